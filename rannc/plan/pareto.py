"""Pareto dynamic programme over stage suffixes for one (microbatch count, schedule) pair.

A state is (k, b, d): the last k stages cover blocks b.. on the last d ranks (ranks are assigned
contiguously in pipeline order, so the suffix starts at rank offset world - d). With gpus_per_node
and a slower inter-node link each state keeps up to three lists, by how its first stage's input is
charged: KIND_OWN (first stage inside one node, input over the inter-node link, or the pipeline's
first stage), KIND_SPAN (first stage spans nodes, inter-node input) and KIND_JOINED (first stage
inside the node of the stage before it, intra-node input).

Recompute needs no state: a stage recomputes exactly when it does not fit in memory otherwise (a
recomputed stage is never faster, and memory is checked per stage).
"""

from __future__ import annotations

import math
import operator

from ..schedule import Schedule
from .bounds import PrefixBounds
from .cost import CostModel, microbatch_rows, replica_counts
from .tables import StageTables
from .types import PlanProblem

# Two step times closer than this (relative) count as equal and the tie-break rules decide.
TIE = 1e-12
# Slack for sums of the same values taken in another order (rounding), in bound-based breaks.
ROUNDING = 1e-12

KIND_OWN, KIND_SPAN, KIND_JOINED = 0, 1, 2

# A Pareto entry for a suffix of stages: (sum t, max t, max AR, last block of its first stage,
# replicas of its first stage, entry of the remaining stages or None).
Entry = tuple[float, float, float, int, int, "Entry | None"]
_TERMINAL: Entry = (0.0, 0.0, 0.0, -1, 0, None)


