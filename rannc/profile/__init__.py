"""Cost of graph blocks: measured on the local device, or estimated from a device profile (FLOPs and bytes)."""

from .devices import DeviceProfile, get_device_profile, list_profiles, load_profile, save_profile
from .distributed import profile_blocks
from .measure import BlockRunner, measure_block

__all__ = [
    "BlockRunner",
    "DeviceProfile",
    "get_device_profile",
    "list_profiles",
    "load_profile",
    "measure_block",
    "profile_blocks",
    "save_profile",
]
