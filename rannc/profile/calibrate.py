"""Measure the local device (matmul rate, memory bandwidth, op overhead, links) as a DeviceProfile."""

from __future__ import annotations

import dataclasses
import datetime
import os
import socket
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from .devices import DeviceProfile, get_device_profile, profile_for_device_name
from .measure import cache_flusher, ranks_on_this_host, usable_cores

__all__ = ["calibrate"]

KIB, MIB = 2**10, 2**20


def calibrate(
    device: torch.device | str | None = None, *, world_size_probe: bool = True, quick: bool = False
) -> DeviceProfile:
    """A DeviceProfile of this machine: matmul FLOP/s per dtype, copy bandwidth, memory, per-op overhead.

    When torch.distributed is initialised with more than one rank, every rank must call it: every figure is
    measured on all ranks at once and averaged (what one rank gets while all compute, as in training), and
    (with `world_size_probe`) ranks 0 and 1 measure point-to-point latency/bandwidth (1 KiB .. 64 MiB
    ping-pong) and all ranks an allreduce. Otherwise the link figures are copied from
    the shipped profile of the same GPU model (or the generic "cpu" profile), as `sources` says.
    `quick` uses tiny sizes (for tests). Takes a few seconds on a CPU.

    Example::

        profile = calibrate()
        save_profile(profile, "my-machine.json")  # then plan with get_device_profile("my-machine.json")
    """
    device = torch.device(device) if device is not None else _default_device()
    cuda = device.type == "cuda"
    if not cuda:
        from ..host_memory import keep_freed_host_memory

        keep_freed_host_memory()  # as RaNNCModule runs on CPUs: freed memory is reused, not faulted in again
    name = torch.cuda.get_device_name(device) if cuda else f"cpu ({os.cpu_count()} cores)"
    base = (profile_for_device_name(name) if cuda else None) or get_device_profile("cpu")
    where = f"measured by rannc.profile.calibrate on {socket.gethostname()} ({name}), {_today()}"
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        where += f", per rank with {dist.get_world_size()} ranks measuring at once"
    if cuda:
        sizes = [256, 512] if quick else [2048, 4096, 8192]
    else:
        sizes = [32, 64] if quick else [256, 512, 1024]
    min_time = 0.002 if quick else (0.05 if cuda else 0.15)

    copy_bytes = (4 if quick else (1024 if cuda else 64)) * MIB

    # The copy bandwidth is sampled at several moments of the calibration and the median kept: on shared
    # machines it can change by 2x from one second to the next (a 2-vCPU VM: ~24 or ~43 GB/s per rank).
    def copy_rate() -> float:
        return _together(lambda: _copy_bandwidth(device, copy_bytes, min_time))

    bandwidths = [copy_rate()]
    peak, notes = _matmul_peaks(device, sizes, min_time)
    bandwidths.append(copy_rate())
    overhead = _together(lambda: _op_overhead(device, 20 if quick else 200))
    update_bytes = MIB if quick else (256 if cuda else 16) * MIB
    update_rate = {
        kind: _together(lambda kind=kind: _update_rate(device, kind, update_bytes, min_time))
        for kind in ("adam", "momentum", "sgd")
    }
    bandwidths.append(copy_rate())
    sources = {
        "peak_flops": f"{where}: best square matmul (n in {sizes}), TFLOP/s: {', '.join(notes)}",
        "memory_bytes": f"{where}: " + ("CUDA total_memory" if cuda else "physical RAM (sysconf)"),
        "op_overhead": f"{where}: time per tiny add, {overhead * 1e6:.3g} us",
        "optimizer_update_rate": f"{where}: optimizer.step() on {update_bytes // MIB} MiB of fp32 parameters in 8 "
        "tensors (AdamW, SGD momentum 0.9, SGD; torch defaults), GB/s of parameters: "
        + ", ".join(f"{kind} {rate / 1e9:.3g}" for kind, rate in update_rate.items()),
        "efficiency": "measured rates are what large kernels achieve: 80% (matmul) / 90% (memory) for the "
        "smaller kernels of real models (assumption)",
    }
    links = _link_figures(base, device, quick, world_size_probe, sources)
    bandwidths += [copy_rate(), copy_rate()]
    bandwidth = statistics.median(bandwidths)
    sources["memory_bandwidth"] = (
        f"{where}: copy of {copy_bytes // MIB} MiB (read + write), median of {len(bandwidths)} samples taken "
        f"through the calibration: {bandwidth / 1e9:.3g} GB/s (samples "
        + ", ".join(f"{b / 1e9:.3g}" for b in bandwidths)
        + ")"
    )
    elementwise_shape = (16, 256) if quick else (256, 4096)
    elementwise = {} if cuda else _elementwise_rates(device, elementwise_shape, quick, bandwidth)
    if elementwise:
        sources["elementwise_rate"] = (
            f"{where}: elements/s of arithmetic-bound elementwise ops on {elementwise_shape[0]} x "
            f"{elementwise_shape[1]} float32 (those slower than moving their bytes at the copy bandwidth): "
            + ", ".join(f"{op} {rate / 1e9:.2g}G" for op, rate in sorted(elementwise.items()))
        )
    shapes = _matmul_shapes(device, quick, peak["float32"])
    sources["matmul_shapes"] = (
        f"{where}: float32 (m x k) @ (k x n) matmuls with cold caches on the grid m {shapes['m']}, k {shapes['k']}, "
        f"n {shapes['n']} (each at most {_SHAPE_FLOPS[_shape_key(device, quick)]:.2g} FLOPs; larger ones count as "
        f"running at peak), FLOP/s over the peak: {min(shapes['factor']):.2f} .. {max(shapes['factor']):.2f}"
    )
    profile = DeviceProfile(
        name=f"calibrated-{name}",
        peak_flops=peak,
        memory_bandwidth=bandwidth,
        memory_bytes=float(_memory_bytes(device)),
        matmul_efficiency=0.8,
        memory_efficiency=0.9,
        op_overhead=overhead,
        optimizer_update_rate=update_rate,
        elementwise_rate=elementwise,
        kind="gpu" if cuda else "cpu",
        sources=sources,
        matmul_shapes=shapes,
        host_cores=None if cuda else usable_cores(),
        measured_ranks=1 if cuda else ranks_on_this_host(),
        **links,
    )
    return _fit_to_reference_layers(profile, device, quick, where)


