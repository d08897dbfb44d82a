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
2. Memory.  For every save above, the VMM helper's peak RSS (the command's
   own ru_maxrss, `os.wait4`), and the back-end's VmHWM during the save
   (reset to VmRSS just before it, `echo 5 > /proc/PID/clear_refs`) against
   its VmRSS before and after the save; the largest over the runs.  memstate
   grows by itself while its writer runs: its initial blocks live in the
   heap, and a rewritten block leaves a hole there that stays resident (see
   --idle, watched before the first save).  So the peak above the RSS
   before the save is an upper bound of what the save itself took, and the
   peak above the RSS after it a lower bound.  Then one more live save with
   a 1 ms limit and `--max-rounds N --force`: pre-copy goes on until nothing
   is pending at a look (or N rounds), for more rounds than the 300 ms limit
   allows.  Last, the back-end's VmRSS at the start and at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_transfer import Backend, backend_process, mib, proc_status, reset_hwm, size_name, table  # noqa: E402

from dbus_vmstate2.examples.memstate import parse_size  # noqa: E402
from dbus_vmstate2.privatebus import PrivateBus  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
BACKEND_ID = "bench"

# memstate itself, with a timestamp on each log line (its basicConfig then does nothing).
_MEMSTATE = """
import logging, sys
logging.basicConfig(level=logging.INFO, format="%(created).6f %(name)s: %(message)s")
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
        """When the back-end last went from ``before`` to ``after`` (``*``: any state)."""
        times = [t for t, b, a in self.transitions if before in (b, "*") and after in (a, "*")]
        return times[-1] if times else None

    def between(self, first: tuple[str, str], last: tuple[str, str]) -> float | None:
        start, end = self.at(*first), self.at(*last)
        return end - start if start is not None and end is not None and end >= start else None


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
        own_stop = median([s.between(("pre-copy", "stop-copy"), ("stop-copy", "stopped")) for s in self.lives])
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
    parser.add_argument("--gib", type=float, default=1.0, help="the back-end's state, in GiB (default 1)")
    parser.add_argument("--dirty-rate", default="10M", help="memstate's --dirty-rate, bytes a second (default 10M)")
    parser.add_argument("--runs", type=int, default=3, help="runs, interleaved, medians taken (default 3)")
    parser.add_argument("--compression", default="none,zstd", help="compressions, each run in turn (default none,zstd)")
    parser.add_argument("--downtime-limit", type=float, default=300.0, metavar="MS",
                        help="the live saves' --downtime-limit, in ms (default 300)")
    parser.add_argument("--max-rounds", type=int, default=100,
                        help="part 2's last live save: 1 ms limit, at most this many rounds, then forced (default 100)")
    parser.add_argument("--idle", type=float, default=2.0,
                        help="seconds the back-end's RSS is watched with no save running, first (default 2)")
    parser.add_argument("--tmpdir", help="where the files go (default: the system's temporary directory)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 256 MiB, 1 run, no zstd, --max-rounds 20")
    args = parser.parse_args(argv)
    if args.quick:
        args.gib, args.runs, args.compression, args.max_rounds = 0.25, 1, "none", 20
    total = int(args.gib * GiB) // MiB * MiB
    compressions = [c.strip() for c in args.compression.split(",") if c.strip()]
    limit = args.downtime_limit / 1000

    started = time.perf_counter()
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-live-", dir=args.tmpdir)))
        log, backend_log = work / "processes.log", work / "memstate.log"
        backend_log.touch()
        bus = stack.enter_context(PrivateBus())
        print(f"bench_live: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, files in {work}, "
              f"{args.runs} run(s), load average {os.getloadavg()[0]:.2f}", flush=True)
        backend = stack.enter_context(backend_process(
            [sys.executable, "-c", _MEMSTATE, "--address", bus.address, "--id", BACKEND_ID, "--size", str(total),
             "--seed", "1", "--dirty-rate", str(parse_size(args.dirty_rate))],
            backend_log,
        ))
        rss_start = proc_status(backend.process.pid)["VmRSS"]
        time.sleep(args.idle)  # the back-end's own drift, with no save running
        idle_growth = proc_status(backend.process.pid)["VmRSS"] - rss_start
        out = str(work / "saved.vms")
        common = ["--address", bus.address]

        def save(extra: list[str], until: tuple[str, str]) -> Save:
            result = run_save([out, *common, *extra], backend, backend_log, log, until=until)
            os.unlink(out)
            return result

        # 1. one-shot and live saves, interleaved
        pairs = [Pair(c) for c in compressions]
        for run in range(args.runs):
            for pair in pairs:
                pair.one_shots.append(save(["--compression", pair.compression], ("saving", "running")))
                pair.lives.append(save(["--compression", pair.compression, "--live", "--resume",
                                        "--downtime-limit", f"{args.downtime_limit:g}"], ("stopped", "running")))
                print(f"  run {run + 1}, {pair.compression}: one-shot {pair.one_shots[-1].doc['seconds']:.2f} s, "
                      f"live downtime {ms(pair.lives[-1].doc['downtime'])}, {pair.lives[-1].doc['rounds']} round(s)",
                      flush=True)

        # 2. many rounds
        rounds = save(["--compression", compressions[0], "--live", "--resume", "--downtime-limit", "1",
                       "--max-rounds", str(args.max_rounds), "--force"], ("stopped", "running"))
        rss_end = proc_status(backend.process.pid)["VmRSS"]

    # report
    print()
    print(f"1. Live save against one-shot save: {size_name(total)} of memstate state rewritten at {args.dirty_rate}/s,")
    print(f"   to a file, medians of {args.runs} run(s); live saves with --downtime-limit {args.downtime_limit:g}")
    names = {"none": "none", "zstd": "zstd -1"}
    rows = [["", *(names.get(p.compression, p.compression) for p in pairs)]]
    columns = [p.rows(limit) for p in pairs]
    for i, (label, _) in enumerate(columns[0]):
        rows.append([label, *(column[i][1] for column in columns)])
    table(rows)
    print()
    print("2. Memory: the VMM helper's peak RSS, and the back-end's VmHWM during the save (reset just")
    print("   before) above its VmRSS before the save, of which lasting (its VmRSS after the save), and")
    print("   above its VmRSS after the save; the largest over the runs")
    rows = [["save", "VMM peak RSS", "back-end peak", "lasting", "peak above after", "s (max)", "rounds"]]
    for pair in pairs:
        name = names.get(pair.compression, pair.compression)
        rows.append(memory_row(f"one-shot, {name}", pair.one_shots))
        rows.append(memory_row(f"live, {name}", pair.lives))
    rows.append(memory_row(f"live, 1 ms limit, --max-rounds {args.max_rounds} --force", [rounds]))
    table(rows)
    print(f"   that last save: pre-copy {secs(rounds.doc['precopy_time'])}, {mib(rounds.doc['stream_bytes'])} of stream, "
          f"downtime {ms(rounds.doc['downtime'])}")
    saves = sum(len(p.one_shots) + len(p.lives) for p in pairs) + 1
    print(f"   that save's switch: {rounds.doc['switch_reason']}")
    print(f"   back-end VmRSS: {mib(rss_start)} at the start, {mib(rss_end)} after all {saves} saves; idle, before the")
    print(f"   first save, it grew by {size_text(idle_growth)} in {args.idle:g} s while its writer rewrote blocks")
    print()
    print(f"bench_live: done in {time.perf_counter() - started:.0f} s, load average {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
