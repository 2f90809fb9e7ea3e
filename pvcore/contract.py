"""The values that cross the plugin boundary.

Hook specifications live in :mod:`pvcore.hookspecs`; this module holds the
types their arguments and results are made of, so that a plugin can import
them without importing the daemon. :data:`CONTRACT_VERSION` is the version of
the whole contract (hooks and these types): a plugin states the version it was
built against in :class:`PluginInfo`, and the registry refuses a plugin whose
version it does not support.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import attrs

CONTRACT_VERSION = 2
"""Bumped when a hook or a contract type changes incompatibly."""

SUPPORTED_CONTRACTS = frozenset({2})
"""Contract versions this core can load plugins for."""

CONTRACT_CHANGES = {
    1: (
        "contract 2 calls hypervisor hooks only on the plugin that serves the hypervisor, so "
        "pvcore_probe, pvcore_map_memory, pvcore_open_notifier, pvcore_front_door and pvcore_qemu_args lost "
        "their hypervisor argument (drop it and the 'is this mine?' checks); DaemonContext.hook became "
        "DaemonContext.primitives; the core maps fd memory and adopts eventfds itself; vhost-user moved to "
        "pvcore.transports.vhost_user (see docs/porting.md, 'Contract 2')"
    ),
}
"""For each contract version no longer supported: what changed since, for the registry's refusal."""

PRIMITIVES = ("detect", "probe", "memory", "notification", "stream")
"""The hypervisor primitives a plugin may supply (see docs/architecture.md)."""

DEVICE_CLASSES = ("block", "net", "console", "rng")
"""The device classes the core knows."""


class ContractError(Exception):
    """A plugin answered a hook with something outside the contract."""


@attrs.frozen
class PluginInfo:
    """What a plugin says about itself (answer of ``pvcore_plugin_info``).

    ``hypervisor`` is the name users pass to ``--hypervisor`` (None for a
    plugin that adds device classes only); ``primitives`` and
    ``device_classes`` are what it supplies; ``contract`` is the
    :data:`CONTRACT_VERSION` it was written against.
    """

    name: str
    contract: int
    hypervisor: str | None = None
    primitives: frozenset[str] = attrs.field(default=frozenset(), converter=frozenset)
    device_classes: frozenset[str] = attrs.field(default=frozenset(), converter=frozenset)
    description: str = ""

    @primitives.validator
    def _check_primitives(self, _attr: Any, value: frozenset[str]) -> None:
        unknown = value - set(PRIMITIVES)
        if unknown:
            raise ContractError(f"plugin {self.name}: unknown primitives {sorted(unknown)}")


@attrs.frozen
class OptionSpec:
    """One ``key=value`` option of a device class: its help text and parser.

    ``parse`` turns the string into a value and raises ``ValueError`` with a
    message that names the fix for bad input.
    """

    help: str
    parse: Callable[[str], Any] = str
    required: bool = False
    default: Any = None


@attrs.frozen
class DeviceConfig:
    """One device a user asked for: ``CLASS:key=value,...`` on the command line.

    ``options`` are already parsed by the class's :class:`OptionSpec` s;
    ``name`` is unique within a daemon (``name=`` option, else derived).
    """

    device_class: str
    name: str
    options: Mapping[str, Any] = attrs.field(factory=dict)

    def get(self, key: str, default: Any = None) -> Any:
        """An option's value, or ``default`` when it was not given."""
        value = self.options.get(key)
        return default if value is None else value


@runtime_checkable
class Primitives(Protocol):
    """The memory and notification primitives of one hypervisor, as a ring transport uses them.

    The plugin's own hooks answer where it has them (``pvcore_map_memory``,
    ``pvcore_open_notifier``); otherwise the core's defaults serve
    fd-described memory (:class:`FdMemoryLayout`) and eventfds
    (:class:`EventFdChannel`). See :mod:`pvcore.primitives`.
    """

    def map_memory(self, layout: Any) -> Any:
        """A bounds-checked :class:`~pvcore.ring.memory.GuestMemory` for ``layout``; ``ValueError``/``OSError`` if not."""

    def open_notifier(self, channel: Any) -> Any:
        """A :class:`~pvcore.ring.notify.Notifier` for ``channel``; ``ValueError``/``OSError`` if not."""


@attrs.frozen
class DaemonContext:
    """What the daemon offers a plugin while it builds a front door.

    ``primitives`` maps guest memory and opens notifiers for the hypervisor
    that serves the device; ``run_dir`` is where sockets and state go;
    ``loop`` is the event loop all devices run on; ``switch`` looks up (or
    creates) a named network switch.
    """

    primitives: Primitives
    run_dir: Path
    loop: asyncio.AbstractEventLoop
    switch: Callable[[str], Any]


