"""A SIMULATED Xen world for end-to-end tests: xenstored, host, guests, and a pvcore daemon serving them."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import attrs
from pvcore_xen.host import PAGE_SIZE
from pvcore_xen.plugin import XenPlugin, parse_domain
from pvcore_xen.testing.frontend import add_device
from pvcore_xen.testing.host import SimulatedXenHost
from pvcore_xen.testing.xenstored import SimulatedXenstored
from pvcore_xen.virtio import virtio_type
from pvcore_xen.xenstore import XenstoreClient

from pvcore.contract import DeviceConfig
from pvcore.daemon import Daemon
from pvcore.devices import classes
from pvcore.registry import Registry

GUEST_MEMORY = 512 * PAGE_SIZE


@attrs.define
class World:
    """The pieces of one simulated Xen host with pvcore serving its guests."""

    store: SimulatedXenstored
    host: SimulatedXenHost
    clients: dict[int, XenstoreClient]
    registry: Registry
    plugin: XenPlugin
    daemon: Daemon

    def served(self, name: str) -> tuple[Any, Any]:
        """The (device instance, front door) of the device called ``name``."""
        for instance, door in self.daemon.served:
            if instance.config.name == name:
                return instance, door
        raise KeyError(name)


def device(device_class: str, name: str, domain: str, **options: Any) -> DeviceConfig:
    """A device configuration as the daemon receives it."""
    return DeviceConfig(device_class, name, {"domain": domain, **options})


@contextlib.asynccontextmanager
async def xen_world(directory: Path, configs: Sequence[DeviceConfig], domids: Sequence[int] = (1, 2)) -> AsyncIterator[World]:
    """Start a simulated xenstored and host with guests ``domids``, create the devices in xenstore, serve them."""
    store = SimulatedXenstored()
    host = SimulatedXenHost(backend_domid=0)
    clients: dict[int, XenstoreClient] = {}
    daemon: Daemon | None = None
    try:
        for domid in (0, *domids):
            socket_path = directory / f"xenstored-dom{domid}.sock"
            await store.listen(socket_path, domid=domid)
            clients[domid] = await XenstoreClient.connect(socket_path, timeout=2.0)
        for domid in domids:
            host.add_domain(domid, GUEST_MEMORY)
        for config in configs:
            domid, devid = parse_domain(config.options["domain"])
            kind = "console" if config.device_class == "console" else "virtio"
            nodes = {} if kind == "console" else {"type": virtio_type(config.device_class), "transport": "mmio"}
            await add_device(clients[0], backend_domid=0, domid=domid, kind=kind, devid=devid, nodes=nodes)
        registry = Registry()
        for builtin in (classes.block, classes.net, classes.console, classes.rng):
            registry.register(builtin, name=builtin.name)
        plugin = XenPlugin(host, xenstore_path=str(directory / "xenstored-dom0.sock"), backend_domid=0)
        registry.register(plugin, name="xen")
        daemon = Daemon(registry, "xen", configs, run_dir=directory / "run")
        await daemon.start()
        yield World(store, host, clients, registry, plugin, daemon)
    finally:
        if daemon is not None:
            await daemon.stop()
        for client in clients.values():
            await client.close()
        await store.close()
        host.close()