def _matmul_peaks(
    device: torch.device, sizes: list[int], min_time: float
) -> tuple[dict[str, float], list[str]]:
    """The best square matmul FLOP/s per dtype (every rank at once), and a note per dtype for `sources`."""
    cuda = device.type == "cuda"
    peak: dict[str, float] = {}
    notes: list[str] = []
    for key, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16), ("float16", torch.float16)):
        rate = _together(
            lambda dtype=dtype, key=key: _matmul_rate(
                device, dtype, sizes if key == "float32" or cuda else sizes[:-1], min_time
            )
        )
        if rate is not None:
            peak[key] = rate
            notes.append(f"{key} {rate / 1e12:.3g}")
    if cuda:
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            peak["tf32"] = (
                _together(lambda: _matmul_rate(device, torch.float32, sizes, min_time)) or peak["float32"]
            )
        finally:
            torch.backends.cuda.matmul.allow_tf32 = previous
        notes.append(f"tf32 {peak['tf32'] / 1e12:.3g}")
    else:
        peak["tf32"] = peak["float32"]
        notes.append("tf32 = float32 (no TF32 on CPUs)")
    return peak, notes


def _link_figures(
    base: DeviceProfile, device: torch.device, quick: bool, probe: bool, sources: dict[str, str]
) -> dict[str, Any]:
    """The DeviceProfile's link fields: measured between the ranks when several run (and `probe`), else copied
    from the shipped profile `base`; `sources` says which."""
    cuda = device.type == "cuda"
    links: dict[str, Any] = {
        "intra_node_bandwidth": base.intra_node_bandwidth,
        "intra_node_latency": base.intra_node_latency,
        "inter_node_bandwidth": base.inter_node_bandwidth,
        "inter_node_latency": base.inter_node_latency,
        "gpus_per_node": torch.cuda.device_count() if cuda else base.gpus_per_node,
        "allreduce_overlap": base.allreduce_overlap,
    }
    copied = f"not measured (single process): copied from the shipped {base.name!r} profile"
    sources["intra_node"] = sources["inter_node"] = sources["allreduce_overlap"] = copied
    if probe and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        probed, text = _probe_links(device, quick)
        links.update(probed)
        sources.update(text)
    return links


