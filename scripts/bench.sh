#!/usr/bin/env bash
# Sets up (see setup.sh) and runs the benchmarks: the stream (bench_stream.py),
# the transfers (bench_transfer.py; extra arguments go to it, e.g. --quick),
# then the live save (bench_live.py; of the extra arguments only --quick,
# which makes it a smoke run too).
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
exec "$root/.venv/bin/python" benchmarks/bench_live.py "${live_args[@]}"
