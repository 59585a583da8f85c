"""pyrannc compatibility: RaNNC's module-level functions, and its RaNNCModule options translated or refused.

A RaNNC script runs after ``import rannc as pyrannc``. Options that ask for what rannc does anyway are accepted;
those that ask for something rannc does not do raise `ConfigError` naming what to use instead.
"""

from __future__ import annotations

import dataclasses
import logging
import weakref
from typing import Any, Protocol

import torch.distributed as dist

from .errors import ConfigError, RanncError
from .runtime import dist as rdist


class Registered(Protocol):
    """What this module calls on a live RaNNCModule (it registers itself here; see `register`)."""

    def delay_grad_allreduce(self, delay: bool) -> None: ...

    def undeploy(self) -> None: ...


logger = logging.getLogger(__name__)

_AUTOCAST = (
    "call the model under torch.autocast (bf16, or fp16 with rannc.GradScaler); parameters, their gradients "
    "and the optimizer stay in fp32, so there are no separate master parameters"
)

# pyrannc RaNNCModule keyword -> (the value that asks for what rannc does anyway, why any other value is refused)
_ACCEPTED_ONLY_AS: dict[str, tuple[Any, str]] = {
    "gather_inputs": (
        True,
        "rannc always takes each rank's own rows and concatenates them in rank order into the global batch; give "
        "every rank its part of the batch (e.g. with a DistributedSampler) and drop gather_inputs",
    ),
    "enable_apex_amp": (False, f"apex AMP is not supported: {_AUTOCAST}; drop enable_apex_amp"),
    "allreduce_amp_master_params": (
        False,
        f"apex AMP master parameters do not exist here: {_AUTOCAST}; drop allreduce_amp_master_params",
    ),
    "use_amp_master_params": (
        False,
        f"apex AMP master parameters do not exist here: {_AUTOCAST}; drop use_amp_master_params",
    ),
    "check_unused_values": (
        False,
        "rannc does not check for unused values: parameters and values that forward does not use are allowed "
        "(they get no gradient, as in the unwrapped model); drop check_unused_values",
    ),
    "offload_params": (
        False,
        "rannc does not offload parameters to host memory; to need less memory per device let the planner use "
        "more pipeline stages (mem_limit_gb, partition_num), shard optimizer state with enable_zero=True, or "
        "recompute activations (recompute='auto')",
    ),
    "dist_params": (
        False,
        "rannc does not distribute parameters at construction: every rank builds the whole model (on CPU, or on "
        "the meta device for `rannc plan`) and keeps only its stage's parameters after the first call; use "
        "save_sharded/load_sharded for checkpoints too large to gather, and drop dist_params",
    ),
}


def translate_options(options: dict[str, Any]) -> dict[str, Any]:
    """RaNNCModule keyword arguments -> config overrides: pyrannc's options read, refused or passed on.

    ``load_deployment=PATH`` (pyrannc takes the file) becomes ``load_deployment=True, deployment_file=PATH``.
    """
    out: dict[str, Any] = {}
    for name, value in options.items():
        if name in _ACCEPTED_ONLY_AS:
            accepted, why = _ACCEPTED_ONLY_AS[name]
            if value != accepted:
                raise ConfigError(f"RaNNCModule({name}={value!r}) is pyrannc's option: {why}")
        elif name == "load_deployment" and value is None:
            continue  # pyrannc's default: plan
        elif name == "load_deployment" and isinstance(value, str) and not _is_boolean_word(value):
            out["load_deployment"] = True
            out["deployment_file"] = value
        else:
            out[name] = value
    return out


def _is_boolean_word(text: str) -> bool:
    return text.strip().lower() in ("1", "true", "yes", "on", "0", "false", "no", "off", "")


# ---- process-wide state: the modules alive, and pyrannc's switches ----------------------------------------------


@dataclasses.dataclass
class Settings:
    """pyrannc's process-wide switches (module functions of the same names set them)."""

    delay_grad_allreduce: bool = False  # the default of every RaNNCModule created later, too
    sync_params_on_init: bool = False  # True: broadcast rank 0's parameters and buffers instead of checking


SETTINGS = Settings()
_modules: list[weakref.ref[Registered]] = []  # in creation order: the same order on every rank


def register(module: Registered) -> None:
    _modules[:] = [ref for ref in _modules if ref() is not None]
    _modules.append(weakref.ref(module))


def live_modules() -> list[Registered]:
    """RaNNCModules not yet garbage collected, in creation order."""
    return [module for module in (ref() for ref in _modules) if module is not None]


def _start() -> None:
    """Like pyrannc's import, join the job before the first RaNNCModule: under torchrun (RANK and WORLD_SIZE set)
    start torch.distributed from the environment; without those variables this is one process."""
    if dist.is_available() and dist.is_initialized():
        return
    import os

    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        from .config import load_config

        rdist.ensure_initialized(load_config().timeout_s)


def get_rank() -> int:
    """This process's rank in the job (0 in a single process); starts torch.distributed under torchrun."""
    _start()
    return rdist.get_rank()


def get_world_size() -> int:
    """The number of ranks in the job (1 in a single process); starts torch.distributed under torchrun."""
    _start()
    return rdist.get_world_size()


def barrier() -> None:
    """Wait until every rank reaches this call (nothing to wait for in a single process)."""
    _start()
    rdist.barrier()


def delay_grad_allreduce(delay: bool) -> None:
    """pyrannc's gradient accumulation switch for every RaNNCModule (existing and later ones): while True,
    backward leaves gradients unreduced on each rank, until `allreduce_grads()` or a backward after the switch
    is turned off. As in pyrannc the switch counts when backward runs, so it may be flipped between a forward
    and its backward."""
    SETTINGS.delay_grad_allreduce = bool(delay)
    for module in live_modules():
        module.delay_grad_allreduce(delay)


def sync_params_on_init(sync: bool) -> None:
    """True: on their first call, RaNNCModules created afterwards copy rank 0's parameters and buffers to every
    rank (pyrannc's default). False (rannc's default): every rank must build the same model (same seed); rannc
    compares them and raises when they differ."""
    SETTINGS.sync_params_on_init = bool(sync)


def keep_graph(keep: bool) -> None:
    """pyrannc's retain_graph switch. Only False (rannc's behaviour) is accepted."""
    if keep:
        raise RanncError(
            "keep_graph(True) (several backward passes after one forward) is not supported: the pipeline runs each "
            "forward's backward once. Sum the losses and call backward once, or run the forward again"
        )


def dump_events() -> None:
    """pyrannc's event trace dump; rannc writes its traces itself."""
    raise RanncError(
        "dump_events() is pyrannc's event trace: set RANNC_TRACE=<dir> instead, and every rank writes a Chrome/"
        "Perfetto trace of each step to <dir>/rank{rank}_step{step}.json"
    )


def clear() -> None:
    """Release rannc's state (every rank calls it): undeploy every RaNNCModule (each gives its model and optimizer
    back whole on every rank; a later call plans again) and reset pyrannc's switches and the step traces."""
    for module in live_modules():
        module.undeploy()
    SETTINGS.delay_grad_allreduce = False
    SETTINGS.sync_params_on_init = False
    from .runtime.trace import forget_tracers

    forget_tracers()
    logger.info("rannc state cleared")
