"""Quick candidate plans that give the exact search a first cutoff (an upper bound on the optimum).

Uniform plans: K stages of world / K replicas each, blocks split to minimise the largest stage time
(a min-max partition over the search's stage time bounds, with the microbatches each stage holds by
its place). Each one is evaluated exactly; none is claimed optimal.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from .cost import evaluate, stage_ranges
from .pareto import SuffixSearch


class UniformPlan(NamedTuple):
    """A feasible uniform plan: its analytic step time and stages (last blocks, replica counts)."""

    step_time: float
    lasts: list[int]
    replicas: list[int]


def uniform_candidates(
    search: SuffixSearch, stage_counts: list[int], cap: float = math.inf
) -> list[UniformPlan]:
    """The feasible uniform plans of one search that may be faster than `cap`."""
    problem = search.problem
    world, num_blocks = problem.world_size, len(problem.blocks)
    out = []
    for count in stage_counts:
        if world % count or world // count not in search.replicas or count > num_blocks:
            continue
        bounds = search.bounds  # built only for a slice with a uniform stage count (zero bubble: one count)
        ri = search.replicas.index(world // count)
        # T >= (K + P - 1) * the mean stage time >= (K + P - 1) / K * the summed block times (split backwards:
        # T >= P max t_s >= P / K * the summed block times).
        stretch = search.p if search.split else count + search.p - 1
        if stretch / count * float(bounds.block[:, ri].sum()) > cap:
            continue
        lasts = _min_max_partition(search, ri, count)
        if lasts is None:
            continue
        replicas = [world // count] * count
        result = evaluate(problem, stage_ranges(lasts), replicas, search.p, search.schedule, search.model)
        if result is not None:
            out.append(UniformPlan(result[0], lasts, replicas))
    return out


def _min_max_partition(search: SuffixSearch, ri: int, count: int) -> list[int] | None:
    """Last blocks of `count` contiguous stages minimising the largest stage time bound."""
    bounds = search.bounds
    num_blocks = bounds.num_blocks
    plain, again = bounds.plain[ri], bounds.again[ri]
    fits, fits_again = bounds.fits[ri], bounds.fits_again[ri]
    best = np.full(num_blocks + 1, math.inf)
    best[num_blocks] = 0.0
    choices = []
    time, level = plain, -1
    for n in range(1, count + 1):
        inflight = search.inflight(n)
        if inflight != level:
            time = np.where(inflight <= fits, plain, np.where(inflight <= fits_again, again, np.inf))
            level = inflight
        value = np.maximum(time, best[None, 1:])  # [b][j]: stage b..j, then n - 1 stages from j + 1
        pick = value.argmin(axis=1)
        best = np.append(value[np.arange(num_blocks), pick], math.inf)
        choices.append(pick)
    if not np.isfinite(best[0]):
        return None
    lasts, b = [], 0
    for n in range(count, 0, -1):
        j = int(choices[n - 1][b])
        lasts.append(j)
        b = j + 1
    return lasts if b == num_blocks else None
