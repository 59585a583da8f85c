"""Single-process reference training: the unwrapped model on the whole global batch, same optimizer.

`train_reference` is what a correct rannc run must reproduce. With `chunk_rows` it instead accumulates the gradient
over contiguous row chunks weighted by rows/B (exactly the arithmetic of microbatches and replicas, in a different
summation order); the tests use that to check that their tolerance survives a mere change of reduction order.
"""

from __future__ import annotations

from typing import Any

import torch
from models import (
    INPUT_GRAD_LOCATION,
    Batch,
    batch_input,
    batch_outputs,
    batch_rows,
    build,
    call,
    get_loss,
    make_optimizer,
    output_structure,
    row_range,
    slice_rows,
)


def chunk_sizes(global_batch: int, microbatches: int, replicas: int = 1) -> list[int]:
    """Row counts of the (microbatch, replica) pieces of a global batch, in row order: microbatch i covers a
    near-equal contiguous range (first ones larger), split near-equally among the replicas."""
    sizes: list[int] = []
    for microbatch in range(microbatches):
        mb_start, mb_end = row_range(global_batch, microbatch, microbatches)
        for replica in range(replicas):
            start, end = row_range(mb_end - mb_start, replica, replicas)
            sizes.append(end - start)
    return [size for size in sizes if size > 0]


def train_reference(
    model_name: str,
    seed: int,
    batches: list[Batch],
    optimizer_name: str,
    lr: float,
    steps: int,
    *,
    chunk_rows: list[int] | None = None,
    input_grad: bool = False,
) -> dict[str, Any]:
    """Train one process on the global batches and return what the distributed run is compared against.

    Returns {"losses": [float per step], "state_dict": {name: cloned tensor} after the last step,
    "outputs0": {name: batch-shaped output of step 0 (all global rows)}, "structure0": the container structure
    of the step-0 output, "input_grad0": gradient of the step-0 loss w.r.t. the model's float input (only with
    input_grad=True, else None)}.
    """
    if steps > len(batches):
        raise ValueError(f"{steps} steps need {steps} batches, got {len(batches)}")
    model = build(model_name, seed)
    optimizer = make_optimizer(optimizer_name, model.parameters(), lr)
    losses: list[float] = []
    outputs0: dict[str, torch.Tensor] = {}
    structure0: Any = None
    input_grad0: torch.Tensor | None = None
    for step in range(steps):
        batch = slice_rows(batches[step], 0, batch_rows(batches[step]))  # private copy
        rows = batch_rows(batch)
        leaf: torch.Tensor | None = None
        if input_grad and step == 0:
            leaf = batch_input(batch, INPUT_GRAD_LOCATION[model_name]).requires_grad_(True)
        sizes = [rows] if chunk_rows is None else chunk_rows
        if sum(sizes) != rows:
            raise ValueError(f"chunk_rows {sizes} do not add up to the batch size {rows}")
        total = 0.0
        pieces: dict[str, list[torch.Tensor]] = {}
        start = 0
        for size in sizes:
            chunk = slice_rows(batch, start, start + size) if len(sizes) > 1 else batch
            if leaf is not None and len(sizes) > 1:
                # keep the chunk's input connected to the full-batch leaf so its grad lands in the right rows
                kind, key = INPUT_GRAD_LOCATION[model_name]
                view = leaf[start : start + size]
                if kind == "args":
                    chunk["args"][int(key)] = view
                else:
                    chunk["kwargs"][str(key)] = view
            out = call(model, chunk)
            loss = get_loss(model_name, out)
            weighted = loss * (size / rows) if len(sizes) > 1 else loss
            weighted.backward()
            total += float(weighted.detach())
            if step == 0:
                structure0 = output_structure(out)
                for name, value in batch_outputs(model_name, out).items():
                    pieces.setdefault(name, []).append(value.detach().clone())
            start += size
        losses.append(total if len(sizes) > 1 else float(loss.detach()))
        if step == 0:
            outputs0 = {name: torch.cat(parts) for name, parts in pieces.items()}
            if leaf is not None:
                assert leaf.grad is not None
                input_grad0 = leaf.grad.detach().clone()
        optimizer.step()
        optimizer.zero_grad()
    state = {name: value.detach().clone() for name, value in model.state_dict().items()}
    return {
        "losses": losses,
        "state_dict": state,
        "outputs0": outputs0,
        "structure0": structure0,
        "input_grad0": input_grad0,
    }
