"""The Pareto front of the suffixes one state of the stage search keeps (pareto.py): entries, dominance, ties."""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["TIE", "Entry", "pareto_front", "suffix_key", "triple"]

# Two step times closer than this (relative) count as equal and the tie-break rules decide.
TIE = 1e-12


class Entry(NamedTuple):
    """A Pareto entry: a suffix of stages, as its first stage and the entry of the stages after it."""

    time_sum: float  # sum of the stages' t_s
    time_max: float  # the largest t_s
    allreduce_max: float  # the largest AR_s (gradient allreduce + optimizer update)
    last_block: int  # last block of the first stage
    replicas: int  # replica count of the first stage
    rest: Entry | None  # the stages after the first one (None: no more)


def suffix_key(entry: Entry | None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(last block of every stage, replica count of every stage) of the suffix `entry` stands for."""
    lasts: list[int] = []
    reps: list[int] = []
    while entry is not None:
        lasts.append(entry.last_block)
        reps.append(entry.replicas)
        entry = entry.rest
    return tuple(lasts), tuple(reps)


def pareto_front(candidates: list[Entry], weight: float) -> list[Entry]:
    """Drop candidates that another candidate beats whatever the stages before them.

    e beats c when e.sum + w * (e.max_t - c.max_t)^+ + (e.max_ar - c.max_ar)^+ <= c.sum, since then
    any common prefix gives e a step time no larger than c's; near-ties go to the smaller layout.
    """
    if len(candidates) > 8:
        # Same largest t and AR: only the least sum (and its near-ties) can survive.
        least: dict[tuple[float, float], float] = {}
        for c in candidates:
            pair = (c.time_max, c.allreduce_max)
            known = least.get(pair)
            if known is None or c.time_sum < known:
                least[pair] = c.time_sum
        candidates = [
            c
            for c in candidates
            if c.time_sum
            <= least[(c.time_max, c.allreduce_max)]
            + 3 * TIE * (c.time_sum + weight * c.time_max + c.allreduce_max)
        ]
    candidates.sort(key=triple)
    kept: list[Entry] = []
    for c in candidates:
        a, x, y = c.time_sum, c.time_max, c.allreduce_max
        eps = TIE * (a + weight * x + y)
        beaten = False
        for e in kept:
            margin = e.time_sum
            if e.time_max > x:
                margin += weight * (e.time_max - x)
            if e.allreduce_max > y:
                margin += e.allreduce_max - y
            if margin <= a + eps and (margin < a - eps or _layout_less(e, c)):
                beaten = True
                break
        if beaten:
            continue
        # c can beat an earlier (smaller-sum) entry only in a near-tie.
        while kept and kept[-1].time_sum >= a - eps:
            e = kept[-1]
            margin = a + weight * max(x - e.time_max, 0.0) + max(y - e.allreduce_max, 0.0) - e.time_sum
            if not (margin <= eps and _layout_less(c, e)):
                break
            kept.pop()
        kept.append(c)
    return kept


def triple(entry: Entry) -> tuple[float, float, float]:
    """The sort key of entries in a state: summed, largest and end-of-step times."""
    return entry.time_sum, entry.time_max, entry.allreduce_max


def _layout_less(e: Entry, c: Entry) -> bool:
    """suffix_key(e) < suffix_key(c) for two suffixes of as many stages, without building keys:
    last blocks first, then replica counts; shared tails end the walk."""
    x: Entry | None = e
    y: Entry | None = c
    while x is not None and y is not None and x is not y:
        if x.last_block != y.last_block:
            return x.last_block < y.last_block
        x, y = x.rest, y.rest
    x, y = e, c
    while x is not None and y is not None and x is not y:
        if x.replicas != y.replicas:
            return x.replicas < y.replicas
        x, y = x.rest, y.rest
    return False
