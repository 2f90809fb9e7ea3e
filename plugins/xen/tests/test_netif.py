"""netif on the SIMULATED Xen host: a netfront is one more port on the core's switch.

The simulated netfront (pvcore_xen.testing.netfront) exchanges frames with a
NIC of another front door on the same switch (the core's netdev stream door,
which kvm and lpar guests' QEMU connects to) and with a second netfront;
the switch drops a forged source MAC; checksums left blank are completed.
"""

from __future__ import annotations

import asyncio
import struct
import time
import uuid

from helpers import run
from pvcore_xen.netif import NETIF_RSP_OKAY, NETTXF_CSUM_BLANK, PVCORE_KIND
from pvcore_xen.ring import RSP_EVENT, RSP_PROD
from pvcore_xen.testing.frontend import wait_readable
from pvcore_xen.testing.netfront import SimulatedNetFrontend
from pvcore_xen.xenbus import XenbusState, backend_path
from world import device, xen_world

from pvcore.contract import HostContext
from pvcore.devices.net import format_mac, get_switch
from pvcore.devices.net.checksum import internet_checksum
from pvcore.streams.netdev_stream import NetdevStreamFrontDoor

MAC1 = bytes.fromhex("00163e000001")
MAC2 = bytes.fromhex("00163e000002")
KVM_MAC = bytes.fromhex("525400000003")
LENGTH = struct.Struct(">I")


def ethernet(dst: bytes, src: bytes, payload: bytes, ethertype: int = 0x88B5) -> bytes:
    """An Ethernet frame (a local experimental ethertype unless told)."""
    return dst + src + struct.pack("!H", ethertype) + payload


def udp_frame(dst: bytes, src: bytes, payload: bytes) -> bytes:
    """An IPv4 UDP frame whose UDP checksum is left as garbage (what NETTXF_csum_blank announces)."""
    udp = struct.pack("!HHHH", 5000, 6000, 8 + len(payload), 0xBEEF) + payload
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0, bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])))
    ip[10:12] = internet_checksum(ip).to_bytes(2, "big")
    return ethernet(dst, src, bytes(ip) + udp, 0x0800)


def nics(switch: str, mtu: int = 1500):  # type: ignore[no-untyped-def]
    return [
        device("net", "dom1-nic", "1/0", mac=format_mac(MAC1), switch=switch, mtu=mtu),
        device("net", "dom2-nic", "2/0", mac=format_mac(MAC2), switch=switch, mtu=mtu),
    ]


