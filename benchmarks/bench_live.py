"""Live-save benchmark: the downtime of an iterative save against a one-shot save, and its memory.

Run (after `bash scripts/test.sh --co -q` or `source scripts/setup.sh` made .venv):

    .venv/bin/python benchmarks/bench_live.py [--gib 1] [--dirty-rate 10M] [--runs 3] [--quick]

The issue's setting: 1 GiB of state dirtying 10 MiB/s, saved live to a file;
the measured downtime (from quiesce to the last byte verified) against a
one-shot save of the same state in the same run.  Target: downtime at most
0.05x the one-shot save, and within the requested limit (--downtime-limit,
300 ms as QEMU's default).  Everything runs on this machine against a private
dbus-daemon (`dbus_vmstate2.privatebus.PrivateBus`); the machine is shared
and noisy, so the one-shot save is the baseline, timed in the same run on the
same state, and the figures are medians of --runs runs (each run's downtime
is printed too).  No figure is asserted.

1. Downtime.  One back-end process, the example `memstate` (--gib GiB,
   `--seed 1 --dirty-rate R`: a thread keeps rewriting random 1 MiB blocks),
   started with its log lines timestamped (the library logs each state
   transition of the back-end).  In each run, for each --compression in turn:
   a. the one-shot save: `python -m dbus_vmstate2 save FILE --json
      --compression C`, timed from spawn to exit, and its own JSON `seconds`
      (from before it connects to after the file's fsync and rename).  For a
      VM the whole of a one-shot save is downtime: the VMM stops the VM for
      it.  (memstate does not stop: a one-shot save of its store is a
      snapshot, and its writer goes on.)
   b. the live save: `save FILE --live --json --compression C
      --downtime-limit MS --resume`: from its JSON summary, `downtime` (from
      the switch-over, when StopCopy quiesces the back-ends, to the last
      back-end's stream verified by the VMM helper, before the file's fsync),
      `expected_downtime` (what the plan expected when it switched over),
      `rounds`, `precopy_time`, `total_time`, `stream_bytes`.  From the
      back-end's log: its own stop-copy (StopCopy received to `stopped`:
      quiesced, last round and trailer written into the pipe) and how long
      it stayed stopped (to the Resume that --resume sends once the file is
      committed, fsync and rename included).
2. Memory.  For every save, the VMM helper's peak RSS (the command's own
   ru_maxrss, `os.wait4`), and the back-end's VmHWM during the save (reset
   to VmRSS just before it, `echo 5 > /proc/PID/clear_refs`) against its
   VmRSS before and after the save; the largest over the runs.  memstate
   grows by itself while its writer runs: its initial blocks live in the
   heap, and a rewritten block leaves a hole there that stays resident
   (watched for --idle seconds before the first save).  So, for memstate, the
   peak above the RSS before the save is an upper bound of what the save
   itself took, and the peak above the RSS after it a lower bound.
   memstate at 10 MiB/s also converges in a few rounds even at a 1 ms limit
   (nothing is pending at most looks), and its writer cannot go much faster
   (random.randbytes costs some 12 ms of CPU per MiB, with the GIL held).  So
   for many rounds a second back-end, this script's own: memstate's state
   (`MemState`, the library's `Backend`), rewritten at --rounds-rate by a
   thread that copies blocks out of a random pool, its blocks in mappings of
   their own from the start (so it has no such drift).  It gets a one-shot
   save, a live save at the --downtime-limit, and a live save with a 1 ms
   limit and `--max-rounds N --force`: pre-copy goes on for N rounds, unless
   nothing is pending at a look before, and then switches over anyway.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import logging
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_transfer import Backend, backend_process, mib, proc_status, reset_hwm, size_name, table  # noqa: E402

from dbus_vmstate2.examples.memstate import BLOCK_SIZE, MemState, deterministic_blocks, parse_size  # noqa: E402
from dbus_vmstate2.backend import Backend as LibBackend  # noqa: E402
from dbus_vmstate2.privatebus import PrivateBus  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30

_LOG_FORMAT = "%(created).6f %(name)s: %(message)s"
# memstate itself, with a timestamp on each log line (its basicConfig then does nothing).
_MEMSTATE = f"""
import logging, sys
logging.basicConfig(level=logging.INFO, format={_LOG_FORMAT!r})
from dbus_vmstate2.examples.memstate import main
sys.exit(main(sys.argv[1:]))
"""
# "1795654168.437412 dbus_vmstate2.backend: back-end 'bench': pre-copy -> stop-copy (StopCopy)"
_TRANSITION = re.compile(r"^(\d+\.\d+) \S+: back-end '[^']*': (\S+) -> (\S+) \(")


# processes ---------------------------------------------------------------------


@dataclass
class Save:
    """One `dbus-vmstate2 save` command."""

    wall: float
    """Seconds from spawn to exit."""
    doc: dict
    """Its JSON output."""
    vmm_rss: int
    """Its peak RSS, bytes."""
    before: int
    """The back-end's VmRSS before the save, bytes."""
    peak: int
    """The back-end's VmHWM during the save (reset to VmRSS just before it), bytes."""
    after: int
    """The back-end's VmRSS after the save, bytes."""
    exact: bool
    """Whether the back-end's VmHWM could be reset (else ``peak`` may be older)."""
    transitions: list[tuple[float, str, str]] = field(default_factory=list)
    """The back-end's state transitions during the save: (time, before, after)."""

    def at(self, before: str, after: str) -> float | None:
        """When the back-end last went from ``before`` to ``after``."""
        times = [t for t, b, a in self.transitions if (b, a) == (before, after)]
        return times[-1] if times else None

    def between(self, first: tuple[str, str], last: tuple[str, str]) -> float | None:
        """Seconds from transition ``first`` to transition ``last``."""
        start, end = self.at(*first), self.at(*last)
        return end - start if start is not None and end is not None and end >= start else None


