"""Capture of forward() signatures: named keyword inputs get a dynamic batch; **kwargs fails with a fix."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rannc.capture import capture
from rannc.errors import InputError


class KeywordModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.proj = nn.Linear(4, 1)

    def forward(self, ids: torch.Tensor, *, target: torch.Tensor) -> torch.Tensor:
        return ((self.proj(self.embed(ids)).squeeze(-1) - target) ** 2).mean()


class VarKeywordModel(KeywordModel):
    def forward(self, **batch: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(batch["ids"], target=batch["target"])


def _inputs(rows: int) -> dict[str, torch.Tensor]:
    return {"ids": torch.randint(0, 10, (rows, 3)), "target": torch.randn(rows, 3)}


def test_keyword_only_inputs_are_captured_with_a_dynamic_batch() -> None:
    model = KeywordModel()
    batch = _inputs(5)
    captured = capture(model, (batch["ids"],), {"target": batch["target"]})
    placeholders = [n for n in captured.gm.graph.nodes if n.op == "placeholder"]
    sizes = [n.meta["val"].shape[0] for n in placeholders if n.name in ("ids", "target")]
    assert len(sizes) == 2 and all(isinstance(size, torch.SymInt) for size in sizes)


def test_var_keyword_forward_names_the_fix() -> None:
    with pytest.raises(InputError, match=r"through \*\*batch.*def forward\(self, ids, target\)"):
        capture(VarKeywordModel(), (), _inputs(4))
