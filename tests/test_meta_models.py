"""Models built on the meta device: each rank materialises only its stage, from a weights file (read in part) or
an init function, and trains exactly as one process that loaded the same weights."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from distributed_helpers import run_workers
from models import forced_plan
from safetensors.torch import save_file
from torch import nn

import rannc
from rannc.errors import ConfigError
from rannc.runtime.weights import init_weights

SEQ = 8


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc = nn.Linear(width, width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + torch.tanh(self.fc(self.norm(h)))


class TiedLM(nn.Module):
    """Tied input/output embeddings, a persistent buffer and a non-persistent one (not in any weights file)."""

    def __init__(self, vocab: int = 64, width: int = 32, layers: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.Sequential(*[Block(width) for _ in range(layers)])
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("scale", torch.full((width,), 0.5))
        self.register_buffer("positions", torch.linspace(0, 1, SEQ), persistent=False)

    def forward(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids) * self.scale + self.positions[: ids.shape[1], None]
        logits = self.head(self.blocks(h))
        return nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())


def init_fn(module: nn.Module) -> None:
    """What a user passes as init_weights: reset_parameters where there is one, and the root's buffers."""
    if hasattr(module, "reset_parameters"):
        module.reset_parameters()
    if isinstance(module, TiedLM):
        module.scale.fill_(0.5)
        module.positions.copy_(torch.linspace(0, 1, SEQ))


def batches(steps: int = 3, rows: int = 8) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, 64, (rows, SEQ + 1), generator=g) for _ in range(steps)]


