"""``dbus-vmstate2 save --live``: pre-copy while the daemons change their state.

The command runs as a subprocess (the real CLI, with warnings as errors);
memstate keeps dirtying (``--dirty-rate``) and reports the digest of what it
froze at quiesce and of what it loaded (``--report``), so the destination
can be compared with the source at the moment of quiesce, byte for byte.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import ROOT, count_fds
from .test_interrupts import interrupted, spawn, temp_files
from .test_large_state import memory, reset_peak, run_measured
from .test_vmm import backend_state, cli, wait_for

ENV = {**os.environ, "PYTHONWARNINGS": "error"}


def run(bus_address: str, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "dbus_vmstate2", *args, "--address", bus_address]
    return subprocess.run(argv, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def events(path: Path, event: str) -> list[dict]:
    lines = path.read_text().splitlines() if path.exists() else []
    return [e for e in map(json.loads, lines) if e["event"] == event]


def test_live_save_carries_the_state_at_quiesce_within_the_downtime_limit(bus_address, memstate, tmp_path):
    reports = {i: tmp_path / f"{i}.src" for i in ("fs", "net")}
    sources = [
        memstate("fs", "--size", "48M", "--seed", "1", "--dirty-rate", "8M", "--report", str(reports["fs"])),
        memstate("net", "--size", "8M", "--seed", "2", "--dirty-rate", "1M", "--report", str(reports["net"])),
    ]
    saved = tmp_path / "live.vmstate"
    done = run(bus_address, "save", str(saved), "--live", "--json", "--downtime-limit", "500")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["live"] is True and summary["switch_reason"] == "converged"
    assert summary["downtime"] is not None and summary["downtime"] <= 0.5
    assert 56 << 20 < summary["stream_bytes"] < saved.stat().st_size
    # The sources are stopped, frozen as saved, until resumed.
    for source in sources:
        assert backend_state(bus_address, source) == "stopped"
    frozen = {i: events(p, "quiesced") for i, p in reports.items()}
    assert all(len(v) == 1 for v in frozen.values())

    # Load the file into fresh destinations: each equals its source at quiesce.
    dest_reports = {i: tmp_path / f"{i}.dst" for i in reports}
    assert run(bus_address, "resume").returncode == 0
    for source in sources:
        assert backend_state(bus_address, source) == "running"
    with _other_bus() as dest_bus:
        for backend_id, report in dest_reports.items():
            memstate(backend_id, "--report", str(report), address=dest_bus)
        assert cli(dest_bus, "load", str(saved)) == 0
    for backend_id in reports:
        [loaded] = events(dest_reports[backend_id], "loaded")
        assert loaded["digest"] == frozen[backend_id][0]["digest"], backend_id


def test_a_state_that_never_converges_gives_up_after_max_rounds_or_switches_when_forced(bus_address, memstate, tmp_path):
    report = tmp_path / "fs.src"
    source = memstate("fs", "--size", "4M", "--seed", "3", "--dirty-rate", "16M", "--report", str(report))
    saved = tmp_path / "never.vmstate"
    # The state changes eight times faster than the capped channel carries it
    # (a margin for a busy machine, where the writer slows down).
    never = ("--live", "--max-bandwidth", "2M", "--max-rounds", "3", "--compression", "none")
    gave_up = run(bus_address, "save", str(saved), *never)
    assert gave_up.returncode == 1, gave_up.stderr
    assert "after 3 rounds" in gave_up.stderr and "force" in gave_up.stderr, gave_up.stderr
    assert not saved.exists() and not temp_files(tmp_path)
    assert backend_state(bus_address, source) == "running" and not events(report, "quiesced")

    forced = run(bus_address, "save", str(saved), *never, "--force", "--resume", "--json")
    assert forced.returncode == 0, forced.stderr
    summary = json.loads(forced.stdout)
    assert summary["switch_reason"] == "max rounds, forced" and summary["rounds"] >= 3
    assert backend_state(bus_address, source) == "running"  # --resume
    assert len(events(report, "quiesced")) == 1


@pytest.mark.parametrize("when", ["pre-copy", "stop-copy"])
def test_a_killed_live_save_leaves_the_source_serving_with_its_state(bus_address, memstate, tmp_path, when):
    report = tmp_path / "fs.src"
    source = memstate("fs", "--size", "256M", "--seed", "4", "--dirty-rate", "4M", "--report", str(report))
    fds = count_fds(source.process.pid)
    saved = tmp_path / "killed.vmstate"
    # Capped, so that the stop-copy of what is left lasts several seconds.
    process = spawn(bus_address, "save", str(saved), "--live", "--compression", "none", "--max-bandwidth", "32M")
    try:
        wait_for(lambda: backend_state(bus_address, source) == "pre-copy", "pre-copy")
        if when == "stop-copy":
            time.sleep(0.2)
            process.send_signal(signal.SIGUSR1)  # switch over now, with most of the state still to send
            wait_for(lambda: events(report, "quiesced"), "the quiesce")  # the daemon is frozen: the VM's downtime
            assert backend_state(bus_address, source) == "stop-copy"
    finally:
        process.kill()
        process.communicate(timeout=60)
    wait_for(lambda: backend_state(bus_address, source) == "running", "running")
    assert len(events(report, "quiesced")) == (1 if when == "stop-copy" else 0)
    # Resumed and intact: it serves, changes, and saves whole again.
    check = tmp_path / "check.vmstate"
    assert cli(bus_address, "save", str(check), "--compression", "none") == 0
    assert check.stat().st_size > 256 << 20
    assert count_fds(source.process.pid) == fds


def test_sigterm_in_a_live_save_cancels_it_cleanly(bus_address, memstate, tmp_path):
    source = memstate("fs", "--size", "128M", "--seed", "5", "--dirty-rate", "4M")
    saved = tmp_path / "interrupted.vmstate"
    process = spawn(bus_address, "save", str(saved), "--live", "--compression", "none")
    try:
        wait_for(lambda: backend_state(bus_address, source) == "pre-copy", "pre-copy")
    finally:
        process.terminate()
        interrupted(process)
    assert not saved.exists() and not temp_files(tmp_path)
    assert backend_state(bus_address, source) == "running"


class _other_bus:  # noqa: N801 - a context manager
    def __enter__(self) -> str:
        from dbus_vmstate2.privatebus import PrivateBus

        self._bus = PrivateBus().start()
        return self._bus.address

    def __exit__(self, *exc: object) -> None:
        self._bus.stop()


@pytest.mark.slow
def test_memory_stays_flat_over_many_rounds_of_a_1_gib_state(bus_address, memstate, tmp_path):
    source = memstate("big", "--size", "1G", "--seed", "6", "--dirty-rate", "64M")
    fds = count_fds(source.process.pid)
    before = reset_peak(source.process.pid)
    saved = tmp_path / "big.vmstate"
    # The cap keeps the state from converging: 20 rounds of changes, then forced.
    code, vmm_peak, stderr = run_measured(
        "save", str(saved), "--live", "--compression", "none", "--max-bandwidth", "256M", "--max-rounds", "20",
        "--force", "--resume", "--json", "--address", bus_address,
    )
    assert code == 0, stderr
    growth = memory(source.process.pid)["VmHWM"] - before
    assert vmm_peak < 100 << 20, f"the VMM helper peaked at {vmm_peak >> 20} MiB"
    assert growth < 64 << 20, f"the back-end grew by {growth >> 20} MiB beyond its state"
    assert count_fds(source.process.pid) == fds
    assert saved.stat().st_size > 1 << 30
