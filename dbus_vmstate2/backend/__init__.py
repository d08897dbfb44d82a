"""The back-end helper library: put a daemon's state on the VMState bus names."""

from .core import Backend
from .daemon import Daemon, LoadCallable, Pending, PreCopyDaemon, SaveCallable
from .dirty import DirtyStore
from .inline import InlineMode, inline_capacity
from .notify import Notifier
from .threaded import ThreadedBackend

__all__ = [
    "Backend",
    "Daemon",
    "DirtyStore",
    "InlineMode",
    "LoadCallable",
    "Notifier",
    "Pending",
    "PreCopyDaemon",
    "SaveCallable",
    "ThreadedBackend",
    "inline_capacity",
]
