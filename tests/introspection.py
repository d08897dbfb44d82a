"""Compare a running object's introspection, as busctl shows it, with our XML."""

from __future__ import annotations

import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

INTERFACES = Path(__file__).resolve().parent.parent / "interfaces"

Member = tuple[str, str, tuple, tuple]
"""(kind, name, attributes, children): a canonical, comparable form."""


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
    members = set()
    for fields in busctl_table(address, destination, path, interface):
        name, kind, signature = fields[:3]
        # Methods: NAME method IN OUT FLAGS; properties: NAME property TYPE VALUE FLAGS.
        members.add((name, kind, signature, fields[3] if kind != "property" else ""))
    return members


def busctl_table(address: str, destination: str, path: str, interface: str) -> list[list[str]]:
    """The rows of ``busctl introspect``'s table for ``interface``, split into fields."""
    output = _busctl(address, "introspect", "--no-legend", destination, path, interface)
    return [line.split() for line in output.splitlines() if line.split() and line.split()[0].startswith(".")]


def described_from_xml(interface: str) -> set[Member]:
    """Every member of ``interface`` in interfaces/, with all its arguments and annotations."""
    return _described(ET.parse(INTERFACES / f"{interface}.xml").getroot(), interface)


def described_from_busctl(address: str, destination: str, path: str, interface: str) -> set[Member]:
    """The same, from the XML the live object serves (``busctl introspect --xml-interface``)."""
    xml = _busctl(address, "introspect", "--xml-interface", destination, path)
    return _described(ET.fromstring(xml), interface)


def _described(root: ET.Element, interface: str) -> set[Member]:
    [node] = [i for i in root.iter("interface") if i.get("name") == interface]
    return {_canonical(element) for element in node}


def _canonical(element: ET.Element) -> Member:
    children = tuple(_canonical(child) for child in element)  # args keep their order
    return (element.tag, element.get("name", ""), tuple(sorted(element.attrib.items())), children)


def _busctl(address: str, *args: str) -> str:
    return subprocess.run(
        ["busctl", f"--address={address}", "--no-pager", *args], check=True, capture_output=True, text=True, timeout=30
    ).stdout