@dataclass
class Watched:
    """A back-end process, its log, and its VmRSS at the start and at the end."""

    backend: Backend
    log: Path
    rss_start: int
    idle_growth: int = 0
    """Its VmRSS growth while idle for --idle seconds, before the first save."""
    rss_end: int = 0

    @property
    def id(self) -> str:
        return self.log.stem


def transitions(log: Path, offset: int) -> list[tuple[float, str, str]]:
    with log.open() as file:
        file.seek(offset)
        return [(float(m[1]), m[2], m[3]) for line in file if (m := _TRANSITION.match(line))]


def run_save(args: list[str], backend: Backend, backend_log: Path, log: Path, *, until: tuple[str, str]) -> Save:
    """Run ``python -m dbus_vmstate2 save ARGS --json``; time it, read its JSON, and watch the back-end.

    ``until`` is the back-end's transition that ends the save on its side;
    its log is read until that line is in (it may come just after the
    command's exit).
    """
    pid = backend.process.pid
    before = proc_status(pid)
    exact = reset_hwm(pid)
    offset = backend_log.stat().st_size
    with log.open("a") as err:
        t0 = time.perf_counter()
        process = subprocess.Popen([sys.executable, "-m", "dbus_vmstate2", "save", *args, "--json"],
                                   stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, cwd=ROOT)
        assert process.stdout is not None
        out = process.stdout.read()
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - t0
        process.stdout.close()
    code = os.waitstatus_to_exitcode(status)
    process.returncode = code
    if code != 0:
        raise RuntimeError(f"dbus-vmstate2 save {' '.join(args)} exited {code}: {out.decode(errors='replace')}; see {log}")
    after = proc_status(pid)
    deadline = time.monotonic() + 5
    while True:
        seen = transitions(backend_log, offset)
        if any(b == until[0] and a == until[1] for _, b, a in seen) or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    return Save(wall, json.loads(out), usage.ru_maxrss * 1024, before["VmRSS"], after["VmHWM"], after["VmRSS"], exact, seen)


# part 2's back-end -----------------------------------------------------------------

_M_MMAP_THRESHOLD = -3  # glibc's <malloc.h>


