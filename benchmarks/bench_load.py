"""Load benchmark: `dbus-vmstate2 load` against the raw pipe and `zstd -dc`.

Run (after `source scripts/setup.sh` made .venv):

    .venv/bin/python benchmarks/bench_load.py [--sizes 1G] [--linear 256M,1G,2G,4G] [--runs 6] [--quick]

A load is what the VM waits for on the destination.  For each state kind
(``random``: pseudo-random bytes, as memstate makes them; ``compressible``:
JSON-lines-like text with zero pages between, about 5x with zstd level 1),
each size and each page cache temperature (``cold``: the input file dropped
from the page cache with posix_fadvise before each run; ``warm``: read once
before), this times, in turn, in the same run:

- ``raw``: ``cat STATE | consumer``, the raw state through a pipe into a
  Python consumer that keeps every byte (1 MiB reads, kept in a list): the
  limit for an uncompressed load;
- ``load none``: ``python -m dbus_vmstate2 load FILE`` of a file saved with
  ``--compression none``, into a fresh memstate (``--dbus-incoming``, which
  keeps the state it gets), from spawn to exit: start-up, discovery, the
  two-phase load and the commit;
- ``zstd -dc``: ``zstd -dc STATE.zst | consumer`` (``zstd -1`` of the raw
  state), the limit for a compressed load;
- ``load zstd``: the same load of a file saved with zstd (level 1).

Each round times every case once, baseline and load one after the other,
and the rounds alternate which goes first.  Before each side a cold case
drops both sides' files from the page cache (a warm case reads its own
once): on this project's test VM a cold side that ran while the other
side's file, just read, still sat in the page cache took up to twice as
long, and the fixed order of earlier versions (baseline, then load) charged
that to the load alone.  A round's ratio is its baseline time over its load
time (1.0: as fast; the target is at least 0.8); the figure is the geometric
mean of the rounds' ratios (--runs is even, so both orders weigh alike), and
beside it their range.  The times are medians over the rounds.  Beside
the times: the system time of each side (the baseline's two processes; the
VMM helper and the back-end), page faults per GiB of state (minor faults,
of the VMM helper and of the back-end during the load) and peak memory (the
VMM's ru_maxrss; the back-end's VmHWM growth over its state).  On a virtual
machine whose balloon reports freed memory to its host, first-touched
memory and page cache cost the host's faults, and the system times show how
much of a round that was.  The package's bytecode is compiled first, as an
installed package's is.  ``--linear`` times the warm uncompressed load of
random state at several sizes, to show that its time per GiB is flat (best
of --runs).  No figure is asserted.
"""

from __future__ import annotations

import argparse
import compileall
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from statistics import geometric_mean, median

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_transfer import backend_process, proc_status, reset_hwm  # noqa: E402

from dbus_vmstate2.privatebus import PrivateBus  # noqa: E402
from dbus_vmstate2.units import parse_size  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30

_CONSUMER = """
import os, sys
kept = []
while data := os.read(0, 1 << 20):
    kept.append(data)
print(sum(map(len, kept)))
"""


