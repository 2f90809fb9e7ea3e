"""The xen plugin's hook implementations (entry point ``pvcore.plugins: xen``).

Xen specific, and nothing else:

* detect: ``/sys/hypervisor/type`` is ``xen``, a xenstore socket or xenbus
  device, or a libvirt connection of type Xen;
* probe: the devices in this backend domain's xenstore ``backend`` tree
  whose type has a front door here (:data:`FRONT_DOORS`, :mod:`pvcore_xen.xenbus`);
* memory: grant DMA addresses mapped through the host (:mod:`pvcore_xen.grants`);
* notification: interdomain event channels;
* stream/transport: Xen's own PV protocols, which Linux's front ends speak:
  netif for net (:mod:`pvcore_xen.netif`) and the console ring
  (:mod:`pvcore_xen.console`).

:class:`XenPlugin` holds what the hooks need: the host (``/dev/xen`` by
default), the xenstore path and this backend's domain id. The entry point
registers this module, whose hooks are those of a default :class:`XenPlugin`
(backend domain ``$PVCORE_XEN_DOMID``, else 0); tests register their own on
the simulated host.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
from collections.abc import Mapping
from typing import Any

from pvcore.contract import (
    CONTRACT_VERSION,
    DaemonContext,
    Detection,
    DeviceInstance,
    DeviceSlot,
    FrontDoor,
    HostContext,
    OptionSpec,
    PluginInfo,
)
from pvcore.hookspecs import hookimpl
from pvcore_xen.blkback import XenBlockBackend
from pvcore_xen.console import XenConsoleBackend
from pvcore_xen.grants import EventChannelSpec, GrantLayout, GrantMemory
from pvcore_xen.host import EventChannel, LinuxXenHost, XenHost
from pvcore_xen.netif import XenNetBackend
from pvcore_xen.xenbus import HYPERVISOR, XenbusBackend
from pvcore_xen.xenstore import XenstoreClient
from pvcore_xen.xs_wire import XenstoreError

log = logging.getLogger("pvcore.xen")

MAX_DOMID = 0x7FEF
"""DOMID_FIRST_RESERVED - 1: the largest id of a real domain."""


DOMAIN_FIX = (
    "on xen, write the guest's domain id and the device id, e.g. domain=3/0 "
    "(xl domid NAME; the device id is the <devid> of backend/<type>/<domid>/<devid> in xenstore)"
)

FRONT_DOORS: dict[str, type[XenbusBackend]] = {"block": XenBlockBackend, "net": XenNetBackend, "console": XenConsoleBackend}
"""Device class -> the xenbus backend that serves it; its ``kind`` is the xenstore type (``vif``, ``console``)."""


def parse_domain(text: str) -> tuple[int, int]:
    """``DOMID`` or ``DOMID/DEVID`` (the ``domain=`` option) as (domid, devid); devid defaults to 0."""
    domid_text, _, devid_text = str(text).partition("/")
    try:
        domid, devid = int(domid_text, 10), int(devid_text or "0", 10)
    except ValueError:
        domid = devid = -1
    if not 1 <= domid <= MAX_DOMID or not 0 <= devid <= 0xFFFFFFFF:
        raise ValueError(f"domain={text!r}: {DOMAIN_FIX}")
    return domid, devid


def parse_domain_option(text: str) -> str:
    """The ``domain=`` option of a device xen serves: ``text`` once :func:`parse_domain` accepts it."""
    try:
        parse_domain(text)
    except ValueError:
        raise ValueError(DOMAIN_FIX) from None
    return text


DOMAIN_OPTION = OptionSpec(
    "DOMID/DEVID: the guest's domain id and the xenstore device id (see pvcore probe), e.g. 3/0",
    parse=parse_domain_option,
    required=True,
)
"""xen's ``domain=``: required, and a domain id with a device id instead of a guest name."""


