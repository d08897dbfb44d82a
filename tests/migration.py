"""Helpers for the migration tests: the real command on both sides, TLS
credentials made with the openssl command, a proxy that corrupts a byte."""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import ROOT

_STARTED: list[subprocess.Popen[str]] = []
"""Every command this module started, so that a failed test leaves none running."""


@pytest.fixture(autouse=True)
def reap_commands() -> Iterator[None]:
    """Import into a test module: after each test, kill and reap what is still running."""
    yield
    while _STARTED:
        process = _STARTED.pop()
        if process.poll() is None:
            process.kill()
        process.communicate()

ENV = {**os.environ, "PYTHONWARNINGS": "error"}
COMMAND = [sys.executable, "-m", "dbus_vmstate2"]


def run(address: str, *args: str, timeout: float = 180, prefix: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the command to the end (``prefix``: e.g. ``ip netns exec NS``)."""
    argv = [*(prefix or []), *COMMAND, *args, "--address", address]
    return subprocess.run(argv, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def start(address: str, *args: str, prefix: list[str] | None = None) -> subprocess.Popen[str]:
    argv = [*(prefix or []), *COMMAND, *args, "--address", address]
    process = subprocess.Popen(argv, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               stdin=subprocess.DEVNULL)  # fmt: skip
    _STARTED.append(process)
    return process


class Incoming:
    """``dbus-vmstate2 incoming`` running; ``address`` once it listens."""

    def __init__(self, address: str, uri: str, *args: str, prefix: list[str] | None = None, timeout: float = 60) -> None:
        self.process = start(address, "incoming", uri, *args, prefix=prefix)
        self.stderr_lines: list[str] = []
        deadline = time.monotonic() + timeout
        assert self.process.stderr is not None
        while True:
            ready, _, _ = select.select([self.process.stderr], [], [], max(0.0, deadline - time.monotonic()))
            line = self.process.stderr.readline() if ready else ""
            if not line:
                self.process.kill()
                raise RuntimeError(f"incoming did not listen: {''.join(self.stderr_lines)}{self.process.stderr.read()}")
            self.stderr_lines.append(line)
            if "listening on " in line:
                self.address = line.split("listening on ", 1)[1].strip()
                return

    def finish(self, timeout: float = 120) -> tuple[int, str, str]:
        out, err = self.process.communicate(timeout=timeout)
        return self.process.returncode, out, "".join(self.stderr_lines) + err

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.communicate()


def make_tls(directory: Path, hosts: list[str], *, ca_name: str = "test-ca") -> tuple[Path, Path]:
    """A CA and, signed by it, a server certificate for ``hosts`` and a client
    certificate; returns the destination's and the source's credential
    directories (QEMU's tls-creds-x509 layout)."""
    ca = directory / "ca"
    server, client = directory / "server", directory / "client"
    for d in (ca, server, client):
        d.mkdir(parents=True)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", str(ca / "ca-key.pem"), "-out", str(ca / "ca-cert.pem"), "-days", "2",
            "-subj", f"/CN={ca_name}", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")  # fmt: skip
    names = ",".join(f"IP:{h}" if h[0].isdigit() or ":" in h else f"DNS:{h}" for h in hosts)
    for role, d, ext in (("server", server, f"subjectAltName={names}\nextendedKeyUsage=serverAuth\n"),
                         ("client", client, "extendedKeyUsage=clientAuth\n")):  # fmt: skip
        (directory / f"{role}.ext").write_text(ext)
        openssl("req", *ec, "-keyout", str(d / f"{role}-key.pem"), "-out", str(directory / f"{role}.csr"),
                "-subj", f"/CN={role}")  # fmt: skip
        openssl("x509", "-req", "-in", str(directory / f"{role}.csr"), "-CA", str(ca / "ca-cert.pem"),
                "-CAkey", str(ca / "ca-key.pem"), "-CAcreateserial", "-out", str(d / f"{role}-cert.pem"), "-days", "2",
                "-extfile", str(directory / f"{role}.ext"))  # fmt: skip
        (d / "ca-cert.pem").write_bytes((ca / "ca-cert.pem").read_bytes())
    return server, client


class CorruptingProxy:
    """Forward a unix socket to another, flipping the byte at ``offset`` of
    what the source sends (counted from its first byte)."""

    def __init__(self, listen: str, target: str, offset: int) -> None:
        self.offset = offset
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(listen)
        self._server.listen(1)
        self._target = target
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            source, _ = self._server.accept()
        except OSError:
            return
        dest = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        dest.connect(self._target)
        back = threading.Thread(target=self._copy, args=(dest, source, None), daemon=True)
        back.start()
        self._copy(source, dest, self.offset)
        back.join(30)
        for s in (source, dest):
            s.close()

    @staticmethod
    def _copy(a: socket.socket, b: socket.socket, flip: int | None) -> None:
        seen = 0
        try:
            while data := a.recv(1 << 16):
                if flip is not None and seen <= flip < seen + len(data):
                    data = bytearray(data)
                    data[flip - seen] ^= 0x01
                seen += len(data)
                b.sendall(data)
            b.shutdown(socket.SHUT_WR)
        except OSError:
            try:
                b.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self._server.close()
