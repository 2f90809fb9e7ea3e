"""Opening libvirt connections and choosing the hypervisor plugin that serves them.

The plugin is chosen through the detect hook with the connection in
:class:`~pvcore.contract.HostContext`: whichever installed plugin answers for
the connection's driver (the kvm plugin for ``getType() == "QEMU"``, a third
party's for its own) serves that connection's domains, without a change here.
For a remote URI the host's files are not this machine's, so plugins see an
empty root and only the connection speaks.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

from pvcore.contract import Detection, HostContext
from pvcore.libvirt import LibvirtError
from pvcore.registry import Registry

INSTALL_HINT = (
    "libvirt-python is not installed: pip install 'pvcore[libvirt]' "
    "(it builds against libvirt's headers: apt-get install libvirt-dev pkg-config gcc python3-dev)"
)


def import_libvirt() -> ModuleType:
    """The ``libvirt`` module, or :class:`LibvirtError` saying how to install it."""
    try:
        import libvirt
    except ImportError:
        raise LibvirtError(INSTALL_HINT) from None
    # libvirt prints every error to stderr by default; pvcore reports the ones that matter itself.
    libvirt.registerErrorHandler(_ignore_error, None)
    return libvirt


def _ignore_error(_context: Any, _error: Any) -> None:
    """libvirt's error callback: errors are raised as exceptions and reported by the caller."""


def open_connection(uri: str) -> Any:
    """A read-write connection to ``uri``; a failure names the URI and the usual fixes."""
    libvirt = import_libvirt()
    try:
        return libvirt.open(uri)
    except libvirt.libvirtError as exc:
        raise LibvirtError(
            f"cannot connect to {uri}: {exc.get_error_message()} "
            "(is libvirtd running there, and may this user manage it?)"
        ) from None


def is_local_uri(uri: str) -> bool:
    """Whether ``uri`` reaches a hypervisor on this machine (no host part, no remote transport)."""
    parts = urlsplit(uri)
    return not parts.hostname and "+" not in parts.scheme


def detections(registry: Registry, conn: Any, uri: str) -> list[Detection]:
    """Every plugin's answer for ``conn``, most confident first."""
    if is_local_uri(uri):
        return registry.detect(HostContext(libvirt=conn))
    with tempfile.TemporaryDirectory(prefix="pvcore-remote-root-") as empty:
        return registry.detect(HostContext(root=Path(empty), libvirt=conn, environ={}))


def choose_hypervisor(registry: Registry, conn: Any, uri: str, requested: str | None = None) -> str:
    """``requested`` if given, else the plugin that answers for ``conn`` most confidently."""
    available = ", ".join(sorted(registry.hypervisors())) or "none installed"
    if requested:
        if requested not in registry.hypervisors():
            raise LibvirtError(f"no plugin serves hypervisor {requested!r} (installed: {available})")
        return requested
    found = detections(registry, conn, uri)
    if not found:
        raise LibvirtError(
            f"{uri}: no installed plugin answers for libvirt driver {driver_type(conn)!r} "
            f"(installed hypervisor plugins: {available}); install the plugin for it or pass --hypervisor NAME"
        )
    return found[0].hypervisor


def driver_type(conn: Any) -> str:
    """The connection's driver name (``QEMU``, ``Xen``, ``Test``...), or ``unknown``."""
    return HostContext(libvirt=conn).libvirt_driver() or "unknown"


def lookup_domain(conn: Any, name: str) -> Any:
    """The domain called ``name`` (or with that UUID), or :class:`LibvirtError` listing what exists."""
    libvirt = import_libvirt()
    for lookup in (conn.lookupByName, conn.lookupByUUIDString):
        try:
            return lookup(name)
        except libvirt.libvirtError:
            continue
    names = sorted(domain.name() for domain in conn.listAllDomains(0))
    raise LibvirtError(f"no domain {name!r} on {conn.getURI()} (domains: {', '.join(names) or 'none'})")


@contextlib.contextmanager
def libvirt_errors(uri: str) -> Iterator[None]:
    """Turn a libvirt API failure into a one-line :class:`LibvirtError` naming the connection."""
    libvirt = import_libvirt()
    try:
        yield
    except libvirt.libvirtError as exc:
        raise LibvirtError(f"{uri}: {exc.get_error_message()}") from None