def parse_on_off(text: str) -> bool:
    """``on``/``off`` (also yes/no, true/false, 1/0)."""
    lowered = str(text).strip().lower()
    if lowered in ("on", "yes", "true", "1"):
        return True
    if lowered in ("off", "no", "false", "0"):
        return False
    raise ValueError(f"{text!r}: expected on or off")


ATTACHABLE = ("block", "net", "console")
"""Classes whose xenstore nodes pvcore can write itself (``attach=on``)."""

ATTACH_OPTION = OptionSpec(
    "on: write the device's xenstore nodes (as xl block-attach does) when they do not exist; "
    "a disk then lives under backend/pvcore-vbd and a NIC under backend/pvcore-vif, which blkback and netback leave alone",
    parse=parse_on_off,
    default=False,
)


class XenPlugin:
    """The xen plugin's hooks, bound to one host, xenstore and backend domain."""

    def __init__(self, host: XenHost | None = None, *, xenstore_path: str | None = None, backend_domid: int = 0) -> None:
        self._host = host
        self.xenstore_path = xenstore_path
        self.backend_domid = backend_domid

    def __repr__(self) -> str:
        return f"XenPlugin(backend dom{self.backend_domid}, xenstore {self.xenstore_path or 'default'})"

    @property
    def host(self) -> XenHost:
        """The host (the Linux ``/dev/xen`` one unless another was given)."""
        if self._host is None:
            self._host = LinuxXenHost()
        return self._host

    @hookimpl
    def pvcore_plugin_info(self) -> PluginInfo:
        """The xen plugin."""
        return PluginInfo(
            name="xen",
            contract=CONTRACT_VERSION,
            hypervisor=HYPERVISOR,
            primitives={"detect", "probe", "memory", "notification", "stream"},
            device_classes=set(FRONT_DOORS),
            description="Xen: xenstore probe, event channels, grants, and Xen's PV protocols (netif, console ring)",
        )

    @hookimpl
    def pvcore_device_options(self) -> Mapping[str, Mapping[str, OptionSpec]]:
        """``domain=DOMID/DEVID`` for every class: which xenstore device a pvcore device serves."""
        options = {device_class: {"domain": DOMAIN_OPTION} for device_class in FRONT_DOORS}
        for device_class in ATTACHABLE:
            options[device_class] = {**options[device_class], "attach": ATTACH_OPTION}
        return options

    @hookimpl
    def pvcore_detect(self, host: HostContext) -> Detection | None:
        """A libvirt connection of type Xen, ``/sys/hypervisor/type`` saying xen, or a xenstore endpoint."""
        if host.libvirt_driver() == "Xen":
            return Detection(HYPERVISOR, 90, "libvirt connection type is Xen")
        try:
            hypervisor_type = host.path("/sys/hypervisor/type").read_text().strip()
        except OSError:
            hypervisor_type = ""
        if hypervisor_type == "xen":
            return Detection(HYPERVISOR, 80, "/sys/hypervisor/type is xen")
        for endpoint in ("/var/run/xenstored/socket", "/dev/xen/xenbus"):
            if host.path(endpoint).exists():
                return Detection(HYPERVISOR, 50, f"{endpoint} exists (but /sys/hypervisor/type does not say xen)")
        return None

    @hookimpl
    def pvcore_probe(self, host: HostContext) -> list[DeviceSlot]:
        """The devices of this backend domain's xenstore tree that a front door here serves (:data:`FRONT_DOORS`).

        Runs its own event loop in a worker thread, so it may be called from
        any thread (but must not block the loop that serves the xenstore it reads).
        """
        path = self.xenstore_path or host.environ.get("XENSTORED_PATH")
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="xen-probe") as worker:
            return worker.submit(asyncio.run, self._probe(path)).result()

    async def _probe(self, path: str | None) -> list[DeviceSlot]:
        slots: list[DeviceSlot] = []
        async with await XenstoreClient.connect(path) as client:
            for device_class, door in FRONT_DOORS.items():
                kind = door.kind
                root = f"/local/domain/{self.backend_domid}/backend/{kind}"
                for domid_text in await _children(client, root):
                    for devid_text in await _children(client, f"{root}/{domid_text}"):
                        address = f"{root}/{domid_text}/{devid_text}"
                        if not (domid_text.isdigit() and devid_text.isdigit()):
                            log.warning("xenstore %s: not a <domid>/<devid> backend node; skipped", address)
                            continue
                        domid, devid = int(domid_text), int(devid_text)
                        if kind == "console" and devid == 0:
                            continue  # the primary console: xenconsoled's, never a front door's
                        properties = {"devid": str(devid), "domain": f"{domid}/{devid}"}
                        for node in ("state", "frontend", "mac"):
                            try:
                                properties[node] = (await client.read(f"{address}/{node}")).decode("ascii", "replace")
                            except XenstoreError:
                                continue
                        slots.append(DeviceSlot(HYPERVISOR, device_class, address, str(domid), properties))
        return slots

    @hookimpl
    def pvcore_map_memory(self, layout: Any) -> GrantMemory | None:
        """The grant address space of ``layout.domid``, mapped lazily through ``layout.host``."""
        if not isinstance(layout, GrantLayout):
            return None
        return GrantMemory(layout.domid, layout.host)

    @hookimpl
    def pvcore_open_notifier(self, channel: Any) -> EventChannel | None:
        """Bind the interdomain event channel the guest allocated for this domain (``OSError`` if it cannot)."""
        if not isinstance(channel, EventChannelSpec):
            return None
        return self.host.bind_interdomain(channel.domid, channel.port)

    @hookimpl
    def pvcore_front_door(self, device: DeviceInstance, context: DaemonContext) -> FrontDoor:
        """The xenbus backend of the device's class (:data:`FRONT_DOORS`), serving its engine."""
        config = device.config
        domid, devid = parse_domain(config.get("domain", ""))
        where = {
            "primitives": context.primitives,
            "host": self.host,
            "xenstore_path": self.xenstore_path,
            "backend_domid": self.backend_domid,
            "domid": domid,
            "devid": devid,
            "name": config.name,
            "attach": bool(config.get("attach", False)),
        }
        door = FRONT_DOORS.get(config.device_class)
        if door is None:
            raise ValueError(
                f"{config.name}: xen serves {', '.join(sorted(FRONT_DOORS))} with Xen's PV protocols, not {config.device_class}"
            )
        return door(device.engine, **where)


