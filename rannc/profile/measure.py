"""Measure one block's forward time, backward time and saved-activation bytes at given microbatch sizes."""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist

from ..host_memory import release_free_host_pages
from ..plan.types import BlockProfile
from ..split_backward import input_grads
from .memtrack import PeakMemory

__all__ = ["BlockRunner", "measure_block", "ranks_on_this_host", "usable_cores"]

_GRAD_SEED = 0


@dataclasses.dataclass
class BlockRunner:
    """How to run one block: `module(*inputs)` returns a tuple of outputs (tensors or non-tensors).

    `make_inputs(m)` returns fresh positional inputs for microbatch size m on the device; the inputs at
    `param_input_indices` are parameters, buffers or constants (parameters are leaf tensors with
    requires_grad=True), every other input is an activation.

    Example::

        w = torch.randn(256, 64, requires_grad=True)
        runner = BlockRunner(
            module=lambda x, w: (torch.nn.functional.linear(x, w).relu(),),
            make_inputs=lambda m: [torch.randn(m, 64), w],
            param_input_indices=frozenset({1}),
        )
    """

    module: Callable[..., Sequence[Any]]
    make_inputs: Callable[[int], list[Any]]
    param_input_indices: frozenset[int]


def measure_block(
    runner: BlockRunner,
    microbatch_sizes: Sequence[int],
    iterations: int = 3,
    device: torch.device | None = None,
    *,
    flush: Callable[[], None] | None = None,
) -> BlockProfile:
    """Median forward/backward seconds and saved-activation bytes of `runner` at each microbatch size.

    Floating-point activation inputs require grad (as between pipeline stages); backward runs over the
    floating-point outputs that require grad with fixed-seed random gradients. Activation bytes are the
    unique storages saved for backward, not counting storages of parameter inputs. The backward is also run
    split as a zero-bubble stage runs it (`rannc.split_backward`: input gradients, then parameter gradients) on
    a forward of its own, both passes timed: `bwd_weight` is the median seconds of the parameter-gradient pass
    and `deferred_grad_bytes` what the first pass keeps for the second. Workspace bytes are the
    most bytes live at once during a forward+backward beyond the inputs and those saved tensors, the
    microbatch's parameter gradients included (counted by `PeakMemory`; on CUDA also from the allocator's
    peak of the timed runs). `flush` evicts the caches before each timed run (default: a `cache_flusher` of
    the device made for this call; pass one to reuse its buffer over many calls).

    Example::

        profile = measure_block(runner, [1, 4, 16])
        profile.fwd_time[4], profile.bwd_time[4], profile.activation_bytes[4]
    """
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    sizes = sorted(set(microbatch_sizes))
    if not sizes or sizes[0] < 1:
        raise ValueError(f"microbatch sizes must be positive integers, got {list(microbatch_sizes)}")
    found: dict[int, _Measured] = {}
    if flush is None and device is not None:
        flush = cache_flusher(device)
    for m in sizes:
        found[m] = _measure_size(runner, m, iterations, device, flush)
        # This size's inputs (a meta model's stand-in parameters among them) and gradients are freed: give their
        # pages back, so that profiling block after block holds one block's tensors in memory, not a fragmented
        # heap of all of them (see release_free_host_pages).
        release_free_host_pages()
    return BlockProfile(
        fwd_time={m: v.fwd for m, v in found.items()},
        bwd_time={m: v.bwd for m, v in found.items()},
        activation_bytes={m: v.activation for m, v in found.items()},
        workspace_bytes={m: v.workspace for m, v in found.items()},
        bwd_weight={m: v.bwd_weight for m, v in found.items()},
        deferred_grad_bytes={m: v.deferred for m, v in found.items()},
    )


@dataclasses.dataclass(frozen=True)
class _Measured:
    """One block at one microbatch size (seconds, bytes)."""

    fwd: float
    bwd: float
    activation: float
    workspace: float
    bwd_weight: float
    deferred: float


def _measure_size(
    runner: BlockRunner,
    m: int,
    iterations: int,
    device: torch.device | None,
    flush: Callable[[], None] | None,
) -> _Measured:
    inputs = list(runner.make_inputs(m))
    if device is None:
        device = _infer_device(inputs)
    params = [x for i, x in enumerate(inputs) if i in runner.param_input_indices and _is_tensor(x)]
    # Parameter gradients accumulate during measurement; the caller's .grad values are put back afterwards.
    previous_grads = [(p, p.grad) for p in params if p.is_leaf and p.requires_grad]
    for p, _ in previous_grads:
        p.grad = None
    try:
        with torch.enable_grad():
            return _measure_prepared(
                runner, inputs, params, iterations, device, flush or cache_flusher(device)
            )
    finally:
        for p, grad in previous_grads:
            p.grad = grad


