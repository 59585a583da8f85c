"""Capture: nn.Module + example inputs -> exported graph with parameter, buffer and batch metadata."""

from .export import CapturedGraph, capture
from .inputs import FlatCall, tile_rows

__all__ = ["CapturedGraph", "FlatCall", "capture", "tile_rows"]
