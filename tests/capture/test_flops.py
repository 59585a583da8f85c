"""FLOPs per op from the recorded shapes (what rannc plan balances blocks by) equal those of a run of the graph."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import transformers
from torch import nn

from rannc.capture import FlatCall, capture
from rannc.capture.samples import example_leaves, placeholder_state, record_flops, shape_flops


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x)).flatten(1)
        return nn.functional.cross_entropy(self.head(h) @ torch.eye(10), y)


def models() -> dict[str, tuple[nn.Module, dict[str, Any]]]:
    transformers.logging.set_verbosity_error()
    ids = torch.zeros(2, 32, dtype=torch.long, device="meta")
    gpt2 = transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=4, n_positions=32, vocab_size=300, use_cache=False
    )
    t5 = transformers.T5Config(
        d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16, vocab_size=300, decoder_start_token_id=0
    )
    t5.use_cache, t5.pad_token_id = False, 0
    with torch.device("meta"):
        found = {
            "gpt2": (transformers.GPT2LMHeadModel(gpt2), {"input_ids": ids, "labels": ids}),
            "t5": (
                transformers.T5ForConditionalGeneration(t5),
                {"input_ids": ids, "labels": torch.zeros(2, 8, dtype=torch.long)},
            ),
        }
    found["conv"] = (ConvNet(), {"x": torch.randn(4, 3, 8, 8), "y": torch.zeros(4, dtype=torch.long)})
    return found


@pytest.mark.parametrize("name", ["gpt2", "t5", "conv"])
def test_shape_flops_equal_the_flops_of_a_run(name: str) -> None:
    model, kwargs = models()[name]
    captured = capture(model, (), kwargs)
    call = FlatCall.of((), kwargs)
    ran = record_flops(captured, placeholder_state(model, captured), example_leaves(model, captured, call, 2))
    shaped = shape_flops(captured, 2)
    assert shaped is not None and sum(ran.values()) > 0
    assert {k: v for k, v in shaped.items() if v} == {k: v for k, v in ran.items() if v}