def serve_rewriter(address: str, backend_id: str, size: int, rate: int) -> int:
    """memstate's state, rewritten at ``rate`` bytes a second by copies out of a random pool."""
    logging.basicConfig(level=logging.INFO, format=_LOG_FORMAT)
    # Every block in a mapping of its own from the start, so that a rewritten
    # block gives its memory back (memstate fixes this only after start-up).
    ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, 128 << 10)
    state = MemState(deterministic_blocks(size, 1))
    pool = memoryview(os.urandom(64 * MiB))
    stopping = threading.Event()

    def rewrite() -> None:  # memstate's Dirtier, with copies instead of random.randbytes
        rng = random.Random(2)
        budget, last = 0.0, time.monotonic()
        while not stopping.wait(0.01):
            now = time.monotonic()
            budget, last = min(budget + (now - last) * rate, max(rate, BLOCK_SIZE)), now
            while budget >= BLOCK_SIZE and not stopping.is_set():
                start = rng.randrange(len(pool) - BLOCK_SIZE)
                state.rewrite(rng.randrange(len(state)), bytes(pool[start : start + BLOCK_SIZE]))
                budget -= BLOCK_SIZE

    async def serve() -> None:
        backend = LibBackend(backend_id, state, address=address)
        await backend.start()
        print(f"READY {backend.unique_name}", flush=True)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await backend.stop()

    threading.Thread(target=rewrite, name="rewriter", daemon=True).start()
    try:
        asyncio.run(serve())
    finally:
        stopping.set()
    return 0


# figures --------------------------------------------------------------------------


def median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1000:,.0f} ms"


def secs(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds:.2f} s"


def ratio(a: float | None, b: float | None, digits: int = 3) -> str:
    return "n/a" if a is None or not b else f"{a / b:.{digits}f}"


def stream_bytes(save: Save) -> int:
    doc = save.doc
    return doc["stream_bytes"] if doc.get("live") else sum(b["stream_bytes"] for b in doc["backends"])


@dataclass
class Pair:
    """The saves of one compression: a one-shot and a live save per run."""

    compression: str
    one_shots: list[Save] = field(default_factory=list)
    lives: list[Save] = field(default_factory=list)

    def live(self, name: str) -> list:
        """Field ``name`` of each live save's JSON summary."""
        return [s.doc.get(name) for s in self.lives]

    def rows(self, limit: float) -> list[tuple[str, str]]:
        """The report's rows: label, figure (medians over the runs)."""
        shot_wall = median([s.wall for s in self.one_shots])
        shot_seconds = median([s.doc["seconds"] for s in self.one_shots])
        shot_backend = median([s.between(("running", "saving"), ("saving", "running")) for s in self.one_shots])
        downtime = median(self.live("downtime"))
        expected = median(self.live("expected_downtime"))
        own_stops = [s.between(("pre-copy", "stop-copy"), ("stop-copy", "stopped")) for s in self.lives]
        own_stop = median(own_stops)
        stopped = median([s.between(("pre-copy", "stop-copy"), ("stopped", "running")) for s in self.lives])
        shot_bytes = median([stream_bytes(s) for s in self.one_shots])
        live_bytes = median([stream_bytes(s) for s in self.lives])
        within = sum(1 for d in self.live("downtime") if d is not None and d <= limit)
        return [
            ("one-shot save, spawn to exit", secs(shot_wall)),
            ("one-shot save, its JSON seconds (the baseline)", secs(shot_seconds)),
            ("one-shot save, the back-end's Save call to its last byte written (its log)", secs(shot_backend)),
            ("live: downtime, quiesce to last stream verified (JSON)", ms(downtime)),
            ("  each run", ", ".join(ms(d) for d in self.live("downtime"))),
            ("  / one-shot JSON seconds (target <= 0.05)", ratio(downtime, shot_seconds)),
            ("  / one-shot spawn to exit", ratio(downtime, shot_wall)),
            ("  / one-shot back-end Save (no fsync on either side)", ratio(downtime, shot_backend)),
            (f"  within the {limit * 1000:.0f} ms limit (target: all runs)",
             f"{within} of {len(self.lives)} runs"),
            ("live: expected downtime at the switch-over (JSON)", ms(expected)),
            ("live: measured / expected", ratio(downtime, expected, 2)),
            ("live: the back-end's own stop-copy (its log)", ms(own_stop)),
            ("  downtime beyond it, each run (the VMM helper's side)",
             ", ".join(ms(None if o is None or d is None else d - o) for d, o in zip(self.live("downtime"), own_stops))),
            ("live: the back-end stopped, StopCopy to Resume (its log)", ms(stopped)),
            ("live: rounds of changed data (each run)", ", ".join(str(r) for r in self.live("rounds"))),
            ("live: switch reason (each run)", ", ".join(str(r) for r in self.live("switch_reason"))),
            ("live: pre-copy time (JSON)", secs(median(self.live("precopy_time")))),
            ("live: total time, start to last stop-copy's end (JSON)", secs(median(self.live("total_time")))),
            ("live: spawn to exit", secs(median([s.wall for s in self.lives]))),
            ("stream bytes, one-shot", mib(shot_bytes)),
            ("stream bytes, live (x one-shot)", f"{mib(live_bytes)} ({ratio(live_bytes, shot_bytes, 3)}x)"),
        ]