# Grid of the matmul shape table per device kind (rows m, reduction k, columns n) and the most FLOPs measured.
_SHAPE_GRIDS = {
    "quick": ([4, 16], [8, 32], [8, 32]),
    "cpu": ([16, 64, 256, 1024, 4096], [64, 256, 1024, 4096], [64, 256, 1024, 4096, 16384]),
    "cuda": ([64, 256, 1024, 4096, 16384], [64, 256, 1024, 4096, 16384], [64, 256, 1024, 4096, 16384, 65536]),
}
_SHAPE_FLOPS = {"quick": 1e6, "cpu": 1.2e9, "cuda": 2e11}


def _shape_key(device: torch.device, quick: bool) -> str:
    return "quick" if quick else ("cuda" if device.type == "cuda" else "cpu")


def _matmul_shapes(device: torch.device, quick: bool, peak: float) -> dict[str, list[float]]:
    """DeviceProfile.matmul_shapes: each grid shape's cold-cache float32 FLOP/s over `peak` (every rank at once
    when distributed, averaged). A shape above the FLOP cap gets the best factor of its neighbours one grid step
    smaller along one axis (larger matmuls run at least as well), 1 when it has none."""
    key = _shape_key(device, quick)
    ms, ks, ns = _SHAPE_GRIDS[key]
    cap = _SHAPE_FLOPS[key]
    flush = cache_flusher(device)
    repeats = 2 if quick else 3

    def measure() -> list[float]:
        factors = []
        for m in ms:
            for k in ks:
                for n in ns:
                    flops = 2.0 * m * k * n
                    if flops > cap:
                        factors.append(-1.0)  # filled in below
                        continue
                    a = torch.randn(m, k, device=device)
                    b = torch.randn(k, n, device=device)
                    torch.mm(a, b)  # warm-up (kernel selection, allocator)
                    samples = []
                    for _ in range(repeats):
                        flush()
                        _sync(device)
                        start = time.perf_counter()
                        torch.mm(a, b)
                        _sync(device)
                        samples.append(time.perf_counter() - start)
                    rate = flops / max(statistics.median(samples), 1e-9)
                    factors.append(min(1.0, max(1e-3, rate / peak)))
        return factors

    factors = _together(measure)
    sizes = (len(ks), len(ns))
    for i in range(len(ms)):  # m-major order: the smaller neighbours are already final
        for j in range(len(ks)):
            for k in range(len(ns)):
                index = (i * sizes[0] + j) * sizes[1] + k
                if factors[index] >= 0:
                    continue
                smaller = [(i - 1, j, k), (i, j - 1, k), (i, j, k - 1)]
                known = [
                    factors[(a * sizes[0] + b) * sizes[1] + c] for a, b, c in smaller if min(a, b, c) >= 0
                ]
                factors[index] = max(known, default=1.0)
    return {
        "m": [float(v) for v in ms],
        "k": [float(v) for v in ks],
        "n": [float(v) for v in ns],
        "factor": factors,
    }


