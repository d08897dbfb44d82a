"""The introspection a back-end serves: exactly interfaces/*.xml.

dbus-fast builds an interface's introspection from its Python methods: the
in-arguments are named after the parameters, but out-arguments and signal
arguments have no names and no member has annotations.  A client reading
``busctl introspect`` then sees less than the XML promises (which out
argument is which; that ``State`` announces its changes; that ``Id`` never
changes).  :class:`DescribedInterface` fills in what Python cannot say, from
two tables its subclass declares beside its methods, and serves that.  A
test compares busctl's view of a running back-end with the XML, member by
member, argument by argument, annotation by annotation.
"""

# No "from __future__ import annotations": ServiceInterface subclasses are
# read by dbus-fast, which evaluates annotations.
import inspect
from typing import ClassVar

from dbus_fast import introspection as intr
from dbus_fast.service import ServiceInterface

EMITS_CHANGED = "org.freedesktop.DBus.Property.EmitsChangedSignal"
"""The annotation that says how a property announces its changes: ``true``
(PropertiesChanged with the value), ``const`` (it never changes), ..."""


class DescribedInterface(ServiceInterface):
    """A ServiceInterface whose introspection names every argument and
    carries annotations.

    Subclasses set:

    * ``OUT_ARGS``: for each method with out-arguments, their names in order;
    * ``ANNOTATIONS``: for each member that has them, name -> value.

    Signal arguments are named after the signal function's parameters.  The
    description is built once, in the constructor, so a table that does not
    fit the methods fails at once, not when a client introspects.
    """

    OUT_ARGS: ClassVar[dict[str, tuple[str, ...]]] = {}
    ANNOTATIONS: ClassVar[dict[str, dict[str, str]]] = {}

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self._description = self._describe(super().introspect())

    def introspect(self) -> intr.Interface:
        """What the bus serves for this interface (dbus-fast calls this)."""
        return self._description

    def _describe(self, plain: intr.Interface) -> intr.Interface:
        members = {m.name for m in (*plain.methods, *plain.signals, *plain.properties)}
        unknown = (set(self.OUT_ARGS) | set(self.ANNOTATIONS)) - members
        if unknown:
            raise TypeError(f"{type(self).__name__}: no such member {sorted(unknown)}")
        methods = []
        for m in plain.methods:
            names = self.OUT_ARGS.get(m.name, ())
            if len(names) != len(m.out_args):
                raise TypeError(f"{type(self).__name__}.{m.name}: {len(m.out_args)} out arguments, {len(names)} names")
            out = [intr.Arg(a.signature, intr.ArgDirection.OUT, n) for a, n in zip(m.out_args, names, strict=True)]
            methods.append(intr.Method(m.name, m.in_args, out, self._annotations(m.name)))
        signals = []
        for s in plain.signals:
            fn = inspect.unwrap(getattr(type(self), s.name))
            names = list(inspect.signature(fn).parameters)[1:]  # after self
            if len(names) != len(s.args):
                raise TypeError(f"{type(self).__name__}.{s.name}: {len(s.args)} arguments, {len(names)} parameters")
            # A signal's arguments have no direction attribute (the D-Bus
            # specification allows only "out", and the XML leaves it out).
            args = [intr.Arg(a.signature, None, n) for a, n in zip(s.args, names, strict=True)]
            signals.append(intr.Signal(s.name, args, self._annotations(s.name)))
        properties = [
            intr.Property(p.name, p.signature, p.access, annotations=self._annotations(p.name)) for p in plain.properties
        ]
        return intr.Interface(plain.name, methods, signals, properties)

    def _annotations(self, member: str) -> dict[str, str]:
        return dict(self.ANNOTATIONS.get(member, {}))
