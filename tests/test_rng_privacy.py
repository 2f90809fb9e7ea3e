"""Entropy is never logged: every log record made while the rng front doors serve traffic
is searched for the bytes the kernel handed out, in every form a log line could carry them.

All levels are enabled (DEBUG and below, on every logger) and records are taken where
every logger hands them on (``Logger.handle``), so a record is seen even if no handler
would print it. The entropy is recorded where it is made (``os.getrandom``), so bytes a
front door dropped count as much as bytes the guest received.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import codecs
import logging
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pvcore.devices.rng import EntropySource, RateLimit, create_rng_device
from pvcore.streams.egd import EgdFrontDoor
from pvcore.streams.fifo import RngFifoFrontDoor
from pvcore.testing.loopback import Loopback

WINDOW = 8
"""Bytes of entropy that, found in a log record, fail the test (a chance match of 8 random bytes is ~2^-64)."""
TIMEOUT = 30.0

_HEX_RUN = re.compile(r"(?:[0-9a-fA-F]{2}[\s:.,-]?){8,}")
_BASE64_RUN = re.compile(r"[A-Za-z0-9+/_-]{12,}={0,2}")


class EntropyLeakDetector:
    """Keeps every chunk ``os.getrandom`` returned, and every log record made meanwhile."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.records: list[logging.LogRecord] = []

    def windows(self) -> set[bytes]:
        """Every :data:`WINDOW`-byte slice of every chunk of entropy handed out."""
        return {chunk[i : i + WINDOW] for chunk in self.chunks for i in range(len(chunk) - WINDOW + 1)}

    def leaks(self) -> list[str]:
        """The records that carry entropy, described."""
        windows = self.windows()
        return [
            f"{record.name} {record.levelname}: {_message(record)!r}"
            for record in self.records
            if any(_carries(candidate, windows) for candidate in _candidates(record))
        ]


def _message(record: logging.LogRecord) -> str:
    try:
        return record.getMessage()
    except Exception:  # a broken format string still must not hide its arguments
        return f"{record.msg!r} % {record.args!r}"