def make_state(kind: str, size: int, path: Path) -> None:
    """Write ``size`` bytes of state of ``kind`` to ``path``."""
    rnd = random.Random(7)
    with path.open("wb") as out:
        left = size
        while left:
            if kind == "random":
                block = rnd.randbytes(min(left, MiB))
            else:  # JSON lines, then a zero page run, about 5x with zstd -1
                lines = b"".join(
                    b'{"inode": %d, "path": "/srv/share/dir%03d/file%05d", "mode": 33188, "size": %d}\n'
                    % (rnd.randrange(1 << 30), rnd.randrange(1000), rnd.randrange(100000), rnd.randrange(1 << 20))
                    for _ in range(4096)
                )
                block = (lines[: 3 * MiB // 4] + bytes(MiB // 4))[: min(left, MiB)]
            out.write(block)
            left -= len(block)


def drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def warm_cache(path: Path) -> None:
    with path.open("rb") as file:
        while file.read(8 * MiB):
            pass


def prepare(cache: str, own: Path, other: Path) -> None:
    """Cold: neither file in the page cache; warm: this side's file read once."""
    if cache == "cold":
        drop_cache(own)
        drop_cache(other)
    else:
        warm_cache(own)


def pipeline(first: list[str], size: int) -> dict[str, float]:
    """Seconds and system seconds of ``first | consumer``; checks the consumer got ``size`` bytes."""
    system_before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_stime
    t0 = time.perf_counter()
    producer = subprocess.Popen(first, stdout=subprocess.PIPE)
    consumer = subprocess.run([sys.executable, "-c", _CONSUMER], stdin=producer.stdout, capture_output=True, text=True)
    producer.stdout.close()
    producer.wait()
    seconds = time.perf_counter() - t0
    if consumer.returncode or producer.returncode or int(consumer.stdout) != size:
        raise RuntimeError(f"{' '.join(first)} | consumer failed: {consumer.stderr}")
    return {"seconds": seconds, "system": resource.getrusage(resource.RUSAGE_CHILDREN).ru_stime - system_before}


def proc_stat(pid: int) -> tuple[int, float]:
    """Minor faults and system seconds of a running process, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[7]), int(fields[12]) / os.sysconf("SC_CLK_TCK")


def timed_load(address: str, path: Path, backend_id: str, log: Path) -> dict[str, float]:
    """One load into a fresh back-end: seconds, system seconds, faults and memory of both sides."""
    argv = [sys.executable, "-m", "dbus_vmstate2.examples.memstate", "--address", address, "--id", backend_id,
            "--dbus-incoming"]  # fmt: skip
    with backend_process(argv, log) as backend:
        pid = backend.process.pid
        rss_before = proc_status(pid)["VmRSS"]
        reset_hwm(pid)
        faults_before, system_before = proc_stat(pid)
        with log.open("a") as out:
            t0 = time.perf_counter()
            process = subprocess.Popen([sys.executable, "-m", "dbus_vmstate2", "load", str(path), "--address", address],
                                       stdin=subprocess.DEVNULL, stdout=out, stderr=out, cwd=ROOT)  # fmt: skip
            _, status, usage = os.wait4(process.pid, 0)
            seconds = time.perf_counter() - t0
        if os.waitstatus_to_exitcode(status):
            raise RuntimeError(f"load of {path} failed; see {log}")
        after = proc_status(pid)
        faults, system = proc_stat(pid)
        return {
            "seconds": seconds,
            "system": usage.ru_stime + system - system_before,
            "vmm_faults": usage.ru_minflt,
            "backend_faults": faults - faults_before,
            "vmm_rss": usage.ru_maxrss * 1024,
            "backend_growth": after["VmHWM"] - rss_before,
        }


def saved_file(address: str, state: Path, compression: str, out: Path, log: Path) -> None:
    argv = [sys.executable, "-m", "dbus_vmstate2.examples.memstate", "--address", address, "--id", "bench",
            "--state-file", str(state)]  # fmt: skip
    with backend_process(argv, log):
        subprocess.run([sys.executable, "-m", "dbus_vmstate2", "save", str(out), "--address", address,
                        "--compression", compression], check=True, stdout=subprocess.DEVNULL, cwd=ROOT)  # fmt: skip


def per_gib(value: float, size: int) -> float:
    return value / (size / GiB)


def print_row(kind: str, size: int, case: tuple[str, str], bases: list[dict[str, float]],
              loads: list[dict[str, float]]) -> None:  # fmt: skip
    """One table row: medians over the rounds, the rounds' ratios, and the median load's faults and memory."""
    cache, compression = case
    base, load = (median(run["seconds"] for run in runs) for runs in (bases, loads))
    ratios = sorted(b["seconds"] / l["seconds"] for b, l in zip(bases, loads, strict=True))
    ratio = geometric_mean(ratios)  # half the rounds in each order: see the docstring
    typical = sorted(loads, key=lambda run: run["seconds"])[len(loads) // 2]
    print(f"| {kind} | {size // MiB} MiB | {cache} | {'raw pipe' if compression == 'none' else 'zstd -dc'} "
          f"| {base:.2f} ({median(b['system'] for b in bases):.2f}) | {load:.2f} ({median(l['system'] for l in loads):.2f}) "
          f"| {ratio:.2f} | {ratios[0]:.2f} to {ratios[-1]:.2f} "
          f"| {per_gib(typical['vmm_faults'] * 4096, size) / GiB:.2f} GiB | {per_gib(typical['backend_faults'] * 4096, size) / GiB:.2f} GiB "
          f"| {typical['vmm_rss'] / MiB:.0f} MiB | {typical['backend_growth'] / size:.2f}x |", flush=True)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1G", help="state sizes compared with the baselines (default 1G)")
    parser.add_argument("--linear", default="256M,1G,2G,4G", help="sizes of the linearity run (default 256M,1G,2G,4G)")
    parser.add_argument("--runs", type=int, default=6,
                        help="interleaved rounds, each order of the two sides in half of them (even; default 6)")
    parser.add_argument("--tmpdir", help="where the files go (default: the system's temporary directory)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 64 MiB, 2 runs, linear 32M,64M")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.linear, args.runs = "64M", "32M,64M", 2
    if args.runs < 2 or args.runs % 2:
        parser.error(f"--runs must be even, so that each side goes first as often: not {args.runs}")
    if shutil.which("zstd") is None:
        parser.error("the zstd command is needed for the baseline (apt-get install zstd)")
    sizes = [parse_size(s) for s in args.sizes.split(",") if s]
    linear = [parse_size(s) for s in args.linear.split(",") if s]
    # The command is timed from spawn, so its modules' bytecode must exist,
    # as an installed package's does: under PYTHONDONTWRITEBYTECODE a source
    # tree's would be compiled again by every load (about 0.1 s each).
    compileall.compile_dir(ROOT / "dbus_vmstate2", quiet=1)

    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-load-", dir=args.tmpdir)))
        log = work / "processes.log"
        bus = stack.enter_context(PrivateBus())
        print(f"bench_load: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, {args.runs} "
              f"interleaved rounds (each side first in half), load average {os.getloadavg()[0]:.2f}", flush=True)
        print("| state | size | cache | baseline | baseline s (system) | load s (system) | ratio | rounds' ratios "
              "| faults/GiB VMM | faults/GiB back-end | VMM peak RSS | back-end growth / state |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for kind in ("random", "compressible"):
            for size in sizes:
                state = work / f"{kind}.state"
                make_state(kind, size, state)
                subprocess.run(["zstd", "-q", "-1", "-f", str(state), "-o", f"{state}.zst"], check=True)
                files = {c: work / f"{kind}-{c}.vms" for c in ("none", "zstd")}
                for compression, path in files.items():
                    saved_file(bus.address, state, compression, path, log)
                cases = [(cache, compression) for cache in ("cold", "warm") for compression in files]
                bases: dict[tuple[str, str], list[dict[str, float]]] = {case: [] for case in cases}
                loads: dict[tuple[str, str], list[dict[str, float]]] = {case: [] for case in cases}
                for run in range(args.runs):
                    for cache, compression in cases:
                        path = files[compression]
                        source = state if compression == "none" else Path(f"{state}.zst")
                        first = ["cat", str(source)] if compression == "none" else ["zstd", "-dc", str(source)]

                        for side in ("baseline", "load") if run % 2 == 0 else ("load", "baseline"):
                            if side == "baseline":
                                prepare(cache, source, path)
                                bases[cache, compression].append(pipeline(first, size))
                            else:
                                prepare(cache, path, source)
                                loads[cache, compression].append(timed_load(bus.address, path, "bench", log))
                for case in cases:
                    print_row(kind, size, case, bases[case], loads[case])
                for f in (state, Path(f"{state}.zst"), *files.values()):
                    f.unlink()
        print()
        print("| size | load s (warm, none, random) | s per GiB | raw pipe s per GiB |")
        print("|---|---|---|---|")
        for size in linear:
            state = work / "linear.state"
            make_state("random", size, state)
            path = work / "linear.vms"
            saved_file(bus.address, state, "none", path, log)
            raws, loads_ = [], []
            for run in range(args.runs):
                for side in ("raw", "load") if run % 2 == 0 else ("load", "raw"):
                    if side == "raw":
                        warm_cache(state)
                        raws.append(pipeline(["cat", str(state)], size)["seconds"])
                    else:
                        warm_cache(path)
                        loads_.append(timed_load(bus.address, path, "bench", log)["seconds"])
            best_load, best_raw = min(loads_), min(raws)
            print(f"| {size // MiB} MiB | {best_load:.2f} | {per_gib(best_load, size):.2f} | {per_gib(best_raw, size):.2f} |",
                  flush=True)  # fmt: skip
            state.unlink()
            path.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