def train(model: Any, optimizer: torch.optim.Optimizer, rank: int, world: int) -> list[float]:
    losses = []
    for tokens in batches():
        lo, hi = rank * len(tokens) // world, (rank + 1) * len(tokens) // world
        loss = model(tokens[lo:hi, :-1], tokens[lo:hi, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    return losses


def meta_worker(rank: int, world: int, source: dict[str, Any]) -> dict[str, Any]:
    torch.manual_seed(0)
    with torch.device("meta"):
        model = TiedLM()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    wrapped = rannc.RaNNCModule(model, optimizer, **source, **forced_plan(world))
    initial = None
    if "init_weights" in source:  # the weights as initialised, before any step
        with torch.no_grad():
            wrapped(batches()[0][:2, :-1], batches()[0][:2, 1:])
        initial = wrapped.state_dict()
    losses = train(wrapped, optimizer, rank, world)
    state = wrapped.state_dict()
    return {"losses": losses, "state": state if rank == 0 else None, "initial": initial}


def one_process(load: dict[str, torch.Tensor]) -> dict[str, Any]:
    torch.manual_seed(123)
    model = TiedLM()
    model.load_state_dict(load)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return {"losses": train(model, optimizer, 0, 1), "state": model.state_dict()}


def assert_same(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    assert set(state) == set(expected), what
    for name, value in expected.items():
        assert torch.allclose(state[name], value, rtol=1e-5, atol=1e-6), f"{what}: {name}"


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One model's weights saved the ways users have them; HF-style files store tied weights once."""
    torch.manual_seed(0)
    model = TiedLM()
    with torch.no_grad():
        model.scale.uniform_()  # a buffer whose value must come from the file
    state = {k: v.clone() for k, v in model.state_dict().items()}
    base = tmp_path_factory.mktemp("weights")
    torch.save(state, base / "model.pt")
    once = {k: v.contiguous() for k, v in state.items() if k != "head.weight"}
    save_file(once, str(base / "model.safetensors"))
    shards = base / "hf"
    shards.mkdir()
    keys = sorted(once)
    parts = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for file, names in parts.items():
        save_file({k: once[k] for k in names}, str(shards / file))
    index = {"metadata": {}, "weight_map": {k: f for f, names in parts.items() for k in names}}
    (shards / "model.safetensors.index.json").write_text(json.dumps(index))
    return {"state": state, "base": base}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["model.pt", "model.safetensors", "hf"])
def test_meta_model_loads_its_stage_and_trains_as_one_process(kind: str, weights: dict[str, Any]) -> None:
    # the file lacks the non-persistent buffer: init_weights computes it
    source = {"load_weights": str(weights["base"] / kind), "init_weights": init_fn}
    runs = run_workers(meta_worker, 2, source, timeout=300)
    reference = one_process(weights["state"])
    for run in runs:
        assert run["losses"] == pytest.approx(reference["losses"], rel=1e-5)
    assert_same(runs[0]["state"], reference["state"], kind)


@pytest.mark.slow
def test_init_weights_gives_the_same_model_on_any_plan(tmp_path: Path) -> None:
    """Each submodule is initialised under a generator seeded by its name: 2 ranks / 2 stages and 1 rank get the
    same weights, which equal the per-submodule initialisation of the whole model in one process."""
    two = run_workers(meta_worker, 2, {"init_weights": init_fn}, timeout=300)
    one = run_workers(meta_worker, 1, {"init_weights": init_fn}, timeout=300)
    assert_same(two[0]["initial"], one[0]["initial"], "2 ranks vs 1 rank")
    with torch.device("meta"):
        model = TiedLM()
    model.to_empty(device="cpu")
    model.head.weight = model.embed.weight  # to_empty unties them (rannc keeps them tied)
    torch.manual_seed(0)
    names = {id(t): n for n, t in list(model.named_parameters()) + list(model.named_buffers())}
    shapes = {n: (t.shape, t.dtype) for n, t in list(model.named_parameters()) + list(model.named_buffers())}
    init_weights(model, init_fn, set(names.values()), names, shapes, seed=torch.initial_seed())
    expected = model.state_dict()
    assert_same(one[0]["initial"], expected, "1 rank vs the whole model initialised in one process")
    reference = one_process(expected)
    assert two[0]["losses"] == pytest.approx(reference["losses"], rel=1e-5)


def test_meta_model_without_weights_is_refused() -> None:
    with torch.device("meta"):
        model = TiedLM()
    with pytest.raises(ConfigError, match="load_weights=PATH.*init_weights=FN"):
        rannc.RaNNCModule(model, torch.optim.SGD(model.parameters(), lr=0.1))


WIDE, LAYERS = 4096, 16  # 16 x 64 MiB of fp32 weights: 1 GiB


def wide_mlp() -> nn.Module:
    return nn.Sequential(*[nn.Sequential(nn.Linear(WIDE, WIDE), nn.Tanh()) for _ in range(LAYERS)])


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/self/status")


def rss_worker(
    rank: int, world: int, weights_path: str, on_meta: bool, profile_cache_dir: str
) -> dict[str, float]:
    """Wrap the 1 GiB model (built on meta with load_weights, or whole on every rank) and make the first call
    (capture, profile, plan, materialise and load this rank's stage); report the peak resident memory.
    `profile_cache_dir`: an empty directory, so that every block is profiled (a cached profile measures nothing)."""
    import time

    baseline = _status_kib("VmRSS")  # torch, rannc and the process group, no model yet
    torch.manual_seed(0)
    x = torch.randn(2, WIDE)  # before the model: building on meta draws no random numbers
    if on_meta:
        with torch.device("meta"):
            model = wide_mlp()
        source: dict[str, Any] = {"load_weights": weights_path}
    else:
        from safetensors.torch import load_file

        model = wide_mlp()
        model.load_state_dict(load_file(weights_path))
        source = {}
    # a memory limit that fits 4 of the 16 layers' weights and gradients per rank: 4 stages of 4 layers
    plan = forced_plan(
        world, microbatches=1, mem_limit_gb=0.85, opt_param_factor=0.0, profile_cache_dir=profile_cache_dir
    )
    wrapped = rannc.RaNNCModule(model, None, **source, **plan)
    started = time.perf_counter()
    with torch.no_grad():
        out = wrapped(x)
    first_call = time.perf_counter() - started
    return {
        "baseline_gib": baseline / 2**20,
        "peak_gib": _status_kib("VmHWM") / 2**20,
        "first_call_s": first_call,
        "out_norm": float(out.norm()),
        "stages": len(wrapped.deployment.plan.stages),
        "held_gib": sum(p.numel() * p.element_size() for p in wrapped.parameters()) / 2**30,
    }


@pytest.mark.slow
def test_host_memory_is_the_stage_share(tmp_path: Path) -> None:
    """4 ranks / 4 stages of a 1 GiB model: built on meta, no rank's peak resident memory exceeds what it had
    before the model plus half the model's bytes; built whole on every rank (for comparison) each holds it all."""
    torch.manual_seed(0)
    model = wide_mlp()
    model_gib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    assert model_gib >= 1.0
    path = tmp_path / "wide.safetensors"
    save_file(model.state_dict(), str(path))
    del model
    # Each run profiles into its own empty cache: profiling block after block is part of what is measured.
    meta_profiles, whole_profiles = tmp_path / "meta-profiles", tmp_path / "whole-profiles"
    meta = run_workers(rss_worker, 4, str(path), True, str(meta_profiles), timeout=500)
    whole = run_workers(rss_worker, 4, str(path), False, str(whole_profiles), timeout=500)
    assert len(list(meta_profiles.glob("*.json"))) == 1 and len(list(whole_profiles.glob("*.json"))) == 1
    for rank, (m, w) in enumerate(zip(meta, whole)):
        print(
            f"rank {rank}: meta-built peak {m['peak_gib']:.2f} GiB (baseline {m['baseline_gib']:.2f}, first call "
            f"{m['first_call_s']:.1f} s); built whole {w['peak_gib']:.2f} GiB (baseline {w['baseline_gib']:.2f})"
        )
        assert m["stages"] == 4 and m["held_gib"] <= 0.26, m
        assert m["peak_gib"] - m["baseline_gib"] <= 0.5 * model_gib, (rank, m)
        assert w["peak_gib"] - w["baseline_gib"] >= model_gib, (rank, w)
        assert m["out_norm"] == pytest.approx(w["out_norm"], rel=1e-5)  # the same weights, loaded in parts


def resume_worker(rank: int, world: int, directory: str, phase: str) -> dict[str, Any]:
    """phase "first": a meta-built job trains 2 steps, saves (save_sharded and state_dict), trains 2 more.
    phase "resume": a meta-built job of another world size loads the sharded checkpoint and trains the 2 more."""
    torch.manual_seed(0)
    with torch.device("meta"):
        model = TiedLM()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    source = {"init_weights": init_fn} if phase == "first" else {"load_weights": directory + "/ckpt"}
    if phase == "resume":
        source["init_weights"] = init_fn  # the non-persistent buffer is in no checkpoint
    wrapped = rannc.RaNNCModule(model, optimizer, **source, **forced_plan(world))
    data = batches(steps=4)
    saved = None

    def step(tokens: torch.Tensor) -> float:
        lo, hi = rank * len(tokens) // world, (rank + 1) * len(tokens) // world
        loss = wrapped(tokens[lo:hi, :-1], tokens[lo:hi, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return float(loss)

    losses = []
    if phase == "first":
        losses += [step(t) for t in data[:2]]
        wrapped.save_sharded(directory + "/ckpt")
        saved = wrapped.state_dict()
        if rank == 0:
            torch.save(saved, directory + "/model.pt")
    losses += [step(t) for t in data[2:]]
    return {"losses": losses, "saved": saved, "final": wrapped.state_dict()}


@pytest.mark.slow
def test_meta_job_checkpoint_resumes_on_another_world_size(tmp_path: Path) -> None:
    first = run_workers(resume_worker, 2, str(tmp_path), "first", timeout=300)
    resumed = run_workers(resume_worker, 1, str(tmp_path), "resume", timeout=300)
    assert resumed[0]["losses"] == pytest.approx(first[0]["losses"][2:], rel=1e-5)
    assert_same(resumed[0]["final"], first[0]["final"], "resumed on 1 rank vs uninterrupted on 2")
    # the full state dict written by the meta-built job is the weights it had (and loads into a plain model)
    plain = TiedLM()
    plain.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    assert_same(plain.state_dict(), first[0]["saved"], "state_dict() file")