@runtime_checkable
class DeviceInstance(Protocol):
    """A device engine built for one :class:`DeviceConfig` by its class's factory.

    ``virtio`` is the :class:`~pvcore.virtio.VirtioDevice` for ring front doors
    (None if the class has no ring form); ``engine`` is the
    transport-independent engine that stream front doors use (a
    ``BlockBackend``, a switch port factory, a ``ConsoleStream``, an
    ``EntropySource``; an engine whose stream form is a block medium has a
    ``block_export()``, see :func:`pvcore.streams.nbd.block_export`).
    """

    config: DeviceConfig
    virtio: Any
    engine: Any

    async def start(self) -> None:
        """Start what the engine needs besides its front door (e.g. a console's attach point)."""

    async def close(self) -> None:
        """Finish in-flight work, flush and release the engine's resources."""


@attrs.frozen
class DeviceClass:
    """A device class the core can build (answer of ``pvcore_device_classes``).

    ``create(config, context)`` returns a :class:`DeviceInstance`.
    """

    name: str
    summary: str
    options: Mapping[str, OptionSpec]
    create: Callable[[DeviceConfig, DaemonContext], DeviceInstance]


@runtime_checkable
class FrontDoor(Protocol):
    """How one device is reached by its guest: a vhost-user socket, a chardev
    stream, an NBD server, a xenbus backend... (answer of ``pvcore_front_door``)."""

    description: str

    async def start(self) -> None:
        """Begin serving (e.g. listen on the socket)."""

    async def stop(self) -> None:
        """Stop serving: finish in-flight requests, close connections, remove sockets."""


@attrs.frozen
class HostContext:
    """What detect and probe may look at: the host, and a libvirt connection if any.

    ``root`` prefixes every host path a plugin reads (tests point it at a fake
    tree); ``libvirt`` is an open libvirt connection or None; ``environ`` is the
    process environment to consult.
    """

    root: Path = Path("/")
    libvirt: Any = None
    environ: Mapping[str, str] = attrs.field(factory=lambda: dict(os.environ))

    def path(self, host_path: str) -> Path:
        """``host_path`` under :attr:`root`."""
        return self.root / host_path.lstrip("/")

    def libvirt_driver(self) -> str | None:
        """The libvirt connection's driver (``QEMU``, ``Xen``, ``Test``...), ``unknown`` if it
        cannot say, or None without a connection."""
        if self.libvirt is None:
            return None
        try:
            return str(self.libvirt.getType())
        except Exception:  # libvirt raises its own libvirtError; any failure means unknown
            return "unknown"


@attrs.frozen
class Detection:
    """A plugin's answer that its hypervisor is here (answer of ``pvcore_detect``).

    Higher ``confidence`` wins when several answer (0-100); ``evidence`` says
    what was seen, for ``pvcore probe`` and error messages.
    """

    hypervisor: str
    confidence: int
    evidence: str


@attrs.frozen
class DeviceSlot:
    """A device instance that wants a backend (answer of ``pvcore_probe``).

    ``device_class`` is one of :data:`DEVICE_CLASSES`; ``address`` is the
    hypervisor's name for the slot (a socket path, a xenstore backend path, a
    device-tree unit address); ``properties`` are what matters for serving it
    (a MAC, a socket path...); ``domain`` names the guest.
    """

    hypervisor: str
    device_class: str
    address: str
    domain: str = ""
    properties: Mapping[str, str] = attrs.field(factory=dict)


@attrs.frozen
class FdRegion:
    """One shared-memory region passed as a file descriptor (vhost-user, vfio-user...)."""

    fd: int
    guest_addr: int
    size: int
    user_addr: int
    offset: int


@attrs.frozen
class FdMemoryLayout:
    """Guest memory as a table of fd regions (the payload of vhost-user SET_MEM_TABLE)."""

    regions: tuple[FdRegion, ...]


@attrs.frozen
class EventFdChannel:
    """A notification channel that is an eventfd (KVM ioeventfd / irqfd)."""

    fd: int


@runtime_checkable
class LibvirtXml(Protocol):
    """How one hypervisor's libvirt domains name pvcore's devices (answer of ``pvcore_libvirt_xml``).

    One object both writes a device's element and reads elements back, so the
    two never disagree. Elements are :mod:`xml.etree.ElementTree` elements of
    the domain definition; ``domain`` is the whole ``<domain>`` element.
    """

    def element(self, config: DeviceConfig, domain: Any) -> Any:
        """The ``<devices>`` child that attaches ``config``'s device to ``domain``.

        ``domain`` is only read (e.g. to pick a free disk target). Raises
        ``ValueError`` naming the device and the fix when it cannot be written.
        """

    def served(self, config: DeviceConfig) -> DeviceConfig:
        """``config`` as the element written for it needs it served (e.g. kvm: an rng over EGD)."""

    def socket(self, element: Any) -> str | None:
        """The Unix socket an element of a kind this plugin writes connects to; None for any other element."""

    def slots(self, domain_name: str, domain: Any) -> list[DeviceSlot]:
        """Every device element of ``domain`` that pvcore could serve, of every class :meth:`element` writes."""

    def check(self, domain_name: str, domain: Any, configs: Sequence[DeviceConfig]) -> list[str]:
        """What the definition lacks to serve ``configs`` (e.g. shared memory), each with its fix; empty if nothing."""
