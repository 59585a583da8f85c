"""Models whose forward calls code torch.export cannot capture, as users write them, and the multi-rank worker
that trains them with rannc (`run_opaque_cases`).

* `TokenModel` calls, in its middle, a `torch.jit.script` function that loops over the tokens and zeroes the
  hidden state of pad tokens in place, and a plain Python function that branches per sample on a value
  (`.tolist()` of a data-dependent mask).
* `RouterModel` has a submodule (`router`) that sends each token to one of two experts chosen in a Python loop
  over `argmax(...).tolist()`.

Each is built either as written (the functions unmarked: torch.export fails on them) or with the functions
marked `rannc.opaque` (the submodule is made opaque by the config item `opaque_modules`). Their computations
are row-wise (per sample), so microbatches and replicas give the global batch's result.
"""

from __future__ import annotations

import dataclasses
import gc
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import rannc
from rannc.errors import CaptureError

VOCAB, DIM, SEQ, CLASSES = 12, 16, 6, 4
PAD = 0
LR, MOMENTUM = 0.05, 0.9
GLOBAL_BATCH, STEPS = 16, 3


@torch.jit.script
def zero_pad_tokens(h: torch.Tensor, ids: torch.Tensor, pad: int) -> torch.Tensor:
    """Zero the hidden state of every pad token, one token at a time, in place."""
    for b in range(ids.size(0)):
        for t in range(ids.size(1)):
            if int(ids[b, t]) == pad:
                h[b, t].zero_()
    return h


def flip_negative_samples(h: torch.Tensor) -> torch.Tensor:
    """Per sample: halve and negate its hidden states when their mean is negative (a Python branch per sample)."""
    negative = (h.mean(dim=(1, 2)) < 0).tolist()
    return torch.stack([row * -0.5 if flip else row for row, flip in zip(h, negative)])


opaque_zero_pad_tokens = rannc.opaque(zero_pad_tokens)
opaque_flip_negative_samples = rannc.opaque(flip_negative_samples)


class TokenModel(nn.Module):
    def __init__(self, marked: bool) -> None:
        super().__init__()
        self.zero_pads = opaque_zero_pad_tokens if marked else zero_pad_tokens
        self.flip = opaque_flip_negative_samples if marked else flip_negative_samples
        self.embed = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleList(nn.Linear(DIM, DIM) for _ in range(4))
        self.head = nn.Linear(DIM, CLASSES)

    def forward(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.layers[0](self.embed(ids)))
        h = self.layers[1](h)
        h = self.zero_pads(h, ids, PAD)  # the Linear's output: autograd does not need it, so in place is fine
        h = self.flip(torch.tanh(h))
        h = torch.tanh(self.layers[2](h))
        h = torch.tanh(self.layers[3](h))
        return F.cross_entropy(self.head(h.mean(dim=1)), labels)


class Router(nn.Module):
    """Each token goes through the expert its score picks, one token at a time; the picked score scales it."""

    def __init__(self) -> None:
        super().__init__()
        self.score = nn.Linear(DIM, 2)
        self.experts = nn.ModuleList(nn.Linear(DIM, DIM) for _ in range(2))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        probabilities = torch.softmax(self.score(h), dim=-1)
        rows = []
        for b, choices in enumerate(probabilities.argmax(dim=-1).tolist()):
            tokens = [self.experts[e](h[b, t]) * probabilities[b, t, e] for t, e in enumerate(choices)]
            rows.append(torch.stack(tokens))
        return torch.stack(rows)


class RouterModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.before = nn.Sequential(nn.Linear(DIM, DIM), nn.Tanh(), nn.Linear(DIM, DIM), nn.Tanh())
        self.router = Router()
        self.after = nn.Sequential(nn.Linear(DIM, DIM), nn.Tanh(), nn.Linear(DIM, DIM), nn.Tanh())
        self.head = nn.Linear(DIM, CLASSES)

    def forward(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = self.before(self.embed(ids))
        h = h + self.router(h)
        h = self.after(h)
        return F.cross_entropy(self.head(h.mean(dim=1)), labels)


def build(model: str, marked: bool, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return TokenModel(marked) if model == "token" else RouterModel()


def batches(steps: int = STEPS, rows: int = GLOBAL_BATCH) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Global batches of (ids with about a quarter pad tokens, labels)."""
    g = torch.Generator().manual_seed(7)
    return [
        (
            torch.randint(0, VOCAB, (rows, SEQ), generator=g) * (torch.rand(rows, SEQ, generator=g) > 0.25),
            torch.randint(0, CLASSES, (rows,), generator=g),
        )
        for _ in range(steps)
    ]


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)


@dataclasses.dataclass(frozen=True)
class OpaqueCase:
    label: str
    model: str  # "token" or "router"
    opaque_modules: tuple[str, ...] = ()  # the config item (the router's case)
    stages: int = 2
    microbatches: int = 2

    def overrides(self) -> dict[str, Any]:
        return {
            "partition_num": self.stages,
            "min_pipeline": self.microbatches,
            "max_pipeline": self.microbatches,
            "schedule": "1f1b",
            "profile_iterations": 1,
            "show_progress": False,
        }


def train_one_process(case: OpaqueCase) -> dict[str, Any]:
    """The model as written (nothing marked), trained on the global batches in one process."""
    model = build(case.model, marked=False)
    optimizer = make_optimizer(model)
    losses = []
    for ids, labels in batches():
        loss = model(ids, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    return {"losses": losses, "state": {k: v.clone() for k, v in model.state_dict().items()}}


def run_opaque_cases(rank: int, world: int, cases: list[OpaqueCase]) -> list[dict[str, Any]]:
    """Per case: the CaptureError of the model as written, then training with the code marked opaque."""
    results = []
    for case in cases:
        unmarked = rannc.RaNNCModule(build(case.model, marked=False), None, **case.overrides())
        ids, labels = batches()[0]
        rows = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
        try:
            unmarked(ids[rows], labels[rows])
        except CaptureError as exc:
            error = str(exc)
        else:
            error = None
        del unmarked
        model = build(case.model, marked=True)
        optimizer = make_optimizer(model)
        wrapped = rannc.RaNNCModule(model, optimizer, opaque_modules=case.opaque_modules, **case.overrides())
        losses = []
        for ids, labels in batches():
            loss = wrapped(ids[rows], labels[rows])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(float(loss))
        plan = wrapped.deployment.plan
        stage_nodes = wrapped.deployment.stage_nodes
        state = wrapped.state_dict()
        results.append(
            {
                "capture_error": error,
                "losses": losses,
                "stages": len(plan.stages),
                "microbatches": plan.microbatches,
                "stage_nodes": [list(nodes) for nodes in stage_nodes],
                "state": {k: v.detach().clone() for k, v in state.items()} if rank == 0 else None,
            }
        )
        del wrapped, optimizer, model, state
        gc.collect()
        rannc.barrier()
    return results
