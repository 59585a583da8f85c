"""Models built on the meta device: each rank's own weights materialised, read from a file or initialised,
without ever building the whole model in host memory (their blocks are profiled on stand-ins:
`rannc.profile.blocks.stand_in`)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import ConfigError, RanncError

InitWeights = Callable[[torch.nn.Module], None]

_HF_INDEX = "model.safetensors.index.json"


def is_meta_model(model: torch.nn.Module) -> bool:
    return any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))


def materialise(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    tensors: dict[str, torch.Tensor],
    local: set[str],
    device: torch.device,
) -> None:
    """Replace the model's meta tensors by real ones on `device`: uninitialised storage for `local` (filled from
    the weights given), empty tensors for the rest (they live on other ranks).

    A meta tensor cannot take real data in place, so each becomes a new object (as `Module.to_empty` makes
    them) at every place the model holds it (tied weights stay tied) and in the optimizer's parameter groups;
    `tensors` (canonical name -> tensor) is updated.
    """
    new_of: dict[int, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if not tensor.is_meta:
            continue
        shape = tensor.shape if name in local else (0,)
        value = torch.empty(shape, dtype=tensor.dtype, device=device)
        if isinstance(tensor, torch.nn.Parameter):
            value = torch.nn.Parameter(value, requires_grad=tensor.requires_grad)
        new_of[id(tensor)] = value
        tensors[name] = value
    for module in model.modules():
        for slots in (module._parameters, module._buffers):
            for attr, held in slots.items():
                if held is not None and id(held) in new_of:
                    slots[attr] = new_of[id(held)]
    if optimizer is not None:
        for group in optimizer.param_groups:
            group["params"] = [new_of.get(id(p), p) for p in group["params"]]


# ---- load_weights -----------------------------------------------------------------------------------------


def load_weights(
    path: str | Path,
    tensors: dict[str, torch.Tensor],
    local: set[str],
    aliases: dict[str, list[str]],
) -> list[str]:
    """Fill this rank's tensors (`local`, canonical names) from a weights file, reading only those entries.

    `path` is a `torch.save`d state dict (.pt/.pth/.bin, loaded with weights_only=True and memory-mapped), a
    .safetensors file, or a directory of Hugging Face sharded safetensors with its model.safetensors.index.json.
    A tied tensor is read under whichever of its names (`aliases`) the file has. Returns the local names the
    file lacks (for example non-persistent buffers).
    """
    source = Path(path).expanduser()
    if not source.exists():
        raise ConfigError(f"load_weights={str(path)!r} does not exist; pass a weights file or directory")
    reader = _reader_for(source)
    missing = []
    with torch.no_grad():
        for name in sorted(local):
            key = next((a for a in [name, *aliases.get(name, [])] if reader.has(a)), None)
            if key is None:
                missing.append(name)
                continue
            value = reader.get(key)
            target = tensors[name]
            if tuple(value.shape) != tuple(target.shape):
                raise RanncError(
                    f"{source}: {key} has shape {tuple(value.shape)} but the model's {name} has "
                    f"{tuple(target.shape)}; load weights saved from this model"
                )
            target.copy_(value)
    return missing


class _Reader:
    def has(self, key: str) -> bool:
        raise NotImplementedError

    def get(self, key: str) -> torch.Tensor:
        raise NotImplementedError


class _TorchFile(_Reader):
    def __init__(self, path: Path) -> None:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:
            raise RanncError(f"{path} is not a state dict torch.load can read safely ({exc})") from exc
        if not isinstance(state, dict):
            raise RanncError(f"{path} holds a {type(state).__name__}, not a state dict of tensors")
        self.state = state

    def has(self, key: str) -> bool:
        return isinstance(self.state.get(key), torch.Tensor)

    def get(self, key: str) -> torch.Tensor:
        return self.state[key]


class _Safetensors(_Reader):
    """Tensors by name from one or several safetensors files; each is opened for the one read, so that the
    pages it mapped leave the process's resident memory with it."""

    def __init__(self, files: dict[str, Path]) -> None:
        self.files = files  # tensor name -> file

    @classmethod
    def of_file(cls, path: Path) -> _Safetensors:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return cls({key: path for key in f.keys()})

    @classmethod
    def of_index(cls, directory: Path) -> _Safetensors:
        index = json.loads((directory / _HF_INDEX).read_text())
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict):
            raise RanncError(f"{directory / _HF_INDEX} has no weight_map; it is not a Hugging Face index")
        return cls({key: directory / str(file) for key, file in weight_map.items()})

    def has(self, key: str) -> bool:
        return key in self.files

    def get(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.files[key]), framework="pt") as f:
            return f.get_tensor(key)


def _reader_for(path: Path) -> _Reader:
    if path.is_dir():
        if (path / _HF_INDEX).exists():
            return _Safetensors.of_index(path)
        files = sorted(path.glob("*.safetensors"))
        if len(files) == 1:
            return _Safetensors.of_file(files[0])
        raise RanncError(
            f"{path} is a directory without {_HF_INDEX} or a single .safetensors file; pass a weights file, a "
            "Hugging Face checkpoint directory, or a directory written by save_sharded"
        )
    if path.suffix == ".safetensors":
        return _Safetensors.of_file(path)
    return _TorchFile(path)


def is_sharded_checkpoint(path: str | Path) -> bool:
    """A directory written by `RaNNCModule.save_sharded` (torch.distributed.checkpoint's metadata file)."""
    source = Path(path).expanduser()
    return source.is_dir() and not (source / _HF_INDEX).exists() and not any(source.glob("*.safetensors"))


# ---- init_weights -----------------------------------------------------------------------------------------


def init_weights(
    model: torch.nn.Module,
    init: InitWeights,
    local: set[str],
    canonical: dict[int, str],
    shapes: dict[str, tuple[torch.Size, torch.dtype]],
    seed: int,
) -> None:
    """Call `init(submodule)` for every submodule owning a tensor this rank holds (its direct parameters and
    buffers), each under a generator seeded from `seed` and the submodule's name: a submodule gets the same
    values whatever the plan, world size or rank that initialises it. Tensors of the submodule that live on
    other ranks get storage for the call only."""
    for name, module in model.named_modules():
        direct = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        owned = [t for _, t in direct if canonical.get(id(t)) in local]
        if not owned:
            continue
        device = owned[0].device
        elsewhere = [t for _, t in direct if canonical.get(id(t)) not in local]
        parked = [(t, t.data) for t in elsewhere]
        for tensor in elsewhere:
            shape, dtype = shapes.get(canonical.get(id(tensor), ""), (tensor.shape, tensor.dtype))
            tensor.data = torch.empty(shape, dtype=dtype, device=device)
        digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
        try:
            devices = [device.index or 0] if device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                torch.manual_seed(int.from_bytes(digest[:8], "little") % 2**63)
                init(module)
        finally:
            for tensor, data in parked:
                tensor.data = data
