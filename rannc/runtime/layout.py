"""Which global sample rows each stage replica holds in each microbatch."""

from __future__ import annotations

import dataclasses

from ..errors import InputError


def split_sizes(total: int, parts: int) -> list[int]:
    """Near-equal split of `total` into `parts` sizes; the first ones get the remainder."""
    base, extra = divmod(total, parts)
    return [base + (1 if k < extra else 0) for k in range(parts)]


def bounds(total: int, parts: int, start: int = 0) -> list[tuple[int, int]]:
    out, lo = [], start
    for size in split_sizes(total, parts):
        out.append((lo, lo + size))
        lo += size
    return out


def overlap(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int] | None:
    lo, hi = max(a[0], b[0]), min(a[1], b[1])
    return (lo, hi) if lo < hi else None


@dataclasses.dataclass(frozen=True)
class SampleLayout:
    """Rows of the global batch: microbatch i is a contiguous range; a stage's replicas split it in order."""

    global_batch: int
    microbatches: int
    replicas: tuple[int, ...]  # per stage

    def __post_init__(self) -> None:
        smallest = self.global_batch // self.microbatches
        widest = max(self.replicas)
        if smallest < widest:
            raise InputError(
                f"global batch {self.global_batch} is too small for {self.microbatches} microbatches and a stage "
                f"with {widest} replicas (every replica needs at least one sample per microbatch); use a global "
                f"batch of at least {self.microbatches * widest} or re-plan for this batch size"
            )

    def microbatch_rows(self, i: int) -> tuple[int, int]:
        return bounds(self.global_batch, self.microbatches)[i]

    def rows(self, stage: int, microbatch: int, replica: int) -> tuple[int, int]:
        lo, hi = self.microbatch_rows(microbatch)
        return bounds(hi - lo, self.replicas[stage], lo)[replica]

    def pieces(self, producer: int, consumer: int, microbatch: int) -> list[tuple[int, int, tuple[int, int]]]:
        """(producer replica, consumer replica, global rows) for every overlapping pair."""
        out = []
        for jp in range(self.replicas[producer]):
            a = self.rows(producer, microbatch, jp)
            for jc in range(self.replicas[consumer]):
                common = overlap(a, self.rows(consumer, microbatch, jc))
                if common is not None:
                    out.append((jp, jc, common))
        return out