class _ReferenceLayer(torch.nn.Module):
    """A pre-norm transformer layer written with plain ops (no fused attention), the calibration workload."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = torch.nn.LayerNorm(width)
        self.qkv = torch.nn.Linear(width, 3 * width)
        self.proj = torch.nn.Linear(width, width)
        self.norm2 = torch.nn.LayerNorm(width)
        self.up = torch.nn.Linear(width, 4 * width)
        self.down = torch.nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, w = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, s, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        attention = ((q @ k.transpose(-1, -2)) * (w // self.heads) ** -0.5).softmax(-1) @ v
        x = x + self.proj(attention.transpose(1, 2).reshape(b, s, w))
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm2(x))))


class _ReferenceHead(torch.nn.Module):
    """Memory-bound work as at the end of a language model: norm, a wide projection, log-softmax, loss."""

    def __init__(self, width: int, vocab: int) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(width)
        self.proj = torch.nn.Linear(width, vocab, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.proj(torch.nn.functional.gelu(self.norm(x)))
        return torch.nn.functional.log_softmax(logits, -1).neg().mean(-1, keepdim=True).expand_as(x) + x


def _reference_workloads(
    device: torch.device, quick: bool
) -> list[tuple[str, torch.nn.Module, torch.Tensor]]:
    """(label, module, input): stacks of transformer layers as large as a stage's working set (beyond the
    caches), mostly matmul-bound, and a wide head, mostly memory-bound."""
    if quick:
        shapes, head = [(2, 16, 64, 2, 2)], (2, 16, 64, 512)
    elif device.type == "cuda":
        shapes, head = [(8, 512, 1024, 16, 8)], (8, 512, 1024, 50304)
    else:
        shapes, head = [(4, 64, 256, 4, 8), (4, 64, 512, 8, 4)], (4, 64, 256, 16384)
    found = []
    for batch, seq, width, heads, depth in shapes:
        stack = torch.nn.Sequential(*[_ReferenceLayer(width, heads) for _ in range(depth)])
        found.append(
            (f"{depth} layers of width {width} x {batch * seq} rows", stack, torch.randn(batch, seq, width))
        )
    batch, seq, width, vocab = head
    found.append(
        (
            f"head {width} -> {vocab} x {batch * seq} rows",
            _ReferenceHead(width, vocab),
            torch.randn(batch, seq, width),
        )
    )
    return [(label, module.to(device), x.to(device)) for label, module, x in found]


def _fit_to_reference_layers(
    profile: DeviceProfile, device: torch.device, quick: bool, where: str
) -> DeviceProfile:
    """Fit the two roofline efficiencies to what real work achieves here.

    Times a forward + backward of each reference workload (every rank at once when distributed, so the
    figures include sharing the machine; caches cold, as a pipeline stage runs), prices the same work with
    `profile` split into its compute-bound and memory-bound ops (plus the per-op overhead), and solves
    measured = compute / matmul_efficiency + memory / memory_efficiency + overhead in the least-squares sense
    (relative errors). Falls back to one common factor when the fit is not well posed.
    """
    from torch.func import functional_call

    from .analytic import estimate_block

    rows: list[
        tuple[float, float, float, float]
    ] = []  # (measured, compute at 100%, memory at 100%, overhead)
    notes = []
    nominal = dataclasses.replace(profile, matmul_efficiency=1.0, memory_efficiency=1.0)
    for label, module, x in _reference_workloads(device, quick):
        names = [n for n, _ in module.named_parameters()]

        def run(
            x: torch.Tensor, *params: torch.Tensor, module: torch.nn.Module = module, names: list[str] = names
        ) -> tuple[torch.Tensor]:
            return (functional_call(module, dict(zip(names, params)), (x,)),)

        params = [p.detach().requires_grad_(True) for p in module.parameters()]
        x = x.requires_grad_(True)
        grad = torch.randn_like(x)

        def step(x: torch.Tensor = x, params: list[torch.Tensor] = params, grad: torch.Tensor = grad) -> None:
            torch.autograd.grad(run(x, *params), [x, *params], [grad])

        measured = _together(lambda step=step: _cold_seconds(step, device, 2 if quick else 5))
        estimate = estimate_block(
            run, [x, *params], nominal, param_indices=frozenset(range(1, 1 + len(params)))
        )
        rows.append((measured, *_split_roofline(estimate.ops, nominal, profile)))
        notes.append(f"{label}: {measured * 1e3:.3g} ms")
    compute_slowdown, memory_slowdown, how = _solve_efficiencies(rows, profile)
    matmul_eff, flops_scale = _efficiency_and_scale(compute_slowdown)
    memory_eff, bandwidth_scale = _efficiency_and_scale(memory_slowdown)
    sources = dict(profile.sources)
    sources["efficiency"] = (
        f"{where}: fitted to forward + backward of reference workloads ({'; '.join(notes)}) priced at the "
        f"measured peaks: {how}"
    )
    # Work that ran faster than the measured peaks allow raises them: the achieved rates then come from the
    # reference work, whatever moment the (noisier, on shared machines) peak measurements happened to catch.
    if flops_scale > 1.0:
        sources["peak_flops"] += f"; raised x{flops_scale:.3g} to what the reference workloads achieved"
    if bandwidth_scale > 1.0:
        sources["memory_bandwidth"] += (
            f"; raised x{bandwidth_scale:.3g} to what the reference workloads achieved"
        )
    return dataclasses.replace(
        profile,
        peak_flops={dtype: rate * flops_scale for dtype, rate in profile.peak_flops.items()},
        memory_bandwidth=profile.memory_bandwidth * bandwidth_scale,
        matmul_efficiency=matmul_eff,
        memory_efficiency=memory_eff,
        sources=sources,
    )


def _split_roofline(ops: Any, nominal: DeviceProfile, profile: DeviceProfile) -> tuple[float, float, float]:
    """Seconds at 100% efficiency of the ops that are compute-bound / memory-bound at `profile`'s efficiencies,
    and their per-op overhead."""
    compute = memory = overhead = 0.0
    peak, bandwidth = nominal.peak("float32"), nominal.memory_bandwidth
    for op in ops:
        c, m = op.flops / (peak * op.shape_factor), op.bytes / bandwidth
        if c / profile.matmul_efficiency >= m / profile.memory_efficiency:
            compute += c
        else:
            memory += m
        overhead += op.time - max(c, m)
    return compute, memory, overhead


_PRIOR_WEIGHT = 0.1  # of the assumed efficiencies in the fit, against relative errors of the workloads' times


def _solve_efficiencies(
    rows: list[tuple[float, float, float, float]], profile: DeviceProfile
) -> tuple[float, float, str]:
    """(compute slowdown, memory slowdown, how they were found) from rows of (measured, compute, memory,
    overhead): the factors by which the work's compute-bound and memory-bound seconds at the measured peaks
    are stretched in fact. Below 1 the work ran faster than the peaks imply (they were measured at a worse
    moment, or caches helped)."""
    import numpy as np

    a = np.array([[c / t, m / t] for t, c, m, _ in rows])
    b = np.array([(t - o) / t for t, _, _, o in rows])
    if len(rows) >= 2 and np.linalg.matrix_rank(a) == 2:
        # Relative errors of the times, plus a weak pull towards the assumed efficiencies: a slowdown the
        # workloads barely constrain (little of their time is memory-bound) would otherwise follow the timing
        # noise of one workload (on a 2-core VM with 4 ranks it swung by 4x between calibrations).
        prior = np.array([1.0 / profile.matmul_efficiency, 1.0 / profile.memory_efficiency])
        a_pulled = np.vstack([a, _PRIOR_WEIGHT * np.eye(2)])
        b_pulled = np.concatenate([b, _PRIOR_WEIGHT * prior])
        slowdown, *_ = np.linalg.lstsq(a_pulled, b_pulled, rcond=None)
        if (slowdown > 0).all():
            return float(slowdown[0]), float(slowdown[1]), "least squares over compute- and memory-bound work"
    # One factor on both (the workloads cannot tell them apart, or the fit is not positive).
    predicted = [c / profile.matmul_efficiency + m / profile.memory_efficiency + o for _, c, m, o in rows]
    factor = statistics.geometric_mean([t / p for (t, _, _, _), p in zip(rows, predicted)])
    return (
        factor / profile.matmul_efficiency,
        factor / profile.memory_efficiency,
        f"one factor {factor:.3g} on the assumed efficiencies",
    )


def _efficiency_and_scale(slowdown: float) -> tuple[float, float]:
    """(efficiency, factor on the peak): a slowdown above 1 is an efficiency; below 1 the peak is raised."""
    return (1.0 / slowdown, 1.0) if slowdown >= 1.0 else (1.0, 1.0 / slowdown)


def _cold_seconds(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """Median seconds of fn() started with cold caches each time (as a pipeline stage runs), after a warm-up."""
    flush = cache_flusher(device)
    fn()
    samples = []
    for _ in range(repeats):
        flush()
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def _together(measure: Callable[[], float | None]) -> Any:
    """`measure()` on every rank at once when distributed (so each figure is what one rank gets while all of
    them compute, as in training), averaged over the ranks; else just `measure()`."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return measure()
    dist.barrier()
    value = measure()
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    if any(v is None for v in values):
        return None
    if isinstance(value, list):  # one figure per entry
        return [statistics.fmean(column) for column in zip(*values)]
    return statistics.fmean(values)


