"""The rng stream front doors: the EGD server (driven by a raw client speaking what
QEMU's rng-egd sends) and the entropy FIFO (read as QEMU's rng-random reads it)."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import stat
import struct
from pathlib import Path

import pytest

from pvcore.devices.rng import EntropySource, RateLimit
from pvcore.streams.egd import EgdFrontDoor
from pvcore.streams.fifo import FifoError, RngFifoFrontDoor

TIMEOUT = 30
"""Generous: only a broken door takes this long; a loaded host only makes rate windows later."""


def windows_opened(elapsed: float, rate: RateLimit) -> int:
    """The most rate windows that can open within ``elapsed`` seconds, with one to spare
    for rounding: the first opens at the first request, each next one a period later at least."""
    return math.floor(elapsed / rate.period) + 2


class EgdClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, path: Path) -> EgdClient:
        return cls(*await asyncio.open_unix_connection(str(path)))

    async def receive(self, count: int) -> bytes:
        async with asyncio.timeout(TIMEOUT):
            return await self.reader.readexactly(count)

    async def blocking_read(self, count: int) -> bytes:
        self.writer.write(bytes((0x02, count)))
        return await self.receive(count)

    async def nonblocking_read(self, count: int) -> bytes:
        self.writer.write(bytes((0x01, count)))
        (length,) = await self.receive(1)
        assert length <= count
        return await self.receive(length)

    async def closed_by_peer(self) -> bool:
        async with asyncio.timeout(TIMEOUT):
            return await self.reader.read(1) == b""

    def close(self) -> None:
        self.writer.close()


async def egd_door(tmp_path: Path, rate: RateLimit | None = None, **options: int) -> EgdFrontDoor:
    door = EgdFrontDoor(EntropySource("dom1", rate), tmp_path / "egd.sock", **options)
    await door.start()
    return door


def test_egd_reads_level_and_write(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)

    async def scenario():
        door = await egd_door(tmp_path)
        assert stat.S_IMODE(door.socket_path.stat().st_mode) == 0o600
        client = await EgdClient.connect(door.socket_path)
        first, second = await client.blocking_read(200), await client.blocking_read(200)
        assert len(first) == len(second) == 200 and first != second
        assert await client.blocking_read(0) == b""
        # QEMU sends its requests back to back; answers come in order
        client.writer.write(bytes((0x02, 255)) * 3)
        assert len(await client.receive(765)) == 765
        assert len(await client.nonblocking_read(32)) == 32
        client.writer.write(b"\x00")
        assert struct.unpack(">I", await client.receive(4))[0] == door.entropy_level_bits > 0
        client.writer.write(b"\x03" + struct.pack(">HB", 64, 8) + b"guestbuf")
        assert len(await client.blocking_read(4)) == 4
        client.close()
        await door.stop()
        assert not door.socket_path.exists()
        return first

    first = asyncio.run(scenario())
    assert first.hex() not in caplog.text and repr(first) not in caplog.text
    assert "client 1" in caplog.text and "disconnected" in caplog.text


def test_egd_unsupported_command_closes_only_that_connection(tmp_path, caplog):
    async def scenario():
        door = await egd_door(tmp_path, max_connections=2)
        good = await EgdClient.connect(door.socket_path)
        for command in (0x04, 0x7F):
            bad = await EgdClient.connect(door.socket_path)
            bad.writer.write(bytes((command,)))
            assert await bad.closed_by_peer()
            bad.close()
        assert len(await good.blocking_read(16)) == 16
        good.close()
        await door.stop()

    asyncio.run(scenario())
    assert "command 0x04 is not supported" in caplog.text


def test_egd_refuses_a_second_concurrent_connection(tmp_path, caplog):
    async def scenario():
        door = await egd_door(tmp_path)
        first = await EgdClient.connect(door.socket_path)
        assert len(await first.blocking_read(8)) == 8
        second = await EgdClient.connect(door.socket_path)
        assert await second.closed_by_peer()
        second.close()
        assert len(await first.blocking_read(8)) == 8
        first.close()
        async with asyncio.timeout(TIMEOUT):
            while door.connection_count:
                await asyncio.sleep(0.001)
        third = await EgdClient.connect(door.socket_path)
        assert len(await third.blocking_read(8)) == 8
        third.close()
        await door.stop()

    asyncio.run(scenario())
    assert "client 2" in caplog.text and "refused: already 1 connection" in caplog.text


def test_egd_nonblocking_read_takes_only_what_the_rate_allows_now(tmp_path):
    async def scenario():
        door = await egd_door(tmp_path, RateLimit(256, 60.0), max_connections=2)
        client = await EgdClient.connect(door.socket_path)
        other = await EgdClient.connect(door.socket_path)
        assert len(await client.blocking_read(255)) == 255
        assert len(await other.nonblocking_read(255)) == 1  # one byte of the window was left
        assert await other.nonblocking_read(255) == b""  # quota spent: nothing, at once
        assert door.source.held == 0
        client.close()
        other.close()
        await door.stop()

    asyncio.run(scenario())


def test_egd_blocking_reads_wait_for_the_rate_limit(tmp_path):
    rate = RateLimit(256, 0.1)

    async def scenario():
        loop = asyncio.get_running_loop()
        door = await egd_door(tmp_path, rate)
        client = await EgdClient.connect(door.socket_path)
        started = loop.time()
        client.writer.write(bytes((0x02, 255)) * 4)
        assert len(await client.receive(1020)) == 1020
        elapsed = loop.time() - started
        # 1020 bytes at 256 per window need four windows: the fourth opens three periods after the first
        assert elapsed >= 3 * rate.period
        assert door.source.bytes_delivered == 1020
        client.close()
        await door.stop()

    asyncio.run(scenario())


def test_egd_stop_cancels_a_held_read(tmp_path):
    async def scenario():
        door = await egd_door(tmp_path, RateLimit(16, 60.0))
        client = await EgdClient.connect(door.socket_path)
        assert len(await client.blocking_read(16)) == 16
        client.writer.write(bytes((0x02, 100)))
        async with asyncio.timeout(TIMEOUT):
            while door.source.held == 0:
                await asyncio.sleep(0.001)
        async with asyncio.timeout(TIMEOUT):  # far less than the 60 s the held read would wait
            await door.stop()
        assert door.source.held == 0
        assert await client.closed_by_peer()
        client.close()

    asyncio.run(scenario())


# FIFO


async def read_fifo(path: Path, count: int) -> bytes:
    """Read ``count`` bytes from the FIFO as QEMU's rng-random does (non-blocking, whenever there is data)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    data = bytearray()
    try:
        async with asyncio.timeout(TIMEOUT):
            while len(data) < count:
                try:
                    data += os.read(fd, count - len(data))
                except BlockingIOError:
                    await asyncio.sleep(0.002)
    finally:
        os.close(fd)
    return bytes(data)


