"""The rest of the fault matrix (tests/test_faults.py has the disk and the
back-end; tests/test_migrate*.py a migration's back-end, destination, link
and signals): the bus daemon and the VMM helper killed, or stopped and
continued, in the middle of a save, of a load and of a migration.

What a user gets:

* the bus daemon killed: the command fails within seconds with one line
  saying the bus went away (exit 1), leaves no file; each back-end's
  transfer ends with its state untouched, and since a back-end cannot
  rejoin a bus (it opens no socket once sandboxed), ``wait_closed()``
  returns and memstate exits 0; one left ``stopped`` stays quiesced;
* the bus daemon stopped, then continued: nothing is lost; the data never
  went through the bus, and the command completes once it answers again
  (a bus stopped for longer than a call's 30 s fails the command, naming
  the call);
* the helper stopped, then continued: it completes if it was stopped for
  less than the back-ends' stall timeout; beyond that each back-end ends
  its transfer itself, keeping its state, and the command fails with the
  back-end's reason;
* the helper killed: the back-ends see their pipe break and serve on; a
  save leaves no file at all (it writes an unnamed file until its rename);
* in a migration (each side with its own bus), nothing is lost before
  the destination acknowledged: every source back-end keeps its state, and
  serves on if its bus lives; the destination applies nothing:

  - the source's bus daemon killed, in pre-copy or stop-copy: ``migrate``
    fails within seconds with one line saying the bus went away (exit 1);
    the source's back-ends end their transfers keeping their state (one in
    stop-copy serves again: its transfer failed) and leave, as above;
    ``incoming`` sees its source leave before the end of the container
    (exit 4);
  - the destination's bus daemon killed: ``incoming`` says the bus went
    away (exit 1), its back-ends drop their loads and leave; ``migrate``
    fails with that message (exit 4) and its back-ends serve on;
  - either bus daemon stopped, then continued: the migration completes with
    the state the source had at quiesce (no data goes through a bus);
  - either helper stopped, then continued: within its peer's and its
    back-ends' timeouts it completes; beyond them, the other helper gives
    up on its I/O timeout naming the link (exit 4), the stopped helper's
    back-ends end their transfers on their stall timeout, and the helper,
    continued, fails in one line.
  - the source helper killed (SIGKILL) in pre-copy: its back-ends see
    their pipes break, end their transfers and serve on with their state;
    ``incoming`` sees the connection end (or reset) before the end of the
    container (exit 4) and applies nothing;
  - a destination back-end killed: ``incoming`` fails in one line naming it
    (exit 1) and tells the source: ``migrate`` exits 4 with that message,
    its back-ends serve on, the other destination back-end applies nothing;
  - a back-end, on either side, stopped briefly (less than every timeout):
    the migration completes and moves the state at quiesce.

After each: no zombie, no fd leaked by a back-end that lives on.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from dbus_vmstate2.backend import Backend, DirtyStore
from dbus_vmstate2.cli import main
from dbus_vmstate2.examples.memstate import deterministic_state
from dbus_vmstate2.privatebus import PrivateBus

from .conftest import ROOT, BackendProcess, count_fds, start_memstate
from .migration import reap_commands  # noqa: F401 (the fixture)
from .migration import Incoming, run, start
from .test_live_save import events
from .test_migrate import assert_moved, assert_source_serves_on, pair
from .test_vmm import backend_state, temp_files, wait_for

pytestmark = pytest.mark.slow

ENV = {**os.environ, "PYTHONWARNINGS": "error"}
BIG = 128 << 20
SLOW_SAVE = ["--compression", "zstd", "--level", "15"]
"""About 3 s for BIG here: time to hit the middle of the save."""
LIVE_SAVE = ["--live", "--resume", "--compression", "none", "--max-bandwidth", "32M"]
"""A pre-copy of about 4 s for BIG, then the switch-over and the back-ends resumed."""


@pytest.fixture
def bus() -> Iterator[PrivateBus]:
    with PrivateBus() as private:
        yield private


@pytest.fixture
def backends(bus) -> Iterator[Callable[..., BackendProcess]]:
    started: list[BackendProcess] = []

    def spawn(backend_id: str, *args: str, address: str | None = None) -> BackendProcess:
        started.append(start_memstate(address or bus.address, backend_id, *args))
        return started[-1]

    yield spawn
    for backend in started:
        backend.stop()


def command(address: str, *args: str) -> subprocess.Popen[str]:
    argv = [sys.executable, "-m", "dbus_vmstate2", *args, "--address", address]
    return subprocess.Popen(argv, cwd=ROOT, env=ENV, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


def finish(process: subprocess.Popen[str], within: float) -> tuple[int, str]:
    """The command's exit code and stderr; it must end within ``within`` seconds."""
    try:
        _, err = process.communicate(timeout=within)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise AssertionError(f"the command did not end within {within} s") from None
    return process.returncode, err