class StreamNic:
    """A QEMU NIC on the netdev stream door: length-prefixed frames over a Unix socket."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    def send(self, frame: bytes) -> None:
        self.writer.write(LENGTH.pack(len(frame)) + frame)

    async def receive(self, timeout: float = 5.0) -> bytes:
        (length,) = LENGTH.unpack(await asyncio.wait_for(self.reader.readexactly(4), timeout))
        return await asyncio.wait_for(self.reader.readexactly(length), timeout)


def test_a_netfront_and_a_qemu_nic_share_the_switch(tmp_path):
    switch = f"xen-{uuid.uuid4().hex[:8]}"

    async def body() -> None:
        async with xen_world(tmp_path, nics(switch)[:1]) as world:
            door = NetdevStreamFrontDoor(get_switch(switch), tmp_path / "qemu-nic.sock", KVM_MAC, name="kvm-nic")
            await door.start()
            try:
                qemu = StreamNic(*await asyncio.open_unix_connection(str(tmp_path / "qemu-nic.sock")))
                await asyncio.sleep(0.05)
                front = SimulatedNetFrontend(world.host.domains[1], world.clients[1], devid=0)
                await front.connect()
                front.post_rx(8)
                ping = ethernet(KVM_MAC, MAC1, b"ping" * 100)
                front.send(ping, first_id=7)
                assert await front.wait_tx(1) == [(7, NETIF_RSP_OKAY)]
                assert await qemu.receive() == ping
                pong = ethernet(MAC1, KVM_MAC, b"pong" * 300)
                qemu.send(pong)
                assert await front.receive() == pong
                _, backend = world.served("dom1-nic")
                assert (backend.port.counters.rx_frames, backend.port.counters.tx_frames) == (1, 1)
                qemu.writer.close()
            finally:
                await door.stop()

    run(body)


def test_two_netfronts_ping_forged_mac_dropped_and_counted(tmp_path):
    switch = f"xen-{uuid.uuid4().hex[:8]}"

    async def body() -> None:
        async with xen_world(tmp_path, nics(switch)) as world:
            one = SimulatedNetFrontend(world.host.domains[1], world.clients[1], devid=0)
            two = SimulatedNetFrontend(world.host.domains[2], world.clients[2], devid=0)
            await one.connect()
            await two.connect()
            two.post_rx(4)
            one.post_rx(4)
            forged = ethernet(MAC2, bytes.fromhex("00163e0000ff"), b"not me")
            one.send(forged)
            assert await one.wait_tx(1) == [(0, NETIF_RSP_OKAY)]  # taken from the ring, dropped by the switch
            ping = ethernet(MAC2, MAC1, b"ping")
            one.send(ping, first_id=1)
            assert await two.receive() == ping  # the first frame two sees is the real one
            two.send(ethernet(MAC1, MAC2, b"pong"))
            assert await one.receive() == ethernet(MAC1, MAC2, b"pong")
            _, backend = world.served("dom1-nic")
            assert backend.port.counters.dropped_spoof == 1
            assert get_switch(switch).counters.dropped_forged == 1

    run(body)


def test_blank_checksum_completed_and_large_frames_use_several_slots(tmp_path):
    switch = f"xen-{uuid.uuid4().hex[:8]}"

    async def body() -> None:
        async with xen_world(tmp_path, nics(switch, mtu=9000)) as world:
            one = SimulatedNetFrontend(world.host.domains[1], world.clients[1], devid=0)
            two = SimulatedNetFrontend(world.host.domains[2], world.clients[2], devid=0)
            await one.connect()
            await two.connect()
            two.post_rx(8)
            frame = udp_frame(MAC2, MAC1, bytes(range(256)) * 4)
            one.send(frame, flags=NETTXF_CSUM_BLANK)
            received = await two.receive()
            assert isinstance(received, bytes) and received != frame
            udp = received[34:]
            pseudo = received[26:34] + struct.pack("!BBH", 0, 17, len(udp))
            assert internet_checksum(pseudo + udp) == 0  # a valid checksum sums to zero
            jumbo = ethernet(MAC2, MAC1, bytes(range(256)) * 32)  # 8206 bytes: three pages
            assert one.send(jumbo) == 3
            assert await one.wait_tx(4) == [(0, 0), (0, 0), (1, 0), (2, 0)]
            assert await two.receive() == jumbo

    run(body)


def test_without_feature_sg_frames_longer_than_a_page_are_not_sent_to_it(tmp_path):
    switch = f"xen-{uuid.uuid4().hex[:8]}"

    async def body() -> None:
        async with xen_world(tmp_path, nics(switch, mtu=9000)) as world:
            one = SimulatedNetFrontend(world.host.domains[1], world.clients[1], devid=0)
            two = SimulatedNetFrontend(world.host.domains[2], world.clients[2], devid=0)
            await one.connect()
            await two.connect(sg=False)
            two.post_rx(8)
            one.send(ethernet(MAC2, MAC1, bytes(5000)))
            small = ethernet(MAC2, MAC1, b"fits")
            one.send(small, first_id=2)
            assert await two.receive() == small
            _, backend = world.served("dom2-nic")
            assert backend.port.counters.dropped_too_big == 1

    run(body)


def test_probe_lists_vifs_with_their_mac(tmp_path):
    switch = f"xen-{uuid.uuid4().hex[:8]}"

    async def body() -> None:
        async with xen_world(tmp_path, nics(switch)) as world:
            for domid in (1, 2):
                await SimulatedNetFrontend(world.host.domains[domid], world.clients[domid]).wait_backend(XenbusState.INIT_WAIT)
            slots = await asyncio.get_running_loop().run_in_executor(
                None, lambda: world.registry.call("xen", "pvcore_probe", host=HostContext(environ={}))
            )
            assert {(s.device_class, s.properties["domain"], s.properties["mac"]) for s in slots} == {
                ("net", "1/0", format_mac(MAC1)), ("net", "2/0", format_mac(MAC2))
            }

    run(body)


def test_attach_writes_the_nodes_under_pvcores_own_backend_type(tmp_path):
    switch = f"xen-{uuid.uuid4().hex[:8]}"
    configs = [device("net", "dom1-nic", "1/4", mac=format_mac(MAC1), switch=switch, attach="on")]

    async def body() -> None:
        async with xen_world(tmp_path, configs) as world:
            dom0 = world.clients[0]
            backend, frontend = backend_path(0, PVCORE_KIND, 1, 4), "/local/domain/1/device/vif/4"
            assert (await dom0.read(f"{frontend}/backend")).decode() == backend
            assert (await dom0.read(f"{frontend}/mac")).decode() == format_mac(MAC1)
            assert (await dom0.read(f"{backend}/frontend")).decode() == frontend
            front = SimulatedNetFrontend(world.host.domains[1], world.clients[1], devid=4)
            front.backend_path = backend
            await front.connect()
            front.send(ethernet(b"\xff" * 6, MAC1, b"attached"))
            assert await front.wait_tx(1) == [(0, NETIF_RSP_OKAY)]

    run(body)


def test_the_backend_signals_only_when_the_frontend_asked(tmp_path):
    """``rsp_event`` beyond the responses just published: no event; at the next one: an event."""
    switch = f"xen-{uuid.uuid4().hex[:8]}"

    async def body() -> None:
        async with xen_world(tmp_path, nics(switch)) as world:
            one = SimulatedNetFrontend(world.host.domains[1], world.clients[1], devid=0)
            await one.connect()
            one.channel.consume()
            one.tx.put(RSP_EVENT, 100)  # "not before the 100th response"
            one.send(ethernet(MAC2, MAC1, b"quiet"))
            deadline = time.monotonic() + 5
            while one.tx.get(RSP_PROD) != 1:
                assert time.monotonic() < deadline, "the backend did not answer"
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.1)
            assert one.channel.consume() == 0
            one.tx.put(RSP_EVENT, 2)  # the next response
            one.send(ethernet(MAC2, MAC1, b"loud"), first_id=1)
            await wait_readable(one.channel.fileno(), 5)
            assert one.channel.consume() == 1

    run(body)


FRAMES = 30
FRAME_LEN = 1000


async def timed_burst(sender: SimulatedNetFrontend, receiver: SimulatedNetFrontend, dst: bytes, src: bytes) -> float:
    """Seconds from the first of :data:`FRAMES` frames sent until the last arrives; every one must arrive, in order."""
    receiver.post_rx(FRAMES)
    frames = [ethernet(dst, src, bytes([i]) * (FRAME_LEN - 14)) for i in range(FRAMES)]
    started = time.monotonic()
    for i, frame in enumerate(frames):
        sender.send(frame, first_id=i)
    for frame in frames:
        assert await receiver.receive(timeout=30) == frame
    elapsed = time.monotonic() - started
    assert sorted(await sender.wait_tx(FRAMES, timeout=30)) == [(i, NETIF_RSP_OKAY) for i in range(FRAMES)]
    return elapsed


def least_time(rate_bits: int) -> float:
    """The shortest time :data:`FRAMES` frames may take at ``rate_bits`` (all bytes, less a full bucket and the
    frame that may overshoot it), less 5% for rounding; without the rate they take a few milliseconds."""
    rate = rate_bits / 8
    return 0.95 * (FRAMES * FRAME_LEN - rate / 10 - FRAME_LEN) / rate


def test_a_xen_nics_rate_holds_frames_both_ways_and_changes_live(tmp_path):
    """rate= on a netif NIC: transmit and receive each at most the rate, nothing dropped; set-limits applies at once."""
    switch = f"xen-{uuid.uuid4().hex[:8]}"
    limited, other = nics(switch)
    limited = device("net", "dom1-nic", "1/0", mac=limited.options["mac"], switch=switch, rate="400k")

    async def body() -> None:
        async with xen_world(tmp_path, [limited, other]) as world:
            one = SimulatedNetFrontend(world.host.domains[1], world.clients[1], devid=0)
            two = SimulatedNetFrontend(world.host.domains[2], world.clients[2], devid=0)
            await one.connect()
            await two.connect()
            sent = await timed_burst(one, two, MAC2, MAC1)
            received = await timed_burst(two, one, MAC1, MAC2)
            print(f"rate=400k: {FRAMES} x {FRAME_LEN} B sent in {sent:.2f} s, received in {received:.2f} s "
                  f"(at least {least_time(400_000):.2f} s each)")
            assert least_time(400_000) <= sent < 4 * least_time(400_000) + 1
            assert least_time(400_000) <= received < 4 * least_time(400_000) + 1

            assert world.daemon.set_limits("dom1-nic", "rate=200k")["limits"] == "rate=200000"
            sent = await timed_burst(one, two, MAC2, MAC1)
            received = await timed_burst(two, one, MAC1, MAC2)
            print(f"rate=200k: sent in {sent:.2f} s, received in {received:.2f} s (at least {least_time(200_000):.2f} s)")
            assert least_time(200_000) <= sent < 4 * least_time(200_000) + 1
            assert least_time(200_000) <= received < 4 * least_time(200_000) + 1

            _, backend = world.served("dom1-nic")
            counters = backend.port.counters
            assert (counters.rx_frames, counters.tx_frames) == (2 * FRAMES, 2 * FRAMES)
            assert counters.dropped_full == counters.dropped_spoof == 0 and backend.stats.tx_errors == 0
            assert backend.endpoint.throttle.throttled_seconds() > 0

    run(body, timeout=120)
