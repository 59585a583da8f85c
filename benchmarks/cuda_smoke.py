"""One-rank CUDA/NCCL check: rannc vs plain eager GPT-2 on the GPU (fp32 AdamW and SGD, bf16, fp16+GradScaler,
verify mode), with profiling and memory measured on CUDA.

Run: python benchmarks/cuda_smoke.py  (needs a CUDA device; prints the differences and the plan)
"""

from __future__ import annotations

import contextlib
import os
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _models():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=2048,
        n_positions=128,
        n_embd=256,
        n_layer=4,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        use_cache=False,
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    reference = GPT2LMHeadModel(config)
    reference.load_state_dict(model.state_dict())
    return model, reference.cuda()


def run(case: str, optimizer: str, autocast: torch.dtype | None, steps: int = 4, **overrides) -> None:
    import rannc

    model, reference = _models()
    make = (
        (lambda p: torch.optim.AdamW(p, lr=1e-3))
        if optimizer == "adamw"
        else (lambda p: torch.optim.SGD(p, lr=0.1))
    )
    opt, ref_opt = make(model.parameters()), make(reference.parameters())
    wrapped = rannc.RaNNCModule(model, opt, min_pipeline=4, max_pipeline=4, show_progress=False, **overrides)
    fp16 = autocast is torch.float16
    scaler, ref_scaler = (
        (torch.amp.GradScaler("cuda"), torch.amp.GradScaler("cuda")) if fp16 else (None, None)
    )
    generator = torch.Generator().manual_seed(1)
    worst_loss = 0.0
    times = []
    for _ in range(steps):
        ids = torch.randint(0, 2048, (8, 64), generator=generator).cuda()
        ctx = torch.autocast("cuda", dtype=autocast) if autocast else contextlib.nullcontext()
        torch.cuda.synchronize()
        started = time.perf_counter()
        with ctx:
            loss = wrapped(input_ids=ids, labels=ids).loss
        (scaler.scale(loss) if scaler else loss).backward()
        (scaler.step(opt), scaler.update()) if scaler else opt.step()
        opt.zero_grad()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
        with ctx:
            ref_loss = reference(input_ids=ids, labels=ids).loss
        (ref_scaler.scale(ref_loss) if ref_scaler else ref_loss).backward()
        (ref_scaler.step(ref_opt), ref_scaler.update()) if ref_scaler else ref_opt.step()
        ref_opt.zero_grad()
        worst_loss = max(worst_loss, abs(loss.item() - ref_loss.item()) / abs(ref_loss.item()))
    state = wrapped.state_dict()
    worst_param = max(
        (
            (state[k].float() - v.detach().cpu().float()).abs().max()
            / v.detach().cpu().float().abs().max().clamp_min(1e-12)
        ).item()
        for k, v in reference.state_dict().items()
    )
    print(
        f"{case:28s} loss rel diff max {worst_loss:.2e}  param rel diff max {worst_param:.2e}  "
        f"first step {times[0] * 1e3:.0f} ms (capture+profile+plan), then {min(times[1:]) * 1e3:.1f} ms/step"
    )


def main() -> None:
    import rannc

    assert torch.cuda.is_available(), "this check needs a CUDA device"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    run("fp32 SGD", "sgd", None)
    run("fp32 AdamW", "adamw", None)
    run("bf16 autocast AdamW", "adamw", torch.bfloat16)
    run("fp16 autocast + GradScaler", "sgd", torch.float16)
    run("fp32 SGD, verify mode", "sgd", None, steps=2, verify=True)
    torch.cuda.reset_peak_memory_stats()
    print(f"backend {torch.distributed.get_backend()}, device {torch.cuda.get_device_name()}")
    model, _ = _models()
    opt = torch.optim.AdamW(model.parameters())
    wrapped = rannc.RaNNCModule(model, opt, show_progress=False)
    ids = torch.randint(0, 2048, (8, 64)).cuda()
    for _ in range(2):  # the second step includes AdamW's state
        wrapped(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    print(
        f"peak CUDA memory of a training step: {torch.cuda.max_memory_allocated() / 2**20:.1f} MiB; predicted "
        f"{wrapped.deployment.plan.stages[0].memory_bytes / 2**20:.1f} MiB"
    )
    rannc.show_deployment(wrapped.deployment)


if __name__ == "__main__":
    main()
