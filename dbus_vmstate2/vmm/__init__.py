"""The VMM helper: find the back-ends on a bus and move their state."""

from .discovery import BackendInfo, BackendStatus, connect, describe, list_backends
from .savefile import UnusableFile
from .session import Session, open_session
from .transfers import Progress, load_from_file, save_to_file

__all__ = [
    "BackendInfo",
    "BackendStatus",
    "Progress",
    "Session",
    "UnusableFile",
    "connect",
    "describe",
    "list_backends",
    "load_from_file",
    "open_session",
    "save_to_file",
]
