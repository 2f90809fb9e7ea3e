"""The netdev stream front door: QEMU's length-prefixed frames as switch ports,
driven by raw stream clients that speak what ``-netdev stream,server=off`` sends."""

from __future__ import annotations

import asyncio
import shutil
import stat
import struct
import time
from pathlib import Path

import pytest

from pvcore.devices.net.switch import MAX_FRAME_LEN, Port, Switch, parse_mac
from pvcore.streams.netdev_stream import NetdevStreamFrontDoor
from pvcore.virtio import DeviceError

MAC_A = parse_mac("52:54:00:00:00:0a")
MAC_B = parse_mac("52:54:00:00:00:0b")
MAC_FORGED = parse_mac("52:54:00:00:00:ff")
BROADCAST = b"\xff" * 6
TIMEOUT = 20  # seconds; only a failing test waits this long, and CI machines are loaded


def frame(dst: bytes, src: bytes, payload: bytes = b"hello") -> bytes:
    return dst + src + b"\x08\x00" + payload


class StreamClient:
    """What QEMU's netdev stream does on the wire: 4-byte big-endian length, then the frame."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, path: Path) -> StreamClient:
        return cls(*await asyncio.open_unix_connection(str(path)))

    async def send(self, data: bytes) -> None:
        self.writer.write(struct.pack(">I", len(data)) + data)
        await self.writer.drain()

    async def receive(self) -> bytes:
        async with asyncio.timeout(TIMEOUT):
            (length,) = struct.unpack(">I", await self.reader.readexactly(4))
            return await self.reader.readexactly(length)

    async def nothing_arrives(self, wait: float = 0.05) -> bool:
        try:
            async with asyncio.timeout(wait):
                await self.reader.read(1)
        except TimeoutError:
            return True
        return False

    async def closed_by_peer(self) -> bool:
        async with asyncio.timeout(TIMEOUT):
            return await self.reader.read(1) == b""

    def close(self) -> None:
        self.writer.close()


async def until(condition, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(0.001)


@pytest.fixture
def doors(tmp_path: Path):
    """Two doors (MACs A and B) on one switch; yields (switch, door_a, door_b)."""
    switch = Switch("test")
    door_a = NetdevStreamFrontDoor(switch, tmp_path / "a.sock", MAC_A, name="a")
    door_b = NetdevStreamFrontDoor(switch, tmp_path / "b.sock", "52:54:00:00:00:0b", name="b", output_limit=80_000)
    return switch, door_a, door_b


def run(coro):
    asyncio.run(coro)


def test_frames_cross_and_spoofed_frames_are_dropped(doors):
    switch, door_a, door_b = doors

    async def scenario():
        await door_a.start()
        await door_b.start()
        assert stat.S_IMODE(door_a.socket_path.stat().st_mode) == 0o600
        a = await StreamClient.connect(door_a.socket_path)
        b = await StreamClient.connect(door_b.socket_path)
        await until(lambda: door_a.connected and door_b.connected, "both connected")

        await a.send(frame(MAC_B, MAC_A, b"a to b"))
        assert await b.receive() == frame(MAC_B, MAC_A, b"a to b")
        await b.send(frame(MAC_A, MAC_B, b"b to a"))
        assert await a.receive() == frame(MAC_A, MAC_B, b"b to a")
        await b.send(frame(BROADCAST, MAC_B, b"everyone"))
        assert await a.receive() == frame(BROADCAST, MAC_B, b"everyone")

        await a.send(frame(MAC_B, MAC_FORGED, b"forged"))
        await a.send(frame(BROADCAST, MAC_FORGED, b"forged broadcast"))
        await a.send(b"short")
        await a.send(frame(MAC_B, MAC_A, b"after"))
        assert await b.receive() == frame(MAC_B, MAC_A, b"after")
        assert door_a.port.counters.dropped_spoof == 2
        assert door_a.port.counters.dropped_malformed == 1
        assert await b.nothing_arrives()
        assert door_b.port.counters.tx_frames == 2

        largest = frame(MAC_B, MAC_A, bytes(MAX_FRAME_LEN - 14))
        await a.send(largest)
        assert await b.receive() == largest
        a.close()
        b.close()
        await door_a.stop()
        await door_b.stop()
        assert not door_a.socket_path.exists()
        assert switch.ports == {}

    run(scenario())


@pytest.mark.parametrize("bad_length", [0, MAX_FRAME_LEN + 1, 2**32 - 1])
def test_bad_length_closes_and_qemu_can_reconnect(doors, bad_length, caplog):
    switch, door_a, door_b = doors

    async def scenario():
        await door_a.start()
        await door_b.start()
        a = await StreamClient.connect(door_a.socket_path)
        b = await StreamClient.connect(door_b.socket_path)
        a.writer.write(struct.pack(">I", bad_length))
        assert await a.closed_by_peer()
        await until(lambda: not door_a.connected, "a disconnected")
        assert f"frame length {bad_length}" in caplog.text

        again = await StreamClient.connect(door_a.socket_path)
        await until(lambda: door_a.connected, "a reconnected")
        await again.send(frame(MAC_B, MAC_A, b"back"))
        assert await b.receive() == frame(MAC_B, MAC_A, b"back")
        await b.send(frame(MAC_A, MAC_B, b"welcome"))
        assert await again.receive() == frame(MAC_A, MAC_B, b"welcome")
        assert door_a.connections == 2
        a.close()
        again.close()
        b.close()
        await door_a.stop()
        await door_b.stop()

    run(scenario())


def test_one_qemu_per_socket(doors):
    switch, door_a, door_b = doors

    async def scenario():
        await door_a.start()
        await door_b.start()
        first = await StreamClient.connect(door_a.socket_path)
        b = await StreamClient.connect(door_b.socket_path)
        await until(lambda: door_a.connected, "first connected")
        second = await StreamClient.connect(door_a.socket_path)
        assert await second.closed_by_peer()
        await b.send(frame(MAC_A, MAC_B, b"to the first"))
        assert await first.receive() == frame(MAC_A, MAC_B, b"to the first")
        first.close()
        second.close()
        b.close()
        await door_a.stop()
        await door_b.stop()

    run(scenario())


def test_slow_reader_output_is_bounded_and_frames_dropped(doors):
    switch, door_a, door_b = doors

    async def scenario():
        await door_a.start()
        await door_b.start()
        a = await StreamClient.connect(door_a.socket_path)
        b = await StreamClient.connect(door_b.socket_path)
        await until(lambda: door_b.connected, "b connected")
        sent = 1500
        for index in range(sent):
            await a.send(frame(MAC_B, MAC_A, index.to_bytes(4, "big") + bytes(1400)))
        await until(lambda: door_a.port.counters.rx_frames == sent, "all frames switched")
        counters = door_b.port.counters
        assert counters.dropped_full > 0
        assert counters.tx_frames + counters.dropped_full == sent
        assert door_b.port.writer.transport.get_write_buffer_size() <= door_b.port.output_limit
        received = [await b.receive() for _ in range(counters.tx_frames)]
        indexes = [int.from_bytes(f[16:20], "big") for f in received]
        assert indexes == sorted(indexes) and indexes[0] == 0
        a.close()
        b.close()
        await door_a.stop()
        await door_b.stop()

    run(scenario())


def test_frames_to_a_disconnected_port_are_dropped(doors):
    switch, door_a, door_b = doors

    async def scenario():
        await door_a.start()
        await door_b.start()
        a = await StreamClient.connect(door_a.socket_path)
        await until(lambda: door_a.connected, "a connected")
        await a.send(frame(MAC_B, MAC_A))
        await until(lambda: door_b.port.counters.dropped_full == 1, "dropped for b")
        a.close()
        await door_a.stop()
        await door_b.stop()

    run(scenario())


def test_duplicate_mac_is_refused(tmp_path):
    switch = Switch("dup")
    first = NetdevStreamFrontDoor(switch, tmp_path / "1.sock", MAC_A, name="one")
    second = NetdevStreamFrontDoor(switch, tmp_path / "2.sock", MAC_A, name="two")

    async def scenario():
        await first.start()
        with pytest.raises(DeviceError, match="already used"):
            await second.start()
        assert not (tmp_path / "2.sock").exists()
        await first.stop()

    run(scenario())
    with pytest.raises(ValueError, match="multicast"):
        NetdevStreamFrontDoor(switch, tmp_path / "3.sock", "01:00:5e:00:00:01")


class CollectingUplink(Port):
    """A trusted uplink port (no MAC of its own) that records what it is given."""

    def __init__(self) -> None:
        super().__init__("uplink", None)
        self.frames: list[bytes] = []

    def deliver(self, frame: bytes) -> bool:
        self.frames.append(frame)
        return True


def test_real_qemu_hub_between_two_doors(doors):
    """QEMU 7.2 connects to both sockets (-netdev stream,server=off) and joins them with its hub.

    A broadcast from an uplink goes out of both doors; QEMU parses each frame
    and sends it on into the other door, where the switch drops it because
    its source is not that port's MAC. Both directions of QEMU's framing are
    exercised, and the anti-spoof filter on what QEMU sends.
    """
    assert shutil.which("qemu-system-x86_64"), "apt-get install -y qemu-system-x86 (make test installs it)"
    switch, door_a, door_b = doors
    uplink = CollectingUplink()
    switch.attach(uplink)
    forged = frame(BROADCAST, MAC_FORGED, b"via qemu" * 20)

    async def scenario():
        await door_a.start()
        await door_b.start()
        qemu = await asyncio.create_subprocess_exec(
            "timeout", "-k", "2", "30",
            "qemu-system-x86_64", "-nodefaults", "-display", "none", "-M", "none",
            "-netdev", f"stream,id=na,server=off,addr.type=unix,addr.path={door_a.socket_path}",
            "-netdev", f"stream,id=nb,server=off,addr.type=unix,addr.path={door_b.socket_path}",
            "-netdev", "hubport,id=ha,hubid=0,netdev=na",
            "-netdev", "hubport,id=hb,hubid=0,netdev=nb",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            await until(lambda: door_a.connected and door_b.connected, "QEMU connected to both doors")
            deadline = time.monotonic() + TIMEOUT
            while not (door_a.port.counters.dropped_spoof and door_b.port.counters.dropped_spoof):
                # QEMU's hub drops a frame for a stream netdev it has not yet marked connected (its side of
                # the connection completes in its main loop, after ours): send again until both came back
                assert time.monotonic() < deadline, "timed out waiting until QEMU sent each frame back"
                assert uplink.send(forged) == 2
                await asyncio.sleep(0.2)
            assert uplink.frames == []
        finally:
            qemu.terminate()
            await qemu.wait()
        await until(lambda: not door_a.connected and not door_b.connected, "QEMU gone")
        await door_a.stop()
        await door_b.stop()

    run(scenario())
