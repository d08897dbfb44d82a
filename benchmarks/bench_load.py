"""Load benchmark: `dbus-vmstate2 load` against the raw pipe and `zstd -dc`.

Run (after `source scripts/setup.sh` made .venv):

    .venv/bin/python benchmarks/bench_load.py [--sizes 1G] [--linear 256M,1G,2G,4G] [--runs 3] [--quick]

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

The ratio is the baseline's time over the load's (1.0: as fast; the target
is at least 0.8).  Beside the times: page faults per GiB of state (minor
faults, of the VMM helper and of the back-end during the load) and peak
memory (the VMM's ru_maxrss; the back-end's VmHWM growth over its state).
``--linear`` times the warm uncompressed load of random state at several
sizes, to show that its time per GiB is flat.  The best of --runs is taken;
no figure is asserted.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

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


def pipeline(first: list[str], size: int) -> float:
    """Seconds for ``first | consumer``; checks the consumer got ``size`` bytes."""
    t0 = time.perf_counter()
    producer = subprocess.Popen(first, stdout=subprocess.PIPE)
    consumer = subprocess.run([sys.executable, "-c", _CONSUMER], stdin=producer.stdout, capture_output=True, text=True)
    producer.stdout.close()
    producer.wait()
    seconds = time.perf_counter() - t0
    if consumer.returncode or producer.returncode or int(consumer.stdout) != size:
        raise RuntimeError(f"{' '.join(first)} | consumer failed: {consumer.stderr}")
    return seconds


def minflt(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[7])


def timed_load(address: str, path: Path, backend_id: str, log: Path) -> dict[str, float]:
    """One load into a fresh back-end: seconds, faults per GiB and memory of both sides."""
    argv = [sys.executable, "-m", "dbus_vmstate2.examples.memstate", "--address", address, "--id", backend_id,
            "--dbus-incoming"]  # fmt: skip
    with backend_process(argv, log) as backend:
        pid = backend.process.pid
        rss_before = proc_status(pid)["VmRSS"]
        reset_hwm(pid)
        faults_before = minflt(pid)
        with log.open("a") as out:
            t0 = time.perf_counter()
            process = subprocess.Popen([sys.executable, "-m", "dbus_vmstate2", "load", str(path), "--address", address],
                                       stdin=subprocess.DEVNULL, stdout=out, stderr=out, cwd=ROOT)  # fmt: skip
            _, status, usage = os.wait4(process.pid, 0)
            seconds = time.perf_counter() - t0
        if os.waitstatus_to_exitcode(status):
            raise RuntimeError(f"load of {path} failed; see {log}")
        after = proc_status(pid)
        return {
            "seconds": seconds,
            "vmm_faults": usage.ru_minflt,
            "backend_faults": minflt(pid) - faults_before,
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1G", help="state sizes compared with the baselines (default 1G)")
    parser.add_argument("--linear", default="256M,1G,2G,4G", help="sizes of the linearity run (default 256M,1G,2G,4G)")
    parser.add_argument("--runs", type=int, default=3, help="runs, best taken (default 3)")
    parser.add_argument("--tmpdir", help="where the files go (default: the system's temporary directory)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 64 MiB, 1 run, linear 32M,64M")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.linear, args.runs = "64M", "32M,64M", 1
    if shutil.which("zstd") is None:
        parser.error("the zstd command is needed for the baseline (apt-get install zstd)")
    sizes = [parse_size(s) for s in args.sizes.split(",") if s]
    linear = [parse_size(s) for s in args.linear.split(",") if s]

    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-load-", dir=args.tmpdir)))
        log = work / "processes.log"
        bus = stack.enter_context(PrivateBus())
        print(f"bench_load: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, best of {args.runs}, "
              f"load average {os.getloadavg()[0]:.2f}", flush=True)
        print("| state | size | cache | baseline | baseline s | load s | ratio | faults/GiB VMM | faults/GiB back-end | VMM peak RSS | back-end growth / state |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for kind in ("random", "compressible"):
            for size in sizes:
                state = work / f"{kind}.state"
                make_state(kind, size, state)
                subprocess.run(["zstd", "-q", "-1", "-f", str(state), "-o", f"{state}.zst"], check=True)
                files = {c: work / f"{kind}-{c}.vms" for c in ("none", "zstd")}
                for compression, path in files.items():
                    saved_file(bus.address, state, compression, path, log)
                for cache in ("cold", "warm"):
                    for compression, path in files.items():
                        source = state if compression == "none" else Path(f"{state}.zst")
                        first = ["cat", str(source)] if compression == "none" else ["zstd", "-dc", str(source)]
                        best_base, best = float("inf"), None
                        for _ in range(args.runs):
                            for f in (source, path):
                                drop_cache(f) if cache == "cold" else warm_cache(f)
                            best_base = min(best_base, pipeline(first, size))
                            drop_cache(path) if cache == "cold" else warm_cache(path)
                            run = timed_load(bus.address, path, "bench", log)
                            if best is None or run["seconds"] < best["seconds"]:
                                best = run
                        base = "raw pipe" if compression == "none" else "zstd -dc"
                        print(f"| {kind} | {size // MiB} MiB | {cache} | {base} | {best_base:.2f} | {best['seconds']:.2f} | "
                              f"{best_base / best['seconds']:.2f} | {per_gib(best['vmm_faults'] * 4096, size) / GiB:.2f} GiB | "
                              f"{per_gib(best['backend_faults'] * 4096, size) / GiB:.2f} GiB | {best['vmm_rss'] / MiB:.0f} MiB | "
                              f"{best['backend_growth'] / size:.2f}x |", flush=True)  # fmt: skip
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
            best_load = best_raw = float("inf")
            for _ in range(args.runs):
                warm_cache(state)
                best_raw = min(best_raw, pipeline(["cat", str(state)], size))
                warm_cache(path)
                best_load = min(best_load, timed_load(bus.address, path, "bench", log)["seconds"])
            print(f"| {size // MiB} MiB | {best_load:.2f} | {per_gib(best_load, size):.2f} | {per_gib(best_raw, size):.2f} |",
                  flush=True)  # fmt: skip
            state.unlink()
            path.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
