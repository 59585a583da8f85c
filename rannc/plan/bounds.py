"""Lower bounds for the suffix search: on whole plans (to skip microbatch counts) and on the stages
before a suffix (blocks 0..b-1 on ranks 0..o-1, to prune suffixes).

Every bound holds for every plan of the search space (with any table values), so pruning with them
keeps the search exact. They relax the plan: a stage's time is at least its compute time (with
recompute when even one microbatch in flight does not fit otherwise) plus the cheaper link's p2p
time, and its allreduce at least the cheaper link's. With u_s = (P - 1) t_s + AR_s,

    T = sum t_s + (P - 1) max t_s + max AR_s >= sum t_s + max u_s,

and both terms are bounded over the plans of blocks 0..b-1 that use at most o ranks: the sum by
Lagrangian relaxation of the rank budget (min over plans of sum (t_s + lam r_s), minus lam o), the
largest u_s by thresholds (the fewest ranks with which every u_s <= U is possible).

With split backwards (zero bubble) T = sum max(t_s - 2 W_s, 0) + (P - 1) max t_s + max (AR_s + 2 W_s): the sum
is bounded over the path terms max(t_s - 2 W_s, 0) (`PrefixBounds.path`) and u_s = (P - 1) t_s + AR_s + 2 W_s.
Since each path term is at most t_s and T >= P max t_s still, the other bounds hold as they are.
"""

from __future__ import annotations

from array import array
from typing import NamedTuple

import numpy as np

from .slices import SearchSlice

_BIG = 1 << 40
# Relative slack against rounding differences between these bounds and the search's sums.
_SLACK = 1e-9


class StageBounds(NamedTuple):
    """Per-stage bounds of one slice, shared by the slices with the same replica counts and microbatch sizes;
    arrays [r index][first block][last block] unless said otherwise."""

    plain: np.ndarray  # stage time lower bounds (inf below the diagonal)
    again: np.ndarray  # the same with recompute
    fits: np.ndarray  # most microbatches in flight with which the stage fits
    fits_again: np.ndarray  # the same with recompute
    allreduce: np.ndarray  # end-of-step lower bounds
    block: np.ndarray  # [block][r index]: each block's compute time alone
    monotone: bool  # stage times grow with their blocks and are >= 0 (the search's breaks rely on it)
    weight2: np.ndarray  # 2 W_s: twice the seconds of the stage's W passes (split backwards)
    fits_split: (
        np.ndarray
    )  # `fits` with split backwards: at least one microbatch keeps its deferred gradients
    fits_split_again: np.ndarray  # the same with recompute (and its rebuilt activations)
    fits_all_pending: np.ndarray  # most q with which a split-backward stage fits holding q, all keeping their
    # deferred gradients (a zero bubble pipeline's last stage), with recompute when allowed


