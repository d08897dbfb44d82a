#!/usr/bin/env bash
# Sets up (see setup.sh) and runs the demo: back-ends on a private bus,
# saved and loaded, verified byte for byte.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$root/scripts/setup.sh"
exec "$root/.venv/bin/python" -m dbus_vmstate2.demo "$@"
