"""Tests of the analytic (FLOPs + bytes roofline) block estimates on meta models, without a device."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.fx as fx
import transformers
from fake_devices import fake_device
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from rannc.capture import CapturedGraph, FlatCall, capture
from rannc.capture.inputs import concrete_shape
from rannc.capture.samples import record_values
from rannc.graph.analysis import GraphAnalysis, analyse, atomic_units
from rannc.graph.stage import build_stage
from rannc.profile.analytic import (
    analytic_block_profiles,
    block_meta_inputs,
    estimate_block,
    estimate_runner,
)
from rannc.profile.devices import get_device_profile
from rannc.profile.measure import BlockRunner, measure_block

ROOT = Path(__file__).resolve().parents[2]
FAKE = fake_device(peak_flops={"float32": 1e12, "bfloat16": 4e12}, matmul_efficiency=0.5, op_overhead=1e-6)


def roofline(flops: float, nbytes: float, peak: float = 1e12) -> float:
    return max(flops / (peak * 0.5), nbytes / (1e11 * 0.8)) + 1e-6


def blocks_of(analysis: GraphAnalysis, count: int) -> list[list[str]]:
    units = atomic_units(analysis)
    return [sum(units[i * len(units) // count : (i + 1) * len(units) // count], []) for i in range(count)]


def meta_gpt2(layers: int = 2, width: int = 64, seq: int = 32, rows: int = 2) -> CapturedGraph:
    config = transformers.GPT2Config(
        n_layer=layers, n_embd=width, n_head=4, vocab_size=1000, n_positions=seq, use_cache=False
    )
    with torch.device("meta"):
        model = transformers.GPT2LMHeadModel(config)
    ids = torch.zeros(rows, seq, dtype=torch.long, device="meta")
    return capture(model, (), {"input_ids": ids, "labels": ids})


@pytest.fixture(scope="module")
def gpt2() -> tuple[CapturedGraph, GraphAnalysis, list[list[str]]]:
    captured = meta_gpt2()
    analysis = analyse(captured)
    return captured, analysis, blocks_of(analysis, 5)


def test_linear_flops_and_roofline() -> None:
    m, fan_in, fan_out = 8, 64, 256
    weight = torch.empty(fan_out, fan_in, device="meta", requires_grad=True)
    bias = torch.empty(fan_out, device="meta", requires_grad=True)
    est = estimate_block(
        lambda x, w, b: (torch.nn.functional.linear(x, w, b),),
        [torch.empty(m, fan_in), weight, bias],
        FAKE,
        param_indices=frozenset({1, 2}),
    )
    forward = 2 * m * fan_in * fan_out
    assert est.total("flops", "fwd") == forward
    assert est.total("flops", "bwd") == 2 * forward
    addmm_bytes = 4 * (fan_out + m * fan_in + fan_in * fan_out + m * fan_out)
    assert [op.op for op in est.ops if op.phase == "fwd"] == ["aten.addmm"]
    assert est.total("bytes", "fwd") == addmm_bytes
    assert est.fwd_time == pytest.approx(roofline(forward, addmm_bytes))
    assert est.bwd_time == pytest.approx(
        sum(roofline(op.flops, op.bytes) for op in est.ops if op.phase == "bwd")
    )
    assert est.activation_bytes == 4 * m * fan_in  # x is saved; the weight is a parameter
    bf16 = estimate_block(
        lambda x, w, b: (torch.nn.functional.linear(x, w, b),),
        [torch.empty(m, fan_in), weight, bias],
        FAKE,
        "bfloat16",
        param_indices=frozenset({1, 2}),
    )
    assert bf16.total("bytes", "fwd") == addmm_bytes / 2 and bf16.activation_bytes == 2 * m * fan_in
    assert bf16.fwd_time == pytest.approx(roofline(forward, addmm_bytes / 2, peak=4e12))


def test_captured_linear_block_on_meta() -> None:
    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU())
    captured = capture(model, (torch.empty(4, 64, device="meta"),), {})
    analysis = analyse(captured)
    (profile,) = analytic_block_profiles(captured, analysis, [analysis.order], [1, 2, 16], FAKE)
    for m in (1, 2, 16):
        addmm = roofline(2 * m * 64 * 256, 4 * (256 + m * 64 + 64 * 256 + m * 256))
        relu = roofline(0, 4 * 2 * m * 256)
        assert profile.fwd_time[m] == pytest.approx(addmm + relu)
        assert profile.activation_bytes[m] == 4 * m * 64 + 4 * m * 256  # x and relu's output


def test_gpt2_block_flops_sum_to_whole_model(gpt2: Any) -> None:
    captured, analysis, blocks = gpt2
    m = 3
    static: dict[str, torch.Tensor] = {}
    block_flops, block_bwd = 0.0, 0.0
    for nodes in blocks:
        graph = build_stage(captured, analysis, nodes)
        indices = frozenset(
            i for i, x in enumerate(graph.inputs) if x.kind in ("param", "buffer", "constant")
        )
        inputs = block_meta_inputs(captured, graph, m, static)
        assert all(x.device.type == "meta" for x in inputs if isinstance(x, torch.Tensor))
        est = estimate_block(graph.module, inputs, FAKE, param_indices=indices)
        block_flops += est.total("flops", "fwd")
        block_bwd += est.total("flops", "bwd")
    counter = FlopCounterMode(display=False)
    with counter:
        captured.gm(*whole_graph_inputs(captured, m))
    whole = counter.get_total_flops()
    assert block_flops == pytest.approx(whole, rel=0.01)
    layers, width, seq, vocab = 2, 64, 32, 1000
    tokens = m * seq
    formula = 2 * tokens * (12 * layers * width**2 + width * vocab) + 4 * layers * tokens * seq * width
    assert block_flops == pytest.approx(formula, rel=0.01)
    assert 1.9 < block_bwd / block_flops < 2.3  # 2x, flash attention's backward recomputes (2.5x)


def whole_graph_inputs(captured: CapturedGraph, m: int) -> list[torch.Tensor]:
    inputs = []
    for node in captured.gm.graph.nodes:
        if node.op == "placeholder":
            val = node.meta["val"]
            shape = concrete_shape(tuple(val.shape), captured.batch_symbol, m)
            inputs.append(torch.empty(shape, dtype=val.dtype, device="meta"))
    return inputs


def test_activation_bytes_grow_linearly(gpt2: Any) -> None:
    captured, analysis, blocks = gpt2
    profiles = analytic_block_profiles(
        captured, analysis, blocks, [1, 2, 4, 8], get_device_profile("a100-80gb")
    )
    total = {m: sum(p.activation_bytes[m] for p in profiles) for m in (1, 2, 4, 8)}
    per_sample = total[4] - total[2]
    assert per_sample > 0 and per_sample % 2 == 0
    per_sample //= 2
    assert total[8] == total[2] + 6 * per_sample  # exactly linear from 2 samples on
    # At one sample the loss's shifted labels ([1, seq] sliced from [1, seq + 1]) count as contiguous, so eager
    # `contiguous` keeps the slice (and its one extra label) instead of copying it: one int64 more, as a real run.
    assert total[1] == total[2] - per_sample + 8
    assert total[8] > 7 * total[1]  # the part that does not depend on the batch is small
    for p in profiles:
        assert p.fwd_time[1] <= p.fwd_time[8] and p.bwd_time[1] <= p.bwd_time[8]


def test_matches_measured_activations_of_a_real_model() -> None:
    """The estimate on meta tensors sees the same saved tensors as a real run on the CPU."""
    import models

    model = models.build("gpt2", 0)
    batch = models.make_batches("gpt2", 0, 1, 4)[0]
    captured = capture(model, tuple(batch["args"]), batch["kwargs"])
    analysis = analyse(captured)
    blocks = blocks_of(analysis, 3)
    meta_profiles = analytic_block_profiles(captured, analysis, blocks, [4], get_device_profile("cpu"))
    state = {p: model.get_parameter(f) for p, f in captured.params.items()}
    state.update({b: model.get_buffer(f) for b, f in captured.buffers.items()})
    recorded, _ = record_values(captured, state, FlatCall.of(tuple(batch["args"]), batch["kwargs"]).leaves)
    recorded.update(state)
    for nodes, meta_profile in zip(blocks, meta_profiles):
        graph = build_stage(captured, analysis, nodes)
        indices = frozenset(
            i for i, x in enumerate(graph.inputs) if x.kind in ("param", "buffer", "constant")
        )
        runner = BlockRunner(graph.module, lambda m, g=graph: [recorded[x.name] for x in g.inputs], indices)
        measured = measure_block(runner, [4], iterations=1).activation_bytes[4]
        estimated = estimate_runner(runner, 4, get_device_profile("cpu")).activation_bytes
        assert estimated == meta_profile.activation_bytes[4]  # real inputs moved to meta = meta inputs
        assert estimated == pytest.approx(measured, rel=0.05)


def test_fused_attention_is_linear_in_sequence_bytes() -> None:
    graph = fx.Graph()
    q, k, v = (graph.placeholder(name) for name in "qkv")
    sdpa = torch.ops.aten.scaled_dot_product_attention.default
    graph.output((graph.call_function(sdpa, (q, k, v), {"is_causal": True}),))
    gm = fx.GraphModule(torch.nn.Module(), graph)
    shape = (2, 4, 256, 32)
    inputs = [torch.empty(shape, device="meta") for _ in range(3)]
    fused = estimate_block(gm, inputs, FAKE)
    unfused = estimate_block(gm, inputs, FAKE, fused_attention=False)
    assert (
        fused.total("flops", "fwd") == sdpa_flop_count(shape, shape, shape) == unfused.total("flops", "fwd")
    )
    lse = 2 * 4 * 256 * 4
    assert fused.total("bytes", "fwd") == 4 * 4 * 2 * 4 * 256 * 32 + lse  # q, k, v, out, logsumexp
    assert unfused.total("bytes", "fwd") > 3 * fused.total("bytes", "fwd")  # the 256 x 256 scores
    assert fused.activation_bytes == 4 * 4 * 2 * 4 * 256 * 32 + lse


def test_op_without_meta_kernel_is_counted_free(caplog: pytest.LogCaptureFixture) -> None:
    @torch.library.custom_op("rannc_test::needs_data", mutates_args=())
    def needs_data(x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    graph = fx.Graph()
    x = graph.placeholder("x")
    w = graph.placeholder("w")
    y = graph.call_function(torch.ops.rannc_test.needs_data.default, (x,))
    z = graph.call_function(torch.ops.aten.mm.default, (y, w))
    graph.output((z,))
    x.meta["val"] = torch.empty(8, 16, device="meta")
    y.meta["val"] = torch.empty(8, 16, device="meta")
    gm = fx.GraphModule(torch.nn.Module(), graph)
    weight = torch.empty(16, 4, device="meta", requires_grad=True)
    with caplog.at_level(logging.WARNING, logger="rannc.profile.analytic"):
        est = estimate_block(gm, [torch.empty(8, 16), weight], FAKE, param_indices=frozenset({1}))
    assert "does not run on meta tensors" in caplog.text
    assert est.total("flops", "fwd") == 2 * 8 * 16 * 4


def test_rejects_unknown_dtype() -> None:
    with pytest.raises(ValueError, match="unsupported compute dtype 'fp8'"):
        estimate_block(lambda x: (x,), [torch.empty(2)], FAKE, "fp8")


MEMORY_SCRIPT = """
import json, resource, sys, time, torch, transformers
from rannc.capture import capture
from rannc.graph.analysis import analyse, atomic_units
from rannc.profile.analytic import analytic_block_profiles
from rannc.profile.devices import get_device_profile
config = transformers.GPT2Config(n_layer=8, n_embd=2048, n_head=16, n_positions=512, use_cache=False)
with torch.device("meta"):
    model = transformers.GPT2LMHeadModel(config)
