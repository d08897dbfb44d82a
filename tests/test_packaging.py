"""What a distribution takes: the sdist and the wheel, built with the oldest
setuptools the project claims, installed in a fresh virtual environment and
run, with tests run from the unpacked sdist; and the Debian package, built
with dpkg-buildpackage from packaging/debian, its files listed and its
module run."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
import venv
import zipfile
from pathlib import Path

import pytest

from .conftest import ROOT

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
# The tests that read what lies outside the package: docs/, interfaces/, packaging/, scripts/.
FROM_THE_SDIST = ["tests/test_states.py", "tests/test_vmstate1.py", "tests/test_cli_docs.py", "tests/test_units.py",
                  "tests/test_guides.py"]  # fmt: skip
IGNORED = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis")


def project_files() -> list[str]:
    """The project's files: git's list (tracked, and new but not ignored) in a
    checkout; everything but build and cache directories elsewhere (an
    unpacked sdist)."""
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-co", "--exclude-standard"],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    if listed.returncode == 0 and listed.stdout:
        return [name for name in listed.stdout.splitlines() if (ROOT / name).is_file()]
    files = []
    for directory, subdirs, names in os.walk(ROOT):
        subdirs[:] = [d for d in subdirs if not IGNORED(directory, [d])]
        files += [os.path.relpath(os.path.join(directory, n), ROOT) for n in names if not IGNORED(directory, [n])]
    return files


def copy_project(target: Path) -> Path:
    for name in project_files():
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target / name)
    return target


def run(argv: list[str | Path], timeout: float = 600, **kwargs) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout, **kwargs)
    assert done.returncode == 0, f"{argv}: exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def fresh_venv(path: Path) -> Path:
    venv.EnvBuilder(with_pip=True, clear=True).create(path)
    return path / "bin" / "python"


def oldest_setuptools() -> str:
    [requirement] = [r for r in PYPROJECT["build-system"]["requires"] if r.startswith("setuptools")]
    match = re.fullmatch(r"setuptools>=([0-9.]+)", requirement)
    assert match, f"the build requirement {requirement!r} should be setuptools>=VERSION"
    return match.group(1)


# the sdist and the wheel -----------------------------------------------------------


@pytest.mark.slow
def test_the_sdist_and_wheel_build_with_the_oldest_setuptools_claimed_install_and_run(tmp_path):
    source = copy_project(tmp_path / "source")
    dist = tmp_path / "dist"
    # In build's isolated environment, pinned by a pip constraint to the
    # oldest setuptools the build requirement admits; the wheel is built
    # from the sdist.
    constraint = tmp_path / "constraint.txt"
    constraint.write_text(f"setuptools=={oldest_setuptools()}\n")
    run([sys.executable, "-m", "build", "--outdir", dist, source], cwd=tmp_path,
        env={**os.environ, "PIP_CONSTRAINT": str(constraint)})  # fmt: skip
    sdist, wheel = dist / f"dbus_vmstate2-{VERSION}.tar.gz", dist / f"dbus_vmstate2-{VERSION}-py3-none-any.whl"

    with tarfile.open(sdist) as tar:
        prefix = f"dbus_vmstate2-{VERSION}/"
        in_sdist = {name.removeprefix(prefix) for name in tar.getnames()}
        if hasattr(tarfile, "data_filter"):  # 3.11.4 on; 3.12 on warns without a filter
            tar.extractall(tmp_path / "unpacked", filter="data")
        else:
            tar.extractall(tmp_path / "unpacked")
    wanted = {"LICENSE", "NOTICE", "README.md", "CHANGELOG.md", "pyproject.toml"}
    wanted |= {n for n in project_files() if n.split("/")[0] in ("tests", "docs", "interfaces", "packaging", "scripts")}
    assert wanted - in_sdist == set()
    with zipfile.ZipFile(wheel) as whl:
        names = whl.namelist()
        metadata = whl.read(f"dbus_vmstate2-{VERSION}.dist-info/METADATA").decode()
    assert {f"dbus_vmstate2-{VERSION}.dist-info/licenses/{n}" for n in ("LICENSE", "NOTICE")} <= set(names)
    assert "License-Expression: GPL-2.0-or-later" in metadata
    assert "dbus_vmstate2/examples/memstate.py" in names

    python = fresh_venv(tmp_path / "venv")
    run([python, "-m", "pip", "install", "-q", f"{wheel}[test]"])
    outside = tmp_path / "elsewhere"  # so that nothing is imported from a source tree
    outside.mkdir()
    done = run([python.parent / "dbus-vmstate2", "--version"], cwd=outside)
    assert done.stdout == f"dbus-vmstate2 {VERSION}\n"
    done = run([python, "-m", "dbus_vmstate2.examples.memstate", "--help"], cwd=outside)
    assert "--dbus-address" in done.stdout and "--notify" in done.stdout
    done = run([python, "-c", "import dbus_vmstate2; print(dbus_vmstate2.__file__)"], cwd=outside)
    assert done.stdout.startswith(str(tmp_path / "venv"))

    # The tests, from the unpacked sdist, in that environment.
    unpacked = tmp_path / "unpacked" / f"dbus_vmstate2-{VERSION}"
    env = {**os.environ, "PATH": f"{python.parent}{os.pathsep}{os.environ['PATH']}"}
    done = run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow", *FROM_THE_SDIST],
               cwd=unpacked, env=env, timeout=900)  # fmt: skip
    assert " passed" in done.stdout and " failed" not in done.stdout


# the Debian package -----------------------------------------------------------------

DEB_FILES = [
    "./usr/bin/dbus-vmstate2",
    "./usr/lib/python3/dist-packages/dbus_vmstate2/__init__.py",
    "./usr/lib/python3/dist-packages/dbus_vmstate2/backend/core.py",
    "./usr/lib/python3/dist-packages/dbus_vmstate2/examples/memstate.py",
    f"./usr/lib/python3/dist-packages/dbus_vmstate2-{VERSION}.dist-info/entry_points.txt",
    "./usr/share/dbus-1/interfaces/org.qemu.VMState1.xml",
    "./usr/share/dbus-1/interfaces/org.qemu.VMState2.xml",
    "./usr/share/dbus-1/system.d/dbus-vmstate2.conf",
    "./usr/share/dbus-vmstate2/bus.conf",
    "./lib/systemd/system/dbus-vmstate2-bus@.service",
    "./lib/systemd/system/dbus-vmstate2-memstate@.service",
    "./usr/share/man/man1/dbus-vmstate2.1.gz",
    "./usr/share/bash-completion/completions/dbus-vmstate2",
    "./usr/share/zsh/vendor-completions/_dbus-vmstate2",
    "./usr/share/doc/dbus-vmstate2/copyright",
    "./usr/share/doc/dbus-vmstate2/README.Debian",
    "./usr/share/doc/dbus-vmstate2/guide-daemon-author.md.gz",
    "./usr/share/doc/dbus-vmstate2/guide-vmm-integrator.md.gz",
    "./usr/share/doc/dbus-vmstate2/guide-operator.md.gz",
]


def build_env(home: Path) -> dict[str, str]:
    """What a package build sees: the system's tools only, with no virtual
    environment or other Python first on PATH (pybuild runs "python3.11 -m
    build"), and a home of its own, as a build daemon gives it."""
    home.mkdir(exist_ok=True)
    return {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "HOME": str(home)}


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("dpkg-buildpackage") is None, reason="dpkg-buildpackage (Debian's dpkg-dev) is not installed")
def test_the_debian_package_builds_and_holds_the_module_interfaces_and_units(tmp_path):
    tree = copy_project(tmp_path / f"dbus-vmstate2-{VERSION}")
    shutil.copytree(tree / "packaging" / "debian", tree / "debian")
    env = build_env(tmp_path / "home")
    missing = subprocess.run(["dpkg-checkbuilddeps"], cwd=tree, env=env, capture_output=True, text=True, timeout=60)
    if missing.returncode != 0:
        pytest.skip(f"the build dependencies are not installed (scripts/setup.sh installs them): {missing.stderr.strip()}")
    run(["dpkg-buildpackage", "-us", "-uc", "-b"], cwd=tree, env=env, timeout=900)
    deb = tmp_path / f"dbus-vmstate2_{VERSION}-1_all.deb"

    listing = run(["dpkg-deb", "-c", deb]).stdout
    files = {line.split()[5] for line in listing.splitlines()}
    assert [f for f in DEB_FILES if f not in files] == []
    fields = run(["dpkg-deb", "-f", deb, "Depends", "Recommends"]).stdout
    assert "python3" in fields and "dbus-daemon" in fields

    # Installed where dpkg would put it (under a root of our own), the module runs.
    root = tmp_path / "root"
    run(["dpkg-deb", "-x", deb, root])
    site = root / "usr" / "lib" / "python3" / "dist-packages"
    env = {**os.environ, "PYTHONPATH": str(site)}  # its dependencies come from this test's environment
    done = run([sys.executable, "-c", "import dbus_vmstate2; print(dbus_vmstate2.__file__)"], cwd=tmp_path, env=env)
    assert done.stdout.startswith(str(site))
    done = run([sys.executable, "-m", "dbus_vmstate2", "--version"], cwd=tmp_path, env=env)
    assert done.stdout == f"dbus-vmstate2 {VERSION}\n"
    assert (root / "usr" / "bin" / "dbus-vmstate2").read_text().startswith("#!/usr/bin/python3\n")
    done = run([sys.executable, "-m", "dbus_vmstate2.examples.memstate", "--help"], cwd=tmp_path, env=env)
    assert "--dbus-incoming" in done.stdout
