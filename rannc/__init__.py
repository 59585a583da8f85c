"""rannc: automatic hybrid pipeline + data parallel training for unmodified PyTorch models."""

from .amp import GradScaler
from .capture.opaque import opaque
from .config import Config, load_config
from .deploy import Deployment, load_deployment, save_deployment, show_deployment
from .errors import CaptureError, ConfigError, DeploymentError, InputError, PlanError, RanncError
from .module import RaNNCModule
from .runtime.dist import barrier, get_rank, get_world_size

__version__ = "0.2.0"

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
    "get_rank",
    "get_world_size",
    "load_config",
    "load_deployment",
    "opaque",
    "save_deployment",
    "show_deployment",
]
