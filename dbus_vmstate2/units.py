"""Sizes and durations for people: pure, so that the pure planner
(``vmm/precopy.py``) and the command print them alike."""

from __future__ import annotations

import argparse

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    """``4096``, ``64K``, ``256M``, ``2G`` -> bytes (binary units)."""
    unit = text[-1:].upper() if text[-1:].isalpha() else ""
    try:
        value = int(text[: len(text) - len(unit)]) * _UNITS[unit]
    except (KeyError, ValueError):
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 4096, 64K, 256M, 2G)") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"a size cannot be negative: {text!r}")
    return value


def size(n: float) -> str:
    """``n`` bytes in binary units, for people."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{int(n)} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def duration(seconds: float) -> str:
    """``seconds`` as ``12 s``, ``3 min 04 s`` or ``1 h 02 min``."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
