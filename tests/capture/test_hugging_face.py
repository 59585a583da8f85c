"""Hugging Face models built from default configs (use_cache=True) capture as with use_cache=False."""

from __future__ import annotations

import models
import pytest
import torch
import transformers

from rannc.capture import capture
from rannc.capture.hugging_face import generation_cache_configs
from rannc.errors import CaptureError


def _call(name: str) -> tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]:
    batch = models.make_batches(name, 0, 1, 2)[0]
    return tuple(batch["args"]), batch["kwargs"]


def _without_cache(name: str) -> torch.nn.Module:
    """What users had to write before: the same model with use_cache=False in its config."""
    model_class, config_class, fields = models.AS_USERS_BUILD[name]
    config = getattr(transformers, config_class)(**fields, use_cache=False)
    torch.manual_seed(0)
    return getattr(transformers, model_class)(config).train()


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(models.AS_USERS_BUILD))
def test_default_config_gives_the_use_cache_false_graph(name: str) -> None:
    """The same graph (hash) and output structure as use_cache=False, so a plan made for either loads for the
    other and planning costs the same; the user's config is left as it was."""
    model = models.as_users_build(name, 0)
    assert model.config.use_cache
    configs = generation_cache_configs(model)
    assert model.config in configs
    args, kwargs = _call(name)
    default = capture(model, args, kwargs)
    reference = capture(_without_cache(name), args, kwargs)
    assert default.graph_hash == reference.graph_hash
    assert default.out_spec == reference.out_spec
    assert all(config.use_cache for config in configs)


class WithLanguageModel(torch.nn.Module):
    """A user's module holding a default-config GPT-2 and calling it with keywords."""

    def __init__(self) -> None:
        super().__init__()
        self.lm = models.as_users_build("gpt2", 0)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids, labels=input_ids).loss


def test_hugging_face_submodule_captures_without_cache() -> None:
    model = WithLanguageModel().train()
    args, kwargs = _call("gpt2")
    captured = capture(model, (kwargs["input_ids"],), {})
    assert len(captured.user_outputs) == 1
    assert model.lm.config.use_cache


def test_call_asking_for_a_cache_is_refused_with_the_fix() -> None:
    model = models.as_users_build("gpt2", 0)
    args, kwargs = _call("gpt2")
    with pytest.raises(
        CaptureError, match=r"returns a transformers DynamicCache.*passes use_cache=True: drop it"
    ):
        capture(model, args, {**kwargs, "use_cache": True})
    assert model.config.use_cache  # restored after the failure too


def test_models_without_transformers_configs_are_left_alone() -> None:
    assert generation_cache_configs(models.build("mlp", 0)) == []
    assert generation_cache_configs(_without_cache("gpt2")) == []
