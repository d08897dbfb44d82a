"""``python -m dbus_vmstate2``: the same as the ``dbus-vmstate2`` command."""

import sys

from .entry import main

sys.exit(main())