def zombies(parent: int) -> list[int]:
    """The children of ``parent`` that ended and were not reaped."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] == "Z" and int(fields[1]) == parent:
            found.append(int(entry))
    return found


def no_zombies(*parents: int) -> None:
    for parent in (os.getpid(), *parents):
        assert zombies(parent) == [], f"unreaped children of {parent}"


def saved_sizes(image: Path, capsys) -> dict[str, int]:
    """Each stream's raw size, from ``inspect``, which verifies them all."""
    capsys.readouterr()
    assert main(["inspect", "--json", str(image)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["verified"]
    return {s["id"]: s["raw_bytes"] for s in doc["streams"]}


@contextmanager
def kept_stopped(pid: int) -> Iterator[None]:
    """The process ``pid`` stopped (SIGSTOP) within the block, continued after it, whatever happens."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def stopped_for(pid: int, seconds: float) -> None:
    with kept_stopped(pid):
        time.sleep(seconds)


# the bus daemon ---------------------------------------------------------------------


@pytest.mark.parametrize("how, busy", [(SLOW_SAVE, "saving"), (LIVE_SAVE, "pre-copy")], ids=["one-shot", "live"])
def test_the_bus_killed_in_mid_save(bus, backends, tmp_path, how, busy):
    small, big = backends("small", "--size", "1M", "--seed", "1"), backends("big", "--size", str(BIG), "--seed", "2")
    image = tmp_path / "vm.vmstate"
    saver = command(bus.address, "save", str(image), *how)
    wait_for(lambda: backend_state(bus.address, big) == busy, "the save to start")
    started = time.monotonic()
    os.kill(bus.pid, signal.SIGKILL)
    code, err = finish(saver, 60)
    assert code == 1 and "Traceback" not in err, err
    # (Not just "bus": the command's own name has it.)
    assert "the bus daemon went away" in err and len(err.splitlines()) == 1, err
    assert time.monotonic() - started < 30
    assert not image.exists() and not temp_files(tmp_path)
    # Each back-end ends its transfer and, with no bus to serve, leaves cleanly.
    for backend in (small, big):
        assert backend.process.wait(timeout=30) == 0
    bus.stop()  # reaps the daemon we killed
    no_zombies()


def test_the_bus_killed_in_mid_load(bus, backends, tmp_path):
    image = tmp_path / "vm.vmstate"
    source = backends("big", "--size", str(2 * BIG), "--seed", "3")
    assert main(["save", str(image), "--compression", "none", "--address", bus.address]) == 0
    source.stop()
    loaded = tmp_path / "big.loaded"
    dest = backends("big", "--size", "1K", "--save-loaded", str(loaded))
    loader = command(bus.address, "load", str(image), "--no-verify")
    wait_for(lambda: backend_state(bus.address, dest) == "resuming", "the load to start")
    started = time.monotonic()
    os.kill(bus.pid, signal.SIGKILL)
    code, err = finish(loader, 60)
    assert code == 1 and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert time.monotonic() - started < 30
    assert dest.process.wait(timeout=30) == 0
    assert not loaded.exists()  # the half-read stream was never applied
    bus.stop()
    no_zombies()


@pytest.mark.parametrize("operation", ["save", "load"])
def test_the_bus_stopped_then_continued_in_mid_transfer(bus, backends, tmp_path, capsys, operation):
    image = tmp_path / "vm.vmstate"
    loaded = tmp_path / "big.loaded"
    if operation == "save":
        small = backends("small", "--size", "1M", "--seed", "1")
        big = backends("big", "--size", str(BIG), "--seed", "2")
        running = command(bus.address, "save", str(image), *SLOW_SAVE)
        busy = "saving"
    else:
        source = backends("big", "--size", str(2 * BIG), "--seed", "2")
        assert main(["save", str(image), "--compression", "none", "--address", bus.address]) == 0
        source.stop()
        big = backends("big", "--size", "1K", "--save-loaded", str(loaded))
        running = command(bus.address, "load", str(image), "--no-verify")
        busy = "resuming"
    fds = count_fds(big.process.pid)
    wait_for(lambda: backend_state(bus.address, big) == busy, "the transfer to start")
    stopped_for(bus.pid, 3)
    code, err = finish(running, 60)
    assert code == 0, err
    if operation == "save":
        assert saved_sizes(image, capsys) == {"small": 1 << 20, "big": BIG}
        assert backend_state(bus.address, small) == "running"
    else:
        assert loaded.read_bytes() == deterministic_state(2 * BIG, 2)
    assert not temp_files(tmp_path)
    assert backend_state(bus.address, big) == "running"
    wait_for(lambda: count_fds(big.process.pid) == fds, "the back-end's fds to be closed", timeout=10)
    no_zombies(big.process.pid)


def test_the_bus_stopped_for_longer_than_the_call_timeout(bus, backends, tmp_path, capsys):
    """A bus that stops answering fails the save once a call's 30 s are up,
    with the call that went unanswered (not the tidying up after it)."""
    big = backends("big", "--size", str(BIG), "--seed", "2")
    image = tmp_path / "vm.vmstate"
    saver = command(bus.address, "save", str(image), *SLOW_SAVE)
    wait_for(lambda: backend_state(bus.address, big) == "saving", "the save to start")
    with kept_stopped(bus.pid):
        code, err = finish(saver, 90)
    assert code == 1 and len(err.splitlines()) == 1, err
    assert "back-end 'big'" in err and "did not answer org.qemu.VMState2.Check within 30 s" in err, err
    assert not image.exists() and not temp_files(tmp_path)
    wait_for(lambda: backend_state(bus.address, big) == "running", "the back-end to serve on")
    assert main(["save", str(image), "--address", bus.address]) == 0
    assert saved_sizes(image, capsys) == {"big": BIG}
    no_zombies(big.process.pid)


async def test_the_bus_killed_while_a_backend_is_stopped_leaves_it_quiesced(bus, tmp_path):
    """After a live save without --resume (or a migration's switch-over) a
    back-end is ``stopped``: its daemon quiesced until a Resume.  If the bus
    dies then, the library does not resume it on its own (two daemons could
    then serve the same device, as two QEMUs the same VM): it stays
    ``stopped``, and the daemon, back from ``wait_closed()``, decides."""
    store = DirtyStore()
    store.put(b"inode:1", b"x" * 4096)
    async with Backend("fs", store, address=bus.address) as backend:
        saver = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "dbus_vmstate2", "save", str(tmp_path / "vm.vmstate"), "--live", "--address",
            bus.address, cwd=ROOT, env=ENV, stdout=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        assert await saver.wait() == 0
        assert (backend.state, store.quiesced) == ("stopped", True)
        os.kill(bus.pid, signal.SIGKILL)
        await asyncio.wait_for(backend.wait_closed(), 30)
        assert (backend.state, store.quiesced) == ("stopped", True)
    assert store.quiesced  # stop() leaves it so too
    store.resume()  # the daemon's own call
    store.put(b"inode:2", b"y")


# the VMM helper ---------------------------------------------------------------------


@pytest.mark.parametrize("operation", ["save", "live save", "load"])
@pytest.mark.parametrize("pause, completes", [(1, True), (6, False)])
def test_the_helper_stopped_then_continued_in_mid_transfer(bus, backends, tmp_path, capsys, operation, pause, completes):
    """The back-ends' stall timeout is 3 s: a helper stopped for 1 s finishes
    its work, one stopped for 6 s finds its transfers ended by the back-ends."""
    image = tmp_path / "vm.vmstate"
    loaded = tmp_path / "big.loaded"
    stall = ("--stall-timeout", "3")
    if operation != "load":
        small = backends("small", "--size", "1M", "--seed", "1", *stall)
        big = backends("big", "--size", str(BIG), "--seed", "2", *stall)
        live = operation == "live save"
        helper = command(bus.address, "save", str(image), *(LIVE_SAVE if live else SLOW_SAVE))
        busy = "pre-copy" if live else "saving"
    else:
        source = backends("big", "--size", str(2 * BIG), "--seed", "2")
        assert main(["save", str(image), "--compression", "none", "--address", bus.address]) == 0
        source.stop()
        big = backends("big", "--size", "1K", "--save-loaded", str(loaded), *stall)
        helper = command(bus.address, "load", str(image), "--no-verify")
        busy = "resuming"
    fds = count_fds(big.process.pid)
    wait_for(lambda: backend_state(bus.address, big) == busy, "the transfer to start")
    stopped_for(helper.pid, pause)
    code, err = finish(helper, 60)
    if completes:
        assert code == 0, err
        if operation != "load":
            assert saved_sizes(image, capsys) == {"small": 1 << 20, "big": BIG}
        else:
            assert loaded.read_bytes() == deterministic_state(2 * BIG, 2)
    else:
        # Every back-end still sending when the helper stopped ended its
        # transfer; the command names the first and gives its reason.
        assert code == 1 and "Traceback" not in err and len(err.splitlines()) == 1, err
        assert re.search(r"back-end '(small|big)': nothing was (read|written) on the other end for 3 s", err), err
        assert not loaded.exists()
        if operation != "load":
            assert not image.exists()
    assert not temp_files(tmp_path)
    wait_for(lambda: backend_state(bus.address, big) == "running", "the back-end to serve on")
    wait_for(lambda: count_fds(big.process.pid) == fds, "the back-end's fds to be closed", timeout=10)
    if operation != "load":
        # Whatever happened, the source's state is whole, in both back-ends.
        wait_for(lambda: backend_state(bus.address, small) == "running", "the small back-end to serve on")
        assert main(["save", str(tmp_path / "again.vmstate"), "--address", bus.address]) == 0
        assert saved_sizes(tmp_path / "again.vmstate", capsys) == {"small": 1 << 20, "big": BIG}
    no_zombies(big.process.pid)


def test_the_helper_killed_in_mid_save_leaves_no_file(bus, backends, tmp_path, capsys):
    big = backends("big", "--size", str(BIG), "--seed", "2")
    fds = count_fds(big.process.pid)
    image = tmp_path / "vm.vmstate"
    saver = command(bus.address, "save", str(image), *SLOW_SAVE)
    wait_for(lambda: backend_state(bus.address, big) == "saving", "the save to start")
    saver.kill()
    saver.communicate()
    wait_for(lambda: backend_state(bus.address, big) == "running", "the back-end to end its transfer")
    wait_for(lambda: count_fds(big.process.pid) == fds, "the back-end's fds to be closed", timeout=10)
    assert not image.exists() and not temp_files(tmp_path)  # its file had no name: it went with the process
    assert main(["save", str(image), "--address", bus.address]) == 0
    assert saved_sizes(image, capsys) == {"big": BIG}
    no_zombies(big.process.pid)


# the migration ----------------------------------------------------------------------

MIGRATE = ["--max-bandwidth", "16M"]
"""A pre-copy of 2 to 3 s for the pair's 34 MiB (changing at 2 MiB/s): time to hit it."""
TIMEOUTS = ["--io-timeout", "3", "--stall-timeout", "3"]
"""For either helper: the link, or a back-end, that moves nothing for 3 s fails it."""
BACKEND_STALL = ("--stall-timeout", "3")
"""A back-end ends a transfer whose other end moves nothing for 3 s."""
LINK_ERROR = r"the (link|connection) (to|from) unix:\S+ .*(took nothing for 3 s|ended|was lost)|nothing came from unix:\S+ .*for 3 s"
"""How a helper names a link that failed, or that its peer closed."""


@pytest.fixture
def dest_bus() -> Iterator[PrivateBus]:
    with PrivateBus() as private:
        yield private


@dataclass
class Migration:
    """A migration under way: pair()'s back-ends, ``incoming`` and ``migrate``."""

    reports: dict[str, tuple[Path, Path]]
    """Each back-end's report files at the source and at the destination."""
    source: dict[str, BackendProcess]
    dest: dict[str, BackendProcess]
    fds: dict[int, int]
    """Each back-end's open fds (by pid) before the migration."""
    incoming: Incoming
    migrating: subprocess.Popen[str]
    directory: Path
    """Where the reports and incoming's socket are."""

    def backends(self) -> list[BackendProcess]:
        return [*self.source.values(), *self.dest.values()]

    def assert_nothing_left(self) -> None:
        """Only the reports remain (incoming's socket is gone)."""
        assert {p.name for p in self.directory.iterdir()} <= {"fs.src", "fs.dst", "net.src", "net.dst"}


def start_migration(backends, bus: PrivateBus, dest_bus: PrivateBus, tmp_path: Path, *args: str,
                    source_args: tuple[str, ...] = (), dest_args: tuple[str, ...] = (),
                    incoming_args: tuple[str, ...] = ()) -> Migration:  # fmt: skip
    """Start migrating pair()'s back-ends (each side's given its ``*_args``
    too) over a unix socket, ``migrate`` with ``args``; return once the source
    is in pre-copy."""
    source: dict[str, BackendProcess] = {}
    dest: dict[str, BackendProcess] = {}

    def spawn(backend_id: str, *spawn_args: str, address: str | None = None) -> BackendProcess:
        side, more = (source, source_args) if address is None else (dest, dest_args)
        side[backend_id] = backends(backend_id, *spawn_args, *more, address=address)
        return side[backend_id]

    reports = pair(spawn, bus.address, dest_bus.address, tmp_path, size="32M")
    fds = {b.process.pid: count_fds(b.process.pid) for b in (*source.values(), *dest.values())}
    incoming = Incoming(dest_bus.address, f"unix:{tmp_path / 'mig.sock'}", *incoming_args)
    migrating = start(bus.address, "migrate", incoming.address, *MIGRATE, *args)
    wait_for(lambda: backend_state(bus.address, source["fs"]) == "pre-copy", "the pre-copy")
    return Migration(reports, source, dest, fds, incoming, migrating, tmp_path)


def one_line(code: int, err: str, expected: int | tuple[int, ...]) -> None:
    """The command failed with ``expected`` and said why in one line."""
    assert code in (expected if isinstance(expected, tuple) else (expected,)), err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err


def assert_completed(m: Migration) -> None:
    """migrate and incoming both succeed, and the state at quiesce moved exactly."""
    code, err = finish(m.migrating, 60)
    assert code == 0, err
    code, err = finish(m.incoming.process, 30)
    assert code == 0, err
    assert_moved(m.reports)


def assert_destination_failed(m: Migration, named: str, started: float, within: float = 30) -> None:
    """incoming fails in one line saying ``named`` (exit 1), and tells the
    source: migrate fails in one line (exit 4) with the destination's reason
    and nothing applied, within 30 s of ``started``."""
    code, err = finish(m.incoming.process, within)
    one_line(code, err, 1)
    assert named in err, err
    code, err = finish(m.migrating, 30)
    one_line(code, err, 4)
    assert re.search(rf"the destination \(unix:\S+\) failed: .*{re.escape(named)}.*; nothing was applied", err), err
    assert time.monotonic() - started < 30


def assert_failed_cleanly(bus: PrivateBus, dest_bus: PrivateBus, m: Migration) -> None:
    """The source serves on with the state it had (never quiesced), the
    destination as it was (nothing loaded), no back-end leaked an fd and no
    file is left."""
    m.assert_nothing_left()
    assert_source_serves_on(bus.address, m.reports)
    for backend_id, (src, _) in m.reports.items():
        assert events(src, "quiesced") == [], backend_id
    for backend in m.dest.values():
        assert backend_state(dest_bus.address, backend) == "running"
    assert_no_fd_leaked(m, m.backends())


def assert_no_fd_leaked(m: Migration, backends: list[BackendProcess]) -> None:
    for backend in backends:
        pid = backend.process.pid
        wait_for(lambda: count_fds(pid) == m.fds[pid], "the back-end's fds to be closed", timeout=10)


@pytest.mark.parametrize("phase", ["pre-copy", "stop-copy"])
def test_the_source_bus_killed_in_mid_migration(bus, dest_bus, backends, tmp_path, phase):
    """migrate says the bus went away; the source's back-ends end their
    transfers, keeping their state (in stop-copy too: the transfer failed,
    so the daemon serves again), and leave, as memstate does once its bus is
    gone; the destination sees its source leave before the end of the
    container and applies nothing."""
    m = start_migration(backends, bus, dest_bus, tmp_path)
    if phase == "stop-copy":
        m.migrating.send_signal(signal.SIGUSR1)  # switch over now: the rest takes 2 s at this bandwidth
        wait_for(lambda: events(m.reports["fs"][0], "quiesced"), "the stop-copy to quiesce the back-end")
    started = time.monotonic()
    os.kill(bus.pid, signal.SIGKILL)
    code, err = finish(m.migrating, 60)
    one_line(code, err, 1)
    assert "the bus daemon went away" in err, err
    assert time.monotonic() - started < 30
    code, err = finish(m.incoming.process, 30)
    one_line(code, err, 4)
    assert "before the end of the container: the source gave up or was killed" in err, err
    # Each source back-end ends its transfer (one in stop-copy resumes its
    # daemon: the transfer failed) and leaves; its state was never sent whole.
    for backend in m.source.values():
        assert backend.process.wait(timeout=30) == 0
    assert len(events(m.reports["fs"][0], "quiesced")) == (1 if phase == "stop-copy" else 0)
    for backend_id, backend in m.dest.items():
        assert backend_state(dest_bus.address, backend) == "running"
        assert events(m.reports[backend_id][1], "loaded") == []
    assert_no_fd_leaked(m, list(m.dest.values()))
    m.assert_nothing_left()
    bus.stop()  # reaps the daemon we killed
    no_zombies(*(b.process.pid for b in m.dest.values()))


def test_the_destination_bus_killed_in_mid_migration(bus, dest_bus, backends, tmp_path):
    """The destination's back-ends drop their loads and leave; incoming
    says the bus went away and tells the source, which resumes its
    back-ends: they serve on with the state they had."""
    m = start_migration(backends, bus, dest_bus, tmp_path)
    started = time.monotonic()
    os.kill(dest_bus.pid, signal.SIGKILL)
    assert_destination_failed(m, "the bus daemon went away", started, within=60)
    for backend_id, backend in m.dest.items():
        assert backend.process.wait(timeout=30) == 0
        assert events(m.reports[backend_id][1], "loaded") == []
    assert_source_serves_on(bus.address, m.reports)
    for backend_id, (src, _) in m.reports.items():
        assert events(src, "quiesced") == [], backend_id
    assert_no_fd_leaked(m, list(m.source.values()))
    m.assert_nothing_left()
    dest_bus.stop()
    no_zombies(*(b.process.pid for b in m.source.values()))


@pytest.mark.parametrize("side", ["source", "destination"])
def test_a_bus_stopped_then_continued_in_mid_migration(bus, dest_bus, backends, tmp_path, side):
    """No data goes through a bus: the migration waits for its calls and
    completes, with the state the source had at quiesce."""
    m = start_migration(backends, bus, dest_bus, tmp_path)
    stopped_for((bus if side == "source" else dest_bus).pid, 2)
    assert_completed(m)
    states = [b["state"] for b in json.loads(run(bus.address, "status", "--json").stdout)]
    assert states == ["stopped", "stopped"]  # the handover is done
    assert [b["state"] for b in json.loads(run(dest_bus.address, "status", "--json").stdout)] == ["running", "running"]
    assert_no_fd_leaked(m, m.backends())
    no_zombies(*(b.process.pid for b in m.backends()))


@pytest.mark.parametrize("side", ["source", "destination"])
def test_a_helper_stopped_briefly_in_mid_migration(bus, dest_bus, backends, tmp_path, side):
    """Stopped for 1 s, less than every timeout (3 s here): it completes."""
    m = start_migration(backends, bus, dest_bus, tmp_path, *TIMEOUTS, source_args=BACKEND_STALL,
                        dest_args=BACKEND_STALL, incoming_args=tuple(TIMEOUTS))  # fmt: skip
    stopped_for((m.migrating if side == "source" else m.incoming.process).pid, 1)
    assert_completed(m)
    assert_no_fd_leaked(m, m.backends())
    no_zombies(*(b.process.pid for b in m.backends()))


@pytest.mark.parametrize("side", ["source", "destination"])
def test_a_helper_stopped_for_longer_than_the_timeouts_in_mid_migration(bus, dest_bus, backends, tmp_path, side):
    """Everyone waiting for the stopped helper gives up within its timeout
    (3 s here), as the failure table of docs/migration.md says: the other
    helper through its I/O timeout, naming the link; the stopped helper's
    back-ends through their stall timeout.  Continued, the helper finds its
    work ended, fails in one line and leaves nothing behind.  (The other
    helper's back-ends keep the default stall timeout: it is the link that
    the other helper must find stuck, not its own back-ends.)"""
    stall = {"source_args" if side == "source" else "dest_args": BACKEND_STALL}
    m = start_migration(backends, bus, dest_bus, tmp_path, *TIMEOUTS, incoming_args=tuple(TIMEOUTS), **stall)
    if side == "source":
        stopped, waiting, own = m.migrating, m.incoming.process, m.source
        gives_up = r"nothing came from unix:\S+ \(from a local process\) for 3 s \(the I/O timeout\)"
        own_reason = r"back-end '(fs|net)': nothing was read on the other end for 3 s"
    else:
        stopped, waiting, own = m.incoming.process, m.migrating, m.dest
        gives_up = r"the link to unix:\S+ took nothing for 3 s \(the I/O timeout\)"
        own_reason = r"back-end '(fs|net)': nothing was written on the other end for 3 s"
    with kept_stopped(stopped.pid):
        started = time.monotonic()
        code, err = finish(waiting, 30)
        one_line(code, err, 4)
        assert re.search(gives_up, err), err
        assert time.monotonic() - started < 15
        for backend in own.values():
            wait_for(lambda: backend_state(bus.address if own is m.source else dest_bus.address, backend) == "running",
                     "the stopped helper's back-ends to end their transfers", timeout=15)  # fmt: skip
    code, err = finish(stopped, 30)
    # It wakes to both its back-ends' ended transfers and its peer gone:
    # either is a true account, and which it sees first is the scheduler's.
    one_line(code, err, (1, 4))
    assert re.search(own_reason if code == 1 else LINK_ERROR, err), err
    assert_failed_cleanly(bus, dest_bus, m)
    no_zombies(*(b.process.pid for b in m.backends()))


def test_the_source_helper_killed_in_mid_migration(bus, dest_bus, backends, tmp_path):
    """migrate killed (SIGKILL) in pre-copy: the source's back-ends see their
    pipes break, end their transfers themselves and serve on with the state
    they had; incoming sees its source leave before the end of the container
    and applies nothing."""
    m = start_migration(backends, bus, dest_bus, tmp_path)
    started = time.monotonic()
    m.migrating.kill()
    m.migrating.communicate()
    code, err = finish(m.incoming.process, 30)
    one_line(code, err, 4)
    # Killed with PROGRESS messages unread in its socket, it resets the
    # connection rather than closing it (the kernel's choice): incoming says
    # either.
    assert re.search(r"before the end of the container: the source gave up or was killed"
                     r"|the connection to unix:\S+ \(from a local process\) was lost: Connection reset by peer", err), err
    assert time.monotonic() - started < 30
    for backend in m.source.values():
        wait_for(lambda: backend_state(bus.address, backend) == "running",
                 "the source's back-ends to end their transfers", timeout=30)  # fmt: skip
    for backend_id, (_, dst) in m.reports.items():
        assert events(dst, "loaded") == [], backend_id
    assert_failed_cleanly(bus, dest_bus, m)
    no_zombies(*(b.process.pid for b in m.backends()))


def test_a_destination_backend_killed_in_mid_migration(bus, dest_bus, backends, tmp_path):
    """A destination back-end killed (SIGKILL) while it loads: incoming fails
    in one line naming it and tells the source, which resumes its back-ends;
    the other destination back-end discards its staged load."""
    m = start_migration(backends, bus, dest_bus, tmp_path)
    victim = m.dest["fs"]
    started = time.monotonic()
    victim.process.kill()
    victim.process.wait()
    assert_destination_failed(m, "back-end 'fs'", started)
    m.assert_nothing_left()
    assert_source_serves_on(bus.address, m.reports)
    for backend_id, (src, _) in m.reports.items():
        assert events(src, "quiesced") == [], backend_id
    assert backend_state(dest_bus.address, m.dest["net"]) == "running"
    assert_no_fd_leaked(m, [*m.source.values(), m.dest["net"]])
    no_zombies(*(b.process.pid for b in m.backends()))


@pytest.mark.parametrize("side", ["source", "destination"])
def test_a_backend_stopped_briefly_in_mid_migration(bus, dest_bus, backends, tmp_path, side):
    """A back-end stopped for 1 s, less than every timeout (3 s here): the
    migration completes and moves the state at quiesce exactly."""
    m = start_migration(backends, bus, dest_bus, tmp_path, *TIMEOUTS, source_args=BACKEND_STALL,
                        dest_args=BACKEND_STALL, incoming_args=tuple(TIMEOUTS))  # fmt: skip
    stopped_for((m.source if side == "source" else m.dest)["fs"].process.pid, 1)
    assert_completed(m)
    assert_no_fd_leaked(m, m.backends())
    no_zombies(*(b.process.pid for b in m.backends()))



def test_a_source_backend_stopped_for_longer_than_the_stall_timeout_fails_the_migration_in_time(
    bus, dest_bus, backends, tmp_path
):
    """A source back-end stopped (SIGSTOP) and kept stopped: migrate's plan
    finds it stuck within its stall timeout (3 s here) and fails naming it,
    whatever the calls to it that never return (each tick's Check and
    Pending, the clean-up's cancel and resume each have a short bound of
    their own).  Continued, the back-end serves on with its state."""
    m = start_migration(backends, bus, dest_bus, tmp_path, *TIMEOUTS, incoming_args=tuple(TIMEOUTS))
    fs = m.source["fs"]
    with kept_stopped(fs.process.pid):
        started = time.monotonic()
        code, err = finish(m.migrating, 60)
        elapsed = time.monotonic() - started
        one_line(code, err, 1)
        assert "back-end 'fs'" in err, err
        assert elapsed < 20, f"migrate took {elapsed:.1f} s to give up on a stopped back-end"
    code, err = finish(m.incoming.process, 30)
    one_line(code, err, 4)
    wait_for(lambda: backend_state(bus.address, fs) == "running", "the continued back-end to end its transfer")
    m.assert_nothing_left()
    assert_source_serves_on(bus.address, m.reports)
    for backend in m.dest.values():
        assert backend_state(dest_bus.address, backend) == "running"
    assert_no_fd_leaked(m, m.backends())
    no_zombies(*(b.process.pid for b in m.backends()))


def test_a_destination_backend_stopped_for_longer_than_the_stall_timeout_is_named_by_both_sides(
    bus, dest_bus, backends, tmp_path
):
    """A destination back-end stopped and kept stopped: incoming finds it
    reads nothing within its stall timeout (3 s here) and fails naming it,
    and tells the source before it discards the loads (the discard waits for
    the stopped back-end's answer), so that migrate names the same back-end
    at the destination rather than its own side."""
    m = start_migration(backends, bus, dest_bus, tmp_path, *TIMEOUTS, incoming_args=tuple(TIMEOUTS))
    fs = m.dest["fs"]
    with kept_stopped(fs.process.pid):
        started = time.monotonic()
        code, err = finish(m.migrating, 60)
        elapsed = time.monotonic() - started
        one_line(code, err, 4)
        assert "the destination (unix:" in err and "back-end 'fs'" in err, err
        assert elapsed < 20, f"migrate took {elapsed:.1f} s"
        code, err = finish(m.incoming.process, 30)
        one_line(code, err, 1)
        assert "back-end 'fs'" in err, err
    wait_for(lambda: backend_state(dest_bus.address, fs) == "running", "the continued back-end to end its load")
    assert_failed_cleanly(bus, dest_bus, m)
    no_zombies(*(b.process.pid for b in m.backends()))
