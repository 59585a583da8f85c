"""A model captured on the meta device (as `rannc plan` does) must give the graph of the same model on the CPU,
or a real job refuses the offline plan (the graph hash differs)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import transformers
from torch import nn

from rannc.capture import capture

transformers.logging.set_verbosity_error()


class Indexing(nn.Module):
    """Assigns Python numbers into tensors (like T5's decoder-input shift) and indexes with Python lists (like
    Falcon's fused query/key/value split)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(32, 8)
        self.proj = nn.Linear(8, 8)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        shifted = ids.new_zeros(ids.shape)
        shifted[:, 1:] = ids[:, :-1].clone()
        shifted[:, 0] = 5
        hidden = self.embed(shifted)
        hidden[:, -1] = 0.5
        picked = hidden[:, :, [0, -2]] + hidden[[0, 0]].sum()
        return self.proj(hidden).sum() + picked.sum()


def _captures(
    make: Callable[[], nn.Module], inputs: Callable[[str], dict[str, torch.Tensor]]
) -> tuple[Any, Any]:
    torch.manual_seed(0)
    cpu = capture(make(), (), inputs("cpu"))
    with torch.device("meta"):
        model = make()
    return cpu, capture(model, (), inputs("meta"))


def test_numbers_and_lists_in_indexing_capture_the_same_graph_on_meta_and_cpu() -> None:
    ids = torch.randint(0, 32, (4, 6), generator=torch.Generator().manual_seed(0))
    cpu, meta = _captures(Indexing, lambda device: {"ids": ids.to(device)})
    assert meta.graph_hash == cpu.graph_hash
    # the numbers and the list indices are real constants in both graphs, not meta tensors
    assert sorted(meta.constants) == sorted(cpu.constants) and len(cpu.constants) == 4
    for name, value in meta.constants.items():
        assert value.device.type == "cpu" and torch.equal(value, cpu.constants[name])


VOCAB, SEQ = 128, 16
_HF_MODELS: dict[str, Callable[[], nn.Module]] = {
    "t5": lambda: transformers.T5ForConditionalGeneration(
        transformers.T5Config(
            vocab_size=VOCAB,
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=1,
            num_heads=4,
            use_cache=False,
            decoder_start_token_id=0,
            pad_token_id=0,
        )
    ),
    "falcon": lambda: transformers.FalconForCausalLM(
        transformers.FalconConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, use_cache=False
        )
    ),
    "bloom": lambda: transformers.BloomForCausalLM(
        transformers.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=1, n_head=2, use_cache=False)
    ),
    "mistral": lambda: transformers.MistralForCausalLM(
        transformers.MistralConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=SEQ,
            use_cache=False,
        )
    ),
    "bart": lambda: transformers.BartForConditionalGeneration(
        transformers.BartConfig(
            vocab_size=VOCAB,
            d_model=32,
            encoder_layers=1,
            decoder_layers=1,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            max_position_embeddings=SEQ,
            use_cache=False,
        )
    ),
}


@pytest.mark.parametrize("name", sorted(_HF_MODELS))
def test_hugging_face_models_capture_the_same_graph_on_meta_and_cpu(name: str) -> None:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1, VOCAB, (2, SEQ), generator=generator)
    labels = ids if name not in ("t5", "bart") else ids[:, : SEQ // 2].clone()
    cpu, meta = _captures(
        _HF_MODELS[name], lambda device: {"input_ids": ids.to(device), "labels": labels.to(device)}
    )
    assert meta.graph_hash == cpu.graph_hash
