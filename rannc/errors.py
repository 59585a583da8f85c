"""Error types users can catch; every message names the problem and the fix."""

from __future__ import annotations


class RanncError(RuntimeError):
    """Base class of every error rannc raises on purpose."""


class ConfigError(RanncError):
    """A configuration item is missing, malformed or contradictory."""


class CaptureError(RanncError):
    """The model could not be captured as a graph (torch.export failed or the graph is unsupported)."""


class PlanError(RanncError):
    """No plan satisfies the constraints (memory, batch size, world size)."""


class LaunchError(RanncError):
    """The processes could not form one job: the rendezvous address cannot be bound or reached, or ranks are missing."""


class DeploymentError(RanncError):
    """A deployment file is unreadable or was made for another model, world size or device memory."""


class InputError(RanncError):
    """The inputs of a call do not match what the captured graph expects."""


class RemoteError(RanncError):
    """Another rank failed; raised on every rank so that none is left waiting."""