def _decodings(text: str) -> Iterator[bytes]:
    """The bytes ``text`` could be showing: raw, escaped (repr of bytes), hex, base64."""
    yield text.encode("latin-1", "replace")
    yield text.encode("utf-8", "surrogateescape")
    try:
        yield codecs.escape_decode(text.encode("latin-1", "backslashreplace"))[0]
    except ValueError:
        pass
    for run in _HEX_RUN.findall(text):
        digits = re.sub(r"[^0-9a-fA-F]", "", run)
        yield bytes.fromhex(digits[: len(digits) // 2 * 2])
        yield bytes.fromhex(digits[1 : 1 + (len(digits) - 1) // 2 * 2])
    for run in _BASE64_RUN.findall(text):
        for decode in (base64.b64decode, base64.urlsafe_b64decode):
            try:
                yield decode(run + "=" * (-len(run) % 4))
            except (binascii.Error, ValueError):
                pass


def _candidates(record: logging.LogRecord) -> Iterator[bytes]:
    texts = [_message(record), str(record.msg), record.exc_text or "", record.stack_info or ""]
    args = record.args if isinstance(record.args, tuple) else (record.args,)
    for arg in args:
        if isinstance(arg, (bytes, bytearray, memoryview)):
            yield bytes(arg)
        texts += [str(arg), repr(arg)]
    for text in texts:
        yield from _decodings(text)


def _carries(candidate: bytes, windows: set[bytes]) -> bool:
    return any(candidate[i : i + WINDOW] in windows for i in range(len(candidate) - WINDOW + 1))


@pytest.fixture
def detector(monkeypatch: pytest.MonkeyPatch) -> Iterator[EntropyLeakDetector]:
    """Record all entropy and every log record, at every level, on every logger."""
    spy = EntropyLeakDetector()
    getrandom = os.getrandom

    def recording_getrandom(size: int, flags: int = 0) -> bytes:
        data = getrandom(size, flags)
        spy.chunks.append(data)
        return data

    handle = logging.Logger.handle

    def recording_handle(logger: logging.Logger, record: logging.LogRecord) -> None:
        spy.records.append(record)
        handle(logger, record)

    monkeypatch.setattr(os, "getrandom", recording_getrandom)
    monkeypatch.setattr(logging.Logger, "handle", recording_handle)
    loggers = [logging.root] + [
        logger for logger in logging.root.manager.loggerDict.values() if isinstance(logger, logging.Logger)
    ]
    saved = [(logger, logger.level, logger.disabled) for logger in loggers]
    for logger in loggers:
        logger.disabled = False
        logger.setLevel(logging.NOTSET)
    logging.root.setLevel(1)
    logging.disable(logging.NOTSET)
    try:
        yield spy
    finally:
        for logger, level, disabled in saved:
            logger.setLevel(level)
            logger.disabled = disabled


def test_the_detector_finds_entropy_in_every_form_a_log_line_could_take() -> None:
    spy = EntropyLeakDetector()
    data = os.getrandom(32)
    spy.chunks.append(data)
    piece = data[5:21]
    forms = [
        ("%s", (piece.hex(),)), ("%s", (piece.hex(" ").upper(),)), ("%r", (piece,)), ("%s", (bytes(piece),)),
        ("%s", (base64.b64encode(piece).decode(),)), ("%s", (piece.decode("latin-1"),)),
        ("got " + piece.hex(":"), None), ("%s", (memoryview(piece),)),
    ]
    for msg, args in forms:
        spy.records = [logging.LogRecord("t", logging.DEBUG, __file__, 1, msg, args, None)]
        assert spy.leaks(), f"missed {msg!r} % {args!r}"
    spy.records = [logging.LogRecord("t", logging.DEBUG, __file__, 1, "rng dom: %d bytes", (16,), None)]
    assert not spy.leaks()


def test_virtio_rng_never_logs_entropy(detector: EntropyLeakDetector) -> None:
    delivered = []
    with Loopback(create_rng_device({"rate": "4096/50ms"}, name="dom"), name="rng") as lb:
        for size in (1, 8, 16, 64, 500, 4096):
            delivered.append(lb.request(0, [], [size], timeout=TIMEOUT).data)
        heads = [lb.submit(0, [], [512]) for _ in range(16)]  # two windows: some are held
        delivered += [used.data for used in lb.wait_used(0, len(heads), timeout=TIMEOUT)]
        assert lb.request(0, [b"junk"], [], timeout=TIMEOUT).written == 0  # logged: has no writable buffer
    assert all(data for data in delivered)
    assert any(record.name == "pvcore.rng" for record in detector.records)
    assert detector.chunks
    assert detector.leaks() == []


async def _egd_traffic(socket_path: Path) -> list[bytes]:
    delivered = []
    reader, writer = await asyncio.open_unix_connection(str(socket_path))
    async with asyncio.timeout(TIMEOUT):
        for count in (8, 64, 255, 255, 255):
            writer.write(bytes((0x02, count)))
            delivered.append(await reader.readexactly(count))
        writer.write(bytes((0x01, 200)))
        (length,) = await reader.readexactly(1)
        delivered.append(await reader.readexactly(length))
        writer.write(b"\x00")
        await reader.readexactly(4)
        writer.write(b"\x03" + bytes((0, 64, 8)) + b"guestbuf")
        writer.write(b"\x04")  # unsupported: the door logs why it closes the connection
        assert await reader.read(1) == b""
    writer.close()
    return delivered


def test_egd_door_never_logs_entropy(detector: EntropyLeakDetector, tmp_path: Path) -> None:
    async def scenario() -> list[bytes]:
        door = EgdFrontDoor(EntropySource("dom", RateLimit(512, 0.05)), tmp_path / "egd.sock")
        await door.start()
        try:
            return await _egd_traffic(door.socket_path)
        finally:
            await door.stop()

    delivered = asyncio.run(scenario())
    assert sum(map(len, delivered)) > 800
    assert any(record.name == "pvcore.rng" for record in detector.records)
    assert detector.leaks() == []


def test_fifo_door_never_logs_entropy(detector: EntropyLeakDetector, tmp_path: Path) -> None:
    path = tmp_path / "rng.fifo"

    async def scenario() -> bytes:
        door = RngFifoFrontDoor(EntropySource("dom", RateLimit(4096, 0.05)), path)
        await door.start()
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        received = bytearray()
        deadline = time.monotonic() + TIMEOUT
        try:
            while len(received) < 3 * 4096 and time.monotonic() < deadline:
                try:
                    received += os.read(fd, 65536)
                except BlockingIOError:
                    await asyncio.sleep(0.002)
        finally:
            os.close(fd)
            await door.stop()
        return bytes(received)

    received = asyncio.run(scenario())
    assert len(received) >= 3 * 4096
    assert any(record.name == "pvcore.rng" for record in detector.records)
    assert detector.leaks() == []