async def _children(client: XenstoreClient, path: str) -> list[str]:
    try:
        return await client.directory(path)
    except XenstoreError as exc:
        if exc.name == "ENOENT":
            return []
        raise


def backend_domid_from_environment() -> int:
    """This backend's domain id: ``$PVCORE_XEN_DOMID``, 0 (dom0) when unset or empty."""
    text = os.environ.get("PVCORE_XEN_DOMID", "")
    try:
        domid = int(text or "0", 10)
    except ValueError:
        domid = -1
    if not 0 <= domid <= MAX_DOMID:
        raise ValueError(
            f"PVCORE_XEN_DOMID={text!r} is not a domain id: set it to the id (0..{MAX_DOMID}) of the domain "
            "pvcore runs in, or unset it for dom0"
        )
    return domid


default_plugin = XenPlugin(backend_domid=backend_domid_from_environment())
"""The plugin the entry point registers (through the module-level hooks below)."""

pvcore_plugin_info = default_plugin.pvcore_plugin_info
pvcore_detect = default_plugin.pvcore_detect
pvcore_device_options = default_plugin.pvcore_device_options
pvcore_probe = default_plugin.pvcore_probe
pvcore_map_memory = default_plugin.pvcore_map_memory
pvcore_open_notifier = default_plugin.pvcore_open_notifier
pvcore_front_door = default_plugin.pvcore_front_door
