"""File-descriptor helpers that the back-end and the VMM side share."""

from __future__ import annotations

import fcntl

PIPE_SIZE = 1 << 20
"""We ask for pipe buffers this large (Linux caps unprivileged processes at
/proc/sys/fs/pipe-max-size, 1 MiB by default): fewer wake-ups per MiB."""


def enlarge_pipe(fd: int) -> None:
    """Grow ``fd``'s pipe buffer to :data:`PIPE_SIZE` where allowed; else leave it."""
    try:
        if fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ) < PIPE_SIZE:
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:  # not a pipe, or over the allowed size
        pass
