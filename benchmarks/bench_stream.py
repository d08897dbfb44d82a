"""Stream benchmark: framing, zstd encode against the `zstd` command, decode.

Run (after `bash scripts/test.sh` or `source scripts/setup.sh` made .venv):

    .venv/bin/python benchmarks/bench_stream.py [--mib 128] [--runs 3]

Prints MiB/s of raw (uncompressed) state, best of --runs, for two kinds of
data: JSON-lines-like inode/handle tables (compressible) and random bytes
(incompressible).  The machine is shared and noisy, so the zstd figures are
also given as a ratio to the `zstd -1 --single-thread` command timed in the
same run on the same bytes (its process start-up, timed on an empty file, is
subtracted), and to `zstd -b1` (libzstd in memory, no I/O at all).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from dbus_vmstate2.stream import NEED_DATA, Compression, StreamDecoder, StreamEncoder  # noqa: E402

MiB = 1 << 20


def inode_table(size: int, seed: int = 1) -> bytes:
    rnd, lines, n = random.Random(seed), [], 0
    while n < size:
        line = json.dumps({
            "ino": rnd.getrandbits(40), "parent": rnd.getrandbits(40), "generation": rnd.randrange(1 << 16),
            "refcount": rnd.randrange(8), "handle": f"{rnd.getrandbits(128):032x}", "mode": 0o100644,
            "path": f"/srv/share/d{rnd.randrange(1000)}/f{rnd.randrange(100000)}.dat",
            "mtime": round(rnd.uniform(1.6e9, 1.8e9), 6),
        }).encode() + b"\n"  # fmt: skip
        lines.append(line)
        n += len(line)
    return b"".join(lines)[:size]


def best(runs: int, fn) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def encode(data: memoryview, compression: Compression, record: int, workers: int = 0) -> int:
    enc = StreamEncoder("bench", compression, level=1, workers=workers)
    wire = sum(map(len, enc.start()))
    for off in range(0, len(data), record):
        wire += sum(map(len, enc.record(data[off : off + record])))  # the chunks are dropped, as after a write
    return wire + sum(map(len, enc.finish()))


def encoded(data: memoryview, compression: Compression, record: int) -> bytes:
    enc = StreamEncoder("bench", compression, level=1)
    out = enc.start()
    for off in range(0, len(data), record):
        out += enc.record(data[off : off + record])
    return b"".join(out + enc.finish())


def decode(stream: bytes, chunk: int, payloads: bool = True) -> None:
    dec, view = StreamDecoder("bench", payloads=payloads), memoryview(stream)
    for off in range(0, len(stream), chunk):
        dec.feed(view[off : off + chunk])  # read-only slices, as bytes from os.read()
        while dec.next_event() is not NEED_DATA:
            pass
    dec.feed_eof()
    while dec.next_event() is not NEED_DATA:
        pass
    assert dec.done


def zstd_cli(path: str, runs: int) -> tuple[float, float]:
    """Seconds for `zstd -1 --single-thread` on ``path`` (start-up subtracted), and zstd -b1's MB/s."""
    empty = path + ".empty"
    open(empty, "wb").close()
    cmd = ["zstd", "-1", "--single-thread", "-q", "-c"]

    def run(p: str) -> None:
        subprocess.run([*cmd, p], stdout=subprocess.DEVNULL, check=True)

    startup = best(runs, lambda: run(empty))
    seconds = best(runs, lambda: run(path)) - startup
    bench = subprocess.run(["zstd", "-b1", "-i2", "--single-thread", path], capture_output=True, text=True)
    speeds = re.findall(r"([\d.]+) MB/s", bench.stdout + bench.stderr)
    return seconds, float(speeds[0]) * 1e6 / MiB if speeds else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=128, help="MiB of state per data kind (default 128)")
    ap.add_argument("--runs", type=int, default=3, help="runs per figure; the best is kept (default 3)")
    ap.add_argument("--record-mib", type=int, default=1, help="record size in MiB (default 1)")
    args = ap.parse_args()
    size, runs, record = args.mib * MiB, args.runs, args.record_mib * MiB
    print(f"{args.mib} MiB per data kind, {args.record_mib} MiB records, best of {runs}; MiB/s of raw state\n")
    for kind, data in (("compressible (inode table)", inode_table(size)), ("incompressible (random)", os.urandom(size))):
        view = memoryview(data)
        rate = lambda seconds: size / seconds / MiB  # noqa: E731
        plain, packed = encoded(view, Compression.NONE, record), encoded(view, Compression.ZSTD, record)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "state")
            with open(path, "wb") as f:
                f.write(data)
            cli_s, cli_b = zstd_cli(path, runs)
        rows = [
            ("framing, uncompressed: encode", rate(best(runs, lambda: encode(view, Compression.NONE, record)))),
            ("framing, uncompressed: decode, 1 MiB chunks", rate(best(runs, lambda: decode(plain, MiB)))),
            ("framing, uncompressed: decode, 64 KiB chunks (pipe)", rate(best(runs, lambda: decode(plain, 64 << 10)))),
            ("framing, uncompressed: skim (payloads=False)", rate(best(runs, lambda: decode(plain, MiB, False)))),
            ("zstd -1 command, --single-thread (start-up subtracted)", rate(cli_s)),
            ("zstd -b1 (libzstd in memory, no I/O)", cli_b),
        ]
        ours = rate(best(runs, lambda: encode(view, Compression.ZSTD, record)))
        rows.append(("zstd level 1 encode, 0 workers", ours))
        w2 = rate(best(runs, lambda: encode(view, Compression.ZSTD, max(record, 4 * MiB), 2)))
        rows.append((f"zstd level 1 encode, 2 workers, {max(record, 4 * MiB) >> 20} MiB records", w2))
        rows.append(("zstd decode (full verify), 1 MiB chunks", rate(best(runs, lambda: decode(packed, MiB)))))
        rows.append(("zstd skim (payloads=False)", rate(best(runs, lambda: decode(packed, MiB, False)))))
        print(f"== {kind}: {size / len(packed):.2f}x smaller with zstd -1")
        for name, value in rows:
            print(f"  {name:58s} {value:8.0f}")
        print(f"  {'ratio: ours 0 workers / zstd -1 command':58s} {ours / rate(cli_s):8.2f}")
        print(f"  {'ratio: ours 0 workers / zstd -b1':58s} {ours / cli_b:8.2f}")
        print(f"  {'ratio: ours 2 workers / zstd -1 command':58s} {w2 / rate(cli_s):8.2f}\n")


if __name__ == "__main__":
    main()