def _measure_prepared(
    runner: BlockRunner,
    inputs: list[Any],
    params: list[torch.Tensor],
    iterations: int,
    device: torch.device,
    flush: Callable[[], None],
) -> _Measured:
    cuda = device.type == "cuda"
    param_storages = {_storage_key(p) for p in params}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        key = _storage_key(tensor)
        if key is not None and key not in param_storages:
            saved[key] = max(saved.get(key, 0), tensor.untyped_storage().nbytes())
        return tensor

    # Warm-up: also records the tensors saved for backward, the peak beyond the inputs, and picks the output
    # gradients.
    existing = [x for x in inputs if _is_tensor(x)]
    with PeakMemory(existing) as tracker:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            outputs = runner.module(*_fresh_activations(inputs, runner.param_input_indices))
        grad_outputs = _random_grads(_differentiable(outputs))
        _backward(outputs, grad_outputs)
        del outputs
    activation = float(sum(saved.values()))
    input_keys = {_storage_key(x) for x in existing}
    saved_inputs = sum(v for key, v in saved.items() if key in input_keys)  # already in start_bytes
    workspace = max(0.0, tracker.peak_bytes - tracker.start_bytes - (activation - saved_inputs))

    if cuda:  # peak after the warm-up, so that one-off workspaces (cuBLAS, cuDNN) are not counted
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start_bytes = torch.cuda.memory_allocated(device)
    fwd_times: list[float] = []
    bwd_times: list[float] = []
    weight_times: list[tuple[float, float]] = []  # (W seconds, deferred bytes) per run
    # In a pipeline step a block's weights and inputs are not in the CPU caches (other blocks and microbatches
    # ran since), so each timed run starts cold; otherwise small microbatches look cheaper than they are.
    while len(fwd_times) < sample_count(iterations, fwd_times, bwd_times):
        step_inputs = _fresh_activations(inputs, runner.param_input_indices)
        flush()
        _sync(cuda, device)
        t0 = time.perf_counter()
        outputs = runner.module(*step_inputs)
        _sync(cuda, device)
        t1 = time.perf_counter()
        fwd_times.append(t1 - t0)
        if grad_outputs:
            flush()
            t0 = time.perf_counter()
            _backward(outputs, grad_outputs)
            _sync(cuda, device)
            bwd_times.append(time.perf_counter() - t0)
        del outputs, step_inputs
    if grad_outputs and any(_wants_grad(p) for p in params):  # (no parameters: no W pass)
        weight_times = _time_weight_passes(
            runner, inputs, params, grad_outputs, iterations, flush, cuda, device
        )
    if cuda:  # the allocator also sees what kernels allocate outside the dispatcher
        peak = torch.cuda.max_memory_allocated(device) - start_bytes  # .grad of the parameters included
        workspace = max(workspace, float(peak) - activation)
    bwd_time = typical_run(bwd_times) if bwd_times else 0.0
    bwd_weight = min(typical_run([t for t, _ in weight_times]), bwd_time) if weight_times else 0.0
    deferred = weight_times[-1][1] if weight_times else 0.0
    return _Measured(typical_run(fwd_times), bwd_time, activation, workspace, bwd_weight, deferred)


def _time_weight_passes(
    runner: BlockRunner,
    inputs: list[Any],
    params: list[torch.Tensor],
    grad_outputs: list[torch.Tensor],
    iterations: int,
    flush: Callable[[], None],
    cuda: bool,
    device: torch.device,
) -> list[tuple[float, float]]:
    """`_time_weight_pass` `iterations` times (or more, see `sample_count`) after an untimed one, once the whole
    backwards were timed.

    Apart from the whole backwards, and after giving their freed pages back, so that a block's peak host memory
    is that of its whole backwards: the W pass frees the parameter gradients and allocates its own, and with the
    heap that never shrinks (`keep_freed_host_memory`) each such free-then-allocate of a weight-sized tensor
    amid the small tensors of a forward can land on free pages that earlier blocks gave back (a better fit than
    the chunk just freed, or that chunk grown by a free neighbour) instead of the pages it just freed: run
    between the whole backwards, the W pass added up to a gradient's size per block to the peak, more the more
    blocks were profiled before. The untimed pass faults in what the timed ones reuse."""
    for param in params:  # (gradients of the timed whole backwards: measuring's own, restored by the caller)
        if _wants_grad(param):
            param.grad = None
    release_free_host_pages()
    _time_weight_pass(runner, inputs, params, grad_outputs, flush, cuda, device)
    runs: list[tuple[float, float]] = []
    while len(runs) < sample_count(iterations, [t for t, _ in runs]):
        runs.append(_time_weight_pass(runner, inputs, params, grad_outputs, flush, cuda, device))
    return runs


def _time_weight_pass(
    runner: BlockRunner,
    inputs: list[Any],
    params: list[torch.Tensor],
    grad_outputs: list[torch.Tensor],
    flush: Callable[[], None],
    cuda: bool,
    device: torch.device,
) -> tuple[float, float]:
    """The backward split as a zero-bubble stage runs it, on a forward of its own: (seconds of the W pass, bytes
    of the gradients the I pass keeps for it)."""
    step_inputs = _fresh_activations(inputs, runner.param_input_indices)
    outputs = runner.module(*step_inputs)
    activations = [
        x for i, x in enumerate(step_inputs) if i not in runner.param_input_indices and _wants_grad(x)
    ]
    weights = [p for p in params if _wants_grad(p)]
    _, weight_pass = input_grads(_differentiable(outputs), grad_outputs, activations, weights)
    caught = {_storage_key(t): t.untyped_storage().nbytes() for t in weight_pass.caught_tensors()}
    del outputs, step_inputs
    for param in weights:  # (gradients of earlier timed runs: measuring's own, restored by the caller)
        param.grad = None
    flush()
    _sync(cuda, device)
    t0 = time.perf_counter()
    weight_pass.compute()
    _sync(cuda, device)
    return time.perf_counter() - t0, float(sum(caught.values()))


