"""A SIMULATED Xen world for end-to-end tests: xenstored, host, guests, and a pvcore daemon serving them."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import pvcore_scsi.plugin
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
    world: World | None = None
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
        registry.register(pvcore_scsi.plugin, name="scsi")  # a device-class plugin, as a third party's would be
        plugin = XenPlugin(host, xenstore_path=str(directory / "xenstored-dom0.sock"), backend_domid=0)
        registry.register(plugin, name="xen")
        daemon = Daemon(registry, "xen", configs, run_dir=directory / "run")
        await daemon.start()
        world = World(store, host, clients, registry, plugin, daemon)
        yield world
    finally:
        if world is not None:
            daemon = world.daemon  # a test may have restarted it
        if daemon is not None:
            await daemon.stop()
        for client in clients.values():
            await client.close()
        await store.close()
        host.close()


async def stop_daemon(world: World, *, crash: bool = False) -> None:
    """Stop the daemon as SIGTERM does, or (``crash``) drop it as a killed process would.

    A crash finishes nothing, publishes nothing and writes nothing to
    xenstore: every queue is detached where it stands (requests the device
    had taken stay unfinished), the xenstore connections close, and the
    simulated host unbinds the backend's event channels as Xen does when the
    backend's process dies. The engines are then closed only to release
    their threads and files (a dead process's writes are in the page cache).
    """
    if not crash:
        await world.daemon.stop()
        return
    loop = asyncio.get_running_loop()
    for instance, door in world.daemon.served:
        door._stopping = True
        if door._runner is not None:
            door._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await door._runner
        session = getattr(door, "session", None)
        if session is not None:
            for queue in session.running.values():
                queue.detach()
            loop.remove_reader(door._error.fileno())
        channel = getattr(door, "channel", None)
        if channel is not None:
            loop.remove_reader(channel.fileno())
            door.stream.on_input = None
        client, door.client = door.client, None
        if client is not None:
            await client.close()
    for instance, _ in world.daemon.served:
        await instance.close()
    world.daemon.served.clear()
    world.host.backend_exited()


async def start_daemon(world: World, configs: Sequence[DeviceConfig]) -> Daemon:
    """A fresh daemon with ``configs`` on the same simulated host and xenstore (a restart); it becomes ``world.daemon``."""
    daemon = Daemon(world.registry, "xen", configs, run_dir=world.daemon.run_dir)
    await daemon.start()
    world.daemon = daemon
    return daemon
