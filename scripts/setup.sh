#!/usr/bin/env bash
# Installs what the demo, the tests and the benchmarks need, then leaves a
# ready virtual environment in .venv.  Safe to run again: it installs only
# what is missing.  Sourced by demo.sh, test.sh and bench.sh.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# Debian packages: the bus daemon, busctl and systemd-analyze, stock QEMU
# (VMState1 interop tests), the zstd command (the benchmark's baseline),
# PyGObject for Debian's python3 (bench_inline.py's hand-written back-end),
# libseccomp (the sandbox test's filter, through pyseccomp), and what
# tests/test_packaging.py builds the Debian package with (packaging/debian:
# its Build-Depends).
python=${PYTHON:-python3}
need_apt=()
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "ok installed"; }
# Debian's own python3 makes virtual environments only with python3-venv.
"$python" -c 'import ensurepip' 2>/dev/null || need_apt+=(python3-venv)
command -v dbus-daemon >/dev/null || need_apt+=(dbus-daemon)
command -v busctl >/dev/null || need_apt+=(systemd)
command -v qemu-system-x86_64 >/dev/null || need_apt+=(qemu-system-x86)
command -v zstd >/dev/null || need_apt+=(zstd)
installed libseccomp2 || need_apt+=(libseccomp2)
installed python3-gi || need_apt+=(python3-gi)
installed gir1.2-glib-2.0 || need_apt+=(gir1.2-glib-2.0)
for package in dpkg-dev debhelper dh-python python3-all pybuild-plugin-pyproject python3-setuptools groff-base; do
    installed "$package" || need_apt+=("$package")
done
if ((${#need_apt[@]})); then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
    echo "setup: Python 3.11 or newer is needed ($python is $("$python" --version 2>&1))" >&2
    exit 1
}

venv="$root/.venv"
if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
stamp="$venv/.installed"
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ]; then
    "$venv/bin/python" -m pip install -q --disable-pip-version-check -e "$root[test]"
    touch "$stamp"
fi
