#!/usr/bin/env bash
# Sets up (see setup.sh) and runs the benchmarks: the stream (bench_stream.py),
# then the transfers (bench_transfer.py; extra arguments go to it, e.g. --quick).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$root/scripts/setup.sh"
cd "$root"
"$root/.venv/bin/python" benchmarks/bench_stream.py
echo
exec "$root/.venv/bin/python" benchmarks/bench_transfer.py "$@"
