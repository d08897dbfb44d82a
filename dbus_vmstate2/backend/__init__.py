"""The back-end helper library: put a daemon's state on the VMState bus names."""

from .core import Backend, LoadCallable, SaveCallable
from .threaded import ThreadedBackend

__all__ = ["Backend", "LoadCallable", "SaveCallable", "ThreadedBackend"]
