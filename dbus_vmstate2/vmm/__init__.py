"""The VMM helper: find the back-ends on a bus and move their state."""

from .discovery import BackendInfo, BackendStatus, connect, describe, list_backends
from .transfers import Progress, load_from_file, save_to_file

__all__ = ["BackendInfo", "BackendStatus", "Progress", "connect", "describe", "list_backends", "load_from_file", "save_to_file"]
