"""A seccomp filter for a back-end, loaded right after ``start()``.

It shows the library's sandbox promise: once registered, a back-end needs no
new file, socket, program or thread.  Every thread of the process (TSYNC: the
library's own threads were started before the filter) is killed with SIGSYS
on any of :data:`FORBIDDEN`, and of :data:`NEW_THREADS` unless threads are
allowed; everything else is allowed, so this is a demonstration and a test,
not a complete sandbox (a real daemon would allow only a list: see "The
sandbox contract" in the README).

It needs libseccomp and its ctypes binding, the ``pyseccomp`` package
(``pip install pyseccomp``); nothing else in the project does.
"""

from __future__ import annotations

FORBIDDEN = ("open", "openat", "openat2", "creat", "socket", "socketpair", "connect", "execve", "execveat")
"""Opening a file, making or connecting a socket, running a program."""

NEW_THREADS = ("clone", "clone3")
"""Starting a thread (or a process).  The back-end's threads all exist once
start() returns; only a Save with the ``workers`` option starts threads,
libzstd's own, for the length of that save."""


def apply_kill_filter(allow_threads: bool = False) -> None:
    """Load the filter into every thread of the process.

    Args:
        allow_threads: let threads be started (for Save's ``workers`` option).

    Raises:
        ImportError: pyseccomp (or libseccomp itself) is missing.
        OSError: the kernel refused the filter.
    """
    import pyseccomp as seccomp  # an optional dependency: only here

    rules = seccomp.SyscallFilter(seccomp.ALLOW)
    rules.set_attr(seccomp.Attr.CTL_TSYNC, 1)
    for name in FORBIDDEN + (() if allow_threads else NEW_THREADS):
        rules.add_rule(seccomp.KILL_PROCESS, name)
    rules.load()
