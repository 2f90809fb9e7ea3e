"""A SIMULATED Xen world for end-to-end tests: xenstored, host, guests, and a pvcore daemon serving them."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import attrs
from pvcore_xen.host import PAGE_SIZE
from pvcore_xen.plugin import FRONT_DOORS, XenPlugin, parse_domain
from pvcore_xen.testing.frontend import add_device
from pvcore_xen.testing.host import SimulatedXenHost
from pvcore_xen.testing.xenstored import SimulatedXenstored
from pvcore_xen.xenbus import frontend_path
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
            kind = FRONT_DOORS[config.device_class].kind
            mac = {"mac": config.options["mac"]} if "mac" in config.options else {}
            await add_device(clients[0], backend_domid=0, domid=domid, kind=kind, devid=devid, nodes=mac)
            for node, value in mac.items():  # libxl writes the vif's MAC on both sides
                await clients[0].write(f"{frontend_path(kind, domid, devid)}/{node}", value)
        registry = Registry()
        for builtin in (classes.block, classes.net, classes.console, classes.rng):
            registry.register(builtin, name=builtin.name)
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
    xenstore: every ring is left where it stands, the xenstore connections
    close, the NICs' ports leave the switch, and the
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
        for channel in (getattr(door, "channel", None), *(queue.channel for queue in getattr(door, "queues", ()))):
            if channel is not None:  # the dead process's event channels wake nothing
                loop.remove_reader(channel.fileno())
        if hasattr(door, "stream"):
            door.stream.on_input = None
        port = getattr(door, "port", None)
        if port is not None and port.switch is not None:  # the dead process's switch went with it
            port.switch.detach(port)
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
