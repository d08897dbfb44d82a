"""The VMM helper: find the back-ends on a bus and move their state."""

from .discovery import BackendInfo, connect, list_backends

__all__ = ["BackendInfo", "connect", "list_backends"]
