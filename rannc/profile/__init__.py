"""Measured cost of graph blocks: time and saved-activation memory per microbatch size, spread over ranks."""

from .distributed import profile_blocks
from .measure import BlockRunner, measure_block

__all__ = ["BlockRunner", "measure_block", "profile_blocks"]
