"""A private dbus-daemon for one VM, as libvirt runs one per VM.

Used by the demo, the tests and the benchmarks; also handy for trying a
back-end by hand.  The default policy lets every local peer own names and
call anything, as libvirt's per-VM bus does: isolation comes from the bus
being private (its socket lives in a directory only its owner can enter).
Tests pass stricter policies.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
{policy}
</busconfig>
"""

OPEN_POLICY = """  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>"""
"""libvirt's per-VM bus policy: every peer may own any name and call anything."""


class PrivateBus:
    """Start ``dbus-daemon`` on a socket in a fresh private directory.

    ``address`` is a plain ``unix:path=...`` address with no ``,guid=``
    part, so it can go into a QEMU ``-object`` option unchanged.

    Args:
        policy: the ``<policy>`` elements of the bus configuration
            (default :data:`OPEN_POLICY`).
        shared: let other users reach the socket (its directory is made
            searchable by all); the policy must still admit them
            (``<allow user="*"/>``).  For tests with a second user.
    """

    def __init__(self, policy: str = OPEN_POLICY, *, shared: bool = False) -> None:
        self._policy = policy
        self._shared = shared
        self._dir: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self.address = ""

    def start(self) -> PrivateBus:
        """Start the daemon and return once it accepts connections.

        Raises:
            FileNotFoundError: dbus-daemon is not installed.
            RuntimeError: the daemon exited before it was ready.
        """
        self._dir = Path(tempfile.mkdtemp(prefix="dbus-vmstate2-bus-"))
        if self._shared:
            self._dir.chmod(0o755)
        socket = self._dir / "bus"
        config = self._dir / "bus.conf"
        config.write_text(_CONFIG.format(socket=socket, policy=self._policy))
        # The daemon's own complaints (such as not being allowed to raise its
        # fd limit) go to a log beside the socket, not into our output.
        self._log = self._dir / "bus.log"
        with self._log.open("wb") as log:
            self._process = subprocess.Popen(
                ["dbus-daemon", "--nofork", "--nopidfile", f"--config-file={config}", "--print-address=1"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
            )
        assert self._process.stdout is not None
        if not self._process.stdout.readline():  # it prints the address once listening
            message = self._log.read_text(errors="replace").strip()
            self.stop()
            raise RuntimeError(f"dbus-daemon exited before it was ready: {message}")
        self.address = f"unix:path={socket}"
        return self

    @property
    def pid(self) -> int | None:
        """The daemon's process id while it runs (a fault test signals it)."""
        return None if self._process is None else self._process.pid

    def stop(self) -> None:
        """Stop the daemon and remove its directory; safe to call more than once
        (also after the daemon died or was stopped by a signal)."""
        if self._process is not None:
            self._process.terminate()
            self._process.send_signal(signal.SIGCONT)  # a stopped daemon acts on SIGTERM only once continued
            self._process.wait()
            if self._process.stdout is not None:
                self._process.stdout.close()
            self._process = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> PrivateBus:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
