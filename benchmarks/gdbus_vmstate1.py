"""A minimal hand-written org.qemu.VMState1 back-end on GDBus: the baseline of bench_inline.py.

What a helper written by hand against QEMU's interface does, and nothing
more: it queues on ``org.qemu.VMState1``, exports ``Id``, ``Save() -> ay``
(its state as it is, one GLib.Bytes shared with the reply, no copy) and
``Load(ay)`` (keeps the bytes it got), at ``/org/qemu/VMState1``, and
prints ``READY <unique name>`` once on the bus.  It does not use the
project: it runs under a Python with PyGObject, e.g. Debian's
``/usr/bin/python3`` with ``apt-get install python3-gi gir1.2-glib-2.0``.

    python3 benchmarks/gdbus_vmstate1.py ADDRESS ID STATE_FILE
"""

import signal
import sys

import gi

gi.require_version("Gio", "2.0")
from gi.repository import Gio, GLib  # noqa: E402

XML = """<node><interface name="org.qemu.VMState1">
  <property name="Id" type="s" access="read"/>
  <method name="Load"><arg type="ay" name="data" direction="in"/></method>
  <method name="Save"><arg type="ay" name="data" direction="out"/></method>
</interface></node>"""


def main(address: str, backend_id: str, state_file: str) -> int:
    with open(state_file, "rb") as file:
        state = GLib.Bytes.new(file.read())
    byte_array = GLib.VariantType.new("ay")

    def on_call(connection, sender, path, interface, method, parameters, invocation):
        nonlocal state
        if method == "Save":
            reply = GLib.Variant.new_from_bytes(byte_array, state, True)
            invocation.return_value(GLib.Variant.new_tuple(reply))
        else:  # Load
            state = parameters.get_child_value(0).get_data_as_bytes()
            invocation.return_value(None)

    def on_get(connection, sender, path, interface, name):
        return GLib.Variant("s", backend_id)

    flags = Gio.DBusConnectionFlags.AUTHENTICATION_CLIENT | Gio.DBusConnectionFlags.MESSAGE_BUS_CONNECTION
    connection = Gio.DBusConnection.new_for_address_sync(address, flags, None, None)
    interface = Gio.DBusNodeInfo.new_for_xml(XML).interfaces[0]
    connection.register_object("/org/qemu/VMState1", interface, on_call, on_get, None)
    # Queue on the name (flags 0), as QEMU expects of its helpers.
    connection.call_sync(
        "org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus", "RequestName",
        GLib.Variant("(su)", ("org.qemu.VMState1", 0)), None, Gio.DBusCallFlags.NONE, -1, None,
    )
    print(f"READY {connection.get_unique_name()}", flush=True)
    loop = GLib.MainLoop()
    GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, signal.SIGTERM, loop.quit)
    loop.run()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
