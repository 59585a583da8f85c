"""Pareto dynamic programme over stage suffixes for one slice of the search (a microbatch count and a schedule).

This is the stage-level step of RaNNC's partitioning (Tanaka et al., IPDPS 2021: phase (c), a dynamic programme
over the blocks in topological order that chooses the stage boundaries and the devices of every stage), made
exact. RaNNC keeps one (max forward, max backward) pair per state, a heuristic; here a state keeps every suffix
that could still be part of the best plan, its Pareto front over (sum t, max t, max AR).

A state is (k, b, d): the last k stages cover blocks b.. on the last d ranks (ranks are assigned
contiguously in pipeline order, so the suffix starts at rank offset world - d). With gpus_per_node
and a slower inter-node link each state keeps up to three lists, by how its first stage's input is
charged (`InputLink`).

Recompute needs no state: a stage recomputes exactly when it does not fit in memory otherwise (a
recomputed stage is never faster, and memory is checked per stage).

One run (`SuffixSearch.run`) builds the suffixes layer by layer, k = 1, 2, ...:

1. `_Run.extend`: in front of every kept (k-1)-stage suffix, every new first stage (first block, replica
   count): `_stage_time` prices it (its memory decides recompute), `_placement` says which links its
   transfers and allreduce use at each rank offset the stages before may leave it, and `_attach` puts it in
   front of the suffix's entries, dropping what a lower bound on the whole plan puts above the cutoff.
2. `_Run.keep`: per state, the Pareto front (`pareto_front`), or with a beam its few best entries.
3. The entries covering every block on every rank are plans; a stage count the problem allows lowers the
   cutoff to the best of them.
"""

from __future__ import annotations

import enum
import math
from typing import NamedTuple

from .bounds import PrefixBounds, whole_of_parts
from .cost import SEND_WINDOW, CostModel
from .front import TIE, Entry, pareto_front, triple
from .slices import SearchSlice
from .types import ShardLevel

# Slack for sums of the same values taken in another order (rounding), in bound-based breaks.
ROUNDING = 1e-12


class InputLink(enum.IntEnum):
    """How a suffix's first stage receives its inputs (an index into a state's lists)."""

    OWN = 0  # inside one node, inputs over the inter-node link (or the pipeline's first stage)
    SPAN = 1  # spanning nodes: inter-node inputs
    JOINED = 2  # inside the node of the stage before it: intra-node inputs


_TERMINAL = Entry(0.0, 0.0, 0.0, -1, 0, None)
# Entry(...) without the named tuple's own __new__ (a Python call): the search makes hundreds of thousands
_entry = tuple.__new__
Lists = list[list[Entry]]  # a state's entries by InputLink


class SuffixSearch(SearchSlice):
    """The Pareto dynamic programme over suffixes of one slice (see the module's steps)."""

    _bounds: PrefixBounds | None = None  # built when first needed, dropped by `release`
    states = 0  # states expanded by the last run (for profiling)

    @property
    def bounds(self) -> PrefixBounds:
        if self._bounds is None:
            self._bounds = PrefixBounds(self)
        return self._bounds

    def release(self) -> None:
        """Drop the bounds, rebuilt when needed again, so that searches waiting their turn hold no memory of their
        own: on a 1024-rank problem one search's tables take several MiB, and there is one search per microbatch
        count and schedule (the tables they share stay in `StageTables.shared`, which keeps a few)."""
        self._bounds = None

    def lower_bound(self, stage_counts: list[int], cutoff: float = math.inf) -> float:
        """A lower bound on the step time of every candidate with these microbatches (it may stop
        refining once above the cutoff)."""
        if self._bounds is None:  # without building this slice's bounds when another slice made their parts
            parts = self.tables.whole_parts.get(PrefixBounds.whole_key(self))
            if parts is not None:
                return whole_of_parts(parts, self.weight, stage_counts)
        return self.bounds.whole(stage_counts, cutoff)

    def entry_time(self, entry: Entry) -> float:
        """The step time T of the plan an entry covering every block and rank stands for."""
        return self.step_time(entry.time_sum, entry.time_max, entry.allreduce_max)

    def run(self, stage_counts: list[int], cutoff: float, beam: int = 0) -> dict[int, list[Entry]]:
        """Pareto entries of every plan with an allowed stage count whose step time may be <= cutoff.

        Arguments: `stage_counts` the allowed stage counts, `cutoff` the step time no plan returned may
        exceed (its bound), `beam` > 0 to keep only the `beam` most promising entries per state: a quick
        heuristic whose results are real candidates (an upper bound), not the exact optimum.
        Returns: stage count -> entries of plans covering every block on every rank (`suffix_key` reads one).
        """
        if not self.replicas:
            return {s: [] for s in stage_counts}
        run = _Run(self, stage_counts, cutoff)
        world, num_blocks = self.problem.world_size, len(self.problem.blocks)
        below: dict[int, list[tuple[int, Lists]]] = {num_blocks: [(0, [[_TERMINAL], [], []])]}
        finals: dict[int, list[Entry]] = {}
        self.states = 0
        for k in range(1, max(stage_counts) + 1):
            candidates = run.extend(k, below)
            self.states += len(candidates)
            layer = run.keep(candidates, beam)
            finals[k] = layer.get(0, {}).get(world, [[]])[InputLink.OWN]
            if k in stage_counts:
                for entry in finals[k]:
                    run.cutoff = min(run.cutoff, relaxed(self.entry_time(entry)))
            below = {c: sorted(by_d.items()) for c, by_d in layer.items() if c > 0}
            if not below:
                break
        return {s: finals.get(s, []) for s in stage_counts}


