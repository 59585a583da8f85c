"""Hugging Face models as users build them: capture and run their training forward without a generation cache.

Every transformers config has `use_cache=True` by default (and every `from_pretrained` model keeps it), and in
transformers 5.x a decoder then returns a key/value cache object (`DynamicCache`, `EncoderDecoderCache`) even in
training mode. torch.export cannot return such an object, and a cache is for generation, not training: it would
make every layer's keys and values an output that each stage keeps alive and sends to the user's rank. So while
rannc captures (or runs the unpartitioned reference of `verify`), every transformers config of the model says
`use_cache=False`, as gradient checkpointing makes transformers do in training; the wrapped model returns the
outputs the unwrapped one returns with `use_cache=False` (the same ModelOutput, without the cache). A call that
passes `use_cache=True` itself still asks for a cache and is refused at capture.

transformers is not imported here: a model can only be a transformers model once the user has imported it.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from typing import Any

import torch

logger = logging.getLogger(__name__)

__all__ = ["generation_cache_configs", "without_generation_cache"]


def generation_cache_configs(model: torch.nn.Module) -> list[Any]:
    """The transformers configs of `model` (of any submodule, and their nested configs, e.g. a multimodal model's
    `text_config`) that turn the key/value cache on; [] for a model without any."""
    pretrained_model = getattr(sys.modules.get("transformers.modeling_utils"), "PreTrainedModel", None)
    configuration = sys.modules.get("transformers.configuration_utils")
    # PreTrainedConfig in transformers 5, PretrainedConfig before (5 keeps both names)
    pretrained_config = getattr(
        configuration, "PreTrainedConfig", getattr(configuration, "PretrainedConfig", None)
    )
    if pretrained_model is None or pretrained_config is None:
        return []
    configs: dict[int, Any] = {}

    def collect(config: Any) -> None:
        if isinstance(config, pretrained_config) and id(config) not in configs:
            configs[id(config)] = config
            for value in list(vars(config).values()):
                collect(value)

    for module in model.modules():
        if isinstance(module, pretrained_model):
            collect(getattr(module, "config", None))
    return [config for config in configs.values() if getattr(config, "use_cache", None)]


@contextlib.contextmanager
def without_generation_cache(model: torch.nn.Module) -> Iterator[None]:
    """Within the block, every transformers config of `model` has `use_cache=False`; restored afterwards."""
    configs = generation_cache_configs(model)
    if configs:
        logger.info(
            "%s: capturing with use_cache=False (a key/value cache is for generation; the wrapped model returns "
            "no cache while training)",
            type(model).__name__,
        )
    previous = [config.use_cache for config in configs]
    try:
        for config in configs:
            config.use_cache = False
        yield
    finally:
        for config, value in zip(configs, previous):
            config.use_cache = value