def _default_device() -> torch.device:
    return (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )


def _today() -> str:
    return datetime.date.today().isoformat()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seconds_per_call(
    fn: Callable[[], Any], device: torch.device, min_time: float, repeats: int = 3
) -> float:
    """Median over `repeats` of the mean time of fn() in a loop lasting at least `min_time`."""
    fn()
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    once = max(time.perf_counter() - start, 1e-7)
    calls = max(1, min(10_000, int(min_time / once)))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        _sync(device)
        samples.append((time.perf_counter() - start) / calls)
    return statistics.median(samples)


def _matmul_rate(
    device: torch.device, dtype: torch.dtype, sizes: Sequence[int], min_time: float
) -> float | None:
    """Best FLOP/s of n x n matmuls; None if the dtype is unsupported here."""
    best = 0.0
    for n in sizes:
        try:
            a = torch.randn(n, n, device=device).to(dtype)
            b = torch.randn(n, n, device=device).to(dtype)
            seconds = _seconds_per_call(lambda a=a, b=b: torch.mm(a, b), device, min_time)
        except (RuntimeError, TypeError):  # e.g. no half-precision matmul on this device
            return None
        best = max(best, 2 * n**3 / seconds)
    return best or None


def _copy_bandwidth(device: torch.device, nbytes: int, min_time: float) -> float:
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / _seconds_per_call(lambda: dst.copy_(src), device, min_time)