class PrefixBounds:
    """Bounds of one (microbatch count, schedule) search; `prepare` builds the tables by (b, o)."""

    def __init__(self, search: SearchSlice) -> None:
        self.search = search
        problem = search.problem
        self.num_blocks = len(problem.blocks)
        self.world = problem.world_size
        self.weight = search.weight
        tables = search.tables
        self.ranks = np.array(search.replicas, dtype=np.int64)
        shared = tables.shared.get(search.shared_key)
        if shared is None:
            shared = tables.shared[search.shared_key] = _stage_arrays(search)
        self.monotone = shared.monotone
        self.block = shared.block
        self.allreduce = shared.allreduce
        self.plain, self.again = shared.plain, shared.again
        self.split = search.split
        self.fits, self.fits_again = shared.fits, shared.fits_again
        if self.split:
            self.fits, self.fits_again = shared.fits_split, shared.fits_split_again
        self.weight2 = shared.weight2
        # Single-level tables: every stage holds at least one microbatch (fill-drain: P).
        self._base_level = search.inflight(1)
        key = ("base", search.shared_key, self.split, self.weight, self._base_level)
        found = tables.levels.get(key)
        if found is None:
            time = self.at_level(self._base_level)
            found = tables.levels[key] = (time, self._path(time), self._u(time))
        self.time, self.path, self.u = found
        self._whole: float | None = None
        self._whole_key = self.whole_key(search)
        self.pre_max: list[array] = []
        self._reach: list[int] | None = None

    # ------------------------------------------------------------------ relaxed plans over blocks

    def at_level(self, inflight: int) -> np.ndarray:
        """Stage time lower bounds when `inflight` microbatches are in flight (inf: does not fit)."""
        return np.where(
            inflight <= self.fits, self.plain, np.where(inflight <= self.fits_again, self.again, np.inf)
        )

    def _u(self, time: np.ndarray) -> np.ndarray:
        finite = np.isfinite(time)
        end = self.allreduce + self.weight2 * (1 - _SLACK) if self.split else self.allreduce
        return np.where(finite, self.weight * np.where(finite, time, 0.0) + end, np.inf)

    def _path(self, time: np.ndarray) -> np.ndarray:
        """Lower bounds on the stages' terms of the summed part: t_s, or max(t_s - 2 W_s, 0) when split."""
        if not self.split:
            return time
        with np.errstate(invalid="ignore"):
            return np.where(np.isfinite(time), np.maximum(time - self.weight2 * (1 + _SLACK), 0.0), time)

    def _fewest_ranks(self, thresholds: np.ndarray, u: np.ndarray | None = None) -> np.ndarray:
        """[g][b]: fewest ranks of a plan of blocks 0..b-1 with every u_s <= thresholds[g]
        (thresholds ascending)."""
        u = self.u if u is None else u
        count, num_blocks = u.shape[0], u.shape[1]
        grid = np.asarray(thresholds, dtype=np.float64)
        # Index of the first threshold each stage meets; the first replica count met by threshold g.
        met = np.searchsorted(grid, u, side="left")  # [r][i][j], len(grid) when never
        first = np.full(
            (len(grid) + 1, num_blocks, num_blocks), count, dtype=np.int16 if count < 30000 else np.int64
        )
        rows, columns = np.indices((num_blocks, num_blocks))
        for ri in range(count - 1, -1, -1):  # the least index met at each threshold wins
            first[met[ri], rows, columns] = ri
        first = first[:-1]
        for g in range(1, len(grid)):  # running minimum over the thresholds (faster than accumulate)
            np.minimum(first[g - 1], first[g], out=first[g])
        least = np.append(self.ranks, _BIG)[first]
        return _chain(least, 0, _BIG)

    def _lagrange(self, lams: np.ndarray, time: np.ndarray | None = None) -> np.ndarray:
        """[l][b]: least sum over stages of (t_s + lams[l] r_s) of a plan of blocks 0..b-1 (`time`: the
        stages' path terms, `self.path` by default)."""
        time = self.path if time is None else time
        out = []
        step = max(1, 400_000 // max(1, time.size))
        for start in range(0, len(lams), step):
            part = lams[start : start + step, None, None, None]
            cost = (time[None] + part * self.ranks[None, :, None, None]).min(axis=1)
            out.append(_chain(cost, 0.0, np.inf))
        return np.concatenate(out)

    def _threshold(self, feasible, top: float, stop: float) -> float:
        """Largest threshold (on two refined grids) under which `feasible` fails, or a value above
        stop; 0 if none."""
        low, high = 0.0, top
        grid = top * np.geomspace(1e-6, 1.0, 64)
        for _ in range(2):
            fits = feasible(grid)
            if (~fits).any():
                low = max(low, float(grid[np.flatnonzero(~fits)[-1]]))
            if fits.any():
                high = min(high, float(grid[np.flatnonzero(fits)[0]]))
            if low > stop or high <= low * (1 + 1e-3):
                break
            grid = np.linspace(low, high, 66)[1:-1] if low > 0 else high * np.geomspace(1e-12, 1.0, 64)[:-1]
        return low

    def whole(self, stage_counts: list[int], cutoff: float = np.inf) -> float:
        """Lower bound on the step time of every plan (all blocks on all ranks); once above the
        cutoff it may stop refining."""
        if self._whole is not None:
            return self._whole
        parts = self.search.tables.whole_parts.get(self._whole_key)
        if parts is None:
            parts = self.search.tables.whole_parts[self._whole_key] = self._whole_parts(cutoff)
        self._whole = whole_of_parts(parts, self.weight, stage_counts)
        return self._whole

    @staticmethod
    def whole_key(search: SearchSlice) -> tuple:
        """What `whole`'s parts depend on: the stage tables and the level only, so that slices of one microbatch
        count holding the same level (zero bubble's of every depth >= P) share them."""
        return search.shared_key, search.split, search.inflight(1)

    def _whole_parts(self, cutoff: float) -> tuple[float, float]:
        """(lower bound on the summed part, on the largest u_s) of every plan; (inf, inf): no plan at all."""
        world = self.world
        finite = self.u[np.isfinite(self.u)]
        top = float(finite.max()) if finite.size else 0.0
        if finite.size == 0 or self._fewest_ranks(np.array([top]))[0, -1] > world:
            return np.inf, np.inf
        # Sum of stage times: the best Lagrange multiplier (the bound is concave in it).
        lams = self._lambda_grid()
        sums = 0.0
        for _ in range(3):
            values = _minus(self._lagrange(lams)[:, -1], lams * world)
            best = int(values.argmax())
            sums = max(sums, float(values.max()))
            lams = np.linspace(lams[max(best - 1, 0)], lams[min(best + 1, len(lams) - 1)], 10)
        # Largest u_s: the largest threshold with which no plan fits in the world.
        largest = self._threshold(lambda grid: self._fewest_ranks(grid)[:, -1] <= world, top, cutoff - sums)
        return sums, largest

    def _lambda_grid(self) -> np.ndarray:
        """Multipliers from far below to above the largest useful one (time per rank)."""
        finite = self.path[np.isfinite(self.path)]
        if not finite.size:
            return np.zeros(1)
        low = max(float(finite.min()) / max(1, int(self.ranks[-1])) * 1e-3, 1e-300)
        high = max(float(finite.max()) * 4, low)
        return np.concatenate([[0.0], np.geomspace(low, high, 24)])

    # ------------------------------------------------------------------ tables for the search

    def prepare(self, cutoff: float) -> None:
        """Tables by (b, o) for the search, for plans of step time <= cutoff (see level_tables)."""
        self._cutoff = cutoff
        self._level_tables: dict[int, tuple[list[array], list[array]]] = {}
        key = ("pre_max", self.search.shared_key)
        found = self.search.tables.levels.get(key)
        if found is None:
            found = self.search.tables.levels[key] = self._prefix_max()
        self.pre_max = found

    def _prefix_max(self) -> list[array]:
        """pre_max[b][o]: a lower bound on the largest stage time of blocks 0..b-1 on o ranks."""
        world = self.world
        offsets = np.arange(world + 1)
        # Largest stage time: rank-seconds per rank and the slowest single block (compute only, so
        # that it bounds every stage containing the block when block times are >= 0).
        ranks, block = self.ranks, self.block
        if not self.monotone:
            block = np.zeros_like(block)
        top_index = np.searchsorted(ranks, offsets, side="right") - 1
        running = np.minimum.accumulate(block, axis=1) if block.size else block
        least = np.where(top_index[None, :] >= 0, running[:, np.maximum(top_index, 0)], np.inf)
        work = np.concatenate([[0.0], np.cumsum((block * ranks[None, :]).min(axis=1))])
        with np.errstate(divide="ignore", invalid="ignore"):
            per_rank = np.where(offsets[None, :] > 0, work[:, None] / np.maximum(offsets, 1)[None, :], 0.0)
        biggest = np.vstack([np.zeros((1, world + 1)), np.maximum.accumulate(least, axis=0)])
        return _rows(np.maximum(per_rank, biggest))

    def level_tables(self, inflight: int) -> tuple[list[array], list[array]]:
        """(pre_sum, pre_u) by (b, o) when every stage before the suffix holds at least `inflight`
        microbatches (1F1B: one more than the suffix's stages, fill-drain: P).

        Made for the largest level of 1, 2, 3, 4, 6, 8, 12, ... (powers of two and 1.5 times them) not above
        `inflight`: stages holding more microbatches fit no better, so those tables bound them too, and a deep
        pipeline's search asks for a few levels instead of one per stage count."""
        if inflight != self._base_level:
            inflight = max(_level_below(inflight), self._base_level)
        found = self._level_tables.get(inflight)
        if found is not None:
            return found
        # What the tables depend on; zero bubble's slices of one microbatch count and every depth >= P share them.
        key = (self.search.shared_key, self.split, self.weight, self._base_level, inflight, self._cutoff)
        found = self.search.tables.levels.get(key)
        if found is not None:
            self._level_tables = {inflight: found}
            return found
        num_blocks, world, cutoff = self.num_blocks, self.world, self._cutoff
        offsets = np.arange(world + 1)
        time = self.time if inflight == self._base_level else self.at_level(inflight)
        u = self._u(time)
        # Stages no plan under the cutoff can contain: too slow on their own.
        if np.isfinite(cutoff):
            useless = (time * (self.weight + 1) > cutoff) | (u > cutoff)
            time = np.where(useless, np.inf, time)
            u = np.where(useless, np.inf, u)
        # Sum: Lagrange multipliers on a geometric grid (and 0).
        sums = np.zeros((num_blocks + 1, world + 1))
        if np.isfinite(time).any():
            lams = self._lambda_grid()
            for lam, h in zip(lams.tolist(), self._lagrange(lams, self._path(time))):
                np.maximum(sums, _lines(h, lam, offsets), out=sums)
        # Largest u_s: thresholds on a grid, fine near the cutoff and coarse below it.
        finite_u = u[np.isfinite(u)]
        pre_u = np.zeros((num_blocks + 1, world + 1))
        if finite_u.size:
            most = float(finite_u.max())
            top = min(most, cutoff)
            points = {top * 0.996**e for e in range(120)} | {top * 0.85**e for e in range(40)} | {most}
            grid = np.array(sorted(points))
            fewest = self._fewest_ranks(grid, u)  # [grid][b], non-increasing along the grid
            for b in range(1, num_blocks + 1):
                # Largest threshold whose fewest ranks exceed o: the prefix's largest u_s is above it.
                above = np.searchsorted(-fewest[:, b], -offsets, side="left")
                pre_u[b] = np.where(above > 0, grid[np.maximum(above - 1, 0)], 0.0)
                # No plan of the prefix at all on o ranks (with every stage that fits allowed).
                pre_u[b][fewest[-1, b] > offsets] = np.inf
        found = (_rows(sums), _rows(pre_u))
        # Only the latest level is kept: a run asks for them in order (level k + 1 for its k-stage
        # suffixes), and each takes (blocks x world) doubles twice, 1.2 MB on 1024 ranks.
        self._level_tables = {inflight: found}
        self.search.tables.levels[key] = found
        return found

    # ------------------------------------------------------------------ stage counts and rank sums

    def reach(self) -> list[int]:
        """reach[n]: bit o set when n allowed replica counts can sum to o (o <= world)."""
        if self._reach is None:
            mask = (1 << (self.world + 1)) - 1
            reach = [1]
            for _ in range(min(self.num_blocks, self.world)):
                previous, bits = reach[-1], 0
                for r in self.search.replicas:
                    bits |= previous << r
                reach.append(bits & mask)
            self._reach = reach
        return self._reach

    def allowed_offsets(self, stage_counts: list[int]) -> list[list[int]]:
        """allowed[k][b]: bit o set when a suffix of k stages from block b may start at rank o, i.e.
        some allowed plan has `before` stages on blocks 0..b-1 and ranks 0..o-1."""
        reach = self.reach()
        counts = set(stage_counts)
        most = max(stage_counts)
        allowed = [[0] * (self.num_blocks + 1) for _ in range(most + 1)]
        for k in range(1, most + 1):
            row = allowed[k]
            row[0] = 1 if k in counts else 0
            bits = 0
            for b in range(1, self.num_blocks + 1):
                if b < len(reach) and k + b in counts:
                    bits |= reach[b]
                row[b] = bits
        return allowed


def split_inflight_limit(search: SearchSlice) -> float:
    """Most microbatches in flight with which a split-backward (zero bubble) plan of this slice's microbatch count
    and replica counts can fit, at any depth: every block lies in some stage that fits holding them with at least
    one microbatch's deferred gradients (`StageBounds.fits_split`, generous), and the last block in a stage that fits
    holding them all with their deferred gradients (`StageBounds.fits_all_pending`: the last stage keeps those of
    min(P, D) microbatches). A zero bubble slice of depth D holds min(P, D) microbatches at every stage, so one whose
    min(P, D) exceeds this has no plan. inf without a limit."""
    shared = search.tables.shared.get(search.shared_key)
    if shared is None:
        shared = search.tables.shared[search.shared_key] = _stage_arrays(search)
    num_blocks = len(search.problem.blocks)
    if not num_blocks or not search.replicas:
        return np.inf
    upper = np.arange(num_blocks)[None, :] >= np.arange(num_blocks)[:, None]
    most = np.maximum(shared.fits_split, shared.fits_split_again).max(axis=0)  # [first][last] over replicas
    most = np.where(upper, most, -np.inf)
    # cover[x] = max over first <= x <= last of most[first][last]: the best stage that can hold block x.
    prefix = np.maximum.accumulate(most, axis=0)  # [x][last]: max over first <= x
    cover = np.where(upper, prefix, -np.inf).max(axis=1)
    last = shared.fits_all_pending[:, :, num_blocks - 1].max()  # over replicas and first blocks
    return float(min(cover.min(), last))


def whole_of_parts(parts: tuple[float, float], weight: float, stage_counts: list[int]) -> float:
    """`PrefixBounds.whole` from its parts (lower bounds on the summed part and on the largest u_s)."""
    sums, largest = parts
    if np.isinf(sums):
        return np.inf  # no plan at all
    mean = weight * sums / max(stage_counts)
    return sums + max(largest, mean)


def _level_below(inflight: int) -> int:
    """The largest of 1, 2, 3, 4, 6, 8, 12, 16, ... (2^k and 3 x 2^k) that is at most `inflight` (>= 1)."""
    if inflight <= 2:
        return max(inflight, 1)
    power = 1 << (inflight.bit_length() - 1)
    return power + power // 2 if inflight >= power + power // 2 else power


def _stage_arrays(search: SearchSlice) -> StageBounds:
    """The StageBounds of one slice."""
    problem, tables = search.problem, search.tables
    num_blocks = len(problem.blocks)
    limit = problem.memory_limit_bytes
    upper = np.arange(num_blocks)[None, :] >= np.arange(num_blocks)[:, None]
    keep = 1 - _SLACK
    sizes, replicas = search.sizes, search.replicas

    def stack(name: str) -> np.ndarray:
        return np.stack([tables.compute(m)[name] for m in sizes]) if sizes else np.zeros((0,) + upper.shape)

    fwd, bwd = stack("fwd"), stack("bwd")
    comm_in = np.minimum(stack("in_intra"), stack("in_inter"))
    if num_blocks:
        comm_in[:, 0, :] = stack("in_intra")[:, 0, :]  # the first stage's inputs come from the user
    comm = (comm_in + np.minimum(stack("out_intra"), stack("out_inter"))) * keep
    # Stage time lower bounds without and with recompute (inf below the diagonal).
    plain = np.where(upper, (fwd + bwd) * keep + comm, np.inf)
    again = np.where(upper, (fwd + (bwd + fwd)) * keep + comm, np.inf)
    # Most microbatches in flight with which a stage fits, without and with recompute.
    fits, fits_again = np.full(plain.shape, np.inf), np.zeros(plain.shape)
    # Lower bounds over the shard levels a stage may use (its own level's when it may not shard).
    floors = [tables.sharded_floors(r) for r in replicas]
    fits_split, fits_split_again = fits, fits_again
    fits_all_pending = fits
    if limit is not None:
        base = np.stack([floor[0] for floor in floors]) if replicas else np.zeros(plain.shape)
        ins, act = stack("in"), stack("act")
        io = stack("io")
        # Generous by far more than rounding, so that the bound never excludes a fit.
        room = limit - base - io + 1e-9 * (abs(limit) + np.abs(base) + np.abs(io))
        # Sends held (cost.sent_bytes), with 1 <= q <= p microbatches in flight: at least one microbatch's input
        # gradients and outputs, and a stage keeping its graphs holds the outputs of q; counting only that keeps
        # the bound generous.
        outs = stack("out")
        end = np.stack([floor[1] for floor in floors]) if replicas else np.zeros(plain.shape)
        room = np.where(end <= limit * (1 + 1e-9), room, -np.inf)  # the optimizer step alone does not fit
        fits = _most_inflight(room - ins, act + outs)
        # Split backwards: at least one microbatch keeps its deferred gradients (and, recomputed, activations).
        deferred = stack("dfr")
        fits_split = _most_inflight(room - ins - deferred, act + outs)
        # q in flight and q pending: q (act + dfr) plus the sends of at least one microbatch and q outputs;
        # recomputed, q (in + act + dfr) plus one microbatch's sends (cost.split_memory, cost.sent_bytes)
        fits_all_pending = _most_inflight(room - ins, act + deferred + outs)
        if problem.allow_recompute:
            fits_again = _most_inflight(room - act - (ins + outs), ins)
            fits_split_again = _most_inflight(room - act - deferred - (ins + outs), ins)
            fits_all_pending = np.maximum(
                fits_all_pending, _most_inflight(room - (ins + outs), ins + act + deferred)
            )
    allreduce = np.zeros(plain.shape)
    if replicas:
        allreduce = np.stack([floor[2] for floor in floors]) * keep
    values = [search.model.block_values(m) for m in sizes]
    block = np.array([np.add(f, b) for f, b, _ in values]).T * keep if values else np.zeros((num_blocks, 0))
    # Stage times grow with their blocks and are >= 0 (the search's breaks rely on it).
    monotone = all(min(f + b, default=0.0) >= 0.0 for f, b, _ in values)
    monotone = monotone and tables.boundaries_nonnegative
    weight2 = 2.0 * stack("wgt")
    return StageBounds(
        plain,
        again,
        fits,
        fits_again,
        allreduce,
        block,
        monotone,
        weight2,
        fits_split,
        fits_split_again,
        fits_all_pending,
    )


def _most_inflight(room: np.ndarray, per_microbatch: np.ndarray) -> np.ndarray:
    """Most microbatches in flight with which room >= per_microbatch * inflight (a little generous)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        most = np.where(per_microbatch > 0, room / per_microbatch, np.where(room >= 0, np.inf, -np.inf))
    return most * (1 + 1e-9) + 1e-9


def _rows(table: np.ndarray) -> list[array]:
    """Rows of a 2-D table as arrays of doubles (cheap to build, Python floats when indexed)."""
    table = np.ascontiguousarray(table, dtype=np.float64)
    return [array("d", row.tobytes()) for row in table]


def _minus(total: np.ndarray, part: np.ndarray) -> np.ndarray:
    """total - part, lowered by more than its rounding error (a lower bound stays one)."""
    with np.errstate(invalid="ignore"):
        lowered = total - part - 1e-12 * (np.abs(total) + np.abs(part))
    return np.where(np.isfinite(total), lowered, total)


def _lines(total: np.ndarray, lam: float, offsets: np.ndarray) -> np.ndarray:
    """[b][o]: `_minus(total[b], lam x offsets[o])` for lam >= 0 and offsets >= 0, lowered as much (by 1e-12 of
    each term, far above the few roundings here) from two vectors instead of the whole table."""
    with np.errstate(invalid="ignore"):
        lowered = np.where(np.isfinite(total), total - 1e-12 * np.abs(total), total)
    return np.subtract.outer(lowered, (lam * (1 + 1e-12)) * offsets)


def _chain(stage: np.ndarray, zero, inf) -> np.ndarray:
    """[g][b]: least over chains 0 = i0 < i1 < ... < b of the sum of stage[g][i][next - 1]."""
    count, num_blocks = stage.shape[0], stage.shape[1]
    best = np.full((count, num_blocks + 1), inf, dtype=stage.dtype)
    best[:, 0] = zero
    for b in range(1, num_blocks + 1):
        best[:, b] = (best[:, :b] + stage[:, :b, b - 1]).min(axis=1)
    return best
