"""Import back-end modules while the back-end core does not import (TEMPORARY).

On branch ``store`` the core (backend/core.py) is being moved onto the new
state machine and ``import dbus_vmstate2.backend`` fails.  The store and
memstate's daemon code need none of it: this installs a bare package in its
place (the submodules, without ``__init__``), and stand-ins for the names
memstate imports only to serve on a bus.  Delete this module, and its two
uses, once ``import dbus_vmstate2.backend`` works again.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path


def install() -> None:
    """Make ``dbus_vmstate2.backend.<submodule>`` importable, core or not."""
    try:
        import dbus_vmstate2.backend  # noqa: F401
    except ImportError:
        import dbus_vmstate2

        package = types.ModuleType("dbus_vmstate2.backend")
        package.__path__ = [str(Path(dbus_vmstate2.__file__).parent / "backend")]
        sys.modules["dbus_vmstate2.backend"] = package
        from dbus_vmstate2.backend.inline import InlineMode

        package.InlineMode = InlineMode
        package.Backend = package.ThreadedBackend = None  # memstate serves nothing in these tests
