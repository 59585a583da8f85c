"""Form the global batch from every rank's local batch, and return each rank its own rows.

Whether rannc refused a rank's call travels with the batch sizes: a call refused on one rank (its inputs'
shapes, say) is refused on every rank, each raising the reason, instead of leaving the others waiting.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.distributed as dist

from ..errors import InputError
from .failures import guarded, wait_all


@dataclasses.dataclass(frozen=True)
class GlobalBatch:
    leaves: list[Any]  # tensors hold the whole global batch; other leaves are as given
    local_sizes: list[int]  # samples per rank, in rank order
    requires_grad: list[bool]  # per leaf: does any rank want a gradient for it

    @property
    def size(self) -> int:
        return sum(self.local_sizes)

    def local_rows(self, rank: int) -> tuple[int, int]:
        lo = sum(self.local_sizes[:rank])
        return lo, lo + self.local_sizes[rank]


_ALIGN = 16  # bytes: each tensor starts aligned in the packed buffer, so it can be viewed in its dtype


def _aligned_bytes(tensor: torch.Tensor) -> torch.Tensor:
    raw = tensor.reshape(-1).view(torch.uint8)
    pad = -raw.numel() % _ALIGN
    return torch.cat([raw, raw.new_zeros(pad)]) if pad else raw


def gather_global_batch(
    leaves: list[Any], device: torch.device, world_size: int, refusal: str | None = None
) -> GlobalBatch:
    """The global batch; InputError on every rank when rannc refused any rank's call (`refusal`: why it refused
    this rank's; its `leaves` are then placeholders shaped like the captured call's, as long as the others')."""
    batch_positions = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor) and x.dim() > 0]
    local = leaves[batch_positions[0]].shape[0] if batch_positions else 0
    flags = [bool(isinstance(x, torch.Tensor) and x.requires_grad) for x in leaves]
    if world_size == 1:
        moved = [x.to(device) if isinstance(x, torch.Tensor) else x for x in leaves]
        return GlobalBatch(moved, [local], flags)
    # the per-sample sizes too: ranks must agree on them (a sequence length may change between calls)
    per_sample = [size for pos in batch_positions for size in leaves[pos].shape[1:]]
    header = [int(refusal is not None), local]
    meta = torch.tensor(header + [int(f) for f in flags] + per_sample, dtype=torch.int64, device=device)
    gathered = [torch.empty_like(meta) for _ in range(world_size)]
    with guarded(lambda: "exchanging local batch sizes"):
        work = dist.all_gather(gathered, meta, async_op=True)
    wait_all([work], lambda: "exchanging local batch sizes")
    table = torch.stack(gathered).cpu()
    refused = [rank for rank in range(world_size) if table[rank, 0]]
    if refused:
        _refuse(refused, refusal)
    table = table[:, 1:]
    sizes = [int(v) for v in table[:, 0]]
    if min(sizes) < 1:
        raise InputError(f"every rank must pass at least one sample; local batch sizes are {sizes}")
    shapes = table[:, 1 + len(flags) :]
    differing = [r for r in range(world_size) if not torch.equal(shapes[r], shapes[0])]
    if differing:
        raise InputError(
            f"ranks {differing} passed inputs whose per-sample shapes differ from rank 0's in this call (sizes "
            f"{shapes[0].tolist()} on rank 0, {shapes[differing[0]].tolist()} on rank {differing[0]}); the ranks' "
            "rows form one global batch: pad every rank's batch to the same length (e.g. the longest in the "
            "global batch)"
        )
    any_grad = [bool(v) for v in table[:, 1 : 1 + len(flags)].any(dim=0)]
    widest = max(sizes)
    out = list(leaves)
    # Every batch tensor (padded to the widest local batch) goes into one byte buffer: one collective.
    padded = []
    for pos in batch_positions:
        tensor = leaves[pos].detach().to(device).contiguous()
        if tensor.shape[0] < widest:
            pad = tensor.new_zeros((widest - tensor.shape[0], *tensor.shape[1:]))
            tensor = torch.cat([tensor, pad])
        padded.append(tensor)
    packed = torch.cat([_aligned_bytes(t) for t in padded]) if padded else None
    if packed is not None:
        parts = [torch.empty_like(packed) for _ in range(world_size)]
        with guarded(lambda: "gathering the global batch"):
            work = dist.all_gather(parts, packed, async_op=True)
        wait_all([work], lambda: "gathering the global batch")
        offset = 0
        for pos, tensor in zip(batch_positions, padded):
            nbytes = tensor.numel() * tensor.element_size()
            pieces = [
                part[offset : offset + nbytes].view(tensor.dtype).view(tensor.shape)[:n]
                for part, n in zip(parts, sizes)
            ]
            out[pos] = torch.cat(pieces)
            offset += -(-nbytes // _ALIGN) * _ALIGN
    for pos, leaf in enumerate(leaves):
        if isinstance(leaf, torch.Tensor) and leaf.dim() == 0:
            out[pos] = leaf.detach().to(device)
    return GlobalBatch(out, sizes, any_grad)


def _refuse(refused: list[int], refusal: str | None) -> None:
    """Some ranks' calls were refused: every rank raises InputError with their reasons."""
    reasons: list[str | None] = [None] * dist.get_world_size()
    with guarded(lambda: "exchanging why calls of the model were refused"):
        dist.all_gather_object(reasons, refusal)
    raise InputError(
        "no rank runs this call of the model, because rannc refused it on "
        + "; ".join(f"rank {rank}: {reasons[rank]}" for rank in refused)
    )
