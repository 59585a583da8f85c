"""One-rank CUDA/NCCL check: rannc vs plain eager training of GPT-2 on the GPU, plus profiling on CUDA.

Run: python benchmarks/cuda_smoke.py  (needs a CUDA device; prints the differences and the plan)
"""

from __future__ import annotations

import os
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    import rannc

    assert torch.cuda.is_available(), "this check needs a CUDA device"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    config = GPT2Config(
        vocab_size=2048, n_positions=128, n_embd=256, n_layer=4, n_head=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    reference = GPT2LMHeadModel(config)
    reference.load_state_dict(model.state_dict())
    reference.cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-3)
    wrapped = rannc.RaNNCModule(model, opt, min_pipeline=4, max_pipeline=4, show_progress=False)
    generator = torch.Generator().manual_seed(1)
    for step in range(4):
        ids = torch.randint(0, 2048, (8, 64), generator=generator)
        torch.cuda.synchronize()
        started = time.perf_counter()
        loss = wrapped(input_ids=ids.cuda(), labels=ids.cuda()).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        torch.cuda.synchronize()
        took = time.perf_counter() - started
        ref_loss = reference(input_ids=ids.cuda(), labels=ids.cuda()).loss
        ref_loss.backward()
        ref_opt.step()
        ref_opt.zero_grad()
        print(f"step {step}: rannc loss {loss.item():.6f} reference {ref_loss.item():.6f} "
              f"rel diff {abs(loss.item() - ref_loss.item()) / abs(ref_loss.item()):.2e} ({took * 1e3:.0f} ms)")
    state = wrapped.state_dict()
    worst = max(
        ((state[k].float() - v.detach().cpu().float()).abs().max() / v.detach().cpu().float().abs().max().clamp_min(1e-12)).item()
        for k, v in reference.state_dict().items()
    )
    print(f"largest parameter difference relative to its max magnitude: {worst:.2e}")
    print(f"backend {torch.distributed.get_backend()}, device {wrapped.device}, "
          f"peak allocated {torch.cuda.max_memory_allocated() / 2**20:.1f} MiB")
    rannc.show_deployment(wrapped.deployment)


if __name__ == "__main__":
    main()