# A timed run shorter than this is taken at least SHORT_RUN_SAMPLES times: one stall of the process (the OS
# scheduler runs another process for a time slice, milliseconds; frequent with more ranks than cores) makes a
# sub-millisecond run look several times slower, and such runs planned most of a model on one replica (a 6-layer
# MLP, 4 ranks on 2 cores, profile_iterations=1: a 31 ms step planned where a 17 ms one existed). A stall only
# lengthens a run, so the lesser of two ignores one (`typical_run`); longer runs are distorted less by it and keep
# the `iterations` asked for. (Each run costs a cache flush: three runs doubled the time profiling took.)
SHORT_RUN_S = 0.02
SHORT_RUN_SAMPLES = 2


def sample_count(iterations: int, *samples: list[float]) -> int:
    """How many timed runs a measurement takes, given the seconds of the runs so far (one list per pass timed):
    `iterations`, raised to SHORT_RUN_SAMPLES once a run of any pass was shorter than SHORT_RUN_S (the shortest:
    a stall only lengthens a run)."""
    timed = [runs for runs in samples if runs]
    if len(timed) == 0 or iterations >= SHORT_RUN_SAMPLES:
        return iterations
    if any(min(runs) < SHORT_RUN_S for runs in timed):
        return SHORT_RUN_SAMPLES
    return iterations


def typical_run(seconds: list[float]) -> float:
    """The time a measurement reports from its runs: their median, or with fewer than three the least (of two
    runs, one stalled; see SHORT_RUN_S)."""
    return statistics.median(seconds) if len(seconds) >= 3 else min(seconds)


CACHE_FLUSH_BYTES = 64 * 2**20  # larger than the last-level cache of the CPUs this runs on (32 MiB here)


def cache_flusher(device: torch.device) -> Callable[[], None]:
    """A function that evicts the CPU caches (writes a buffer larger than them); a no-op on other devices."""
    if device.type != "cpu":
        return lambda: None
    buffer = torch.zeros(CACHE_FLUSH_BYTES // 4)

    def flush() -> None:
        buffer.add_(1.0)

    return flush


def _fresh_activations(inputs: list[Any], param_indices: frozenset[int]) -> list[Any]:
    """New leaf tensors (sharing storage) for floating-point activation inputs, so each run has its own graph."""
    fresh = []
    for i, x in enumerate(inputs):
        if i not in param_indices and _is_tensor(x) and (x.is_floating_point() or x.is_complex()):
            x = x.detach().requires_grad_(True)
        fresh.append(x)
    return fresh


def _differentiable(outputs: Any) -> list[torch.Tensor]:
    return [
        t for t in _tensor_leaves(outputs) if t.requires_grad and (t.is_floating_point() or t.is_complex())
    ]


def _random_grads(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(_GRAD_SEED)
    return [torch.randn(t.shape, dtype=t.dtype, generator=generator).to(t.device) for t in tensors]


def _backward(outputs: Any, grad_outputs: list[torch.Tensor]) -> None:
    """Backward over the same differentiable outputs the gradients were drawn for (frees the graph)."""
    tensors = _differentiable(outputs)
    if tensors:
        torch.autograd.backward(tensors, grad_outputs)


def _tensor_leaves(value: Any) -> Iterator[torch.Tensor]:
    if _is_tensor(value):
        yield value
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _tensor_leaves(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensor_leaves(item)


def _infer_device(inputs: list[Any]) -> torch.device:
    for x in inputs:
        if _is_tensor(x):
            return x.device
    return torch.device("cpu")


def _storage_key(tensor: torch.Tensor) -> int | None:
    """Identity of the memory behind a tensor (views share it); None for tensors without real storage."""
    try:
        storage = tensor.untyped_storage()
    except (RuntimeError, NotImplementedError, TypeError):
        return None
    if tensor.device.type == "meta" or storage.nbytes() == 0:
        return None
    return storage.data_ptr()


def _wants_grad(value: Any) -> bool:
    return _is_tensor(value) and value.requires_grad


def _is_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor)


def _sync(cuda: bool, device: torch.device) -> None:
    if cuda:
        torch.cuda.synchronize(device)


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity where the OS has one): what the ranks of a host share
    when they measure at once (`ranks_on_this_host`)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity is not None else os.cpu_count() or 1


def ranks_on_this_host() -> int:
    """How many ranks of the job run on this host (torchrun's and `rannc.launch`'s LOCAL_WORLD_SIZE; else every
    rank of an initialised process group; else 1)."""
    local = os.environ.get("LOCAL_WORLD_SIZE")
    if local is not None and local.isdigit() and int(local) > 0:
        return int(local)
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1
