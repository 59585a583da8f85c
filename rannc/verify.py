"""Verification mode: on the first step rank 0 also runs the unpartitioned model and compares the results."""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
import torch.distributed as dist
import torch.utils._pytree as pytree

from .capture.hugging_face import without_generation_cache
from .errors import RanncError

logger = logging.getLogger(__name__)
# A gradient is compared at no finer scale than this fraction of the model's largest gradient entry: one that is
# zero in exact arithmetic (an attention key's bias: softmax ignores a shift of a query's scores) is rounding noise
# of ~1e-9 whose partitioned and unpartitioned sums differ by 100%, while a real error (a missing contribution, a
# wrong scale) in a small gradient is still far above the tolerance at this scale.
GRADIENT_FLOOR = 1e-3


class Verifier:
    """Holds a copy of the model (rank 0 only) and the reference results of the first training step."""

    def __init__(self, model: torch.nn.Module, rank: int, tolerance: float) -> None:
        self.rank = rank
        self.tolerance = tolerance
        self.model = copy.deepcopy(model) if rank == 0 else None
        self.report: dict[str, float] = {}
        self.reference_outputs: list[Any] = []
        self.reference_grads: dict[str, torch.Tensor] = {}
        self.done = False

    def run_reference(self, leaves: list[Any], spec: Any) -> None:
        """Forward and backward of the whole model on the global batch (rank 0)."""
        if self.model is None:
            return
        args, kwargs = pytree.tree_unflatten([_cpu(x) for x in leaves], spec)
        # as captured: a Hugging Face model returns no generation cache
        with torch.enable_grad(), without_generation_cache(self.model):
            out = self.model(*args, **kwargs)
            flat = pytree.tree_leaves(out)
            losses = [t for t in flat if isinstance(t, torch.Tensor) and t.dim() == 0 and t.requires_grad]
            if losses:
                sum(losses).backward()
        self.reference_outputs = [t.detach() if isinstance(t, torch.Tensor) else t for t in flat]
        self.reference_grads = {  # named_parameters() names each tied tensor once, like the partitioned side
            name: p.grad.detach().clone() for name, p in self.model.named_parameters() if p.grad is not None
        }

    def compare_outputs(self, outputs: list[Any], local_rows: tuple[int, int]) -> None:
        """Rank 0 compares its own rows of batch outputs and every scalar output."""
        if self.model is None:
            return
        worst = 0.0
        for mine, ref in zip(outputs, self.reference_outputs):
            if not isinstance(mine, torch.Tensor) or not mine.is_floating_point():
                continue
            ref = ref if ref.dim() == 0 else ref[local_rows[0] : local_rows[1]]
            worst = max(worst, _relative(mine.detach().cpu().double(), ref.double()))
        self.report["outputs"] = worst

    def compare_grads(self, gathered: dict[str, torch.Tensor]) -> None:
        """Called on every rank with the gradients gathered to rank 0 (others pass {}); raises on failure."""
        verdict: list[Any] = [None]
        if self.rank == 0:
            worst, where = 0.0, ""
            largest = max((_largest(ref) for ref in self.reference_grads.values()), default=0.0)
            for name, ref in self.reference_grads.items():
                if name in gathered:
                    diff = _relative(gathered[name].double(), ref.double(), GRADIENT_FLOOR * largest)
                    if diff > worst:
                        worst, where = diff, name
            self.report["gradients"] = worst
            summary = (
                f"rannc verify: largest relative difference to the unpartitioned model: outputs "
                f"{self.report.get('outputs', 0.0):.2e}, gradients {worst:.2e}"
                + (f" (at {where})" if where else "")
                + f"; tolerance {self.tolerance:.1e}"
            )
            logger.warning(summary)
            failed = max(self.report.get("outputs", 0.0), worst) > self.tolerance
            verdict[0] = (failed, summary)
            self.model = None  # the copy is no longer needed
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast_object_list(verdict, src=0)
        self.done = True
        failed, summary = verdict[0]
        if failed:
            raise RanncError(
                f"{summary}: the partitioned model does not reproduce the unpartitioned one. Check the model for "
                "batch-coupled operations (batch statistics, losses that are not per-sample means) or report a bug"
            )


def _relative(value: torch.Tensor, reference: torch.Tensor, floor: float = 0.0) -> float:
    """The largest difference relative to the reference's largest entry (or `floor`, when that is larger)."""
    if not reference.numel():
        return 0.0
    return (value - reference).abs().max().item() / max(_largest(reference), floor, 1e-12)


def _largest(tensor: torch.Tensor) -> float:
    return tensor.abs().max().item() if tensor.numel() else 0.0


def _cpu(value: Any) -> Any:
    return value.detach().cpu() if isinstance(value, torch.Tensor) else value
