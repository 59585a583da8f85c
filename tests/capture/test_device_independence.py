"""A model captured on the meta device (as `rannc plan` does) must give the graph of the same model on the CPU,
or a real job refuses the offline plan (the graph hash differs)."""

from __future__ import annotations

import torch
from torch import nn

from rannc.capture import capture


class ShiftRight(nn.Module):
    """Assigns Python numbers into tensors, like T5's decoder-input shift."""

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
        return self.proj(hidden).sum()


def test_scalar_assignment_captures_the_same_graph_on_meta_and_cpu() -> None:
    torch.manual_seed(0)
    ids = torch.randint(0, 32, (4, 6))
    cpu = capture(ShiftRight(), (ids,), {})
    with torch.device("meta"):
        meta_model = ShiftRight()
    meta = capture(meta_model, (ids.to("meta"),), {})
    assert meta.graph_hash == cpu.graph_hash
    # the numbers are real constants in both graphs, not meta tensors
    assert sorted(meta.constants) == sorted(cpu.constants) and len(cpu.constants) == 2
    for name, value in meta.constants.items():
        assert value.device.type == "cpu" and torch.equal(value, cpu.constants[name])
