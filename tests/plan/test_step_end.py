"""The end of a step in the cost model: optimizer temporaries (the larger of the two memory phases), parameters
shared between stages (tied weights: one allreduce over every holder, in the simulator), and the graph facts
that feed them."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import models
import pytest
import torch

from rannc.capture import capture
from rannc.errors import ConfigError
from rannc.graph.analysis import analyse, atomic_units
from rannc.graph.blocks import coarsen
from rannc.graph.stage import block_graphs
from rannc.graph.tables import input_bytes, parameter_facts
from rannc.partition import coupled_weight_decay
from rannc.plan import BlockProfile, Plan, PlanProblem, evaluate, plan_stages
from rannc.plan.cost import CostModel, allreduce_time, optimizer_transient_bytes
from rannc.plan.memory import stage_memories
from rannc.plan.search import plan_of_candidate
from rannc.plan.simulate import shared_allreduces, simulate_plan
from rannc.plan.tables import StageTables
from rannc.profile.devices import DeviceProfile, get_device_profile, optimizer_transient
from rannc.profile.memtrack import PeakMemory

PARAMS = [4e6, 1e6, 2e6]
LARGEST = [3e6, 1e6, 0.5e6]


def problem(**kwargs) -> PlanProblem:
    blocks = [BlockProfile(fwd_time={1: 1e-3}, bwd_time={1: 2e-3}, activation_bytes={1: 1e5}) for _ in PARAMS]
    n = len(blocks)
    params = [[math.fsum(PARAMS[i : j + 1]) for j in range(n)] for i in range(n)]
    largest = [[max(LARGEST[i : j + 1]) if j >= i else 0.0 for j in range(n)] for i in range(n)]
    zeros = [[0.0] * n for _ in range(n)]
    settings = dict(world_size=4, global_batch=4, range_largest_param_bytes=largest)
    settings.update(kwargs)
    return PlanProblem(blocks, params, zeros, zeros, **settings)


def test_optimizer_temporaries_only_count_when_they_exceed_the_backward_peak() -> None:
    base = CostModel(problem()).stage(0, 1, 1, 4, 4)  # no temporaries modelled
    state = 5e6 * 4  # parameters, gradients, Adam's two moments
    assert base.memory == pytest.approx(state + 2e5 * 4, rel=1e-12)
    # Three times the largest tensor (CPU Adam): 9e6 > the activations' 8e5, so the step's end sets the peak.
    cpu = CostModel(problem(optimizer_transient=(0.0, 3.0))).stage(0, 1, 1, 4, 4)
    assert cpu.memory == state + 3 * 3e6
    # Small temporaries leave the forward/backward peak alone.
    small = CostModel(problem(optimizer_transient=(0.0, 0.1))).stage(0, 1, 1, 4, 4)
    assert small.memory == base.memory
    # A share of the parameters (GPU foreach), divided over the replicas with ZeRO-1.
    zero = problem(optimizer_transient=(1.0, 0.0), zero_optimizer=True)
    two = CostModel(zero).stage(0, 1, 2, 2, 1)
    assert two.memory == pytest.approx(5e6 * (2 + 2 / 2) + 5e6 / 2, rel=1e-12)


def test_optimizer_stepped_in_chunks_holds_the_temporaries_of_one_chunk() -> None:
    # GPU foreach Adam: one temporary per parameter byte stepped at once. Blocks 0..1 hold 5e6 bytes of parameters,
    # the largest tensor 3e6.
    whole = CostModel(problem(optimizer_transient=(1.0, 0.0))).stage(0, 1, 1, 4, 4)
    assert whole.memory == 5e6 * 4 + 5e6
    # Chunks of 1e6 bytes: a tensor larger than that is a chunk alone, so the largest chunk is that tensor.
    chunked = CostModel(problem(optimizer_transient=(1.0, 0.0), optimizer_chunk_bytes=1e6)).stage(
        0, 1, 1, 4, 4
    )
    assert chunked.memory == 5e6 * 4 + 3e6
    # Chunks larger than the parameters change nothing; with ZeRO-1 a rank steps its shard only.
    big = CostModel(problem(optimizer_transient=(1.0, 0.0), optimizer_chunk_bytes=1e9)).stage(0, 1, 1, 4, 4)
    assert big.memory == whole.memory
    zero = problem(optimizer_transient=(1.0, 0.0), optimizer_chunk_bytes=4e6, zero_optimizer=True)
    assert CostModel(zero).stage(0, 1, 2, 2, 1).memory == pytest.approx(
        5e6 * (2 + 2 / 2) + 5e6 / 2, rel=1e-12
    )
    # The tables agree bit for bit.
    chunking = problem(optimizer_transient=(1.0, 0.5), optimizer_chunk_bytes=1e6)
    tables, model = StageTables(CostModel(chunking)), CostModel(chunking)
    for i in range(3):
        for j in range(i, 3):
            expected = chunking.range_param_bytes[i][j] * 4 + optimizer_transient_bytes(chunking, i, j, 1)
            assert tables.step_end(1)[i][j] == expected
            assert model.stage(i, j, 1, 4, 1).memory >= expected


def test_optimizer_temporaries_in_tables_search_and_least_memory() -> None:
    p = problem(optimizer_transient=(0.5, 2.0), zero_optimizer=True)
    model = CostModel(p)
    tables = StageTables(model)
    for r in (1, 2, 4):
        end = tables.step_end(r)
        for i in range(3):
            for j in range(i, 3):
                shards = r
                expected = p.range_param_bytes[i][j] * (2 + 2 / shards) + (
                    p.range_param_bytes[i][j] / shards * 0.5 + p.range_largest_param_bytes[i][j] * 2.0
                )
                assert end[i][j] == expected
        memories = stage_memories(p, tables, 1, [r], 1)[0]
        assert memories[0][2] >= end[0][2]
    # A limit between the one-stage end-of-step peak and the two-stage ones forces a split.
    one_stage = CostModel(p).stage(0, 2, 4, 1, 1).memory
    limited = dataclasses.replace(p, memory_limit_bytes=one_stage * 0.99, num_stages=None)
    plan = plan_stages(limited)
    assert len(plan.stages) > 1
    assert all(s.memory_bytes <= one_stage * 0.99 for s in plan.stages)
    again = evaluate(
        limited,
        [(s.first_block, s.last_block) for s in plan.stages],
        [s.replicas for s in plan.stages],
        plan.microbatches,
        plan.schedule,
    )
    assert again is not None and again[0] == pytest.approx(plan.predicted_step_time, rel=1e-12)
    assert max(cost.memory for cost in again[1]) <= one_stage * 0.99


def _two_stage_plan(p: PlanProblem, replicas: tuple[int, int]) -> Plan:
    plan = plan_of_candidate(p, [(0, 0), (1, 2)], list(replicas), 2, "1f1b")
    assert plan is not None
    return plan


def test_shared_parameter_allreduce_spans_its_stages() -> None:
    tied = 8e5
    p = problem(shared_params=((tied, (0, 2)),), allreduce_bandwidth=1e9, allreduce_latency=1e-4)
    plan = _two_stage_plan(p, (2, 2))
    found = shared_allreduces(p, plan)
    # Over all 4 holder ranks, less what each stage's own 2-replica allreduce already moved.
    expected = allreduce_time(p, tied, 4) - allreduce_time(p, tied, 2)
    assert found == [(pytest.approx(expected, rel=1e-12), (0, 1))]
    timeline = simulate_plan(p, plan)
    plain = simulate_plan(dataclasses.replace(p, shared_params=()), plan)
    shared_events = [[e for e in events if e.kind == "allreduce_shared"] for events in timeline.events]
    assert all(len(events) == 1 for events in shared_events)
    # It starts when both stages finished their own allreduce, at the same moment on both.
    starts = {events[0].start for events in shared_events}
    assert len(starts) == 1
    assert starts.pop() == pytest.approx(max(max(e.end for e in ev) for ev in plain.events), rel=1e-12)
    assert timeline.step_time == pytest.approx(plain.step_time + expected, rel=1e-12)
    # Blocks on one stage: nothing extra.
    together = problem(shared_params=((tied, (1, 2)),))
    assert shared_allreduces(together, _two_stage_plan(together, (2, 2))) == []


def test_parameter_facts_of_a_tied_model() -> None:
    model = models.build("skip_tied", 0)
    batch = models.make_batches("skip_tied", 0, 1, 2)[0]
    captured = capture(model, batch["args"], batch["kwargs"])
    analysis = analyse(captured)
    units = atomic_units(analysis)
    blocks = coarsen(units, [1.0] * len(units), [0.0] * len(units), 4)
    graphs = block_graphs(captured, analysis, blocks)
    largest, shared = parameter_facts(captured, graphs)
    embed = model.embed.weight.numel() * 4
    assert largest[0][len(graphs) - 1] == embed  # the tied embedding is the largest tensor
    assert all(
        largest[i][j] <= largest[i][j + 1] for i in range(len(graphs)) for j in range(i, len(graphs) - 1)
    )
    # The embedding is used at the start (lookup) and the end (output projection): shared by two blocks.
    assert (float(embed), (0, len(graphs) - 1)) in shared
    assert all(nbytes > 0 and len(blocks) > 1 for nbytes, blocks in shared)


def test_device_kind_and_optimizer_temporaries() -> None:
    assert get_device_profile("cpu").kind == "cpu"
    assert get_device_profile("h100-80gb").kind == "gpu"
    assert optimizer_transient("cpu", 2.0) == (0.0, 2.0)
    assert optimizer_transient("gpu", 2.0) == (1.0, 0.0)
    assert optimizer_transient("cpu", 0.0) == (0.0, 0.0)
    # Adam with L2 weight decay makes grad + wd x param first: one more tensor / list of temporaries
    assert optimizer_transient("cpu", 2.0, l2_weight_decay=True) == (0.0, 3.0)
    assert optimizer_transient("gpu", 2.0, l2_weight_decay=True) == (2.0, 0.0)
    assert optimizer_transient("cpu", 1.0, l2_weight_decay=True) == (0.0, 0.0)


@pytest.mark.parametrize(
    ("make", "temporaries"),
    [
        (lambda p: torch.optim.AdamW(p, weight_decay=0.01), 2.0),
        (lambda p: torch.optim.Adam(p), 2.0),
        (lambda p: torch.optim.Adam(p, weight_decay=0.1), 3.0),
    ],
)
def test_cpu_adam_temporaries_are_what_its_step_allocates(make: Any, temporaries: float) -> None:
    """The CPU figures are what torch's single-tensor Adam/AdamW step allocates beyond its parameters, gradients
    and state, in units of the largest parameter (measured like accuracy.py measures a training step)."""
    large = torch.nn.Parameter(torch.randn(2**16))
    small = torch.nn.Parameter(torch.randn(100))
    optimizer = make([large, small])
    assert optimizer_transient("cpu", 2.0, coupled_weight_decay(optimizer)) == (0.0, temporaries)
    for _ in range(2):  # the first step creates the state; the second shows the steady temporaries
        large.grad, small.grad = torch.randn_like(large), torch.randn_like(small)
        held = [large, small, large.grad, small.grad]
        held += [
            t for state in optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor)
        ]
        with PeakMemory(held) as peak:
            optimizer.step()
    assert (peak.peak_bytes - peak.start_bytes) / (large.numel() * 4) == pytest.approx(temporaries, abs=0.01)
    with pytest.raises(ConfigError, match="kind"):
        dataclasses.replace(get_device_profile("cpu"), kind="tpu")
    data = get_device_profile("cpu").to_json()
    assert DeviceProfile.from_json(data).kind == "cpu"
    del data["kind"]
    assert DeviceProfile.from_json(data).kind == "gpu"  # older files: GPU defaults


def test_every_rank_holds_the_steps_user_inputs() -> None:
    """input_bytes: per sample, every batched input (int64 ids and labels, float32 features) times the global
    batch the runtime gathers on every rank plus the rank's own rows; it adds to every stage's memory, in both
    phases (backward and optimizer step)."""
    model = models.build("skip_tied", 0)
    batch = models.make_batches("skip_tied", 0, 1, 2)[0]
    ids, x, labels = batch["args"]
    captured = capture(model, tuple(batch["args"]), {})
    per_sample = ids[0].numel() * 8 + x[0].numel() * 4 + labels[0].numel() * 8
    assert input_bytes(captured, 10, 4) == per_sample * (10 + 3)  # the largest local share: ceil(10 / 4)
    assert input_bytes(captured, 8, 1) == per_sample * 16
    plain = CostModel(problem()).stage(0, 1, 1, 4, 4)
    held = CostModel(problem(input_bytes=1234.0)).stage(0, 1, 1, 4, 4)
    assert held.memory == pytest.approx(plain.memory + 1234.0, rel=1e-12)
    stepping = dict(optimizer_transient=(0.0, 3.0))  # the optimizer step sets the peak
    plain = CostModel(problem(**stepping)).stage(0, 1, 1, 4, 4)
    held = CostModel(problem(input_bytes=1234.0, **stepping)).stage(0, 1, 1, 4, 4)
    assert held.memory == pytest.approx(plain.memory + 1234.0, rel=1e-12)
