"""Migration benchmark: the downtime of a live migration against a one-shot stop-and-copy.

Run (after `bash scripts/setup.sh` made .venv; the veth link needs root):

    .venv/bin/python benchmarks/bench_migrate.py [--gib 1] [--dirty-rate 10M] [--runs 3] [--quick]

The issue's setting: 1 GiB of state dirtying 10 MiB/s (the example back-end,
`memstate --dirty-rate`), migrated by the real commands, `dbus-vmstate2
incoming` on the destination and `dbus-vmstate2 migrate` on the source, each
side with its own private dbus-daemon, over two links in turn:

* loopback TCP (`tcp:127.0.0.1:PORT`, `--insecure-plain-tcp`);
* a veth pair between two network namespaces, capped at --rate (1 Gbit/s)
  in both directions with `tc ... tbf` (skipped, with the reason, where
  namespaces cannot be made).

On each link, each run does, in turn, with the same back-ends:

a. a one-shot stop-and-copy (each migration into a fresh destination
   back-end, started with --dbus-incoming as a real one is): the library's `migrate()` told to switch over
   before anything is sent (its `switch_over` event set from the start), so
   StopCopy quiesces the back-end at once and the whole state crosses while
   it is stopped: all of it is downtime;
b. a live migration: `dbus-vmstate2 migrate URI --json --downtime-limit MS`.

The downtime of both is their JSON `downtime`: from the switch-over, when
StopCopy quiesces the back-end, to the destination's acknowledgement (every
stream verified, every back-end committed there).  After each run the source
is resumed (`dbus-vmstate2 resume`) for the next.  Target: the live downtime
at most 0.05x the one-shot's, and within --downtime-limit.  The machine is
shared and noisy, so the figures are medians of --runs runs, each run's
printed too.  No figure is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dbus_vmstate2.privatebus import PrivateBus  # noqa: E402
from tests import netns  # noqa: E402
from tests.conftest import start_memstate  # noqa: E402

COMMAND = [sys.executable, "-m", "dbus_vmstate2"]


def oneshot_source(uri: str, address: str) -> int:
    """The one-shot stop-and-copy, as a subprocess (inside the source's namespace)."""
    from dbus_vmstate2.vmm.migrate import migrate
    from dbus_vmstate2.vmm.session import open_session
    from dbus_vmstate2.vmm.uri import parse_uri

    async def run() -> dict:
        now = asyncio.Event()
        now.set()  # switch over at the first look: before anything is sent
        async with open_session(address, require=True) as session:
            summary = await migrate(session.bus, session.backends, parse_uri(uri), switch_over=now)
        return summary.as_dict()

    print(json.dumps(asyncio.run(run())))
    return 0


def incoming(address: str, uri: str, prefix: list[str]) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen([*prefix, *COMMAND, "incoming", uri, "--address", address, "--insecure-plain-tcp"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)  # fmt: skip
    assert process.stderr is not None
    line = process.stderr.readline()
    if "listening on " not in line:
        process.kill()
        raise RuntimeError(f"incoming did not listen: {line}{process.stderr.read()}")
    return process, line.split("listening on ", 1)[1].strip()


def migrate_once(src_bus: str, dst_bus: str, link: dict, how: str, limit_ms: float) -> dict:
    # A fresh destination back-end, waiting for its state as a real one does
    # (--dbus-incoming): replacing a previous run's 1 GiB would be timed too.
    backend = start_memstate(dst_bus, "fs", "--dbus-incoming")
    try:
        return _migrate_once(src_bus, dst_bus, link, how, limit_ms)
    finally:
        backend.stop()


def _migrate_once(src_bus: str, dst_bus: str, link: dict, how: str, limit_ms: float) -> dict:
    dest, uri = incoming(dst_bus, link["listen"], link["dst"])
    if how == "oneshot":
        argv = [*link["src"], sys.executable, __file__, "--oneshot-source", uri, src_bus]
    else:
        argv = [*link["src"], *COMMAND, "migrate", uri, "--address", src_bus, "--json", "--insecure-plain-tcp",
                "--downtime-limit", str(limit_ms)]  # fmt: skip
    started = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=600)
    seconds = time.monotonic() - started
    _, err = dest.communicate(timeout=120)
    if done.returncode != 0 or dest.returncode != 0:
        raise RuntimeError(f"{how} migration failed: {done.stderr[-2000:]} / destination: {err[-2000:]}")
    resumed = subprocess.run([*COMMAND, "resume", "--address", src_bus], capture_output=True, text=True, cwd=ROOT, timeout=60)
    if resumed.returncode != 0:
        raise RuntimeError(f"resume failed: {resumed.stderr}")
    summary = json.loads(done.stdout)
    summary["wall"] = seconds
    return summary


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f} ms"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0, help="the back-end's state, in GiB (default 1)")
    parser.add_argument("--dirty-rate", default="10M", help="memstate --dirty-rate (default 10M)")
    parser.add_argument("--runs", type=int, default=3, help="runs per link, medians taken (default 3)")
    parser.add_argument("--downtime-limit", type=float, default=300.0, metavar="MS", help="default 300")
    parser.add_argument("--rate", default="1gbit", help="the veth link's tbf rate (default 1gbit)")
    parser.add_argument("--links", default="loopback,veth", help="default loopback,veth")
    parser.add_argument("--quick", action="store_true", help="smoke run: 256 MiB, 1 run")
    parser.add_argument("--oneshot-source", nargs=2, metavar=("URI", "ADDRESS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.oneshot_source:
        return oneshot_source(*args.oneshot_source)
    if args.quick:
        args.gib, args.runs = 0.25, 1
    size = f"{int(args.gib * 1024)}M"
    print(f"migration: {size} of state dirtying {args.dirty_rate}/s, {args.runs} run(s) per link, "
          f"downtime limit {args.downtime_limit:g} ms")  # fmt: skip
    hosts = None
    results: dict[str, dict[str, list[dict]]] = {}
    with PrivateBus() as src_bus, PrivateBus() as dst_bus:
        # No --report: its digest of the whole state at quiesce and after a
        # load would be counted in the downtime (the tests check the bytes).
        source = start_memstate(src_bus.address, "fs", "--size", size, "--seed", "1", "--dirty-rate", args.dirty_rate,
                                timeout=600)  # fmt: skip
        try:
            links = {}
            if "loopback" in args.links:
                links["loopback TCP"] = {"listen": "tcp:127.0.0.1:0", "src": [], "dst": []}
            if "veth" in args.links:
                why = netns.why_not()
                if why is not None:
                    print(f"veth link skipped: {why}")
                else:
                    hosts = netns.make()
                    hosts.cap(args.rate, burst="4mb")
                    links[f"veth, tbf {args.rate}"] = {"listen": f"tcp:{hosts.dst_addr}:4444",
                                                       "src": hosts.exec(hosts.src), "dst": hosts.exec(hosts.dst)}  # fmt: skip
            for name, link in links.items():
                results[name] = {"oneshot": [], "live": []}
                for run in range(args.runs):
                    for how in ("oneshot", "live"):
                        summary = migrate_once(src_bus.address, dst_bus.address, link, how, args.downtime_limit)
                        results[name][how].append(summary)
                        print(f"  {name}, run {run + 1}, {how}: downtime {ms(summary['downtime'])} "
                              f"(expected {ms(summary['expected_downtime'])}, stop-copy "
                              f"{ms(summary['stop_copy_time'])}), {summary['rounds']} round(s), "
                              f"{summary['stream_bytes'] / (1 << 20):.0f} MiB, total {summary['total_time']:.1f} s",
                              flush=True)  # fmt: skip
        finally:
            if hosts is not None:
                netns.remove(hosts)
            source.stop()
    print()
    print(f"| link | one-shot downtime | live downtime (each run) | expected (each run) | live / one-shot | "
          f"within {args.downtime_limit:g} ms |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|")
    for name, by in results.items():
        one = statistics.median(s["downtime"] for s in by["oneshot"])
        live_each = [s["downtime"] for s in by["live"]]
        live = statistics.median(live_each)
        within = sum(d <= args.downtime_limit / 1000 for d in live_each)
        expected = ", ".join(ms(s["expected_downtime"]) for s in by["live"])
        print(f"| {name} | {one:.2f} s | {ms(live)} ({', '.join(ms(d)[:-3] for d in live_each)}) | {expected} | "
              f"**{live / one:.3f}** | {within} of {len(live_each)} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