def size_text(n: float) -> str:
    return ("-" if n < 0 else "") + mib(abs(n))


def memory_row(label: str, saves: list[Save]) -> list[str]:
    """VMM peak RSS, the back-end's peak above its RSS before (and the part
    that lasted, and the peak above its RSS after), seconds, rounds: the
    largest over ``saves``."""
    mark = "" if all(s.exact for s in saves) else ">= "
    return [
        label, mib(max(s.vmm_rss for s in saves)),
        mark + size_text(max(s.peak - s.before for s in saves)),
        size_text(max(s.after - s.before for s in saves)),
        mark + size_text(max(s.peak - s.after for s in saves)),
        f"{max(s.wall for s in saves):.1f}", ", ".join(str(s.doc.get("rounds", "-")) for s in saves),
    ]


# the benchmark -----------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0, help="the back-ends' state, in GiB (default 1)")
    parser.add_argument("--dirty-rate", type=parse_size, default=parse_size("10M"),
                        help="memstate's --dirty-rate, bytes a second (default 10M)")
    parser.add_argument("--runs", type=int, default=3, help="runs of part 1, interleaved, medians taken (default 3)")
    parser.add_argument("--compression", default="none,zstd", help="part 1's compressions, each run in turn (default none,zstd)")
    parser.add_argument("--downtime-limit", type=float, default=300.0, metavar="MS",
                        help="the live saves' --downtime-limit, in ms (default 300)")
    parser.add_argument("--idle", type=float, default=2.0,
                        help="seconds each back-end's RSS is watched with no save running, first (default 2)")
    parser.add_argument("--rounds-rate", type=parse_size, default=parse_size("200M"),
                        help="part 2's back-end rewrites this many bytes a second (default 200M)")
    parser.add_argument("--max-rounds", type=int, default=100,
                        help="part 2's last live save: 1 ms limit, this many rounds, then forced (default 100)")
    parser.add_argument("--tmpdir", help="where the files go (default: the system's temporary directory)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 256 MiB, 1 run, no zstd, --max-rounds 20")
    parser.add_argument("--serve-rewriter", nargs=4, metavar=("ADDR", "ID", "SIZE", "RATE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_rewriter:
        address, backend_id, size, rate = args.serve_rewriter
        return serve_rewriter(address, backend_id, int(size), int(rate))
    if args.quick:
        args.gib, args.runs, args.compression, args.max_rounds = 0.25, 1, "none", 20
    total = int(args.gib * GiB) // MiB * MiB
    compressions = [c.strip() for c in args.compression.split(",") if c.strip()]
    limit = args.downtime_limit / 1000
    live = ["--live", "--resume"]

    started = time.perf_counter()
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-live-", dir=args.tmpdir)))
        log = work / "processes.log"
        bus = stack.enter_context(PrivateBus())
        out = str(work / "saved.vms")
        print(f"bench_live: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, files in {work}, "
              f"{args.runs} run(s), load average {os.getloadavg()[0]:.2f}", flush=True)

        def start(name: str, argv: list[str]) -> Watched:
            backend_log = work / f"{name}.log"
            backend = stack.enter_context(backend_process(argv, backend_log))
            watched = Watched(backend, backend_log, proc_status(backend.process.pid)["VmRSS"])
            time.sleep(args.idle)  # its own drift, with no save running
            watched.idle_growth = proc_status(backend.process.pid)["VmRSS"] - watched.rss_start
            return watched

        def save(watched: Watched, extra: list[str], until: tuple[str, str]) -> Save:
            result = run_save([out, "--address", bus.address, "--id-list", watched.id, *extra],
                              watched.backend, watched.log, log, until=until)
            os.unlink(out)
            return result

        # 1. memstate: one-shot and live saves, interleaved
        mem = start("memstate", [sys.executable, "-c", _MEMSTATE, "--address", bus.address, "--id", "memstate",
                                 "--size", str(total), "--seed", "1", "--dirty-rate", str(args.dirty_rate)])
        pairs = [Pair(c) for c in compressions]
        for run in range(args.runs):
            for pair in pairs:
                compression = ["--compression", pair.compression]
                pair.one_shots.append(save(mem, compression, ("saving", "running")))
                pair.lives.append(save(mem, [*compression, *live, "--downtime-limit", f"{args.downtime_limit:g}"],
                                       ("stopped", "running")))
                print(f"  run {run + 1}, {pair.compression}: one-shot {pair.one_shots[-1].doc['seconds']:.2f} s, "
                      f"live downtime {ms(pair.lives[-1].doc['downtime'])}, {pair.lives[-1].doc['rounds']} round(s)",
                      flush=True)
        mem.rss_end = proc_status(mem.backend.process.pid)["VmRSS"]
        mem.backend.process.terminate()  # its memory back before part 2

        # 2. many rounds, uncompressed
        rw = start("rewriter", [sys.executable, str(Path(__file__).resolve()), "--serve-rewriter", bus.address,
                                "rewriter", str(total), str(args.rounds_rate)])
        rw_saves = [
            ("one-shot", save(rw, ["--compression", "none"], ("saving", "running"))),
            (f"live, {args.downtime_limit:g} ms limit", save(rw, ["--compression", "none", *live, "--downtime-limit",
                                                                  f"{args.downtime_limit:g}"], ("stopped", "running"))),
            (f"live, 1 ms limit, --max-rounds {args.max_rounds} --force",
             save(rw, ["--compression", "none", *live, "--downtime-limit", "1", "--max-rounds", str(args.max_rounds),
                       "--force"], ("stopped", "running"))),
        ]
        rw.rss_end = proc_status(rw.backend.process.pid)["VmRSS"]

    # report
    print()
    print(f"1. Live save against one-shot save: {size_name(total)} of memstate state rewritten at "
          f"{mib(args.dirty_rate)}/s,")
    print(f"   to a file, medians of {args.runs} run(s); live saves with --downtime-limit {args.downtime_limit:g}")
    names = {"none": "none", "zstd": "zstd -1"}
    rows = [["", *(names.get(p.compression, p.compression) for p in pairs)]]
    columns = [p.rows(limit) for p in pairs]
    for i, (label, _) in enumerate(columns[0]):
        rows.append([label, *(column[i][1] for column in columns)])
    table(rows)
    print()
    print("2. Memory: the VMM helper's peak RSS; the back-end's VmHWM during the save (reset just before) above")
    print("   its VmRSS before the save, of which lasting (its VmRSS after), and above its VmRSS after the save;")
    print("   the largest over the runs")
    rows = [["save", "VMM peak RSS", "back-end peak", "lasting", "peak above after", "s (max)", "rounds"]]
    for pair in pairs:
        name = names.get(pair.compression, pair.compression)
        rows.append(memory_row(f"memstate, one-shot, {name}", pair.one_shots))
        rows.append(memory_row(f"memstate, live, {name}", pair.lives))
    rows += [memory_row(f"rewriter, {label}, none", [s]) for label, s in rw_saves]
    table(rows)
    for label, s in rw_saves[1:]:
        print(f"   rewriter, {label}: {s.doc['switch_reason']}, pre-copy {secs(s.doc['precopy_time'])}, "
              f"{mib(s.doc['stream_bytes'])} of stream, downtime {ms(s.doc['downtime'])}")
    for name, watched, saves in (("memstate", mem, 2 * args.runs * len(pairs)), ("rewriter", rw, len(rw_saves))):
        print(f"   {name}: VmRSS {mib(watched.rss_start)} at its start, {mib(watched.rss_end)} after its {saves} saves; "
              f"before them, idle for {args.idle:g} s, it grew by {size_text(watched.idle_growth)}")
    print()
    print(f"bench_live: done in {time.perf_counter() - started:.0f} s, load average {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
