"""End to end over the SIMULATED Xen host: pvcore's daemon serves simulated guests through xenstore.

Block, net, rng (grant-mapped virtio on the core's engines) and the PV console
ring, each driven by a simulated frontend on the core's reference driver.
"""

from __future__ import annotations

import asyncio
import os
import struct
import time
import uuid

from helpers import run
from pvcore_xen.console import IN_SIZE, OUT_SIZE
from pvcore_xen.plugin import XenPlugin
from pvcore_xen.testing.frontend import SimulatedConsoleFrontend, SimulatedVirtioFrontend
from pvcore_xen.xenbus import XenbusState
from world import device, xen_world

from pvcore.contract import HostContext
from pvcore.devices.block.virtio_blk import (
    REQUEST_HEADER,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
)
from pvcore.devices.net import format_mac

SECTOR = 512
NET_HDR_LEN = 12
MAC1 = bytes.fromhex("00163e000001")
MAC2 = bytes.fromhex("00163e000002")


class Peer:
    """A person attached to a console, recording what they see."""

    def __init__(self) -> None:
        self.seen = bytearray()

    def deliver(self, data: bytes) -> None:
        """Guest output reaches the person."""
        self.seen += data

    def hangup(self, reason: str) -> None:
        """The console went away."""


def test_block_write_flush_read_back(tmp_path):
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(64 * SECTOR))
    payload = os.urandom(4 * SECTOR)

    async def body() -> None:
        async with xen_world(tmp_path, [device("block", "dom1-disk", "1/0", path=str(image))]) as world:
            front = SimulatedVirtioFrontend(world.host.domains[1], world.clients[1], devid=0)
            await front.connect()
            write = await front.request(0, [REQUEST_HEADER.pack(VIRTIO_BLK_T_OUT, 0, 8), payload], [1])
            assert write.data == bytes([VIRTIO_BLK_S_OK])
            flush = await front.request(0, [REQUEST_HEADER.pack(VIRTIO_BLK_T_FLUSH, 0, 0)], [1])
            assert flush.data == bytes([VIRTIO_BLK_S_OK])
            read = await front.request(0, [REQUEST_HEADER.pack(VIRTIO_BLK_T_IN, 0, 8)], [len(payload), 1])
            assert read.data == payload + bytes([VIRTIO_BLK_S_OK])
            assert image.read_bytes()[8 * SECTOR : 12 * SECTOR] == payload
            _, door = world.served("dom1-disk")
            assert door.state == XenbusState.CONNECTED
            await front.close()
            assert not door.connected

    run(body)


def ethernet(dst: bytes, src: bytes, payload: bytes) -> bytes:
    """An Ethernet frame of a local experimental ethertype."""
    return dst + src + struct.pack("!H", 0x88B5) + payload


def test_net_two_domains_ping_through_the_switch(tmp_path):
    switch = f"xen-{uuid.uuid4().hex[:8]}"
    configs = [
        device("net", "dom1-nic", "1/0", mac=format_mac(MAC1), switch=switch),
        device("net", "dom2-nic", "2/0", mac=format_mac(MAC2), switch=switch),
    ]

    async def body() -> None:
        async with xen_world(tmp_path, configs) as world:
            nic1 = SimulatedVirtioFrontend(world.host.domains[1], world.clients[1], devid=0)
            nic2 = SimulatedVirtioFrontend(world.host.domains[2], world.clients[2], devid=0)
            await nic1.connect()
            await nic2.connect()
            assert nic1.config[:6] == MAC1
            for nic in (nic1, nic2):
                for _ in range(4):
                    nic.submit(0, [], [NET_HDR_LEN + 1514])
            ping = ethernet(MAC2, MAC1, b"ping" * 16)
            await nic1.request(1, [bytes(NET_HDR_LEN) + ping], [])
            (received,) = await nic2.wait_used(0, 1)
            assert received.data[NET_HDR_LEN:] == ping
            pong = ethernet(MAC1, MAC2, b"pong" * 16)
            await nic2.request(1, [bytes(NET_HDR_LEN) + pong], [])
            (received,) = await nic1.wait_used(0, 1)
            assert received.data[NET_HDR_LEN:] == pong

    run(body)


def test_rng_bytes_arrive_and_rate_limit_holds(tmp_path):
    async def body() -> None:
        async with xen_world(tmp_path, [device("rng", "dom1-rng", "1/0", rate="1024/400ms")]) as world:
            front = SimulatedVirtioFrontend(world.host.domains[1], world.clients[1], devid=0)
            await front.connect()
            first = await front.request(0, [], [4096])
            assert first.written == 1024 and len(set(first.data)) > 1
            started = time.monotonic()
            front.submit(0, [], [4096])
            (second,) = await front.wait_used(0, 1, timeout=3.0)
            assert second.written == 1024 and second.data != first.data
            assert time.monotonic() - started > 0.1

    run(body)


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
    configs = [device("block", "dom1-disk", "1/51712", path=str(tmp_path / "d.img")), device("console", "dom2-con", "2/0")]
    (tmp_path / "d.img").write_bytes(bytes(SECTOR))

    async def body() -> None:
        async with xen_world(tmp_path, configs) as world:
            for front in (
                SimulatedVirtioFrontend(world.host.domains[1], world.clients[1], devid=51712),
                SimulatedConsoleFrontend(world.host.domains[2], world.clients[2], devid=0),
            ):  # the handshake moves the state nodes the probe reads: let it settle first
                await front.wait_backend(XenbusState.INIT_WAIT)
            plugin: XenPlugin = world.plugin
            host = HostContext(environ={})
            slots = await asyncio.get_running_loop().run_in_executor(
                None, lambda: world.registry.call("xen", "pvcore_probe", host=host)
            )
            found = {(slot.device_class, slot.domain, slot.properties["devid"]) for slot in slots}
            assert found == {("block", "1", "51712"), ("console", "2", "0")}
            direct = await asyncio.get_running_loop().run_in_executor(None, lambda: plugin.pvcore_probe(host=host))
            assert slots == direct

    run(body)
