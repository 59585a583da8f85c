"""A model captured on the meta device (as `rannc plan` does) must give the graph of the same model on the CPU,
or a real job refuses the offline plan (the graph hash differs)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import models
import pytest
import torch
from torch import nn

from rannc.capture import capture


class Indexing(nn.Module):
    """Assigns Python numbers into tensors (like T5's decoder-input shift) and indexes with Python lists of
    numbers, nested lists and lists of booleans (like Falcon's fused query/key/value split)."""

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
        picked = hidden[:, :, [0, -2]] + hidden[[0, 0]].sum() + hidden[:, [[0, 1], [2, 3]]].sum()
        masked = hidden[:, :, [True, False] * 4]
        return self.proj(hidden).sum() + picked.sum() + masked.sum()


def _captures(make: Callable[[], nn.Module], kwargs: dict[str, torch.Tensor]) -> tuple[Any, Any]:
    """(CPU capture, meta capture) of the module `make` builds, called with `kwargs`."""
    torch.manual_seed(0)
    cpu = capture(make(), (), kwargs)
    with torch.device("meta"):
        model = make()
    return cpu, capture(model, (), {key: value.to("meta") for key, value in kwargs.items()})


def test_numbers_and_lists_in_indexing_capture_the_same_graph_on_meta_and_cpu() -> None:
    ids = torch.randint(0, 32, (4, 6), generator=torch.Generator().manual_seed(0))
    cpu, meta = _captures(Indexing, {"ids": ids})
    assert meta.graph_hash == cpu.graph_hash
    # the numbers and the list indices are real constants in both graphs, not meta tensors
    assert sorted(meta.constants) == sorted(cpu.constants) and len(cpu.constants) == 6
    for name, value in meta.constants.items():
        assert value.device.type == "cpu" and torch.equal(value, cpu.constants[name])


@pytest.mark.parametrize("name", ["t5", "bart", "falcon", "bloom", "llama"])
def test_hugging_face_models_capture_the_same_graph_on_meta_and_cpu(name: str) -> None:
    """T5 and BART assign numbers, Falcon indexes with lists; BLOOM and Llama build masks and positions."""
    batch = models.make_batches(name, 0, 1, 2)[0]
    cpu, meta = _captures(lambda: models.build(name, 0), batch["kwargs"])
    assert meta.graph_hash == cpu.graph_hash
