"""coarsen: neighbouring atomic units merged into at most max_blocks blocks, in order, balanced, cheap cuts kept."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from rannc.graph.blocks import coarsen


def make_units(count: int) -> list[list[str]]:
    # Units of different lengths, so that a block is recognisably a concatenation of whole units.
    return [[f"n{k}_{j}" for j in range(1 + k % 3)] for k in range(count)]


def block_unit_counts(units: list[list[str]], blocks: list[list[str]]) -> list[int]:
    """How many whole units each block is made of; fails unless the blocks are whole units, in order, all used."""
    counts = []
    k = 0
    for block in blocks:
        rest, taken = list(block), 0
        while rest:
            assert k < len(units) and rest[: len(units[k])] == units[k], (block, k)
            rest = rest[len(units[k]) :]
            k += 1
            taken += 1
        counts.append(taken)
    assert k == len(units)
    return counts


def test_blocks_partition_units_in_order() -> None:
    rng = random.Random(0)
    for _ in range(200):
        count = rng.randint(1, 30)
        units = make_units(count)
        costs = [rng.uniform(0.1, 10.0) for _ in range(count)]
        cuts = [rng.choice([0.0, 16.0, 128.0, 4096.0]) for _ in range(count)]
        max_blocks = rng.randint(1, count + 3)
        blocks = coarsen(units, costs, cuts, max_blocks)
        assert 1 <= len(blocks) <= max_blocks
        assert len(blocks) == min(count, max_blocks)  # merges stop as soon as the limit is met
        assert sum(blocks, []) == sum(units, [])
        assert all(blocks)
        block_unit_counts(units, blocks)  # whole units only


@pytest.mark.parametrize("count", [1, 2, 5, 17])
def test_enough_blocks_keeps_units_unchanged(count: int) -> None:
    units = make_units(count)
    for max_blocks in (count, count + 1, 10 * count):
        blocks = coarsen(units, [1.0] * count, [32.0] * count, max_blocks)
        assert blocks == units
        assert all(block is not unit for block, unit in zip(blocks, units))  # no aliasing of the input lists


def test_max_blocks_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_blocks"):
        coarsen(make_units(3), [1.0] * 3, [1.0] * 3, 0)


@pytest.mark.parametrize(
    ("count", "max_blocks"), [(8, 4), (12, 3), (16, 2), (64, 8), (96, 3), (5, 5), (7, 1)]
)
def test_equal_costs_split_evenly_when_halving_fits(count: int, max_blocks: int) -> None:
    """count = max_blocks * 2^k (or max_blocks == count, or one block): every block has the same number of units."""
    units = make_units(count)
    blocks = coarsen(units, [1.0] * count, [64.0] * count, max_blocks)
    assert block_unit_counts(units, blocks) == [count // max_blocks] * max_blocks


def test_equal_costs_are_balanced_within_a_factor_of_two() -> None:
    for count in range(1, 50):
        units = make_units(count)
        for max_blocks in range(1, count + 1):
            blocks = coarsen(units, [1.0] * count, [64.0] * count, max_blocks)
            sizes = block_unit_counts(units, blocks)
            ideal = math.ceil(count / max_blocks)
            assert max(sizes) < 2 * ideal, (count, max_blocks, sizes)
            assert min(sizes) >= count // max_blocks // 2, (count, max_blocks, sizes)


def test_equal_costs_blocks_differ_by_at_most_one_unit() -> None:
    unbalanced = []
    for count, max_blocks in [(6, 2), (12, 2), (10, 4), (100, 8)]:
        units = make_units(count)
        sizes = block_unit_counts(units, coarsen(units, [1.0] * count, [64.0] * count, max_blocks))
        if max(sizes) - min(sizes) > 1:
            unbalanced.append((count, max_blocks, sizes))
    assert not unbalanced


@pytest.mark.parametrize("count", [2, 3, 6, 9])
def test_a_huge_cut_is_removed_first(count: int) -> None:
    """Among equal costs, the boundary carrying by far the most data is merged away in the first round, and
    never comes back as a block boundary however far the coarsening goes."""
    units = make_units(count)
    for heavy in range(count - 1):
        cuts = [8.0] * count
        cuts[heavy] = 1e6
        blocks = coarsen(units, [1.0] * count, cuts, count - 1)
        expected = units[:heavy] + [units[heavy] + units[heavy + 1]] + units[heavy + 2 :]
        assert blocks == expected, heavy
        for max_blocks in range(1, count):
            counts = block_unit_counts(units, coarsen(units, [1.0] * count, cuts, max_blocks))
            boundaries = {sum(counts[: b + 1]) - 1 for b in range(len(counts) - 1)}
            assert heavy not in boundaries, (heavy, max_blocks, counts)


def test_costly_units_stay_apart() -> None:
    """With equal cuts, the cheap units merge with each other and the expensive ones stay single."""
    units = make_units(6)
    costs = [10.0, 1.0, 1.0, 1.0, 1.0, 10.0]
    blocks = coarsen(units, costs, [8.0] * 6, 4)
    assert block_unit_counts(units, blocks) == [1, 2, 2, 1]


def _objective(counts: list[int], costs: list[float], cuts: list[float], blocks: int) -> float:
    """coarsen's objective: sum of (block cost / ideal)^2, plus each boundary's cut over the largest cut."""
    ideal = max(sum(costs) / blocks, 1e-30)
    top = max(max(cuts[: len(costs) - 1], default=0.0), 1e-30)
    total, first = 0.0, 0
    for index, count in enumerate(counts):
        total += (sum(costs[first : first + count]) / ideal) ** 2
        first += count
        if index < len(counts) - 1:
            total += cuts[first - 1] / top
    return total


@pytest.mark.parametrize("seed", range(40))
def test_the_partition_is_optimal_against_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    count, blocks = rng.randint(3, 9), rng.randint(2, 4)
    blocks = min(blocks, count - 1)
    costs = [rng.choice([0.0, rng.random(), 5 * rng.random()]) for _ in range(count)]
    cuts = [rng.choice([0.0, 100 * rng.random()]) for _ in range(count)]
    units = make_units(count)
    found = block_unit_counts(units, coarsen(units, costs, cuts, blocks))
    best = math.inf
    for ends in itertools.combinations(range(1, count), blocks - 1):
        bounds = [0, *ends, count]
        counts = [b - a for a, b in zip(bounds, bounds[1:])]
        best = min(best, _objective(counts, costs, cuts, blocks))
    assert _objective(found, costs, cuts, blocks) <= best * (1 + 1e-12) + 1e-12


def test_the_dynamic_programme_does_not_depend_on_how_many_ends_it_takes_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import rannc.graph.blocks as blocks_module

    rng = random.Random(7)
    count = 300
    costs = [rng.choice([0.0, rng.random(), 10 * rng.random()]) for _ in range(count)]
    cuts = [rng.choice([0.0, 100 * rng.random()]) for _ in range(count)]
    units = make_units(count)
    results = []
    for columns in (1, 7, 128, 1000):
        monkeypatch.setattr(blocks_module, "_DP_COLUMNS", columns)
        results.append(coarsen(units, costs, cuts, 23))
    assert all(result == results[0] for result in results)


def test_a_state_cap_splits_blocks_until_none_of_several_units_exceeds_it() -> None:
    rng = random.Random(3)
    for _ in range(200):
        count = rng.randint(1, 25)
        units = make_units(count)
        costs = [rng.uniform(0.1, 10.0) for _ in range(count)]
        cuts = [rng.choice([0.0, 16.0, 4096.0]) for _ in range(count)]
        weights = [rng.choice([0.0, rng.uniform(0, 5), rng.uniform(0, 30)]) for _ in range(count)]
        cap = rng.uniform(5, 40)
        max_blocks = rng.randint(1, count + 2)
        blocks = coarsen(units, costs, cuts, max_blocks, weights=weights, cap=cap)
        sizes = block_unit_counts(units, blocks)
        held, k = [], 0
        for size in sizes:
            held.append(sum(weights[k : k + size]))
            k += size
        # every block of several units within the cap; a unit over it stands alone
        assert all(h <= cap * (1 + 1e-9) for h, size in zip(held, sizes) if size > 1)
        # no more blocks than the cap or max_blocks needs: the fewest under the cap (greedy) or max_blocks
        fewest, running, empty = 1, 0.0, True
        for w in weights:
            if not empty and running + w > cap:
                fewest, running = fewest + 1, 0.0
            running, empty = running + w, False
        assert len(blocks) == min(count, max(max_blocks, fewest))


def test_transformer_blocks_hold_at_most_the_state_limit() -> None:
    # A GPT-2 whose 6 layers hold about 1.6 MiB of parameters each: with 4 blocks allowed a block would hold
    # 1.5 layers; a limit of 1.25 layers' state cuts finer (at least 6 blocks), and no block is over it.
    import transformers

    from rannc.capture import capture
    from rannc.graph.analysis import analyse, atomic_units
    from rannc.graph.blocks import StateLimit, cut_blocks, unit_parameter_bytes

    config = transformers.GPT2Config(n_layer=6, n_embd=128, n_head=4, n_positions=32, vocab_size=256)
    config.use_cache = False
    with torch.device("meta"):
        model = transformers.GPT2LMHeadModel(config)
    ids = torch.zeros(2, 16, dtype=torch.long, device="meta")
    captured = capture(model, (), {"input_ids": ids, "labels": ids})
    analysis = analyse(captured)
    layer = sum(p.numel() * 4 for p in model.transformer.h[0].parameters())
    state = 4.0  # parameter, gradient and two Adam moments per parameter byte
    limit = StateLimit(captured, state, 1.25 * layer * state)
    blocks = cut_blocks(analysis, {}, 8, 4, limit)
    assert len(blocks) >= 6
    held = unit_parameter_bytes(captured, blocks)
    assert all(h * state <= limit.limit for h, block in zip(held, blocks) if len(block) > 1)
    # every parameter is read by some block (the tied embedding by two: the first and the last)
    units = atomic_units(analysis)
    total = sum(p.numel() * 4 for p in model.parameters())
    assert sum(unit_parameter_bytes(captured, units)) >= total
    assert max(held) <= 1.25 * layer


@pytest.mark.parametrize("seed", range(30))
def test_the_capped_partition_is_optimal_against_brute_force(seed: int) -> None:
    rng = random.Random(1000 + seed)
    count, blocks = rng.randint(3, 9), rng.randint(2, 4)
    blocks = min(blocks, count - 1)
    costs = [rng.choice([0.0, rng.random(), 5 * rng.random()]) for _ in range(count)]
    cuts = [rng.choice([0.0, 100 * rng.random()]) for _ in range(count)]
    weights = [rng.uniform(0, 10) for _ in range(count)]
    cap = rng.uniform(8, 25)
    units = make_units(count)
    found = block_unit_counts(units, coarsen(units, costs, cuts, blocks, weights=weights, cap=cap))
    best, k = math.inf, len(found)
    for ends in itertools.combinations(range(1, count), k - 1):
        bounds = [0, *ends, count]
        if any(b - a > 1 and sum(weights[a:b]) > cap for a, b in zip(bounds, bounds[1:])):
            continue
        counts = [b - a for a, b in zip(bounds, bounds[1:])]
        best = min(best, _objective(counts, costs, cuts, k))
    assert _objective(found, costs, cuts, k) <= best * (1 + 1e-12) + 1e-12


def test_the_banded_programme_chooses_as_the_whole_one(monkeypatch: pytest.MonkeyPatch) -> None:
    import rannc.graph.blocks as blocks_module

    rng = random.Random(11)
    for _ in range(60):
        count = rng.randint(20, 300)
        units = make_units(count)
        costs = [rng.choice([0.0, rng.random(), 5 * rng.random()]) for _ in range(count)]
        cuts = [rng.choice([0.0, 100 * rng.random()]) for _ in range(count)]
        weights = [rng.choice([0.0, rng.uniform(0, 3)]) for _ in range(count)]
        cap = rng.uniform(3, 12)
        max_blocks = rng.randint(1, count // 2)
        banded = coarsen(units, costs, cuts, max_blocks, weights=weights, cap=cap)
        monkeypatch.setattr(blocks_module, "_BANDED", False)
        whole = coarsen(units, costs, cuts, max_blocks, weights=weights, cap=cap)
        monkeypatch.setattr(blocks_module, "_BANDED", True)
        assert banded == whole


# One transformer-like layer as 16 units: (cost, parameter weight, bytes of the cut after it). Layer norms and
# other small elementwise ops between the matmuls; the cut after a residual add (units 7 and 15) carries one tensor,
# the others two or more.
_LAYER = [
    (0.01, 0.0, 4.0),  # layer norm: its output and the residual cross
    (10.0, 1.0, 2.0),  # qkv matmul
    (0.01, 0.0, 4.0),
    (0.01, 0.0, 2.0),
    (10.0, 1.0, 2.0),
    (0.01, 0.0, 2.0),
    (10.0, 1.0, 2.0),  # output projection
    (0.01, 0.0, 1.0),  # residual add
    (0.01, 0.0, 4.0),  # layer norm
    (10.0, 1.0, 2.0),  # up projection
    (0.01, 0.0, 4.0),
    (0.01, 0.0, 2.0),
    (10.0, 1.0, 4.0),  # down projection
    (0.01, 0.0, 4.0),  # dropout
    (0.01, 0.0, 4.0),
    (0.01, 0.0, 1.0),  # residual add
]


@pytest.mark.parametrize("layers", [20, 200])
def test_blocks_end_at_cheap_cuts(layers: int) -> None:
    """Blocks capped to about a layer of parameters end at the cheapest cuts (one tensor crossing), also in a model
    of more units than the dense programme takes (200 layers: 3200 units; a pairwise pre-merge down to the dense
    programme's size merged the small ops around those cuts and moved the boundaries onto costlier ones)."""
    costs, weights, cuts = (list(column) * layers for column in zip(*_LAYER))
    units = make_units(len(costs))
    blocks = coarsen(units, costs, cuts, layers, weights=weights, cap=5.5)
    assert len(blocks) == layers
    ends = {name: k for k, unit in enumerate(units) for name in unit}
    assert [cuts[ends[block[-1]]] for block in blocks[:-1]] == [1.0] * (layers - 1)