class SuffixSearch:
    """Pareto dynamic programme over suffixes for one (microbatch count, schedule)."""

    def __init__(
        self,
        problem: PlanProblem,
        model: CostModel,
        microbatches: int,
        schedule: Schedule | str,
        tables: StageTables | None = None,
    ) -> None:
        self.problem = problem
        self.model = model
        self.tables = tables if tables is not None else StageTables(model)
        self.p = microbatches
        self.schedule = Schedule(schedule)
        self.weight = float(microbatches - 1)
        self.replicas = replica_counts(problem, microbatches)
        self.rmax = self.replicas[-1] if self.replicas else 0
        rows = microbatch_rows(problem.global_batch, microbatches)
        self.sizes = [-(-rows // r) for r in self.replicas]
        self._bounds: PrefixBounds | None = None
        self.states = 0  # states expanded by the last run (for profiling)

    @property
    def bounds(self) -> PrefixBounds:
        if self._bounds is None:
            self._bounds = PrefixBounds(self)
        return self._bounds

    @property
    def shared_key(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Key of the bound tables this search shares with others (same replica counts and microbatch sizes)."""
        return tuple(self.replicas), tuple(self.sizes)

    def release(self, keep_shared: bool = False) -> None:
        """Drop the bounds and (unless `keep_shared`) their shared tables, rebuilt when needed again, so that
        searches waiting their turn hold no memory: on a 1024-rank problem one search's tables take several
        MiB, and there is one search per microbatch count and schedule."""
        self._bounds = None
        if not keep_shared:
            self.tables.shared.pop(self.shared_key, None)

    def lower_bound(self, stage_counts: list[int], cutoff: float = math.inf) -> float:
        """A lower bound on the step time of every candidate with these microbatches (it may stop
        refining once above the cutoff)."""
        return self.bounds.whole(stage_counts, cutoff)

    def run(self, stage_counts: list[int], cutoff: float, beam: int = 0) -> dict[int, list[Entry]]:
        """Pareto entries of every allowed stage count whose step time may be <= cutoff.

        With beam > 0 only the `beam` most promising entries of each list are kept: a quick
        heuristic whose results are real candidates (an upper bound), not the exact optimum.
        """
        problem = self.problem
        num_blocks, world = len(problem.blocks), problem.world_size
        if not self.replicas:
            return {s: [] for s in stage_counts}
        bounds = self.bounds
        bounds.prepare(cutoff)
        # allowed[k][b][o] == "1": a suffix of k stages from block b may start at rank o.
        allowed = [
            [bin(bits)[:1:-1].ljust(world + 1, "0") for bits in row]
            for row in bounds.allowed_offsets(stage_counts)
        ]
        pre_max = bounds.pre_max
        limit = problem.memory_limit_bytes
        recompute = problem.allow_recompute and limit is not None
        weight, p = self.weight, self.p
        most = max(stage_counts)
        node = problem.gpus_per_node
        split = node is not None and (
            (problem.inter_node_bandwidth not in (None, problem.p2p_bandwidth))
            or (problem.inter_node_latency not in (None, problem.p2p_latency))
        )
        spread = node is not None
        tables = self.tables
        columns = [tables.lists(m) for m in self.sizes]
        bases = [tables.base_columns(r) for r in self.replicas]
        ends = [tables.step_end_columns(r) for r in self.replicas]
        ar_intra = [tables.allreduce_columns(r, False) for r in self.replicas]
        ar_inter = [tables.allreduce_columns(r, True) for r in self.replicas] if spread else ar_intra
        monotone = bounds.monotone
        below: dict[int, list[tuple[int, list[list[Entry]]]]] = {num_blocks: [(0, [[_TERMINAL], [], []])]}
        finals: dict[int, list[Entry]] = {}
        self.states = 0
        for k in range(1, most + 1):
            inflight = self.schedule.inflight(p, k)
            sends_held = min(p, inflight + 1)  # cost.sent_bytes, per byte of boundary tensors
            # Stages before this suffix hold at least this many microbatches.
            pre_sum, pre_u = bounds.level_tables(self.schedule.inflight(p, k + 1))
            cand: dict[tuple[int, int, int], list[Entry]] = {}
            allowed_k = allowed[k]
            stage_cap = cutoff * (1 + ROUNDING) / p
            for c, children_by_d in below.items():
                j = c - 1
                terminal = c == num_blocks
                for ri, r in enumerate(self.replicas):
                    col = columns[ri][j]
                    base_col = bases[ri][j]
                    end_col = ends[ri][j]
                    ar_col, arx_col = ar_intra[ri][j], ar_inter[ri][j]
                    for b in range(j, -1, -1):
                        f, bw, act, in_b, out_b, cin, cinx, cout, coutx, io = col[b]
                        fb = f + bw
                        if fb > stage_cap:
                            if monotone:
                                break
                            continue
                        if limit is not None:
                            base = base_col[b]
                            if end_col[b] > limit:  # the optimizer step does not fit
                                continue
                            sent = sends_held * (in_b + out_b)  # sums in cost.stage's order
                            if base + act * inflight + io + sent <= limit:
                                ct = fb
                            elif recompute and base + in_b * inflight + act + io + sent <= limit:
                                ct = f + (bw + f)
                            else:
                                continue
                        else:
                            ct = fb
                        allowed_b = allowed_k[b]
                        sums_b, maxes_b, us_b = pre_sum[b], pre_max[b], pre_u[b]
                        before_cap = min(b, most - k)
                        # Least t and AR of this stage whatever its placement: with the bounds on
                        # the stages before, which only grow as their ranks shrink, they stop the
                        # loop over children (more ranks for the children, fewer before).
                        t_least = ct + ((cin if cin < cinx else cinx) + (cout if cout < coutx else coutx))
                        ar_least = ar_col[b] if ar_col[b] < arx_col[b] else arx_col[b]
                        for dc, lists in children_by_d:
                            o = world - dc - r
                            if o < 0:
                                break
                            floor, before_max, before_u = sums_b[o], maxes_b[o], us_b[o]
                            bx = t_least if t_least > before_max else before_max
                            z = weight * bx + ar_least
                            if t_least + floor + (z if z > before_u else before_u) > cutoff and monotone:
                                break
                            if allowed_b[o] != "1":
                                continue
                            before = before_cap if before_cap < o else o
                            # Placement: how this stage's inputs, outputs and allreduce are charged.
                            spans = spread and o // node != (o + r - 1) // node
                            ar = arx_col[b] if spans else ar_col[b]
                            if not split:
                                kinds = ((KIND_OWN, cin),)
                                outs = ((lists[0], cout),)
                            else:
                                if o == 0:
                                    kinds = ((KIND_OWN, cin),)
                                elif spans:
                                    kinds = ((KIND_SPAN, cinx),)
                                elif o % node:
                                    kinds = ((KIND_OWN, cinx), (KIND_JOINED, cin))
                                else:
                                    kinds = ((KIND_OWN, cinx),)
                                if terminal:
                                    outs = ((lists[0], cout),)
                                elif not spans and (o + r) % node:
                                    outs = ((lists[KIND_JOINED], cout), (lists[KIND_SPAN], coutx))
                                else:
                                    outs = ((lists[KIND_OWN], coutx), (lists[KIND_SPAN], coutx))
                            mean_div = 1.0 / (k + before)
                            for kind, in_comm in kinds:
                                key = (b, world - o, kind)
                                bucket = None
                                for children, out_comm in outs:
                                    if not children:
                                        continue
                                    t = ct + (in_comm + out_comm)
                                    # Children are sorted by summed time: bound the whole group first.
                                    least = children[0][0] + t + floor
                                    bx = t if t > before_max else before_max
                                    mean = least * mean_div
                                    if mean > bx:
                                        bx = mean
                                    z = weight * bx + ar
                                    if least + (z if z > before_u else before_u) > cutoff:
                                        continue
                                    # Children whose largest t and AR this stage covers all give
                                    # (sum + t, t, ar): the first one beats the rest clearly (by
                                    # more than the tie tolerance, so that _pareto would drop them
                                    # too), near-ties aside.
                                    covered = -1.0
                                    for child in children:
                                        a = child[0] + t
                                        x = child[1]
                                        y = child[2]
                                        if x <= t and y <= ar:
                                            if covered < 0.0:
                                                covered = a + 4 * TIE * (a + weight * t + ar)
                                            elif a > covered:
                                                continue
                                            x, y = t, ar
                                        else:
                                            if t > x:
                                                x = t
                                            if ar > y:
                                                y = ar
                                        total = a + floor
                                        bx = x if x > before_max else before_max
                                        mean = total * mean_div
                                        if mean > bx:
                                            bx = mean
                                        z = weight * bx + y
                                        if total + (z if z > before_u else before_u) > cutoff:
                                            continue
                                        if bucket is None:
                                            bucket = cand.get(key)
                                            if bucket is None:
                                                bucket = cand[key] = []
                                        bucket.append((a, x, y, j, r, child if k > 1 else None))
            layer: dict[int, dict[int, list[list[Entry]]]] = {}
            for (b, d, kind), candidates in cand.items():
                kept = _pareto(candidates, weight)
                if beam and len(kept) > beam:
                    best = sorted(kept, key=lambda e: e[0] + weight * e[1] + e[2])[:beam]
                    kept = sorted(best, key=_triple)
                by_d = layer.setdefault(b, {})
                lists = by_d.get(d)
                if lists is None:
                    lists = by_d[d] = [[], [], []]
                lists[kind] = kept
            self.states += len(cand)
            finals[k] = layer.get(0, {}).get(world, [[]])[0]
            if k in stage_counts:
                for entry in finals[k]:
                    cutoff = min(cutoff, relaxed(entry[0] + weight * entry[1] + entry[2]))
            below = {c: sorted(by_d.items()) for c, by_d in layer.items() if c > 0}
            if not below:
                break
        return {s: finals.get(s, []) for s in stage_counts}


def relaxed(total: float) -> float:
    """Cutoff that keeps every candidate within the tie tolerance of `total`."""
    return total + 1e3 * TIE * abs(total)


def suffix_key(entry: Entry | None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    lasts: list[int] = []
    reps: list[int] = []
    while entry is not None:
        lasts.append(entry[3])
        reps.append(entry[4])
        entry = entry[5]
    return tuple(lasts), tuple(reps)


def _pareto(candidates: list[Entry], weight: float) -> list[Entry]:
    """Drop candidates that another candidate beats whatever the stages before them.

    e beats c when e.sum + w * (e.max_t - c.max_t)^+ + (e.max_ar - c.max_ar)^+ <= c.sum, since then
    any common prefix gives e a step time no larger than c's; near-ties go to the smaller layout.
    """
    if len(candidates) > 8:
        # Same largest t and AR: only the least sum (and its near-ties) can survive.
        least: dict[tuple[float, float], float] = {}
        for c in candidates:
            pair = (c[1], c[2])
            known = least.get(pair)
            if known is None or c[0] < known:
                least[pair] = c[0]
        candidates = [
            c for c in candidates if c[0] <= least[(c[1], c[2])] + 3 * TIE * (c[0] + weight * c[1] + c[2])
        ]
    candidates.sort(key=_triple)
    key = _layout_less
    kept: list[Entry] = []
    for c in candidates:
        a, x, y = c[0], c[1], c[2]
        eps = TIE * (a + weight * x + y)
        beaten = False
        for e in kept:
            margin = e[0]
            if e[1] > x:
                margin += weight * (e[1] - x)
            if e[2] > y:
                margin += e[2] - y
            if margin <= a + eps and (margin < a - eps or key(e, c)):
                beaten = True
                break
        if beaten:
            continue
        # c can beat an earlier (smaller-sum) entry only in a near-tie.
        while kept and kept[-1][0] >= a - eps:
            e = kept[-1]
            margin = c[0] + weight * max(c[1] - e[1], 0.0) + max(c[2] - e[2], 0.0) - e[0]
            if not (margin <= eps and key(c, e)):
                break
            kept.pop()
        kept.append(c)
    return kept


_triple = operator.itemgetter(0, 1, 2)


def _layout_less(e: Entry, c: Entry) -> bool:
    """suffix_key(e) < suffix_key(c) for two suffixes of as many stages, without building keys:
    last blocks first, then replica counts; shared tails end the walk."""
    x: Entry | None = e
    y: Entry | None = c
    while x is not None and y is not None and x is not y:
        if x[3] != y[3]:
            return x[3] < y[3]
        x, y = x[5], y[5]
    x, y = e, c
    while x is not None and y is not None and x is not y:
        if x[4] != y[4]:
            return x[4] < y[4]
        x, y = x[5], y[5]
    return False
