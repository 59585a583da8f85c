"""Block workspace memory and the optimizer update time in the cost model, the tables, the search and the
simulator; DeviceProfile's update rate."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pytest
from fake_devices import fake_device

from rannc.errors import ConfigError, PlanError
from rannc.plan import BlockProfile, Plan, PlanProblem, evaluate, interpolate, plan_stages
from rannc.plan.cost import CostModel
from rannc.plan.search import plan_of_candidate
from rannc.plan.simulate import analytic_step_time, bubble_bound, simulate_plan
from rannc.plan.tables import StageTables
from rannc.profile.devices import DeviceProfile, load_profile, save_profile

PARAMS = [1e8, 2e8, 3e8]
WORKSPACE = [{1: 3e6, 2: 6e6}, {1: 5e6, 2: 10e6}, {}]  # the last block's is not known (0)
ACTIVATION = [{1: 1e6, 2: 2e6}, {1: 2e6, 2: 4e6}, {1: 1e6, 2: 2e6}]
IN_PER_SAMPLE, OUT_PER_SAMPLE = 1e3, 2e3


def three_blocks(workspace: bool = True, **kwargs: Any) -> PlanProblem:
    """Three blocks; boundary bytes 1e3 per sample into every block but the first, 2e3 out of every block
    but the last; Adam-like state (opt_param_factor 2); allreduce 5e-5 s + bytes / 1e10."""
    blocks = [
        BlockProfile(
            fwd_time={1: 1e-3, 2: 2e-3},
            bwd_time={1: 2e-3, 2: 4e-3},
            activation_bytes=act,
            workspace_bytes=dict(ws) if workspace else {},
        )
        for act, ws in zip(ACTIVATION, WORKSPACE)
    ]
    n = len(blocks)
    params = [[math.fsum(PARAMS[i : j + 1]) for j in range(n)] for i in range(n)]
    ins = [[0.0 if i == 0 else IN_PER_SAMPLE for _ in range(n)] for i in range(n)]
    outs = [[0.0 if j == n - 1 else OUT_PER_SAMPLE for j in range(n)] for _ in range(n)]
    settings: dict[str, Any] = dict(
        world_size=4, global_batch=8, allreduce_bandwidth=1e10, allreduce_latency=5e-5
    )
    settings.update(kwargs)
    return PlanProblem(blocks, params, ins, outs, **settings)


# ---------------------------------------------------------------------------------------------------------
# Workspace memory


def test_stage_memory_holds_the_largest_block_workspace_once() -> None:
    model = CostModel(three_blocks())
    # Blocks 0..1, one replica, 4 microbatches of 2 samples, 3 in flight.
    cost = model.stage(0, 1, 1, 4, 3)
    assert cost.microbatch_size == 2
    params = 3e8 * (2 + 2.0)  # parameters, gradients, Adam state
    activations = (2e6 + 4e6) * 3
    # receive buffers of the outputs' gradients (current and posted ahead) and the sends still held:
    # min(4 microbatches, 3 in flight + 1)
    buffers = (2 + 4) * (0.0 + OUT_PER_SAMPLE * 2)
    # Block k's workspace plus the microbatch's (not yet accumulated) parameter gradients of the blocks after
    # it, less that microbatch's activations of those blocks (freed by their backward):
    # max(6e6 + 2e8 - 4e6, 10e6 + 0 - 0), not a sum over blocks.
    assert cost.workspace_bytes == 6e6 + 2e8 - 4e6
    assert cost.memory == pytest.approx(params + activations + buffers + 6e6 + 2e8 - 4e6, rel=1e-15)
    # Not per microbatch in flight: one more in flight adds activations only.
    assert model.stage(0, 1, 1, 4, 4).memory - cost.memory == pytest.approx(6e6, rel=1e-12)
    # Without workspace tables the workspace is not modelled: the same stage is exactly that much smaller.
    plain = CostModel(three_blocks(workspace=False)).stage(0, 1, 1, 4, 3)
    assert plain.workspace_bytes == 0.0
    assert cost.memory - plain.memory == pytest.approx(6e6 + 2e8 - 4e6, rel=1e-12)
    # 8 microbatches of 1 sample: the blocks' workspaces and activations at m = 1.
    assert model.stage(0, 1, 1, 8, 3).workspace_bytes == 3e6 + 2e8 - 2e6
    # The last block alone: only its own workspace (which it has).
    assert model.stage(1, 1, 1, 4, 1).workspace_bytes == 10e6
    # Two replicas of 4 samples per microbatch: m = 2 again.
    assert model.stage(0, 0, 2, 2, 1).workspace_bytes == 6e6


def test_recomputed_stage_holds_the_workspace_once_too() -> None:
    model = CostModel(three_blocks())
    cost = model.stage(1, 2, 1, 4, 2, recompute=True)
    params = 5e8 * 4
    stashed = IN_PER_SAMPLE * 2 * 2  # boundary inputs of 2 microbatches in flight
    rebuilt = 4e6 + 2e6  # one microbatch's activations
    # receives (current, posted ahead) + the input gradients sent of at most 2 microbatches (the send window)
    buffers = (2 + 2) * (IN_PER_SAMPLE * 2 + 0.0)
    assert (
        cost.workspace_bytes == 10e6 + 3e8 - 2e6
    )  # block 1's, with block 2's gradients, less its activations
    assert cost.memory == pytest.approx(params + stashed + rebuilt + buffers + 10e6 + 3e8 - 2e6, rel=1e-15)
    # A stage of the block without a workspace table holds none.
    assert model.stage(2, 2, 1, 4, 1).workspace_bytes == 0.0


def test_rows_and_tables_agree_bit_for_bit() -> None:
    for zero in (False, True):
        problem = three_blocks(update_seconds_per_param_byte=1e-11, zero_optimizer=zero)
        model = CostModel(problem)
        tables = StageTables(model)
        for m in (1, 2, 3):
            io = tables.compute(m)["io"]
            for i in range(3):
                row = model.row(i, m)
                for j in range(i, 3):
                    # offset_k = params(i..k) - act(i..k), the activations summed left to right
                    acts = [interpolate(problem.blocks[k].activation_bytes, m) for k in range(3)]
                    offset = [problem.range_param_bytes[i][k] - sum(acts[i : k + 1]) for k in range(3)]
                    reach = max(problem.blocks[k].workspace_at(m) - offset[k] for k in range(i, j + 1))
                    assert row[j - i].workspace_bytes == reach + offset[j]
                    assert io[i][j] == row[j - i].held_bytes
                    ins, outs = row[j - i][3], row[j - i][4]
                    assert row[j - i].held_bytes == 2 * (ins + outs) + row[j - i].workspace_bytes
        for r in (1, 2, 3):
            for inter in (False, True):
                table = tables.allreduce(r, inter)
                for i in range(3):
                    for j in range(i, 3):
                        assert table[i][j] == model.allreduce(i, j, r, inter)


def test_workspace_decides_whether_a_stage_fits() -> None:
    one_rank = dict(world_size=1, global_batch=2, max_microbatches=1, schedules=("fill_drain",))
    problem, plain = three_blocks(**one_rank), three_blocks(workspace=False, **one_rank)
    without = CostModel(plain).stage(0, 2, 1, 1, 1).memory
    with_ws = CostModel(problem).stage(0, 2, 1, 1, 1).memory
    # m = 2: block 0's 6e6 with the gradients of blocks 1-2 (5e8) less their activations (4e6 + 2e6) beats
    # 10e6 + 3e8 - 2e6 and 0
    assert with_ws - without == pytest.approx(6e6 + 5e8 - 6e6, rel=1e-12)
    limit = (without + with_ws) / 2
    fits = plan_stages(dataclasses.replace(plain, memory_limit_bytes=limit))
    assert fits.stages[0].memory_bytes == without
    with pytest.raises(PlanError):
        plan_stages(dataclasses.replace(problem, memory_limit_bytes=limit))
    plan = plan_stages(dataclasses.replace(problem, memory_limit_bytes=with_ws))
    assert plan.stages[0].memory_bytes == with_ws


# ---------------------------------------------------------------------------------------------------------
# Optimizer update time


def test_update_time_is_part_of_the_end_of_step_term() -> None:
    rate = 1e-11  # seconds per parameter byte
    for zero in (False, True):
        model = CostModel(three_blocks(update_seconds_per_param_byte=rate, zero_optimizer=zero))
        ring = 5e-5 + 2 * (2 - 1) / 2 * 3e8 / 1e10
        shards = 2 if zero else 1
        cost = model.stage(0, 1, 2, 2, 1)
        assert cost.update == pytest.approx(3e8 * rate / shards, rel=1e-15)
        assert cost.allreduce == pytest.approx(ring + 3e8 * rate / shards, rel=1e-15)
        # One replica: no allreduce, the whole update (ZeRO-1 over one rank shards nothing).
        single = model.stage(0, 1, 1, 2, 1)
        assert single.update == single.allreduce == pytest.approx(3e8 * rate, rel=1e-15)
        # The stage time (per microbatch) does not include it.
        assert cost.time == CostModel(three_blocks()).stage(0, 1, 2, 2, 1).time
    default = CostModel(three_blocks()).stage(0, 1, 2, 2, 1)
    assert default.update == 0.0
    assert default.allreduce == pytest.approx(5e-5 + 3e8 / 1e10, rel=1e-15)


@pytest.mark.parametrize("zero", [False, True])
def test_step_time_pays_the_largest_allreduce_plus_update(zero: bool) -> None:
    ranges, replicas = [(0, 0), (1, 2)], [2, 2]
    base = evaluate(three_blocks(zero_optimizer=zero), ranges, replicas, 4, "1f1b")
    rate = 1e-11
    timed = evaluate(
        three_blocks(update_seconds_per_param_byte=rate, zero_optimizer=zero), ranges, replicas, 4, "1f1b"
    )
    assert base is not None and timed is not None
    shards = 2 if zero else 1
    # Allreduces 5e-5 + 1e8 / 1e10 and 5e-5 + 5e8 / 1e10; updates 1e8 and 5e8 bytes at `rate` (sharded):
    # the second stage is the largest end-of-step term either way.
    assert [c.update for c in timed[1]] == pytest.approx([1e8 * rate / shards, 5e8 * rate / shards])
    assert timed[0] - base[0] == pytest.approx(5e8 * rate / shards, rel=1e-9)


def test_search_uses_the_same_update_and_workspace_costs() -> None:
    for zero in (False, True):
        problem = three_blocks(
            update_seconds_per_param_byte=2e-11,
            zero_optimizer=zero,
            max_microbatches=8,
            schedules=("1f1b", "fill_drain"),
        )
        plan = plan_stages(problem)
        ranges = [(s.first_block, s.last_block) for s in plan.stages]
        result = evaluate(
            problem, ranges, [s.replicas for s in plan.stages], plan.microbatches, plan.schedule
        )
        assert result is not None
        assert plan.predicted_step_time == pytest.approx(result[0], rel=1e-12)
        for stage, cost in zip(plan.stages, result[1]):
            assert stage.allreduce_time == cost.allreduce and cost.update > 0
            assert stage.memory_bytes == cost.memory


# ---------------------------------------------------------------------------------------------------------
# Simulator


def plan_of(problem: PlanProblem, ranges: list[tuple[int, int]], replicas: list[int], p: int) -> Plan:
    plan = plan_of_candidate(problem, ranges, replicas, p, "1f1b")
    assert plan is not None
    return plan


def test_simulated_update_follows_the_allreduce() -> None:
    rate = 1e-11
    problem = three_blocks(world_size=3, update_seconds_per_param_byte=rate, overlap_grad_sync=False)
    plan = plan_of(problem, [(0, 1), (2, 2)], [2, 1], 4)
    timeline = simulate_plan(problem, plan)
    first, second = timeline.events
    # Two replicas: the allreduce after the last backward, then the update of 3e8 bytes.
    assert [e.kind for e in first[-3:]] == ["B", "allreduce", "update"]
    backward, allreduce, update = first[-3:]
    assert allreduce.start == backward.end
    assert allreduce.duration == pytest.approx(5e-5 + 3e8 / 1e10, rel=1e-12)
    assert update.start == allreduce.end and update.microbatch == -1
    assert update.duration == pytest.approx(3e8 * rate, rel=1e-12)
    assert timeline.stages[0].tail == pytest.approx(allreduce.duration + update.duration, rel=1e-12)
    # One replica: no allreduce, the update right after the last backward.
    assert [e.kind for e in second[-2:]] == ["B", "update"]
    assert second[-1].start == second[-2].end
    assert second[-1].duration == pytest.approx(3e8 * rate, rel=1e-12)
    assert timeline.step_time == max(first[-1].end, second[-1].end)
    assert timeline.step_time == timeline.stage_end(0)  # the ring allreduce makes stage 0 finish last
    # Everything else is as without the update: the step is longer by stage 0's update exactly.
    before = simulate_plan(three_blocks(world_size=3, overlap_grad_sync=False), plan)
    assert [e.kind for e in before.events[0][-2:]] == ["B", "allreduce"]
    assert all(e.kind != "update" for events in before.events for e in events)
    assert timeline.step_time - before.step_time == pytest.approx(3e8 * rate, rel=1e-9)
    assert analytic_step_time(timeline.stages, plan.microbatches) == pytest.approx(
        plan.predicted_step_time, rel=1e-12
    )


def test_overlapped_allreduce_starts_with_the_last_backward() -> None:
    """overlap_grad_sync: the allreduce starts with the last backward; only its first block's part (gradients
    final when the backward ends) must follow it, so it ends at max(B end + that part, B start + whole)."""
    rate = 1e-11
    plan = plan_of(three_blocks(world_size=3), [(0, 1), (2, 2)], [2, 1], 4)
    apart = simulate_plan(
        three_blocks(world_size=3, update_seconds_per_param_byte=rate, overlap_grad_sync=False), plan
    )
    overlapped = simulate_plan(three_blocks(world_size=3, update_seconds_per_param_byte=rate), plan)
    backward, allreduce, update = overlapped.events[0][-3:]
    assert (backward.kind, allreduce.kind, update.kind) == ("B", "allreduce", "update")
    whole = apart.events[0][-2].duration
    assert whole == pytest.approx(5e-5 + 3e8 / 1e10, rel=1e-12)
    exposed = 5e-5 + PARAMS[0] / 1e10  # block 0's gradients among the 2 replicas
    assert overlapped.stages[0].allreduce_exposed == pytest.approx(exposed, rel=1e-12)
    assert allreduce.end == pytest.approx(max(backward.end + exposed, backward.start + whole), rel=1e-12)
    assert allreduce.duration == pytest.approx(whole, rel=1e-12) and allreduce.start >= backward.start
    assert update.start == allreduce.end
    assert overlapped.stages[1].allreduce_exposed is not None and overlapped.stages[1].allreduce == 0
    # the forwards and backwards are unchanged; the step is shorter by what the overlap hides
    assert [e for e in overlapped.events[0] if e.kind in "FB"] == [
        e for e in apart.events[0] if e.kind in "FB"
    ]
    hidden = apart.events[0][-2].end - allreduce.end
    assert hidden > 0
    assert overlapped.step_time == pytest.approx(apart.step_time - hidden, rel=1e-12)
    # the bubble bound still bounds it
    bound = bubble_bound(overlapped.stages, plan.microbatches, post_ahead=True)  # as simulate_plan posts
    assert bound <= overlapped.step_time * (1 + 1e-12)


def test_simulated_memory_has_a_workspace_part() -> None:
    problem = three_blocks(world_size=3)
    plan = plan_of(problem, [(0, 1), (2, 2)], [2, 1], 4)
    timeline = simulate_plan(problem, plan)
    parts = [t.memory_parts for t in timeline.stages]
    assert parts[0] is not None and parts[1] is not None
    # m = 1 (8 samples / 4 microbatches / 2 ranks): max(3e6 + block 1 gradients 2e8 - its activations 2e6, 5e6)
    assert parts[0]["workspace"] == 3e6 + 2e8 - 2e6
    assert "workspace" not in parts[1]  # block 2 has no workspace table
    for timing in timeline.stages:
        assert timing.memory_parts is not None
        assert sum(timing.memory_parts.values()) == pytest.approx(timing.static_bytes, rel=1e-15)
    assert timeline.peak_memory == pytest.approx([s.memory_bytes for s in plan.stages], rel=1e-12)


# ---------------------------------------------------------------------------------------------------------
# DeviceProfile.update_seconds_per_byte


def test_update_seconds_per_byte_follows_the_optimizer_state() -> None:
    profile = fake_device()
    assert profile.byte_rate() == pytest.approx(8e10)
    for factor, passes in ((2.0, 7), (6.0, 7), (1.0, 5), (1.5, 5), (0.0, 3), (0.5, 3)):
        assert profile.update_seconds_per_byte(factor) == pytest.approx(passes / 8e10, rel=1e-15)


def test_measured_update_rates_replace_the_memory_passes() -> None:
    profile = fake_device(optimizer_update_rate={"adam": 4e9, "sgd": 2e10})
    assert profile.update_seconds_per_byte(2.0) == pytest.approx(1 / 4e9, rel=1e-15)
    assert profile.update_seconds_per_byte(0.0) == pytest.approx(1 / 2e10, rel=1e-15)
    assert profile.update_seconds_per_byte(1.0) == pytest.approx(5 / 8e10, rel=1e-15)  # not measured


def test_update_rates_survive_json(tmp_path: Path) -> None:
    profile = fake_device(optimizer_update_rate={"adam": 4e9, "momentum": 6e9, "sgd": 2e10})
    path = tmp_path / "device.json"
    save_profile(profile, path)
    assert json.loads(path.read_text())["optimizer_update_rate"] == {
        "adam": 4e9,
        "momentum": 6e9,
        "sgd": 2e10,
    }
    assert load_profile(path) == profile
    older = profile.to_json()
    del older["optimizer_update_rate"]
    assert DeviceProfile.from_json(older).optimizer_update_rate == {}


@pytest.mark.parametrize(
    "rates",
    [
        {"lion": 1e9},
        {"Adam": 1e9},
        {"adam": 0.0},
        {"adam": -1e9},
        {"momentum": math.nan},
        {"sgd": math.inf},
        {"adam": True},
        {"adam": "1e9"},
        [("adam", 1e9)],
    ],
)
def test_bad_update_rates_are_config_errors(rates: Any, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="optimizer_update_rate"):
        fake_device(optimizer_update_rate=rates)
    data = fake_device().to_json()
    data["optimizer_update_rate"] = rates
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))  # NaN and Infinity as Python's json writes them
    with pytest.raises(ConfigError, match=f"device profile {path}"):
        load_profile(path)
