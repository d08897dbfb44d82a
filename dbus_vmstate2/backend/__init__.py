"""The back-end helper library: put a daemon's state on the VMState bus names."""

from .core import Backend, LoadCallable, SaveCallable
from .inline import InlineMode, inline_capacity
from .threaded import ThreadedBackend

__all__ = ["Backend", "InlineMode", "LoadCallable", "SaveCallable", "ThreadedBackend", "inline_capacity"]
