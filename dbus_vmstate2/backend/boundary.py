"""The one place where exceptions become D-Bus error replies, and where the
daemon's own code is called.

Our typed errors travel with their own name and message.  Anything else is a
bug or a daemon failure: it is logged here with its traceback and the caller
gets only a generic message, never a traceback or ``str(exc)``.

The traceback is written into the log message by :func:`format_traceback`,
not passed as ``exc_info``: a logging formatter renders ``exc_info`` with the
source line of every frame, which it reads from the source files, and a
sandboxed daemon may open no file.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import traceback
from collections.abc import Callable, Iterator
from typing import Any

from dbus_fast import DBusError

from ..errors import BackendFailed, ErrorName, Unsupported, VMStateError, quote_some
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
        log_exception(f"{what} failed", exc)
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
    log_exception(f"the back-end's {what} raised", exc)
    return BackendFailed(f"the back-end's {what} raised {type(exc).__name__}; see the back-end's log")


def log_exception(message: str, exc: BaseException) -> None:
    """Log ``message`` as an error, followed by ``exc``'s traceback."""
    log.error("%s\n%s", message, format_traceback(exc).rstrip("\n"))


def format_traceback(exc: BaseException) -> str:
    """``exc`` and its chain laid out as ``traceback.format_exception`` does,
    but every frame as ``File "F", line N, in f`` without its source line.

    The standard functions read each frame's line from its source file
    (linecache); this reads no file, so it works in a sandboxed daemon.
    """
    pieces: list[str] = []  # the newest exception first
    seen: set[int] = set()
    current = exc
    while True:
        seen.add(id(current))
        pieces.append(_format_one(current))
        if current.__cause__ is not None:
            current, joint = current.__cause__, _CAUSE
        elif current.__context__ is not None and not current.__suppress_context__:
            current, joint = current.__context__, _CONTEXT
        else:
            break
        if id(current) in seen:
            break
        pieces.append(joint)
    return "".join(reversed(pieces))


_CAUSE = "\nThe above exception was the direct cause of the following exception:\n\n"
_CONTEXT = "\nDuring handling of the above exception, another exception occurred:\n\n"


def _format_one(exc: BaseException) -> str:
    lines = []
    if exc.__traceback__ is not None:
        lines.append("Traceback (most recent call last):\n")
        for frame, lineno in traceback.walk_tb(exc.__traceback__):
            lines.append(f'  File "{frame.f_code.co_filename}", line {lineno}, in {frame.f_code.co_name}\n')
    lines.append(_exception_line(exc))
    return "".join(lines)


def _exception_line(exc: BaseException) -> str:
    cls = type(exc)
    name = cls.__qualname__ if cls.__module__ in ("builtins", "__main__") else f"{cls.__module__}.{cls.__qualname__}"
    try:
        text = str(exc)
    except Exception:
        text = "<str() failed>"
    lines = [f"{name}: {text}\n" if text else f"{name}\n"]
    notes = getattr(exc, "__notes__", None)
    if isinstance(notes, list | tuple):
        lines += [f"{note}\n" for note in notes]
    return "".join(lines)


def option_values(method: str, options: dict[str, Any], types: dict[str, str]) -> dict[str, Any]:
    """The values of a method's ``a{sv}`` options, each checked to be known
    and of its one D-Bus type (interfaces/org.qemu.VMState2.xml).

    Raises:
        Unsupported: an unknown option, or one of another type.
    """
    unknown = set(options) - set(types)
    if unknown:
        raise Unsupported(f"unknown {method} options: {quote_some(unknown)} (known: {', '.join(types)})")
    for name, variant in options.items():
        if variant.signature != types[name]:
            raise Unsupported(
                f"the {method} option {name} must be of D-Bus type {types[name]!r}, got {variant.signature!r}"
            )
    return {name: variant.value for name, variant in options.items()}

