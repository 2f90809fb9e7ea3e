"""End to end over the SIMULATED Xen host: pvcore's daemon serves simulated guests through xenstore.

The PV console ring and the probe; netif is in test_netif.py.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid

from helpers import run
from pvcore_xen.console import IN_SIZE, OUT_SIZE
from pvcore_xen.plugin import XenPlugin
from pvcore_xen.testing.frontend import SimulatedConsoleFrontend
from pvcore_xen.testing.netfront import SimulatedNetFrontend
from pvcore_xen.xenbus import XenbusState
from world import device, xen_world

from pvcore.contract import HostContext
from pvcore.devices.net import format_mac

MAC1 = bytes.fromhex("00163e000001")


class Peer:
    """A person attached to a console, recording what they see."""

    def __init__(self) -> None:
        self.seen = bytearray()

    def deliver(self, data: bytes) -> None:
        """Guest output reaches the person."""
        self.seen += data

    def hangup(self, reason: str) -> None:
        """The console went away."""


def test_console_both_ways_with_wrapping_indexes(tmp_path):
    async def body() -> None:
        async with xen_world(tmp_path, [device("console", "dom1-con", "1/0")]) as world:
            instance, _ = world.served("dom1-con")
            stream = instance.engine
            peer = Peer()
            assert stream.attach(peer)
            front = SimulatedConsoleFrontend(world.host.domains[1], world.clients[1], devid=0, start_index=0xFFFFFF00)
            await front.connect()
            output = bytes(range(256)) * 20
            await front.write(output)
            deadline = time.monotonic() + 5
            while len(peer.seen) < len(output) and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert bytes(peer.seen) == output and len(output) > OUT_SIZE
            typed = os.urandom(3 * IN_SIZE)
            assert stream.input(peer, typed)
            assert await front.read(len(typed)) == typed

    run(body)


def test_probe_lists_the_backend_tree(tmp_path):
    configs = [device("net", "dom1-nic", "1/3", mac=format_mac(MAC1), switch=f"xen-{uuid.uuid4().hex[:8]}"), device("console", "dom2-con", "2/1")]

    async def body() -> None:
        async with xen_world(tmp_path, configs) as world:
            for front in (
                SimulatedNetFrontend(world.host.domains[1], world.clients[1], devid=3),
                SimulatedConsoleFrontend(world.host.domains[2], world.clients[2], devid=1),
            ):  # the handshake moves the state nodes the probe reads: let it settle first
                await front.wait_backend(XenbusState.INIT_WAIT)
            plugin: XenPlugin = world.plugin
            host = HostContext(environ={})
            slots = await asyncio.get_running_loop().run_in_executor(
                None, lambda: world.registry.call("xen", "pvcore_probe", host=host)
            )
            found = {(slot.device_class, slot.domain, slot.properties["devid"]) for slot in slots}
            assert found == {("net", "1", "3"), ("console", "2", "1")}
            await world.clients[0].write("/local/domain/0/backend/console/2/0/state", b"1")
            primary = await asyncio.get_running_loop().run_in_executor(
                None, lambda: world.registry.call("xen", "pvcore_probe", host=host)
            )  # xl's primary console (device 0) is xenconsoled's: never listed as waiting
            assert {(slot.device_class, slot.domain, slot.properties["devid"]) for slot in primary} == found
            direct = await asyncio.get_running_loop().run_in_executor(None, lambda: plugin.pvcore_probe(host=host))
            assert slots == direct

    run(body)
