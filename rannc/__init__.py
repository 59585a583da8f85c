"""rannc: automatic hybrid pipeline + data parallel training for unmodified PyTorch models."""

from .amp import GradScaler
from .capture.opaque import opaque
from .compat import (
    barrier,
    clear,
    delay_grad_allreduce,
    dump_events,
    get_rank,
    get_world_size,
    keep_graph,
    sync_params_on_init,
)
from .config import Config, load_config
from .deploy import Deployment, load_deployment, save_deployment, show_deployment
from .errors import CaptureError, ConfigError, DeploymentError, InputError, PlanError, RanncError
from .module import RaNNCModule

__version__ = "0.3.0"

__all__ = [
    "CaptureError",
    "Config",
    "ConfigError",
    "Deployment",
    "DeploymentError",
    "GradScaler",
    "InputError",
    "PlanError",
    "RaNNCModule",
    "RanncError",
    "barrier",
    "clear",
    "delay_grad_allreduce",
    "dump_events",
    "get_rank",
    "get_world_size",
    "keep_graph",
    "load_config",
    "load_deployment",
    "opaque",
    "save_deployment",
    "show_deployment",
    "sync_params_on_init",
]
