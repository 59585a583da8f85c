"""Hugging Face models as users build them (default configs: use_cache=True, return_dict=True) train with rannc
on 2 ranks exactly as one process trains the unwrapped model on the global batch, and plan offline.

transformers 5 returns a key/value cache from a decoder called in training mode when its config has use_cache=True;
rannc captures without it (a cache is for generation), so the wrapped model returns the unwrapped model's outputs
less the cache. The models' configs are left as the user built them.
"""

from __future__ import annotations

import functools
from typing import Any

import models
import pytest
import torch
import transformers
from distributed_helpers import run_workers

import rannc
from rannc.offline import plan_offline

NAMES = ("bert", "gpt2", "llama", "t5")
STEPS, GLOBAL_BATCH, LR = 2, 8, 0.05


def _optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)


def _without_cache(out: Any) -> list[str]:
    """The output's keys other than a generation cache."""
    return [key for key, value in out.items() if not isinstance(value, transformers.Cache)]


def train_worker(rank: int, world: int, cache_dir: str) -> dict[str, dict[str, Any]]:
    """Each default-config model on 2 stages x 2 microbatches (verify on), STEPS steps of SGD with momentum."""
    results: dict[str, dict[str, Any]] = {}
    for name in NAMES:
        model = models.as_users_build(name, 0)
        optimizer = _optimizer(model)
        wrapped = rannc.RaNNCModule(
            model,
            optimizer,
            partition_num=2,
            min_pipeline=2,
            max_pipeline=2,
            verify=True,
            profile_iterations=1,
            show_progress=False,
            profile_cache_dir=cache_dir,
        )
        losses, keys, outputs = [], [], {}
        for step, batch in enumerate(models.make_batches(name, 0, STEPS, GLOBAL_BATCH)):
            out = models.call(wrapped, models.local_slice(batch, rank, world))
            if step == 0:
                keys = list(out.keys())
                outputs = {k: v.detach().clone() for k, v in models.batch_outputs(name, out).items()}
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(out.loss.item())
        state = wrapped.state_dict()
        results[name] = {
            "losses": losses,
            "keys": keys,
            "outputs0": outputs,
            "state": state if rank == 0 else None,
            "use_cache": model.config.use_cache,
            "positions": wrapped.deployment.plan.positions,
        }
        del wrapped, optimizer, model
    return results


def _reference(name: str) -> dict[str, Any]:
    """The unwrapped default-config model trained on the whole global batch in one process."""
    model = models.as_users_build(name, 0)
    optimizer = _optimizer(model)
    losses, keys, outputs = [], [], {}
    for step, batch in enumerate(models.make_batches(name, 0, STEPS, GLOBAL_BATCH)):
        out = models.call(model, batch)
        if step == 0:
            keys = _without_cache(out)
            outputs = {k: v.detach() for k, v in models.batch_outputs(name, out).items()}
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out.loss.item())
    return {"losses": losses, "keys": keys, "outputs0": outputs, "state": model.state_dict()}


@pytest.mark.slow
def test_default_config_models_train_as_one_process(tmp_path) -> None:
    runs = run_workers(train_worker, 2, str(tmp_path), timeout=480)
    for name in NAMES:
        expected = _reference(name)
        for rank, run in enumerate(result[name] for result in runs):
            assert run["positions"] == 2, name  # a pipeline over both ranks
            assert run["use_cache"], f"{name}: the user's config was changed"
            assert run["keys"] == expected["keys"], f"{name} rank {rank}: output keys"
            torch.testing.assert_close(run["losses"], expected["losses"], rtol=1e-5, atol=1e-6)
            lo, hi = models.row_range(GLOBAL_BATCH, rank, 2)
            for key, value in expected["outputs0"].items():
                torch.testing.assert_close(run["outputs0"][key], value[lo:hi], rtol=1e-5, atol=1e-6)
        for key, value in expected["state"].items():
            torch.testing.assert_close(runs[0][name]["state"][key], value, rtol=1e-5, atol=1e-6, msg=key)


def default_gpt2_factory(
    use_cache: bool | None = None,
) -> tuple[torch.nn.Module, tuple[Any, ...], dict[str, Any]]:
    """A meta GPT-2 from the config's defaults (use_cache=True) apart from its size."""
    sizes = dict(n_layer=2, n_embd=64, n_head=4, n_positions=32, vocab_size=512)
    config = transformers.GPT2Config(**sizes, **({} if use_cache is None else {"use_cache": use_cache}))
    with torch.device("meta"):
        model = transformers.GPT2LMHeadModel(config)
    ids = torch.zeros(2, 32, dtype=torch.long, device="meta")
    return model, (), {"input_ids": ids, "labels": ids}


def test_default_config_plans_offline_as_use_cache_false() -> None:
    """`rannc plan` of a default-config model: the same graph and plan as with use_cache=False."""
    plans = [
        plan_offline(
            functools.partial(default_gpt2_factory, use_cache),
            world_size=8,
            device_memory_bytes=40 * 2**30,
            global_batch=32,
            device="a100-40gb",
        ).deployment
        for use_cache in (None, False)
    ]
    assert plans[0].graph_hash == plans[1].graph_hash
    assert plans[0].plan == plans[1].plan