params = sum(p.numel() * p.element_size() for p in model.parameters())
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
started = time.perf_counter()
ids = torch.zeros(2, 512, dtype=torch.long, device="meta")
captured = capture(model, (), {"input_ids": ids, "labels": ids})
analysis = analyse(captured)
units = atomic_units(analysis)
blocks = [sum(units[i * len(units) // 16 : (i + 1) * len(units) // 16], []) for i in range(16)]
profiles = analytic_block_profiles(captured, analysis, blocks, [1, 2, 4, 8], get_device_profile("h100"), "bfloat16")
seconds = time.perf_counter() - started
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
print(json.dumps({"params": params, "grown": grown, "seconds": seconds, "fwd8": sum(p.fwd_time[8] for p in profiles)}))
"""


@pytest.mark.slow
def test_large_meta_model_uses_little_memory() -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "TRANSFORMERS_VERBOSITY": "error"}
    done = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["params"] > 2e9  # real parameters would need > 2 GB
    assert result["grown"] < 2**30
    assert result["seconds"] < 30
    assert result["fwd8"] > 0


def test_parameter_gradients_are_priced_in_their_own_dtype() -> None:
    # A bfloat16 compute dtype prices activations in 2 bytes, but a float32 weight's gradient (autocast) takes 4.
    weight = torch.empty(256, 64, device="meta", requires_grad=True)
    inputs = [torch.empty(8, 64, device="meta"), weight]

    def linear(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor]:
        return (x @ w.t(),)

    full = estimate_block(linear, inputs, FAKE, "float32", param_indices=frozenset({1}))
    half = estimate_block(linear, inputs, FAKE, "bfloat16", param_indices=frozenset({1}))
    assert half.activation_bytes == full.activation_bytes / 2
    assert half.workspace_bytes >= 256 * 64 * 4  # the weight's float32 gradient
    assert half.workspace_bytes - 256 * 64 * 4 <= full.workspace_bytes - 256 * 64 * 4 + 1e-9
