"""Device profiles (peak FLOPs, memory and link bandwidths) for estimating costs without the device."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..plan.types import Links

__all__ = [
    "DTYPES",
    "DeviceProfile",
    "get_device_profile",
    "list_profiles",
    "load_profile",
    "profile_for_device_name",
    "save_profile",
]

DTYPES = ("float32", "tf32", "bfloat16", "float16")
_FORMAT = "rannc-device-profile"
_VERSION = 1


_UPDATE_PASSES = {"adam": 7, "momentum": 5, "sgd": 3}
# Temporaries of torch's default optimizer implementation, as (x parameter bytes, x largest parameter tensor):
# on CPUs a loop over tensors (Adam/AdamW hold two tensors' worth of the largest parameter: the square root of
# the second moment and its quotient, measured with rannc.profile.memtrack), on GPUs the foreach form (one list
# of temporaries, e.g. Adam's square roots of the second moments).
_OPTIMIZER_TRANSIENT = {
    "cpu": {"adam": (0.0, 2.0), "momentum": (0.0, 0.0), "sgd": (0.0, 0.0)},
    "gpu": {"adam": (1.0, 0.0), "momentum": (1.0, 0.0), "sgd": (0.0, 0.0)},
}


# The runtime steps a rank's parameters in chunks of at most this many bytes (a larger tensor alone) when they
# hold more (runtime/optimizer.py), so that the foreach temporaries above cover one chunk, not every parameter.
OPTIMIZER_CHUNK_BYTES = float(2**28)


def optimizer_state_factor(optimizer_class: str, group: Mapping[str, Any]) -> float | None:
    """The state bytes per parameter byte that a `torch.optim` optimizer of class `optimizer_class` keeps for a
    param group with options `group` (scalars such as Adam's step count left out), or None for a class rannc does
    not know (LBFGS's history, factored or third-party optimizers)."""
    if optimizer_class == "SGD":
        return 1.0 if group.get("momentum", 0) else 0.0  # the momentum buffer
    if optimizer_class in ("Adam", "AdamW"):
        return 3.0 if group.get("amsgrad", False) else 2.0  # both moments (and the largest second one)
    if optimizer_class in ("NAdam", "RAdam", "Adamax", "Adadelta", "Rprop"):
        return 2.0
    if optimizer_class == "RMSprop":  # square average, momentum buffer, mean gradient
        return 1.0 + bool(group.get("momentum", 0)) + bool(group.get("centered", False))
    if optimizer_class in ("Adagrad", "ASGD"):
        return 1.0
    return None


# The optimizers `rannc plan --optimizer` names: torch.optim class and param group options (a job reads both from
# its optimizer); their state factors come from `optimizer_state_factor`, as a job's do.
OPTIMIZER_CHOICES: dict[str, tuple[str, dict[str, Any]]] = {
    "adam": ("Adam", {}),
    "adamw": ("AdamW", {}),
    "amsgrad": ("Adam", {"amsgrad": True}),
    "nadam": ("NAdam", {}),
    "radam": ("RAdam", {}),
    "adamax": ("Adamax", {}),
    "adadelta": ("Adadelta", {}),
    "rprop": ("Rprop", {}),
    "sgd": ("SGD", {}),
    "sgd-momentum": ("SGD", {"momentum": 0.9}),
    "adagrad": ("Adagrad", {}),
    "asgd": ("ASGD", {}),
    "rmsprop": ("RMSprop", {}),
}


def named_optimizer_state_factor(name: str) -> float:
    """The state factor of an optimizer `rannc plan --optimizer` names (`OPTIMIZER_CHOICES`)."""
    optimizer_class, group = OPTIMIZER_CHOICES[name]
    factor = optimizer_state_factor(optimizer_class, group)
    assert factor is not None, name  # every choice is a class optimizer_state_factor knows
    return factor


def optimizer_kind(opt_param_factor: float) -> str:
    """The optimizer family its state size suggests: >= 2 x parameters Adam, >= 1 momentum SGD, else SGD."""
    return "adam" if opt_param_factor >= 2 else "momentum" if opt_param_factor >= 1 else "sgd"


def optimizer_transient(
    device_kind: str, opt_param_factor: float, l2_weight_decay: bool = False
) -> tuple[float, float]:
    """(x parameter bytes, x largest parameter) of optimizer step temporaries on a "cpu" or "gpu" device.

    `l2_weight_decay`: Adam with coupled weight decay (torch.optim.Adam(weight_decay > 0), not AdamW) first
    makes grad + weight_decay x param, one more temporary (per tensor on CPUs, a list of them on GPUs)."""
    kind = optimizer_kind(opt_param_factor)
    per_param, per_largest = _OPTIMIZER_TRANSIENT["cpu" if device_kind == "cpu" else "gpu"][kind]
    if l2_weight_decay and kind == "adam":
        return (per_param + 1, per_largest) if per_param else (per_param, per_largest + 1)
    return per_param, per_largest


@dataclasses.dataclass(frozen=True)
class DeviceProfile:
    """What one device (and its links) can do; rates in FLOP/s and bytes/s, latencies in seconds.

    `peak_flops` holds the vendor's dense peak per compute dtype ("float32", "tf32", "bfloat16",
    "float16"; a missing dtype falls back to "float32"). Achieved rates are peak x `matmul_efficiency`
    (ops with FLOPs) and `memory_bandwidth` x `memory_efficiency` (memory-bound ops). Link figures are
    one-way, per GPU: `intra_node_*` between GPUs of a node, `inter_node_*` across nodes (one NIC per
    GPU assumed). `allreduce_*` / `allreduce_inter_*`, when set (e.g. measured), replace the allreduce bus
    bandwidth/latency derived from the links within / across nodes. `sources` says where figures came from.

    Example::

        profile = get_device_profile("a100-80gb")
        profile.flop_rate("bfloat16")
        problem = problem.with_links(profile.planner_links())
    """

    name: str
    peak_flops: dict[str, float]
    memory_bandwidth: float
    memory_bytes: float
    intra_node_bandwidth: float
    intra_node_latency: float
    inter_node_bandwidth: float
    inter_node_latency: float
    gpus_per_node: int
    matmul_efficiency: float = 0.6
    memory_efficiency: float = 0.7
    op_overhead: float = 5e-6  # seconds added per kernel (launch / dispatch)
    allreduce_bandwidth: float | None = None  # bus bandwidth within a node, bytes/s
    allreduce_latency: float | None = None
    allreduce_inter_bandwidth: float | None = None  # bus bandwidth of an allreduce spanning nodes
    allreduce_inter_latency: float | None = None
    # Measured optimizer step throughput, parameter bytes per second, by kind ("adam", "momentum", "sgd");
    # missing kinds are priced as passes over memory (see update_seconds_per_byte).
    optimizer_update_rate: dict[str, float] = dataclasses.field(default_factory=dict)
    # Measured elements per second of elementwise ops whose arithmetic, not memory, bounds them on this device
    # (transcendentals on CPUs), by aten op ("aten.exp", ...): such an op takes at least its output elements /
    # rate. Empty: every elementwise op is priced by the bytes it moves.
    elementwise_rate: dict[str, float] = dataclasses.field(default_factory=dict)
    kind: str = (
        "gpu"  # "gpu" or "cpu": which default optimizer implementation (and its temporaries) to expect
    )
    sources: dict[str, str] = dataclasses.field(default_factory=dict)
    # Measured matmul throughput by shape (`rannc calibrate`): {"m": [...], "k": [...], "n": [...], "factor":
    # [...]}, a grid of (rows, reduction, columns) with, flattened m-major, the FLOP/s of an (m x k) @ (k x n)
    # matmul started with cold caches over the float32 peak. A matmul is priced at peak x matmul_efficiency x
    # its shape's factor (log-linear between grid points, clamped at the ends): small and skinny matmuls run
    # well below the peak of large square ones. None: every matmul runs at peak x matmul_efficiency.
    matmul_shapes: dict[str, list[float]] | None = None
    # Fraction of a gradient allreduce's time that can hide behind the backward still running (the runtime
    # starts it during the last backward). 1: communication runs beside compute (NCCL on GPUs); lower where
    # communication threads share cores with compute (gloo on CPUs; `rannc calibrate` measures it).
    allreduce_overlap: float = 1.0
    # CPUs: the cores the ranks of one node share (None: a device per rank, as GPUs) and how many of those ranks
    # computed at once when the rates were measured (`rannc calibrate --ranks N`: N). The simulator shares the
    # cores among the ranks computing at each moment (`plan.simulate.CoreSharing`): a rank computes faster in
    # another's bubble than the figures measured with every rank computing say.
    host_cores: int | None = None
    measured_ranks: int = 1

    def __post_init__(self) -> None:
        _validate(self)

    def peak(self, dtype: str) -> float:
        return self.peak_flops.get(dtype, self.peak_flops["float32"])

    def flop_rate(self, dtype: str) -> float:
        """Achievable FLOP/s of matmul-like ops in `dtype`."""
        return self.peak(dtype) * self.matmul_efficiency

    def matmul_shape_factor(self, m: float, k: float, n: float) -> float:
        """The measured fraction of peak an (m x k) @ (k x n) matmul achieves (1 without a table)."""
        table = self.matmul_shapes
        if not table:
            return 1.0
        return _grid_lookup(table, (m, k, n))

    def byte_rate(self) -> float:
        """Achievable bytes/s of memory-bound ops."""
        return self.memory_bandwidth * self.memory_efficiency

    def update_seconds_per_byte(self, opt_param_factor: float) -> float:
        """Seconds an optimizer step takes per parameter byte; the kind follows the optimizer state size
        (>= 2 x parameters: Adam, >= 1: SGD with momentum, else plain SGD). Without a measured rate: the
        bytes a fused implementation moves (Adam reads parameter, gradient and two moments and writes three:
        7 passes; momentum 5; SGD 3) at the achievable memory bandwidth."""
        kind = optimizer_kind(opt_param_factor)
        rate = self.optimizer_update_rate.get(kind)
        if rate:
            return 1.0 / rate
        return _UPDATE_PASSES[kind] / self.byte_rate()

    def planner_links(self, gpus_per_node: int | None = None) -> Links:
        """The links the planner charges on this device, with `gpus_per_node` GPUs per node (default: the
        profile's).

        Without a measured figure, an allreduce inside a node runs at the NVLink bandwidth and one across
        nodes at the ring bound min(intra, inter x gpus_per_node) (every GPU drives its own NIC).
        """

        def pick(value: float | None, default: float) -> float:
            return default if value is None else value

        gpus = self.gpus_per_node if gpus_per_node is None else gpus_per_node
        ring = min(self.intra_node_bandwidth, self.inter_node_bandwidth * gpus)
        return Links(
            p2p_bandwidth=self.intra_node_bandwidth,
            p2p_latency=self.intra_node_latency,
            allreduce_bandwidth=pick(self.allreduce_bandwidth, self.intra_node_bandwidth),
            allreduce_latency=pick(self.allreduce_latency, self.intra_node_latency),
            gpus_per_node=gpus,
            inter_node_bandwidth=self.inter_node_bandwidth,
            inter_node_latency=self.inter_node_latency,
            allreduce_inter_bandwidth=pick(self.allreduce_inter_bandwidth, ring),
            allreduce_inter_latency=pick(self.allreduce_inter_latency, self.inter_node_latency),
        )

    def to_json(self) -> dict[str, Any]:
        return {"format": _FORMAT, "version": _VERSION, **dataclasses.asdict(self)}

    @staticmethod
    def from_json(data: Any, where: str = "device profile") -> DeviceProfile:
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a JSON object, got {type(data).__name__}")
        data = dict(data)
        if data.pop("format", _FORMAT) != _FORMAT or data.pop("version", _VERSION) != _VERSION:
            raise ConfigError(f"{where}: not a rannc device profile (format {_FORMAT!r}, version {_VERSION})")
        fields = {f.name: f for f in dataclasses.fields(DeviceProfile)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {unknown}; known fields are {sorted(fields)}")
        required = [n for n, f in fields.items() if _is_required(f)]
        missing = [n for n in required if n not in data]
        if missing:
            raise ConfigError(f"{where}: missing field(s) {missing}")
        try:
            return DeviceProfile(**data)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None


def _grid_lookup(table: dict[str, list[float]], point: tuple[float, float, float]) -> float:
    """Trilinear interpolation in log space of table["factor"] on the grid table["m"] x ["k"] x ["n"]."""
    corners: list[list[tuple[int, float]]] = []  # per axis: (index, weight) of the two neighbours
    for axis, value in zip(("m", "k", "n"), point):
        grid = table[axis]
        x = math.log(min(max(value, grid[0]), grid[-1]))
        hi = next((i for i, g in enumerate(grid) if math.log(g) >= x), len(grid) - 1)
        lo = max(0, hi - 1)
        span = math.log(grid[hi]) - math.log(grid[lo])
        w = (x - math.log(grid[lo])) / span if span > 0 else 1.0
        corners.append([(lo, 1.0 - w), (hi, w)])
    sizes = (len(table["k"]), len(table["n"]))
    total = 0.0
    for i, wi in corners[0]:
        for j, wj in corners[1]:
            for k, wk in corners[2]:
                total += wi * wj * wk * table["factor"][(i * sizes[0] + j) * sizes[1] + k]
    return total


def _validate_matmul_shapes(table: Any) -> None:
    if table is None:
        return
    if not isinstance(table, dict) or set(table) != {"m", "k", "n", "factor"}:
        raise ConfigError("matmul_shapes must be null or an object with 'm', 'k', 'n' and 'factor' lists")
    for axis in ("m", "k", "n"):
        grid = table[axis]
        if not isinstance(grid, list) or not grid:
            raise ConfigError(f"matmul_shapes[{axis!r}] must be a non-empty list of sizes")
        for value in grid:
            _number(value, f"matmul_shapes[{axis!r}] entries", 0, strict=True)
        if any(b <= a for a, b in zip(grid, grid[1:])):
            raise ConfigError(f"matmul_shapes[{axis!r}] must be strictly increasing, got {grid}")
    factors = table["factor"]
    expected = len(table["m"]) * len(table["k"]) * len(table["n"])
    if not isinstance(factors, list) or len(factors) != expected:
        raise ConfigError(f"matmul_shapes['factor'] must list {expected} values (m x k x n, m-major)")
    for value in factors:
        _number(value, "matmul_shapes['factor'] entries", 0, 1, strict=True)


def _is_required(field: dataclasses.Field[Any]) -> bool:
    return field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING


def _number(value: Any, what: str, low: float, high: float = math.inf, strict: bool = False) -> None:
    """`value` is a real number in [low, high) (or (low, high] when `strict`); else a ConfigError."""
    number = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    inside = number and ((low < value <= high) if strict else (low <= value < high))
    if not inside:
        bounds = (
            f"in ({low:g}, {high:g}]"
            if strict and high < math.inf
            else f"> {low:g}"
            if strict
            else f">= {low:g}"
        )
        raise ConfigError(f"{what} must be a finite number {bounds}, got {value!r}")


def _validate(p: DeviceProfile) -> None:
    if not isinstance(p.name, str) or not p.name:
        raise ConfigError(f"name must be a non-empty string, got {p.name!r}")
    if not isinstance(p.peak_flops, dict) or "float32" not in p.peak_flops:
        raise ConfigError(f"peak_flops must be an object with at least 'float32', got {p.peak_flops!r}")
    for key, value in p.peak_flops.items():
        if key not in DTYPES:
            raise ConfigError(f"peak_flops has unknown dtype {key!r}; use {list(DTYPES)}")
        _number(value, f"peak_flops[{key!r}]", 0, strict=True)
    for name in ("memory_bandwidth", "memory_bytes", "intra_node_bandwidth", "inter_node_bandwidth"):
        _number(getattr(p, name), name, 0, strict=True)
    for name in ("allreduce_bandwidth", "allreduce_inter_bandwidth"):
        if getattr(p, name) is not None:
            _number(getattr(p, name), name + " (or null)", 0, strict=True)
    for name in ("intra_node_latency", "inter_node_latency", "op_overhead"):
        _number(getattr(p, name), name, 0)
    for name in ("allreduce_latency", "allreduce_inter_latency"):
        if getattr(p, name) is not None:
            _number(getattr(p, name), name + " (or null)", 0)
    for name in ("matmul_efficiency", "memory_efficiency"):
        _number(getattr(p, name), name, 0, 1, strict=True)
    if p.host_cores is not None and (
        isinstance(p.host_cores, bool) or not isinstance(p.host_cores, int) or p.host_cores < 1
    ):
        raise ConfigError(f"host_cores must be a positive integer or null, got {p.host_cores!r}")
    if isinstance(p.measured_ranks, bool) or not isinstance(p.measured_ranks, int) or p.measured_ranks < 1:
        raise ConfigError(f"measured_ranks must be a positive integer, got {p.measured_ranks!r}")
    overlap = p.allreduce_overlap
    if isinstance(overlap, bool) or not isinstance(overlap, int | float) or not 0 <= overlap <= 1:
        raise ConfigError(f"allreduce_overlap must be a number in [0, 1], got {overlap!r}")
    if isinstance(p.gpus_per_node, bool) or not isinstance(p.gpus_per_node, int) or p.gpus_per_node < 1:
        raise ConfigError(f"gpus_per_node must be an integer >= 1, got {p.gpus_per_node!r}")
    if p.kind not in ("gpu", "cpu"):
        raise ConfigError(f"kind must be 'gpu' or 'cpu', got {p.kind!r}")
    if not isinstance(p.elementwise_rate, dict):
        raise ConfigError(f"elementwise_rate must be an object, got {p.elementwise_rate!r}")
    for key, value in p.elementwise_rate.items():
        if not isinstance(key, str) or not key.startswith("aten."):
            raise ConfigError(f"elementwise_rate keys are aten op names like 'aten.exp', got {key!r}")
        _number(value, f"elementwise_rate[{key!r}]", 0, strict=True)
    if not isinstance(p.optimizer_update_rate, dict):
        raise ConfigError(f"optimizer_update_rate must be an object, got {p.optimizer_update_rate!r}")
    for key, value in p.optimizer_update_rate.items():
        if key not in _UPDATE_PASSES:
            raise ConfigError(f"optimizer_update_rate has unknown kind {key!r}; use {list(_UPDATE_PASSES)}")
        _number(value, f"optimizer_update_rate[{key!r}]", 0, strict=True)
    _validate_matmul_shapes(p.matmul_shapes)
    if not isinstance(p.sources, dict) or not all(isinstance(v, str) for v in p.sources.values()):
        raise ConfigError("sources must be an object of strings")


GB = 1e9
GIB = 2**30
T = 1e12
_NCCL_LATENCY = (
    "assumption, not from a spec sheet: typical NCCL small-message end-to-end latency "
    "(intra-node NVLink ~10 us, inter-node InfiniBand ~20 us); calibrate on the cluster for better figures"
)
_NCCL_OVERLAP = (
    "assumption: NCCL runs the gradient allreduce on its own channels beside the backward's kernels, so all of "
    "it can hide behind compute (1.0); as in DDP, only the gradients final at the backward's end stay exposed"
)
_EFFICIENCY = (
    "assumption: 60% of dense peak for matmul-like ops and 70% of peak bandwidth for memory-bound ops "
    "(typical of large transformer kernels); per-op overhead 5 us (eager kernel launch)"
)
_CAPACITY = "capacity in binary GiB as marketed; CUDA reports ~1-2% less (keep a mem_margin)"


def _gpu(
    name: str,
    peak: dict[str, float],
    bw: float,
    mem: float,
    nvlink: float,
    nic: float,
    sources: dict[str, str],
) -> DeviceProfile:
    return DeviceProfile(
        name=name,
        peak_flops=peak,
        memory_bandwidth=bw,
        memory_bytes=mem,
        intra_node_bandwidth=nvlink,
        intra_node_latency=10e-6,
        inter_node_bandwidth=nic,
        inter_node_latency=20e-6,
        gpus_per_node=8,
        sources={
            **sources,
            "latency": _NCCL_LATENCY,
            "efficiency": _EFFICIENCY,
            "memory_bytes": _CAPACITY,
            "allreduce_overlap": _NCCL_OVERLAP,
        },
    )


_A100_COMPUTE = (
    "NVIDIA A100 Tensor Core GPU datasheet (2021), SXM: 19.5 TFLOPS FP32, 156 TFLOPS TF32, "
    "312 TFLOPS BF16/FP16 Tensor Core (dense; the 312/624 sparse figures are not used)"
)
_A100_LINKS = {
    "intra_node": "A100 datasheet: NVLink 3 600 GB/s total (bidirectional) per GPU via NVSwitch (HGX/DGX A100) "
    "-> 300 GB/s one way",
    "inter_node": "DGX A100 datasheet: 8x ConnectX-6 HDR InfiniBand 200 Gb/s, one per GPU -> 25 GB/s one way",
}
_HOPPER_COMPUTE = (
    "SXM: 67 TFLOPS FP32, 989 TFLOPS TF32 and 1,979 TFLOPS BF16/FP16 Tensor Core are with 2:4 sparsity; "
    "dense (used here) is half: 494.5 TF32, 989.5 BF16/FP16"
)
_HOPPER_LINKS = {
    "intra_node": "NVLink 4 900 GB/s total (bidirectional) per GPU via NVSwitch (HGX/DGX) -> 450 GB/s one way",
    "inter_node": "DGX H100/H200 datasheet: 8x ConnectX-7 NDR InfiniBand 400 Gb/s, one per GPU -> 50 GB/s one way",
}
_HOPPER_PEAK = {"float32": 67 * T, "tf32": 494.5 * T, "bfloat16": 989.5 * T, "float16": 989.5 * T}

_SHIPPED: dict[str, DeviceProfile] = {
    p.name: p
    for p in (
        _gpu(
            "v100-32gb",
            {"float32": 15.7 * T, "tf32": 15.7 * T, "bfloat16": 15.7 * T, "float16": 125 * T},
            900 * GB,
            32 * GIB,
            150 * GB,
            6.25 * GB,
            {
                "peak_flops": "NVIDIA Tesla V100 datasheet (2020), SXM2: 15.7 TFLOPS FP32, 125 TFLOPS FP16 Tensor "
                "Core; no TF32/BF16 units, so those run at the FP32 rate (assumption)",
                "memory_bandwidth": "V100 datasheet: 32 GB HBM2, 900 GB/s",
                "intra_node": "V100 datasheet: NVLink 2 300 GB/s total (bidirectional) -> 150 GB/s one way; DGX-1 "
                "is a hybrid cube-mesh, so one GPU pair may only get 25-50 GB/s",
                "inter_node": "DGX-1 datasheet: 4x EDR InfiniBand 100 Gb/s for 8 GPUs -> 6.25 GB/s per GPU",
            },
        ),
        _gpu(
            "a100-40gb",
            {"float32": 19.5 * T, "tf32": 156 * T, "bfloat16": 312 * T, "float16": 312 * T},
            1555 * GB,
            40 * GIB,
            300 * GB,
            25 * GB,
            {
                "peak_flops": _A100_COMPUTE,
                "memory_bandwidth": "A100 datasheet: 40GB HBM2, 1,555 GB/s",
                **_A100_LINKS,
            },
        ),
        _gpu(
            "a100-80gb",
            {"float32": 19.5 * T, "tf32": 156 * T, "bfloat16": 312 * T, "float16": 312 * T},
            2039 * GB,
            80 * GIB,
            300 * GB,
            25 * GB,
            {
                "peak_flops": _A100_COMPUTE,
                "memory_bandwidth": "A100 datasheet: 80GB HBM2e, 2,039 GB/s (SXM)",
                **_A100_LINKS,
            },
        ),
        _gpu(
            "h100-80gb",
            _HOPPER_PEAK,
            3350 * GB,
            80 * GIB,
            450 * GB,
            50 * GB,
            {
                "peak_flops": "NVIDIA H100 Tensor Core GPU datasheet (2023), " + _HOPPER_COMPUTE,
                "memory_bandwidth": "H100 datasheet: SXM5 80GB HBM3, 3.35 TB/s",
                **_HOPPER_LINKS,
            },
        ),
        _gpu(
            "h200",
            _HOPPER_PEAK,
            4800 * GB,
            141 * GIB,
            450 * GB,
            50 * GB,
            {
                "peak_flops": "NVIDIA H200 Tensor Core GPU datasheet (2024), same compute as H100 SXM; "
                + _HOPPER_COMPUTE,
                "memory_bandwidth": "H200 datasheet: SXM 141GB HBM3e, 4.8 TB/s",
                **_HOPPER_LINKS,
            },
        ),
        DeviceProfile(
            name="cpu",
            peak_flops={"float32": 100 * GB, "tf32": 100 * GB, "bfloat16": 50 * GB, "float16": 50 * GB},
            memory_bandwidth=20 * GB,
            memory_bytes=16 * GIB,
            intra_node_bandwidth=3 * GB,
            intra_node_latency=100e-6,
            inter_node_bandwidth=1.25 * GB,
            inter_node_latency=100e-6,
            gpus_per_node=1,
            op_overhead=10e-6,
            kind="cpu",
            allreduce_overlap=0.5,
            sources={
                "all": "generic conservative CPU (assumption, no spec sheet): a few cores with AVX2/AVX-512 FMA "
                "~100 GFLOP/s FP32, half that for BF16/FP16 (often emulated), 20 GB/s DRAM, 16 GiB; run "
                "`rannc calibrate` (rannc.profile.calibrate) on the real machine to replace it",
                "intra_node": "gloo over loopback measured ~3.2 GB/s one way, ~0.1-0.3 ms small messages "
                "(shared/notes/torch-facts.md)",
                "inter_node": "10 GbE (1.25 GB/s), TCP ~100 us (assumption); one process per node",
                "efficiency": "assumption: 60% / 70% of the figures above; 10 us per op dispatch",
                "allreduce_overlap": "assumption: gloo's communication threads share the cores with compute, so "
                "at most about half of an allreduce hides behind the backward (calibrate measured 0.2-0.4 with 2 "
                "ranks on a 2-core VM and 0-0.15 with 4, more ranks than cores); calibrate measures it",
            },
        ),
    )
}

_ALIASES = {
    "v100": "v100-32gb",
    "a100": "a100-40gb",
    "a100-sxm4-40gb": "a100-40gb",
    "a100-sxm4-80gb": "a100-80gb",
    "h100": "h100-80gb",
    "h100-sxm": "h100-80gb",
    "h100-sxm5-80gb": "h100-80gb",
    "h200-141gb": "h200",
}


def list_profiles() -> list[str]:
    """Names of the shipped profiles."""
    return sorted(_SHIPPED)


def get_device_profile(name_or_path: str | Path | DeviceProfile) -> DeviceProfile:
    """A shipped profile by name (case-insensitive, e.g. "h100-80gb"), or one saved as JSON at a path.

    Example::

        get_device_profile("a100-40gb").peak("bfloat16")  # 312e12
        get_device_profile("./my-cluster.json")
    """
    if isinstance(name_or_path, DeviceProfile):
        return name_or_path
    key = str(name_or_path).strip().lower()
    key = _ALIASES.get(key, key)
    if key in _SHIPPED:
        return _SHIPPED[key]
    path = Path(name_or_path)
    if path.suffix == ".json" or path.exists():
        return load_profile(path)
    raise ConfigError(
        f"unknown device profile {str(name_or_path)!r}: use one of {list_profiles()} (aliases "
        f"{sorted(_ALIASES)}), or the path of a JSON file written by save_profile / `rannc calibrate`"
    )


def profile_for_device_name(device_name: str) -> DeviceProfile | None:
    """The shipped profile matching a CUDA device name (e.g. "NVIDIA A100-SXM4-80GB"), if any."""
    text = device_name.upper()
    if "PCIE" in text or "NVL" in text:
        return None  # other clocks, bandwidths and links than the SXM figures shipped here
    if "H200" in text:
        return _SHIPPED["h200"]
    if "H100" in text:
        return _SHIPPED["h100-80gb"]
    if "A100" in text:
        return _SHIPPED["a100-80gb" if "80GB" in text else "a100-40gb"]
    if "V100" in text and "32GB" in text:
        return _SHIPPED["v100-32gb"]
    return None


def save_profile(profile: DeviceProfile, path: str | Path) -> None:
    Path(path).write_text(json.dumps(profile.to_json(), indent=2, sort_keys=True) + "\n")


def load_profile(path: str | Path) -> DeviceProfile:
    """Read and validate a profile written by `save_profile` (raises ConfigError naming the problem)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read device profile {path}: {exc}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"device profile {path} is not valid JSON: {exc}") from exc
    return DeviceProfile.from_json(data, where=f"device profile {path}")
