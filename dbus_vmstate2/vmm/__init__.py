"""The VMM helper: find the back-ends on a bus and move their state.

The names below are imported on first use (PEP 562), not with the package:
``dbus_vmstate2.vmm.precopy`` is pure (no bus, no dbus-fast) and must be
importable, and testable, without pulling in the bus side.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .control import CancelReport, ResetReport, StatusReport, TransferReport, cancel_latest, reset, resume, status
    from .incoming import incoming
    from .live import save_live
    from .migrate import migrate
    from .discovery import BackendInfo, BackendStatus, connect, describe, list_backends
    from .precopy import PreCopyConfig, PreCopyPlan
    from .savefile import UnusableFile
    from .session import Session, open_session
    from .loading import StagedLoads, load_from_file
    from .transfers import Progress, save_to_file

_HOMES = {
    "BackendInfo": ".discovery",
    "BackendStatus": ".discovery",
    "CancelReport": ".control",
    "PreCopyConfig": ".precopy",
    "PreCopyPlan": ".precopy",
    "Progress": ".transfers",
    "ResetReport": ".control",
    "Session": ".session",
    "StagedLoads": ".loading",
    "StatusReport": ".control",
    "TransferReport": ".control",
    "UnusableFile": ".savefile",
    "cancel_latest": ".control",
    "connect": ".discovery",
    "describe": ".discovery",
    "incoming": ".incoming",
    "list_backends": ".discovery",
    "load_from_file": ".loading",
    "migrate": ".migrate",
    "open_session": ".session",
    "reset": ".control",
    "resume": ".control",
    "save_live": ".live",
    "save_to_file": ".transfers",
    "status": ".control",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    try:
        home = _HOMES[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(import_module(home, __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
