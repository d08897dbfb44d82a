"""The VMM helper: find the back-ends on a bus and move their state."""

from .control import CancelReport, ResetReport, StatusReport, TransferReport, cancel_latest, reset, status
from .discovery import BackendInfo, BackendStatus, connect, describe, list_backends
from .savefile import UnusableFile
from .session import Session, open_session
from .transfers import Progress, load_from_file, save_to_file

__all__ = [
    "BackendInfo",
    "BackendStatus",
    "CancelReport",
    "Progress",
    "ResetReport",
    "Session",
    "StatusReport",
    "TransferReport",
    "UnusableFile",
    "cancel_latest",
    "connect",
    "describe",
    "list_backends",
    "load_from_file",
    "open_session",
    "reset",
    "save_to_file",
    "status",
]