def _op_overhead(device: torch.device, calls: int) -> float:
    x = torch.ones(1, device=device)
    _sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        torch.add(x, x)
    _sync(device)
    return (time.perf_counter() - start) / calls


def _elementwise_ops(x: torch.Tensor) -> dict[str, Callable[[], Any]]:
    """One call of each elementwise aten op that may be bound by arithmetic rather than memory."""
    aten = torch.ops.aten
    pos, grad, other = x.abs() + 0.5, torch.randn_like(x), torch.randn_like(x).abs() + 0.5
    soft, log_soft, tanh, sig = x.softmax(-1), x.log_softmax(-1), x.tanh(), x.sigmoid()
    return {
        "aten.exp": lambda: aten.exp(x),
        "aten.log": lambda: aten.log(pos),
        "aten.tanh": lambda: aten.tanh(x),
        "aten.erf": lambda: aten.erf(x),
        "aten.sigmoid": lambda: aten.sigmoid(x),
        "aten.sqrt": lambda: aten.sqrt(pos),
        "aten.rsqrt": lambda: aten.rsqrt(pos),
        "aten.pow": lambda: aten.pow(x, 3.0),
        "aten.div": lambda: aten.div(x, other),
        "aten.gelu": lambda: aten.gelu(x),
        "aten.gelu_backward": lambda: aten.gelu_backward(grad, x),
        "aten.tanh_backward": lambda: aten.tanh_backward(grad, tanh),
        "aten.sigmoid_backward": lambda: aten.sigmoid_backward(grad, sig),
        "aten._softmax": lambda: aten._softmax(x, -1, False),
        "aten._log_softmax": lambda: aten._log_softmax(x, -1, False),
        "aten._softmax_backward_data": lambda: aten._softmax_backward_data(grad, soft, -1, x.dtype),
        "aten._log_softmax_backward_data": lambda: aten._log_softmax_backward_data(
            grad, log_soft, -1, x.dtype
        ),
    }


def _elementwise_rates(
    device: torch.device, shape: tuple[int, int], quick: bool, bandwidth: float
) -> dict[str, float]:
    """Elements/s of each op in _elementwise_ops that is slower than moving its bytes (read + write) would be."""
    x = torch.randn(*shape, device=device)
    rates = {}
    for op, call in _elementwise_ops(x).items():
        seconds = _together(lambda call=call: _seconds_per_call(call, device, 0.002 if quick else 0.02))
        inputs = 2 if op.endswith("_backward") or op.endswith("_data") or op == "aten.div" else 1
        if seconds > 1.2 * (inputs + 1) * x.numel() * x.element_size() / bandwidth:
            rates[op] = x.numel() / seconds
    return rates


