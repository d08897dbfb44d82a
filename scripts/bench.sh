#!/usr/bin/env bash
# Sets up (see setup.sh) and runs the benchmarks: the stream (bench_stream.py),
# the transfers (bench_transfer.py; extra arguments go to it, e.g. --quick),
# VMState1 inline against hand-written back-ends (bench_inline.py), the load
# (bench_load.py), then the live save (bench_live.py); of the extra arguments
# only --quick goes to these three, which makes them smoke runs too.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$root/scripts/setup.sh"
cd "$root"
live_args=()
for arg in "$@"; do
    if [[ $arg == --quick ]]; then
        live_args+=(--quick)
    fi
done
"$root/.venv/bin/python" benchmarks/bench_stream.py
echo
"$root/.venv/bin/python" benchmarks/bench_transfer.py "$@"
echo
"$root/.venv/bin/python" benchmarks/bench_inline.py "${live_args[@]}"
echo
"$root/.venv/bin/python" benchmarks/bench_load.py "${live_args[@]}"
echo
"$root/.venv/bin/python" benchmarks/bench_live.py "${live_args[@]}"
echo
exec "$root/.venv/bin/python" benchmarks/bench_migrate.py "${live_args[@]}"
