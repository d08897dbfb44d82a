"""Compare a running object's introspection, as busctl prints it, with our XML."""

from __future__ import annotations

import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

INTERFACES = Path(__file__).resolve().parent.parent / "interfaces"


def members_from_xml(interface: str) -> set[tuple[str, str, str, str]]:
    """(name, kind, signature in, signature out) for every member of ``interface``."""
    root = ET.parse(INTERFACES / f"{interface}.xml").getroot()
    [node] = [i for i in root.iter("interface") if i.get("name") == interface]
    members = set()
    for element in node:
        name = "." + element.get("name", "")
        if element.tag == "method":
            args = element.findall("arg")
            sig_in = "".join(a.get("type", "") for a in args if a.get("direction", "in") == "in")
            sig_out = "".join(a.get("type", "") for a in args if a.get("direction") == "out")
            members.add((name, "method", sig_in or "-", sig_out or "-"))
        elif element.tag == "signal":
            sig = "".join(a.get("type", "") for a in element.findall("arg"))
            members.add((name, "signal", sig or "-", "-"))
        elif element.tag == "property":
            members.add((name, "property", element.get("type", ""), ""))
    return members


def members_from_busctl(address: str, destination: str, path: str, interface: str) -> set[tuple[str, str, str, str]]:
    """The same tuples, read from ``busctl introspect`` of the live object."""
    output = subprocess.run(
        ["busctl", f"--address={address}", "introspect", "--no-pager", "--no-legend", destination, path, interface],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    members = set()
    for line in output.splitlines():
        fields = line.split()
        if not fields or not fields[0].startswith("."):
            continue
        name, kind, signature = fields[:3]
        # Methods: NAME method IN OUT FLAGS; properties: NAME property TYPE VALUE FLAGS.
        members.add((name, kind, signature, fields[3] if kind != "property" else ""))
    return members
