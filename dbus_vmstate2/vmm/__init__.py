"""The VMM helper: find the back-ends on a bus and move their state.

The names below are imported on first use (PEP 562), not with the package:
``dbus_vmstate2.vmm.precopy`` is pure (no bus, no dbus-fast) and must be
importable, and testable, without pulling in the bus side.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .discovery import BackendInfo, BackendStatus, connect, describe, list_backends
    from .precopy import PreCopyConfig, PreCopyPlan
    from .transfers import Progress, load_from_file, save_to_file

_HOMES = {
    "BackendInfo": ".discovery",
    "BackendStatus": ".discovery",
    "connect": ".discovery",
    "describe": ".discovery",
    "list_backends": ".discovery",
    "PreCopyConfig": ".precopy",
    "PreCopyPlan": ".precopy",
    "Progress": ".transfers",
    "load_from_file": ".transfers",
    "save_to_file": ".transfers",
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
