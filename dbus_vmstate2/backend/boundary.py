"""The one place where exceptions become D-Bus error replies, and where the
daemon's own code is called.

Our typed errors travel with their own name and message.  Anything else is a
bug or a daemon failure: it is logged here with its traceback and the caller
gets only a generic message, never a traceback or ``str(exc)``.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Callable, Iterator
from typing import Any

from dbus_fast import DBusError

from ..errors import BackendFailed, ErrorName, VMStateError
from .workers import Workers

log = logging.getLogger("dbus_vmstate2.backend")


@contextlib.contextmanager
def dbus_errors(what: str) -> Iterator[None]:
    """Turn any exception raised inside into a D-Bus error reply for ``what``."""
    try:
        yield
    except VMStateError as exc:
        log.warning("%s refused: %s", what, exc)
        raise DBusError(exc.dbus_name, str(exc)) from exc
    except DBusError:
        raise
    except Exception as exc:
        log.exception("%s failed", what)
        raise DBusError(
            ErrorName.FAILED, f"{what} failed with an internal error; see the back-end's log"
        ) from exc


async def call_daemon(what: str, workers: Workers, fn: Callable[..., Any], *args: Any) -> Any:
    """Run the daemon's callable ``fn``: awaited if it is a coroutine
    function, else in one of ``workers`` so the bus stays responsive.

    Raises:
        VMStateError: whatever typed error the daemon raised, unchanged.
        BackendFailed: for any other exception (logged with its traceback).
    """
    try:
        if inspect.iscoroutinefunction(fn):
            return await fn(*args)
        return await workers.run(fn, *args)
    except VMStateError:
        raise
    except Exception as exc:
        raise daemon_failed(what, exc) from exc


def daemon_failed(what: str, exc: Exception) -> BackendFailed:
    """Log the daemon's own exception from its ``what`` (with traceback) and
    return the error the caller sees: the exception's type, nothing more."""
    log.error("the back-end's %s raised", what, exc_info=exc)
    return BackendFailed(f"the back-end's {what} raised {type(exc).__name__}; see the back-end's log")