def _update_rate(device: torch.device, kind: str, nbytes: int, min_time: float) -> float:
    """Parameter bytes per second that `kind`'s torch optimizer steps through (state already created)."""
    params = [torch.nn.Parameter(torch.zeros(nbytes // 32, device=device)) for _ in range(8)]
    for p in params:
        p.grad = torch.full_like(p, 1e-3)
    if kind == "adam":
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(params, lr=1e-4)
    else:
        optimizer = torch.optim.SGD(params, lr=1e-4, momentum=0.9 if kind == "momentum" else 0.0)
    return sum(p.numel() * 4 for p in params) / _seconds_per_call(optimizer.step, device, min_time)


def _memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _probe_links(device: torch.device, quick: bool) -> tuple[dict[str, Any], dict[str, str]]:
    """Ping-pong between ranks 0 and 1 and an allreduce over all ranks; rank 0's figures for everyone."""
    rank, world = dist.get_rank(), dist.get_world_size()
    comm = device if dist.get_backend() == "nccl" else torch.device("cpu")
    hosts: list[Any] = [None] * world
    dist.all_gather_object(hosts, socket.gethostname())
    sizes = [KIB, 64 * KIB] if quick else [KIB, 64 * KIB, MIB, 16 * MIB, 64 * MIB]
    reps = 3 if quick else 10
    one_way: dict[int, float] = {}
    for size in sizes:
        buf = torch.zeros(size, dtype=torch.uint8, device=comm)
        dist.barrier()
        if rank < 2:
            peer = 1 - rank
            samples = []
            for _ in range(reps + 1):
                start = time.perf_counter()
                if rank == 0:
                    dist.send(buf, peer)
                    dist.recv(buf, peer)
                else:
                    dist.recv(buf, peer)
                    dist.send(buf, peer)
                _sync(comm)
                samples.append((time.perf_counter() - start) / 2)
            one_way[size] = statistics.median(samples[1:])
    idle_latency = one_way.get(sizes[0], 0.0)
    bandwidth = sizes[-1] / max(one_way.get(sizes[-1], 1.0) - idle_latency, 1e-9)
    # 60 samples: the delay is bimodal (prompt, or a scheduler tick late), and with 20 the mean still varied by
    # ~1.5 ms between calibrations, enough to move a 4-rank CPU prediction by 10%.
    busy_latency = _busy_sender_latency(device, comm, rank, 3 if quick else 60, 0.002 if quick else 0.02)
    # In a pipeline the sender is computing its next microbatch while its message goes out; when that slows
    # delivery (CPU ranks sharing cores with their communication threads), the busy figure is the latency.
    latency = max(idle_latency, busy_latency)
    reduce_bytes = (MIB if quick else 64 * MIB) // 4 * 4
    tensor = torch.zeros(reduce_bytes // 4, device=comm)
    small = torch.zeros(1, device=comm)
    reduce_time = _seconds_per_call(lambda: dist.all_reduce(tensor), comm, 0.0, repeats=reps)
    reduce_latency = _seconds_per_call(lambda: dist.all_reduce(small), comm, 0.0, repeats=reps)
    bus = 2 * (world - 1) / world * reduce_bytes / max(reduce_time - reduce_latency, 1e-9)
    overlap, overlap_text = _allreduce_overlap(device, comm, 3 if quick else 7, (MIB if quick else 16 * MIB))
    result: list[Any] = [(latency, bandwidth, bus, reduce_latency, idle_latency, busy_latency)]
    dist.broadcast_object_list(result, src=0)
    latency, bandwidth, bus, reduce_latency, idle_latency, busy_latency = result[0]
    scope = "intra_node" if hosts[0] == hosts[1] else "inter_node"
    reduce = "allreduce" if len(set(hosts)) == 1 else "allreduce_inter"
    where = f"measured by rannc.profile.calibrate ({dist.get_backend()}, {world} ranks), {_today()}"
    links = {
        f"{scope}_bandwidth": bandwidth,
        f"{scope}_latency": latency,
        f"{reduce}_bandwidth": bus,
        f"{reduce}_latency": reduce_latency,
        "gpus_per_node": hosts.count(hosts[0]),
        "allreduce_overlap": overlap,
    }
    text = {
        "allreduce_overlap": f"{where}: {overlap_text}",
        scope: f"{where}: ranks 0-1 ping-pong {sizes[0]} B .. {sizes[-1] // KIB} KiB: {idle_latency * 1e6:.3g} us, "
        f"{bandwidth / 1e9:.3g} GB/s one way; {sizes[0]} B from a rank that computes right after sending (all "
        f"others compute too): {busy_latency * 1e6:.3g} us; latency = the larger, {latency * 1e6:.3g} us",
        reduce: f"{where}: {reduce_bytes // KIB} KiB allreduce over {len(set(hosts))} node(s), bus bandwidth "
        f"{bus / 1e9:.3g} GB/s, 1-element {reduce_latency * 1e6:.3g} us",
    }
    return links, text


def _allreduce_overlap(device: torch.device, comm: torch.device, reps: int, nbytes: int) -> tuple[float, str]:
    """The fraction of an allreduce's time that hides behind compute, as when the runtime reduces gradients
    during the last backward: every rank runs a fixed amount of matmuls (about 1.5 allreduces long) alone and
    with an allreduce of `nbytes` started just before; fraction = 1 - (extra time) / (allreduce alone), from
    medians, averaged over the ranks. Communication threads that share cores with compute (gloo on CPUs) hide
    little; a separate engine (NCCL on GPUs) hides nearly all."""
    tensor = torch.zeros(nbytes // 4, device=comm)
    a = torch.randn(256, 256, device=device)

    def timed(compute: int, reduce: bool) -> float:
        dist.barrier()
        start = time.perf_counter()
        work = dist.all_reduce(tensor, async_op=True) if reduce else None
        for _ in range(compute):
            torch.mm(a, a)
        _sync(device)
        if work is not None:
            work.wait()
            _sync(comm)
        return time.perf_counter() - start

    reduce_alone = statistics.median(timed(0, True) for _ in range(reps + 1))
    per_matmul = statistics.median(timed(20, False) for _ in range(3)) / 20
    count = max(1, round(1.5 * reduce_alone / max(per_matmul, 1e-9)))
    alone, both = [], []
    for _ in range(reps):
        alone.append(timed(count, False))
        both.append(timed(count, True))
    extra = max(0.0, statistics.median(both) - statistics.median(alone))
    fraction = min(1.0, max(0.0, 1.0 - extra / max(reduce_alone, 1e-9)))
    mean = torch.tensor([fraction], dtype=torch.float64, device=comm)
    dist.all_reduce(mean)
    fraction = float(mean) / dist.get_world_size()
    text = (
        f"{nbytes // KIB} KiB allreduce alone {reduce_alone * 1e3:.3g} ms; {count} matmuls alone "
        f"{statistics.median(alone) * 1e3:.3g} ms, with the allreduce started first {statistics.median(both) * 1e3:.3g} "
        f"ms: hidden fraction {fraction:.2f} (mean over ranks)"
    )
    return fraction, text


def _busy_sender_latency(
    device: torch.device, comm: torch.device, rank: int, reps: int, busy_seconds: float
) -> float:
    """Mean seconds rank 0 waits for 1 KiB from rank 1 when rank 1 starts computing right after posting the
    send and every other rank computes too (as between pipeline stages); 0 on ranks other than 0. The mean, not
    the median: on CPUs whose cores the ranks share, a send is either prompt or waits for a scheduler tick
    (milliseconds), and every transfer of a step pays the expected delay."""
    message = torch.zeros(KIB, dtype=torch.uint8, device=comm)
    a = torch.randn(256, 256, device=device)
    samples = []
    for _ in range(reps + 1):
        dist.barrier()
        start = time.perf_counter()
        if rank == 0:
            dist.recv(message, 1)
            _sync(comm)
            samples.append(time.perf_counter() - start)
            continue
        work = dist.isend(message, 0) if rank == 1 else None
        while time.perf_counter() - start < busy_seconds:
            torch.mm(a, a)
            _sync(device)
        if work is not None:
            work.wait()
    return statistics.fmean(samples[1:]) if samples else 0.0