def test_fifo_reader_gets_entropy(tmp_path):
    path = tmp_path / "rng.fifo"

    async def scenario():
        door = RngFifoFrontDoor(EntropySource("dom1"), path)
        await door.start()
        info = path.lstat()
        assert stat.S_ISFIFO(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600
        assert door.capacity == 4096
        data = await read_fifo(path, 3 * door.capacity)  # more than the pipe holds: the door refills it
        assert len(set(data[:4096])) > 200
        assert data[:4096] != data[4096:8192]
        assert door.bytes_written >= len(data)
        await door.stop()
        assert not path.exists()

    asyncio.run(scenario())


def test_fifo_rate_limit_holds(tmp_path):
    path = tmp_path / "rng.fifo"
    rate = RateLimit(1024, 0.1)

    async def scenario():
        loop = asyncio.get_running_loop()
        door = RngFifoFrontDoor(EntropySource("dom1", rate), path)
        started = loop.time()
        await door.start()
        await read_fifo(path, 4 * rate.max_bytes)
        elapsed = loop.time() - started
        # four windows' worth: the fourth opens three periods after the first, however loaded the host
        assert elapsed >= 3 * rate.period
        assert door.source.bytes_delivered <= windows_opened(elapsed, rate) * rate.max_bytes
        await door.stop()

    asyncio.run(scenario())


def test_fifo_replaces_a_stale_fifo_and_refuses_other_files(tmp_path):
    stale = tmp_path / "stale.fifo"
    os.mkfifo(stale)
    os.chmod(stale, 0o666)
    regular = tmp_path / "regular"
    regular.write_text("keep me")

    async def scenario():
        door = RngFifoFrontDoor(EntropySource("dom1"), stale)
        await door.start()
        assert stat.S_IMODE(stale.lstat().st_mode) == 0o600
        assert len(await read_fifo(stale, 16)) == 16
        await door.stop()
        with pytest.raises(FifoError, match="not a FIFO"):
            await RngFifoFrontDoor(EntropySource("dom2"), regular).start()
        with pytest.raises(FifoError, match="does not exist"):
            await RngFifoFrontDoor(EntropySource("dom3"), tmp_path / "no" / "fifo").start()

    asyncio.run(scenario())
    assert regular.read_text() == "keep me"
    assert not stale.exists()


def test_fifo_survives_a_restart_for_a_reader_that_keeps_it_open(tmp_path):
    """QEMU's rng-random opens the FIFO once: a restarted door must feed that same FIFO, not a new one."""
    path = tmp_path / "rng.fifo"

    async def read_some(fd: int, count: int) -> bytes:
        data = bytearray()
        async with asyncio.timeout(TIMEOUT):
            while len(data) < count:
                try:
                    chunk = os.read(fd, count - len(data))
                except BlockingIOError:
                    chunk = b""
                if not chunk:  # nothing yet, or no writer at all (end of file) for now
                    await asyncio.sleep(0.002)
                data += chunk
        return bytes(data)

    def drain(fd: int) -> bytes:
        """What is left in a pipe nobody writes to: read up to end of file."""
        data = bytearray()
        while chunk := os.read(fd, 65536):
            data += chunk
        return bytes(data)

    async def scenario():
        first = RngFifoFrontDoor(EntropySource("dom1"), path)
        await first.start()
        inode = path.lstat().st_ino
        reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # as QEMU holds it for the guest's whole life
        try:
            await read_some(reader, 2 * first.capacity)
            await first.stop()  # the same as a daemon that died: nobody writes
            assert path.lstat().st_ino == inode, "a FIFO a reader still has open must stay"
            assert len(drain(reader)) <= first.capacity  # what was left in the pipe, then end of file
            second = RngFifoFrontDoor(EntropySource("dom1"), path)
            await second.start()
            assert path.lstat().st_ino == inode
            assert len(await read_some(reader, 3 * second.capacity)) == 3 * second.capacity
            await second.stop()
        finally:
            os.close(reader)
        assert path.exists()
        third = RngFifoFrontDoor(EntropySource("dom1"), path)
        await third.start()
        await third.stop()  # no reader now: removed
        assert not path.exists()

    asyncio.run(scenario())


def test_egd_door_for_qemu_answers_a_request_the_previous_daemon_took(tmp_path):
    """With unasked_bytes, a new connection gets that many bytes before it asks (a restarted daemon
    answers what QEMU's rng-egd asked the old one); then requests are answered as before."""

    async def scenario():
        door = await egd_door(tmp_path, unasked_bytes=255)
        client = await EgdClient.connect(door.socket_path)
        unasked = await client.receive(255)
        assert len(await client.blocking_read(64)) == 64
        client.close()
        async with asyncio.timeout(TIMEOUT):
            while door.connection_count:
                await asyncio.sleep(0.01)
        second = await EgdClient.connect(door.socket_path)
        assert (await second.receive(255)) != unasked
        second.close()
        await door.stop()
        plain = await egd_door(tmp_path)
        client = await EgdClient.connect(plain.socket_path)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.5):
                await client.reader.read(1)
        client.close()
        await plain.stop()

    asyncio.run(scenario())


@pytest.mark.parametrize("size", [-1, 64 * 1024 + 1])
def test_egd_door_refuses_an_impossible_unasked_size(tmp_path, size):
    with pytest.raises(ValueError, match="unasked_bytes"):
        EgdFrontDoor(EntropySource("dom1"), tmp_path / "egd.sock", unasked_bytes=size)