class _Stage(NamedTuple):
    """A new first stage (blocks b..j on r ranks) priced for one layer, its placement still open."""

    first: int  # b
    last: int  # j
    replicas: int  # r
    time: float  # compute seconds per microbatch (a recomputed forward included)
    comm: tuple[float, float, float, float]  # p2p seconds: inputs intra, inter; outputs intra, inter
    allreduce: tuple[float, float]  # AR seconds within a node, across nodes
    gather: tuple[float, float] = (0.0, 0.0)  # ZeRO-3 gathers per microbatch, replicas within a node / across
    weight2: float = 0.0  # split backwards: 2 W_s, taken off the summed part and added to the end


class _Run:
    """One run of the dynamic programme: what it reads for every layer, and its cutoff (which only falls)."""

    def __init__(self, search: SuffixSearch, stage_counts: list[int], cutoff: float) -> None:
        problem, tables = search.problem, search.tables
        self.search = search
        self.cutoff = cutoff
        self.stage_counts = stage_counts
        self.most = max(stage_counts)
        self.world, self.num_blocks = problem.world_size, len(problem.blocks)
        bounds = search.bounds
        bounds.prepare(cutoff)
        self.bounds = bounds
        # allowed[k][b][o] == "1": a suffix of k stages from block b may start at rank o (as strings from the bits
        # of `offsets` when layer k is extended: a run that prunes early reads few layers).
        self.offsets = bounds.allowed_offsets(stage_counts)
        self.allowed: dict[int, list[str]] = {}
        self.limit = problem.memory_limit_bytes
        self.recompute = problem.allow_recompute and self.limit is not None
        # Replicated stages may shard (plan/sharding.py); none_first: unsharded is the first level tried.
        self.shards = problem.shard_levels != (ShardLevel.NONE,)
        self.none_first = problem.shard_levels[0] == ShardLevel.NONE
        self.window = min(search.p, SEND_WINDOW)  # microbatches whose sends the runtime holds at most
        self.split_backward = search.split
        self.node = problem.gpus_per_node
        self.spread = self.node is not None  # placement decides the links
        # Only a different inter-node link makes the lists by InputLink differ.
        self.split = self.spread and (
            (problem.inter_node_bandwidth not in (None, problem.p2p_bandwidth))
            or (problem.inter_node_latency not in (None, problem.p2p_latency))
        )
        self.columns = [tables.lists(m) for m in search.sizes]
        self.bases = [tables.base_columns(r) for r in search.replicas]
        self.ends = [tables.step_end_columns(r) for r in search.replicas]
        self.ar_intra = [tables.allreduce_columns(r, False) for r in search.replicas]
        self.ar_inter = (
            [tables.allreduce_columns(r, True) for r in search.replicas] if self.spread else self.ar_intra
        )

    # ---- step 1: new first stages in front of the kept suffixes -------------------------------------------

    def extend(
        self, k: int, below: dict[int, list[tuple[int, Lists]]]
    ) -> dict[tuple[int, int, int], list[Entry]]:
        """Every k-stage suffix that may lead to a plan under the cutoff, by state (b, d, InputLink).

        Arguments: `below` the kept (k-1)-stage suffixes: first block c -> [(ranks d, lists by InputLink)],
        ranks ascending (c = number of blocks: the empty suffix).
        Returns: the candidates of layer k, not yet reduced to their Pareto fronts.
        """
        search = self.search
        inflight, pending = search.inflight(k), search.pending(k)
        self.allowed[k] = [bin(bits)[:1:-1].ljust(self.world + 1, "0") for bits in self.offsets[k]]
        # Stages before this suffix hold at least this many microbatches.
        level = self.bounds.level_tables(search.inflight(k + 1))
        stage_cap = self.cutoff * (1 + ROUNDING) / search.p
        candidates: dict[tuple[int, int, int], list[Entry]] = {}
        for c, groups in below.items():
            j = c - 1
            for ri in range(len(search.replicas)):
                column = self.columns[ri][j]
                for b in range(j, -1, -1):
                    if column[b][0] + column[b][1] > stage_cap:  # forward + backward alone are too slow
                        if self.bounds.monotone:
                            break  # and so is every stage that starts earlier
                        continue
                    stage = self._stage_time(inflight, pending, ri, b, j)
                    if stage is not None:
                        self._place(k, stage, groups, c == self.num_blocks, level, candidates)
        return candidates

    def _stage_time(self, inflight: int, pending: int, ri: int, b: int, j: int) -> _Stage | None:
        """Blocks b..j on replicas[ri] ranks holding `inflight` microbatches (and, with split backwards, the
        deferred gradients of `pending`): its compute time per microbatch, with recompute exactly when it must to
        fit in memory; None when it does not fit."""
        f, bw, act, in_b, out_b, cin, cinx, cout, coutx, io, wgt, dfr = self.columns[ri][j][b]
        fb = f + bw
        r = self.search.replicas[ri]
        shards = self.shards and r > 1  # this stage may shard its parameter state
        if shards and not self.none_first:
            return self._sharded_stage(inflight, pending, r, b, j)
        if self.limit is None:
            time = fb
        else:
            base = self.bases[ri][j][b]
            if self.ends[ri][j][b] > self.limit:  # the optimizer step does not fit
                return self._sharded_stage(inflight, pending, r, b, j) if shards else None
            window = self.window  # cost.sent_bytes, in cost.stage's order (cost.split_memory when split)
            sent = window * in_b + min(self.search.p, inflight + 1) * out_b
            again_sent = window * in_b + window * out_b
            if pending:
                plain = base + act * inflight + dfr * pending + io + sent
                again = base + in_b * inflight + (act + dfr) * pending + io + again_sent
            else:
                plain = base + act * inflight + io + sent
                again = base + in_b * inflight + act + io + again_sent
            if plain <= self.limit:
                time = fb
            # a sharded level may fit (`CostModel.fitting` chooses between it and recompute)
            elif shards:
                return self._sharded_stage(inflight, pending, r, b, j)
            elif self.recompute and again <= self.limit:
                time = f + (bw + f)
            else:
                return None
        allreduce = (self.ar_intra[ri][j][b], self.ar_inter[ri][j][b])
        weight2 = 2.0 * wgt if pending else 0.0
        return _Stage(b, j, r, time, (cin, cinx, cout, coutx), allreduce, weight2=weight2)

    def _sharded_stage(self, inflight: int, pending: int, r: int, b: int, j: int) -> _Stage | None:
        """`_stage_time` where the stage's replicas may shard its parameter state: the cost model's choice
        (`CostModel.fitting`), priced for both links of its replicas (gathers and step end)."""
        model, p = self.search.model, self.search.p
        key = (p, inflight, pending, r, b, j)
        priced = self.search.tables.sharded_stages
        if key in priced:
            return priced[key]
        priced[key] = stage = self._price_sharded(model, p, inflight, pending, r, b, j)
        return stage

    def _price_sharded(
        self, model: CostModel, p: int, inflight: int, pending: int, r: int, b: int, j: int
    ) -> _Stage | None:
        cost = model.fitting(b, j, r, p, inflight, pending=pending)
        if cost is None:
            return None
        f, _, _, _, _, cin, cinx, cout, coutx, *_ = self.columns[self.search.replicas.index(r)][j][b]
        spanning = model.stage(
            b, j, r, p, inflight, cost.recompute, (False, False, True), cost.shard, pending
        )
        gather = (cost.comm - (cin + cout), spanning.comm - (cin + cout))
        allreduce = (cost.allreduce, spanning.allreduce)
        weight2 = 2.0 * cost.bwd_weight if pending else 0.0
        return _Stage(b, j, r, cost.fwd + cost.bwd, (cin, cinx, cout, coutx), allreduce, gather, weight2)

    def _place(
        self,
        k: int,
        stage: _Stage,
        groups: list[tuple[int, Lists]],
        terminal: bool,
        level: tuple[list, list],
        candidates: dict[tuple[int, int, int], list[Entry]],
    ) -> None:
        """`stage` in front of every group of suffixes on d ranks (ascending), at rank offset
        o = world - d - r, while the stages before it (blocks 0..b-1 on ranks 0..o-1) can still make a plan
        under the cutoff."""
        b, r = stage.first, stage.replicas
        pre_sum, pre_u = level
        sums_b, maxes_b, us_b = pre_sum[b], self.bounds.pre_max[b], pre_u[b]
        allowed_b = self.allowed[k][b]
        before_cap = min(b, self.most - k)
        weight, cutoff, monotone = self.search.weight, self.cutoff, self.bounds.monotone
        cin, cinx, cout, coutx = stage.comm
        ar_intra, ar_inter = stage.allreduce
        # Least t and AR of this stage whatever its placement: with the bounds on the stages before, which only
        # grow as their ranks shrink, they stop the loop over groups (more ranks for the suffix, fewer before).
        # Split backwards: its summed part max(t - 2W, 0) and end AR + 2W (`cost.split_path`, `split_tail`).
        gather_intra, gather_inter = stage.gather
        t_least = (stage.time + (gather_intra if gather_intra < gather_inter else gather_inter)) + (
            (cin if cin < cinx else cinx) + (cout if cout < coutx else coutx)
        )
        ar_least = ar_intra if ar_intra < ar_inter else ar_inter
        w2 = stage.weight2
        path_least = t_least
        if self.split_backward:
            path_least = max(t_least - w2, 0.0)
            ar_least = ar_least + w2
        for dc, lists in groups:
            o = self.world - dc - r
            if o < 0:
                break
            floor, before_max, before_u = sums_b[o], maxes_b[o], us_b[o]
            bx = t_least if t_least > before_max else before_max
            z = weight * bx + ar_least
            if path_least + floor + (z if z > before_u else before_u) > cutoff and monotone:
                break
            if allowed_b[o] != "1":
                continue
            before = before_cap if before_cap < o else o
            inputs, outputs, spans = self._placement(o, r, terminal, lists, stage.comm)
            ar = ar_inter if spans else ar_intra
            compute = stage.time + (gather_inter if spans else gather_intra)
            bound = _PrefixBound(floor, before_max, before_u, 1.0 / (k + before))
            for kind, in_comm in inputs:
                key = (b, self.world - o, kind)
                for children, out_comm in outputs:
                    if children:
                        t = compute + (in_comm + out_comm)
                        if self.split_backward:
                            terms = (t, max(t - w2, 0.0), ar + w2)
                        else:
                            terms = (t, t, ar)
                        self._attach(k, stage, terms, children, bound, key, candidates)

    def _placement(
        self, o: int, r: int, terminal: bool, lists: Lists, comm: tuple[float, float, float, float]
    ) -> tuple[tuple[tuple[InputLink, float], ...], tuple[tuple[list[Entry], float], ...], bool]:
        """Where a stage on ranks o..o+r-1 sends and receives: its input charges (InputLink of the new state, p2p
        seconds), the suffix lists it may precede with its output charge, and whether it spans nodes (its
        allreduce then crosses them)."""
        cin, cinx, cout, coutx = comm
        node = self.node
        spans = self.spread and o // node != (o + r - 1) // node  # type: ignore[operator]
        if not self.split:
            return ((InputLink.OWN, cin),), ((lists[InputLink.OWN], cout),), spans
        if o == 0:
            inputs: tuple[tuple[InputLink, float], ...] = ((InputLink.OWN, cin),)
        elif spans:
            inputs = ((InputLink.SPAN, cinx),)
        elif o % node:  # type: ignore[operator]
            inputs = ((InputLink.OWN, cinx), (InputLink.JOINED, cin))
        else:
            inputs = ((InputLink.OWN, cinx),)
        if terminal:
            outputs = ((lists[InputLink.OWN], cout),)
        elif not spans and (o + r) % node:  # type: ignore[operator]
            outputs = ((lists[InputLink.JOINED], cout), (lists[InputLink.SPAN], coutx))
        else:
            outputs = ((lists[InputLink.OWN], coutx), (lists[InputLink.SPAN], coutx))
        return inputs, outputs, spans

    def _attach(
        self,
        k: int,
        stage: _Stage,
        terms: tuple[float, float, float],
        children: list[Entry],
        bound: _PrefixBound,
        key: tuple[int, int, int],
        candidates: dict[tuple[int, int, int], list[Entry]],
    ) -> None:
        """The entries of `stage` in front of `children` (sorted by summed time) whose plans may stay under the
        cutoff, added to candidates[key]. `terms`: the stage's t (seconds per microbatch), its term of the
        summed part (t, or max(t - 2W, 0) with split backwards) and of the step's end (AR, or AR + 2W)."""
        t, path, ar = terms
        weight, cutoff = self.search.weight, self.cutoff
        floor = bound.floor
        # Bound the whole group by its first (least summed) child first.
        if bound.above(children[0].time_sum + path + floor, t, ar, weight, cutoff):
            return
        bucket = None
        # Children whose largest t and AR this stage covers all give (sum + t, t, ar): the first one beats the rest
        # clearly (by more than the tie tolerance, so that _pareto would drop them too), near-ties aside.
        covered = -1.0
        for child in children:
            a = child.time_sum + path
            x = child.time_max
            y = child.allreduce_max
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
            if bound.above(a + floor, x, y, weight, cutoff):
                continue
            if bucket is None:
                bucket = candidates.get(key)
                if bucket is None:
                    bucket = candidates[key] = []
            bucket.append(_entry(Entry, (a, x, y, stage.last, stage.replicas, child if k > 1 else None)))

    # ---- step 2: the Pareto front of every state ---------------------------------------------------------

    def keep(
        self, candidates: dict[tuple[int, int, int], list[Entry]], beam: int
    ) -> dict[int, dict[int, Lists]]:
        """Per state, the candidates no other one beats whatever the stages before (`pareto_front`); with `beam` only
        its `beam` best. Returns: first block b -> ranks d -> lists by InputLink."""
        weight = self.search.weight
        layer: dict[int, dict[int, Lists]] = {}
        for (b, d, kind), found in candidates.items():
            kept = pareto_front(found, weight)
            if beam and len(kept) > beam:
                best = sorted(kept, key=self.search.entry_time)[:beam]
                kept = sorted(best, key=triple)
            lists = layer.setdefault(b, {}).setdefault(d, [[], [], []])
            lists[kind] = kept
        return layer


class _PrefixBound(NamedTuple):
    """Lower bounds on the stages before a suffix at one rank offset (bounds.py), to prune with."""

    floor: float  # their summed t
    before_max: float  # their largest t
    before_u: float  # their largest (P - 1) t + AR
    mean_div: float  # 1 / (stage count of the whole plan at the least): the mean stage time bounds max t

    def above(
        self, total: float, time_max: float, allreduce_max: float, weight: float, cutoff: float
    ) -> bool:
        """Whether every plan ending in a suffix of summed time `total` (these stages' floor included), largest
        t `time_max` and largest AR `allreduce_max` takes longer than `cutoff`:
        T >= total + max(weight x max(time_max, before_max, total x mean_div) + allreduce_max, before_u)."""
        bx = time_max if time_max > self.before_max else self.before_max
        mean = total * self.mean_div
        if mean > bx:
            bx = mean
        z = weight * bx + allreduce_max
        return total + (z if z > self.before_u else self.before_u) > cutoff


def relaxed(total: float) -> float:
    """Cutoff that keeps every candidate within the tie tolerance of `total`."""
    return total + 1e3 * TIE * abs(total)
