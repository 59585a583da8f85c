"""Stage cost tables over every block range at once (numpy), bit-identical to `CostModel.row`.

Every value is computed with the same IEEE operations in the same order as the scalar cost model
(sequential running sums from the first block of the range), so the search and `evaluate` agree
exactly. Entries below the diagonal (last block < first block) are meaningless.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np

from .cost import CostModel, allreduce_link, held_bytes, p2p_link, update_seconds_per_byte
from .sharding import GATHERED_UNITS, stage_levels
from .types import ShardLevel

# Bound tables kept at once (see `Recent`): on a 1024-rank problem one slice's stage arrays take about 13 MiB.
KEPT_BOUND_TABLES = 4
# Level tables kept at once (bounds.PrefixBounds: its base level's arrays, level tables of 2 x 1.2 MiB on 1024 ranks,
# the prefix maxima).
KEPT_LEVEL_TABLES = 12

# Fields of a compute table, in order.
# wgt: seconds of bwd spent on parameter gradients (a split backward's W pass); dfr: the gradients one microbatch
# keeps from its I pass to its W pass.
FIELDS = (
    "fwd",
    "bwd",
    "act",
    "in",
    "out",
    "in_intra",
    "in_inter",
    "out_intra",
    "out_inter",
    "io",
    "wgt",
    "dfr",
)


class StageTables:
    """Cached (L, L) arrays of one problem: [first][last] -> value."""

    def __init__(self, model: CostModel) -> None:
        self.model = model
        problem = model.problem
        self.num_blocks = num_blocks = len(problem.blocks)
        index = np.arange(num_blocks)
        self._upper = index[None, :] >= index[:, None]
        self._params = np.array(problem.range_param_bytes, dtype=np.float64).reshape(num_blocks, num_blocks)
        self._in = np.array(problem.range_in_bytes_per_sample, dtype=np.float64).reshape(
            num_blocks, num_blocks
        )
        self._out = np.array(problem.range_out_bytes_per_sample, dtype=np.float64).reshape(
            num_blocks, num_blocks
        )
        upper = self._upper
        self.boundaries_nonnegative = bool((self._in[upper] >= 0).all() and (self._out[upper] >= 0).all())
        self._compute: dict[int, dict[str, np.ndarray]] = {}
        self._lists: dict[int, list[list[list[float]]]] = {}
        self._base: dict[int | str, np.ndarray] = {}
        self._allreduce: dict[tuple[int, bool], np.ndarray] = {}
        self._columns: dict[int, list[list[float]]] = {}
        # Per (replica counts, sizes): arrays of the bounds; per kind, slice level and cutoff: bounds.PrefixBounds'
        # tables. The slices of one microbatch count (every zero bubble depth, every schedule) share them and often
        # run in turn.
        self.shared: Recent = Recent(KEPT_BOUND_TABLES)
        self.levels: Recent = Recent(KEPT_LEVEL_TABLES)
        # (P, in flight, pending, replicas, first, last) -> a stage the search priced with sharding allowed
        # (pareto._Run._sharded_stage): zero bubble's slices of every depth price the same stages again.
        self.sharded_stages: dict[tuple[int, int, int, int, int, int], Any] = {}
        self.whole_parts: dict[tuple, tuple[float, float]] = {}  # bounds.PrefixBounds.whole, per level

    def _running(self, values: list[float]) -> np.ndarray:
        """[i][j] = values[i] + ... + values[j] summed left to right (as CostModel.row does)."""
        spread = np.where(self._upper, np.array(values, dtype=np.float64)[None, :], 0.0)
        return np.cumsum(spread, axis=1)

    def _p2p(self, nbytes: np.ndarray, inter: bool) -> np.ndarray:
        latency, bandwidth = p2p_link(self.model.problem, inter)
        return np.where(nbytes == 0, 0.0, 2 * (latency + nbytes / bandwidth))

    def compute(self, m: int) -> dict[str, np.ndarray]:
        """Per range at microbatch size m: the FIELDS (p2p times count forward and backward)."""
        table = self._compute.get(m)
        if table is None:
            fwd, bwd, act = self.model.block_values(m)
            weight, deferred = self.model.split_values(m)
            in_bytes = self._in * m
            out_bytes = self._out * m
            block_ws = np.array(self.model.workspace_values(m), dtype=np.float64)[None, :]
            running_act = self._running(act)
            offset = self._params - running_act  # as CostModel.row: params(i..j) - act(i..j)
            reach = np.maximum.accumulate(np.where(self._upper, block_ws - offset, -np.inf), axis=1)
            workspace = np.where(self._upper & self.model.has_workspace, reach + offset, 0.0)
            table = {
                "fwd": self._running(fwd),
                "bwd": self._running(bwd),
                "act": running_act,
                "in": in_bytes,
                "out": out_bytes,
                "in_intra": self._p2p(in_bytes, False),
                "in_inter": self._p2p(in_bytes, True),
                "out_intra": self._p2p(out_bytes, False),
                "out_inter": self._p2p(out_bytes, True),
                "io": held_bytes(in_bytes, out_bytes, workspace),
                "wgt": self._running(weight),
                "dfr": self._running(deferred),
            }
            self._compute[m] = table
        return table

    def lists(self, m: int) -> list[list[list[float]]]:
        """compute(m) as nested lists [last][first][field], first <= last (columns, for the search's inner
        loops)."""
        nested = self._lists.get(m)
        if nested is None:
            table = self.compute(m)
            stacked = np.stack([table[name].T for name in FIELDS], axis=-1)
            nested = _triangle(stacked)
            self._lists[m] = nested
        return nested

    def base(self, replicas: int) -> np.ndarray:
        """Parameter, gradient and optimizer bytes (and the step's user inputs) per rank of every range on
        `replicas` ranks."""
        problem = self.model.problem
        shards = replicas if problem.zero_optimizer else 1
        table = self._base.get(shards)
        if table is None:
            table = self._params * (2 + problem.opt_param_factor / shards) + problem.input_bytes
            self._base[shards] = table
        return table

    def step_end(self, replicas: int) -> np.ndarray:
        """Parameter state + optimizer step temporaries per rank of every range on `replicas` ranks."""
        problem = self.model.problem
        shards = replicas if problem.zero_optimizer else 1
        key = -1 - shards
        table = self._base.get(key)
        if table is None:
            per_param, per_largest = problem.optimizer_transient
            largest = (
                np.array(problem.range_largest_param_bytes, dtype=np.float64).reshape(self._params.shape)
                if problem.range_largest_param_bytes
                else np.zeros_like(self._params)
            )
            updated = self._params / shards
            if problem.optimizer_chunk_bytes > 0:  # as cost.optimizer_transient_bytes
                updated = np.minimum(updated, np.maximum(problem.optimizer_chunk_bytes, largest))
            transient = updated * per_param + largest * per_largest
            if not per_param and not per_largest:
                transient = np.zeros_like(self._params)
            table = self._base[key] = self.base(replicas) + transient
        return table

    def step_end_columns(self, replicas: int) -> list[list[float]]:
        """step_end(replicas) as nested lists [last][first], first <= last."""
        shards = replicas if self.model.problem.zero_optimizer else 1
        key = -(10**6) - shards
        nested = self._columns.get(key)
        if nested is None:
            nested = self._columns[key] = _triangle(self.step_end(replicas).T)
        return nested

    def allreduce(self, replicas: int, inter: bool) -> np.ndarray:
        """End-of-step seconds (allreduce + optimizer update) of every range on `replicas` ranks."""
        key = (replicas, inter)
        table = self._allreduce.get(key)
        if table is None:
            problem = self.model.problem
            per_byte = update_seconds_per_byte(problem, replicas)
            if replicas == 1:
                table = np.zeros_like(self._params) + self._params * per_byte
            else:
                latency, bandwidth = allreduce_link(problem, inter)
                table = latency + 2 * (replicas - 1) / replicas * self._params / bandwidth
                table = table + self._params * per_byte
            self._allreduce[key] = table
        return table

    def sharded_floors(self, replicas: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Lower bounds, whatever shard level a stage of `replicas` ranks uses (plan/sharding.py), on its
        parameter state (`base`), its state with the optimizer step's temporaries (`step_end`) and its step
        end seconds: P (2 + f) / r bytes and the update of P / r (every level holds and updates at least that)."""
        problem = self.model.problem
        if problem.shard_levels == (ShardLevel.NONE,) or replicas == 1:
            ends = np.minimum(self.allreduce(replicas, False), self.allreduce(replicas, True))
            return self.base(replicas), self.step_end(replicas), ends
        per_param, per_largest = problem.optimizer_transient
        largest = self.largest_param()
        share = self._params / replicas
        base = share * (2 + problem.opt_param_factor) + problem.input_bytes
        stepped = share  # the temporaries cover a chunk at most (cost.sharded_transient_bytes)
        if problem.optimizer_chunk_bytes > 0:
            stepped = np.minimum(share, np.maximum(problem.optimizer_chunk_bytes, largest))
        end = base + stepped * per_param + largest * per_largest
        return base, end, share * problem.update_seconds_per_param_byte

    def level_states(self, replicas: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """(state bytes, step-end bytes) of every range on `replicas` ranks at each shard level a stage may use
        (plan/sharding.py's arithmetic over whole tables; the first is `base`, `step_end` when NONE is allowed)."""
        problem = self.model.problem
        levels = stage_levels(problem, replicas)
        out = []
        params = self._params
        f = problem.opt_param_factor
        whole = replicas if problem.zero_optimizer else 1
        unshared = self.unshardable()
        shard = np.maximum(params - unshared, 0.0)
        optimizer = shard * f / replicas + unshared * f / whole
        updated = shard / replicas + unshared / whole
        per_param, per_largest = problem.optimizer_transient
        largest = self.largest_param()
        stepped = updated  # as cost.sharded_transient_bytes
        if problem.optimizer_chunk_bytes > 0:
            stepped = np.minimum(updated, np.maximum(problem.optimizer_chunk_bytes, largest))
        transient = stepped * per_param + largest * per_largest
        for level in levels:
            if level == ShardLevel.NONE:
                out.append((self.base(replicas), self.step_end(replicas)))
                continue
            if level == ShardLevel.ZERO_3:
                held = shard / replicas + unshared
                gathered = np.minimum(GATHERED_UNITS * self.largest_block(), shard)
                state = held + gathered + held + optimizer
                step = held + held + optimizer
            else:
                state = params * 2 + optimizer
                step = (
                    state if level == ShardLevel.ZERO_1 else params + shard / replicas + unshared + optimizer
                )
            out.append((state + problem.input_bytes, step + problem.input_bytes + transient))
        return out

    def largest_param(self) -> np.ndarray:
        """[first][last]: the problem's range_largest_param_bytes (zeros without them), converted once: the memory
        tables of every replica count and microbatch count read it."""
        table = self._base.get("largest_param")
        if table is None:
            problem = self.model.problem
            table = (
                np.array(problem.range_largest_param_bytes, dtype=np.float64).reshape(self._params.shape)
                if problem.range_largest_param_bytes
                else np.zeros_like(self._params)
            )
            self._base["largest_param"] = table
        return table

    def unshardable(self) -> np.ndarray:
        """[first][last]: bytes of the parameters the range shares with blocks outside it."""
        table = self._base.get("unshardable")
        if table is None:
            n = self.num_blocks
            first = np.arange(n)[:, None]
            last = np.arange(n)[None, :]
            table = np.zeros((n, n))
            for nbytes, blocks in self.model.problem.shared_params:
                inside = np.zeros((n, n), dtype=bool)
                for b in blocks:
                    inside |= (first <= b) & (b <= last)
                whole = (first <= min(blocks)) & (last >= max(blocks))
                table += np.where(inside & ~whole, nbytes, 0.0)
            self._base["unshardable"] = table
        return table

    def largest_block(self) -> np.ndarray:
        """[first][last]: the largest parameter bytes of one block of the range."""
        table = self._base.get("largest_block")
        if table is None:
            diagonal = np.diag(self._params)
            table = np.maximum.accumulate(np.where(self._upper, diagonal[None, :], 0.0), axis=1)
            self._base["largest_block"] = table
        return table

    def base_columns(self, replicas: int) -> list[list[float]]:
        """base(replicas) as nested lists [last][first], first <= last."""
        key = -(replicas if self.model.problem.zero_optimizer else 1)
        nested = self._columns.get(key)
        if nested is None:
            nested = _triangle(self.base(replicas).T)
            self._columns[key] = nested
        return nested

    def allreduce_columns(self, replicas: int, inter: bool) -> list[list[float]]:
        """allreduce(replicas, inter) as nested lists [last][first], first <= last."""
        key = 2 * replicas + int(inter)
        nested = self._columns.get(key)
        if nested is None:
            nested = _triangle(self.allreduce(replicas, inter).T)
            self._columns[key] = nested
        return nested


class Recent(OrderedDict):
    """A dict that keeps only its `capacity` most recently stored or read entries (large tables rebuilt on demand,
    so that a search over dozens of slices does not hold all of theirs)."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity

    def get(self, key: Any, default: Any = None) -> Any:
        if key not in self:
            return default
        self.move_to_end(key)
        return self[key]

    def __setitem__(self, key: Any, value: Any) -> None:
        super().__setitem__(key, value)
        self.move_to_end(key)
        while len(self) > self.capacity:
            self.popitem(last=False)


def _triangle(by_last: np.ndarray) -> list:
    """Rows [last][first] of a table as nested lists holding only first <= last, the ranges that exist: half the
    Python floats of the whole square (tens of MiB on a 1024-rank problem)."""
    return [by_last[last, : last + 1].tolist() for last in range(by_last.shape[0])]
