"""Time `rannc plan` (plan_offline) end to end for GPT-3 175B and T5 11B shapes built on the meta device.

Cases: `gpt3-175b` (with ZeRO-1, the README's command), `gpt3-175b-no-zero` and `t5-11b` are Hugging Face models;
`gpt3-175b-torch` is the same GPT-3 shape written in
plain torch, which separates rannc's own memory from what importing transformers' model code adds;
`llama2-70b` is a model of another family (grouped-query attention, rotary positions, SwiGLU). Each case runs in
its own process, so each peak RSS is its own."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.export  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from rannc.deploy import show_deployment  # noqa: E402
from rannc.offline import plan_offline  # noqa: E402

GIB = 2**30


def _transformers() -> Any:
    """transformers, imported only by the cases that use it (it adds ~0.1 GiB to the process)."""
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers


def _causal_lm(model_class: str, config_class: str, seq: int, **config: Any) -> tuple[Any, ...]:
    """A Hugging Face causal language model built on meta from `config`, called on `seq` tokens."""
    transformers = _transformers()
    with torch.device("meta"):
        model = getattr(transformers, model_class)(
            getattr(transformers, config_class)(**config, use_cache=False)
        )
    ids = torch.zeros(1, seq, dtype=torch.long, device="meta")
    return model, (), {"input_ids": ids, "labels": ids}


def gpt3_175b() -> tuple[torch.nn.Module, tuple[Any, ...], dict[str, Any]]:
    """GPT-3 175B shape: 96 layers x 12288, 96 heads, 2048 tokens, vocab 50257 (on meta)."""
    shape = dict(n_layer=96, n_embd=12288, n_head=96, n_positions=2048, vocab_size=50257)
    return _causal_lm("GPT2LMHeadModel", "GPT2Config", 2048, **shape)


def t5_11b() -> tuple[torch.nn.Module, tuple[Any, ...], dict[str, Any]]:
    """T5 11B shape: d_model 1024, d_ff 65536, 24 + 24 layers, 128 heads of 128, vocab 32128 (on meta)."""
    transformers = _transformers()
    config = transformers.T5Config(
        d_model=1024,
        d_ff=65536,
        num_layers=24,
        num_heads=128,
        d_kv=128,
        vocab_size=32128,
        decoder_start_token_id=0,
        pad_token_id=0,
        use_cache=False,
    )
    with torch.device("meta"):
        model = transformers.T5ForConditionalGeneration(config)
    ids = torch.zeros(1, 512, dtype=torch.long, device="meta")
    labels = torch.zeros(1, 128, dtype=torch.long, device="meta")
    return model, (), {"input_ids": ids, "labels": labels}


class _Block(nn.Module):
    """A pre-norm GPT block: causal self-attention and a 4x GELU MLP."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.fc, self.out = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (
            z.view(b, t, self.heads, d // self.heads).transpose(1, 2)
            for z in self.qkv(self.ln1(x)).split(d, dim=-1)
        )
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(attended)
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class _GPT(nn.Module):
    def __init__(self, layers: int, width: int, heads: int, vocab: int, seq: int) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, width), nn.Embedding(seq, width)
        self.blocks = nn.ModuleList(_Block(width, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)

    def forward(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = self.wte(ids) + self.wpe(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            x = block(x)
        return F.cross_entropy(self.head(self.ln(x)).flatten(0, 1), labels.flatten())


def gpt3_175b_torch() -> tuple[torch.nn.Module, tuple[Any, ...], dict[str, Any]]:
    """The GPT-3 175B shape in plain torch (no transformers import), on meta."""
    with torch.device("meta"):
        model = _GPT(layers=96, width=12288, heads=96, vocab=50257, seq=2048)
    ids = torch.zeros(1, 2048, dtype=torch.long, device="meta")
    return model, (ids, ids), {}


def cluster(world: int, gib: int, batch: int, device: str, **more: Any) -> dict[str, Any]:
    """plan_offline's cluster arguments: `world` devices of `gib` GiB, a global batch of `batch`, bf16 compute,
    and `more` of them."""
    wanted = dict(
        world_size=world, device_memory_bytes=gib * GIB, global_batch=batch, device=device, dtype="bf16"
    )
    return wanted | more


# The GPT-3 run: 1024 H100s, with ZeRO-1 (the README's command) and without it (fp32 master weights,
# gradients and Adam state: 16 B per parameter, 2.8 TB; it plans since blocks are cut to at most half a device of
# parameter state and sends are held for 2 microbatches at most).
GPT3_CLUSTER = cluster(1024, 80, 1536, "h100-80gb", gpus_per_node=8, zero=True)


def llama2_70b() -> tuple[torch.nn.Module, tuple[Any, ...], dict[str, Any]]:
    """Llama 2 70B shape: 80 layers x 8192, 64 query heads sharing 8 key/value heads, SwiGLU 28672, 4096 tokens,
    vocab 32000, untied head (on meta)."""
    shape = dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64)
    shape.update(num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096)
    return _causal_lm("LlamaForCausalLM", "LlamaConfig", 4096, **shape)


CASES = {
    "gpt3-175b": dict(factory=gpt3_175b, **GPT3_CLUSTER),
    "gpt3-175b-no-zero": dict(factory=gpt3_175b, **(GPT3_CLUSTER | {"zero": False})),
    "t5-11b": dict(factory=t5_11b, **cluster(32, 40, 128, "a100-40gb")),
    "gpt3-175b-torch": dict(factory=gpt3_175b_torch, **GPT3_CLUSTER),
    # a model of another family: grouped-query attention, rotary positions, SwiGLU; 2M tokens a step on 256 H100s
    # (fits 80 GiB without ZeRO)
    "llama2-70b": dict(factory=llama2_70b, **cluster(256, 80, 512, "h100-80gb", gpus_per_node=8)),
}


@contextlib.contextmanager
def timed_capture(into: dict[str, float]) -> Iterator[None]:
    """Time torch.export.export and ExportedProgram.run_decompositions inside rannc's capture."""
    import rannc.capture.export as capture_module

    export, decompose = capture_module.export, torch.export.ExportedProgram.run_decompositions

    def timed_export(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return export(*args, **kwargs)
        finally:
            into["export"] = into.get("export", 0.0) + time.perf_counter() - start

    def timed_decompose(self: Any, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return decompose(self, *args, **kwargs)
        finally:
            into["run_decompositions"] = into.get("run_decompositions", 0.0) + time.perf_counter() - start

    capture_module.export = timed_export  # type: ignore[assignment]
    torch.export.ExportedProgram.run_decompositions = timed_decompose  # type: ignore[method-assign]
    try:
        yield
    finally:
        capture_module.export = export
        torch.export.ExportedProgram.run_decompositions = decompose  # type: ignore[method-assign]


def run(name: str, max_blocks: int | None) -> None:
    case = dict(CASES[name])
    if max_blocks is not None:
        case["max_blocks"] = max_blocks
    parts: dict[str, float] = {}
    start, cpu = time.perf_counter(), time.process_time()
    with timed_capture(parts):
        result = plan_offline(case.pop("factory"), **case)  # type: ignore[arg-type]
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    show_deployment(result.deployment)
    t = result.timings
    rest = t["capture"] - parts.get("export", 0.0) - parts.get("run_decompositions", 0.0)
    print(
        f"\n{name}: {wall:.1f} s end to end, {cpu:.1f} s of CPU (load average {os.getloadavg()[0]:.1f}; peak RSS "
        f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB)"
    )
    print(
        f"  build {t['build']:.1f} s | capture {t['capture']:.1f} s (export {parts.get('export', 0):.1f}, "
        f"run_decompositions {parts.get('run_decompositions', 0):.1f}, rest {rest:.1f}) | analyse "
        f"{t['analyse']:.1f} s | profile {t['profile']:.1f} s ({result.report['distinct_blocks']} distinct of "
        f"{result.report['num_blocks']} blocks x {len(result.report['profiled_microbatch_sizes'])} sizes) | "
        f"search {t['search']:.1f} s | simulate {t['simulate']:.2f} s | interleaved on finer blocks "
        f"{t.get('interleaved on finer blocks', 0.0):.1f} s"
    )


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("cases", nargs="*", metavar="CASE", help=f"some of {', '.join(CASES)} (default: all)")
    parser.add_argument("--max-blocks", type=int, default=None, help="override each case's max_blocks")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.cases) - set(CASES))
    if unknown:
        parser.error(f"unknown case(s) {unknown}; choose from {list(CASES)}")
    torch.set_num_threads(min(torch.get_num_threads(), os.cpu_count() or 1))
    names = args.cases or list(CASES)
    if len(names) == 1:
        run(names[0], args.max_blocks)
        return 0
    # one process per case, so that each peak RSS (the process's maximum) is that case's own
    extra = [] if args.max_blocks is None else ["--max-blocks", str(args.max_blocks)]
    failed = 0
    for name in names:
        failed |= subprocess.run([sys.executable, __file__, name, *extra]).returncode
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
