"""dbus-vmstate2: device-state migration for VMM helper daemons over D-Bus."""
