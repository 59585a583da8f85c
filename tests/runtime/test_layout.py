"""Sample layout: which global rows each stage replica holds in each microbatch, and what moves between stages."""

from __future__ import annotations

import itertools
import random

import pytest

from rannc.errors import InputError
from rannc.runtime.layout import SampleLayout, bounds, overlap, split_sizes


def test_split_sizes_examples() -> None:
    assert split_sizes(10, 3) == [4, 3, 3]
    assert split_sizes(11, 3) == [4, 4, 3]
    assert split_sizes(9, 3) == [3, 3, 3]
    assert split_sizes(2, 4) == [1, 1, 0, 0]
    assert split_sizes(0, 2) == [0, 0]
    assert split_sizes(7, 1) == [7]


def test_split_sizes_are_near_equal_with_the_first_ones_larger() -> None:
    for total in range(0, 60):
        for parts in range(1, 12):
            sizes = split_sizes(total, parts)
            assert len(sizes) == parts
            assert sum(sizes) == total
            assert max(sizes) - min(sizes) <= 1
            assert sizes == sorted(sizes, reverse=True)


def test_bounds_are_contiguous_ranges_from_start() -> None:
    assert bounds(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert bounds(5, 2, start=20) == [(20, 23), (23, 25)]
    for total, parts, start in itertools.product(range(0, 25), range(1, 7), (0, 3, 100)):
        ranges = bounds(total, parts, start)
        assert [hi - lo for lo, hi in ranges] == split_sizes(total, parts)
        assert ranges[0][0] == start and ranges[-1][1] == start + total
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))


def test_overlap() -> None:
    assert overlap((0, 4), (2, 6)) == (2, 4)
    assert overlap((2, 6), (0, 4)) == (2, 4)
    assert overlap((0, 4), (4, 6)) is None
    assert overlap((0, 10), (3, 5)) == (3, 5)


def _combos(seed: int, count: int) -> list[tuple[int, int, tuple[int, ...]]]:
    """(global batch, microbatches, replicas per stage), always valid (batch >= microbatches * widest stage)."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        stages = rng.randint(1, 4)
        replicas = tuple(rng.randint(1, 5) for _ in range(stages))
        microbatches = rng.randint(1, 8)
        batch = microbatches * max(replicas) + rng.randint(0, 23)
        out.append((batch, microbatches, replicas))
    # Edge cases: the smallest valid batch, a batch one short of an extra row per microbatch, no pipelining.
    out += [(6, 3, (2, 1)), (17, 4, (4, 1, 3)), (5, 1, (5,)), (1, 1, (1,)), (23, 7, (3, 2, 1))]
    return out


COMBOS = _combos(0, 300)


def test_microbatches_partition_the_global_batch() -> None:
    for batch, microbatches, replicas in COMBOS:
        layout = SampleLayout(batch, microbatches, replicas)
        ranges = [layout.microbatch_rows(i) for i in range(microbatches)]
        assert ranges == bounds(batch, microbatches)
        assert ranges[0][0] == 0 and ranges[-1][1] == batch
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))


def test_rows_partition_every_microbatch_among_replicas() -> None:
    for batch, microbatches, replicas in COMBOS:
        layout = SampleLayout(batch, microbatches, replicas)
        for stage, count in enumerate(replicas):
            for i in range(microbatches):
                lo, hi = layout.microbatch_rows(i)
                parts = [layout.rows(stage, i, j) for j in range(count)]
                assert parts[0][0] == lo and parts[-1][1] == hi
                assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
                assert all(b > a for a, b in parts), "every replica holds at least one row"
                assert [b - a for a, b in parts] == split_sizes(hi - lo, count)


def test_pieces_cover_each_consumer_rows_exactly_once() -> None:
    for batch, microbatches, replicas in COMBOS:
        layout = SampleLayout(batch, microbatches, replicas)
        for producer, consumer in itertools.permutations(range(len(replicas)), 2):
            for i in range(microbatches):
                pieces = layout.pieces(producer, consumer, i)
                for jc in range(replicas[consumer]):
                    lo, hi = layout.rows(consumer, i, jc)
                    mine = sorted(rows for _, c, rows in pieces if c == jc)
                    assert mine, "every consumer replica receives something"
                    assert mine[0][0] == lo and mine[-1][1] == hi
                    assert all(a[1] == b[0] for a, b in zip(mine, mine[1:])), (mine, lo, hi)
                for jp, jc, (lo, hi) in pieces:
                    assert lo < hi
                    plo, phi = layout.rows(producer, i, jp)
                    clo, chi = layout.rows(consumer, i, jc)
                    assert plo <= lo and hi <= phi, "a producer only sends rows it holds"
                    assert clo <= lo and hi <= chi, "a consumer only receives rows it holds"
                # ... and every producer row goes somewhere, exactly once
                sent = sorted(rows for _, _, rows in pieces)
                assert sent[0][0] == layout.microbatch_rows(i)[0]
                assert sent[-1][1] == layout.microbatch_rows(i)[1]
                assert all(a[1] == b[0] for a, b in zip(sent, sent[1:]))


def test_pieces_same_replica_count_are_one_to_one() -> None:
    layout = SampleLayout(24, 3, (4, 4))
    for i in range(3):
        pieces = layout.pieces(0, 1, i)
        assert [(jp, jc) for jp, jc, _ in pieces] == [(j, j) for j in range(4)]
        assert [rows for _, _, rows in pieces] == [layout.rows(1, i, j) for j in range(4)]


def test_pieces_example_two_to_three_replicas() -> None:
    layout = SampleLayout(12, 2, (2, 3))
    # microbatch 1 is rows [6, 12): producer replicas hold [6, 9) and [9, 12), consumers [6, 8), [8, 10), [10, 12)
    assert layout.pieces(0, 1, 1) == [(0, 0, (6, 8)), (0, 1, (8, 9)), (1, 1, (9, 10)), (1, 2, (10, 12))]


@pytest.mark.parametrize(("microbatches", "replicas"), [(1, (2,)), (3, (1, 2)), (4, (3, 1, 2)), (5, (1,))])
def test_too_small_batch_raises_with_the_minimum(microbatches: int, replicas: tuple[int, ...]) -> None:
    minimum = microbatches * max(replicas)
    SampleLayout(minimum, microbatches, replicas)  # the minimum itself is fine
    with pytest.raises(InputError) as info:
        SampleLayout(minimum - 1, microbatches, replicas)
    message = str(info.value)
    assert f"at least {minimum}" in message
    assert str(minimum - 1) in message
