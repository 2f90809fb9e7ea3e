"""The console log is written off the event loop: a slow disk costs log bytes, never a stalled loop.

A "slow disk" here is ``os.write`` held on a gate for the log file only (recognised by
its inode, so the test does not depend on who calls ``os.write``). The event loop is
shown to keep running while the gate is shut: guest output returns at once and other
tasks keep getting turns. If the log were written on the loop thread, the first output
would hold the loop until the gate gives up (:data:`GATE_LIMIT`), and the test fails.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pvcore.devices.console import ConsoleLog, ConsoleStream

GATE_LIMIT = 10.0
"""Longest a gated write waits; reaching it means the loop itself was made to wait."""
TIMEOUT = 30.0
DROP_NOTE = re.compile(rb"\r\n\[pvcore: ([0-9]+) bytes of console output dropped here: [^]]*\]\r\n")


class SlowDisk:
    """Holds every ``os.write`` to one file until :meth:`open_gate`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.gave_up = False
        self._write = os.write

    def write(self, fd: int, data: bytes) -> int:
        """os.write, held at the gate when ``fd`` is the log file."""
        if self._is_log(fd) and not self.gate.is_set():
            self.entered.set()
            if not self.gate.wait(GATE_LIMIT):
                self.gave_up = True
                self.gate.set()  # once is enough to fail the test
        return self._write(fd, data)

    def open_gate(self) -> None:
        """Let held and later writes through."""
        self.gate.set()

    def _is_log(self, fd: int) -> bool:
        try:
            info, log = os.fstat(fd), self.path.stat()
        except OSError:
            return False
        return (info.st_dev, info.st_ino) == (log.st_dev, log.st_ino)


@pytest.fixture
def slow_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SlowDisk]:
    """A slow disk under ``tmp_path / "guest.log"`` (the gate opens at the end of the test anyway)."""
    disk = SlowDisk(tmp_path / "guest.log")
    monkeypatch.setattr(os, "write", disk.write)
    yield disk
    disk.open_gate()


class Ticker:
    """A task that counts its turns on the event loop."""

    def __init__(self) -> None:
        self.turns = 0
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            self.turns += 1
            await asyncio.sleep(0)

    async def turns_taken(self, count: int) -> None:
        """Wait until the ticker has had ``count`` more turns."""
        target = self.turns + count
        async with asyncio.timeout(TIMEOUT):
            while self.turns < target:
                await asyncio.sleep(0)

    def stop(self) -> None:
        """Cancel the task."""
        self._task.cancel()


async def until(condition: Callable[[], bool], what: str) -> None:
    """Yield to the loop until ``condition()`` holds; TimeoutError naming ``what`` after :data:`TIMEOUT`."""
    deadline = asyncio.get_running_loop().time() + TIMEOUT
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"waited {TIMEOUT:g} s for {what}")
        await asyncio.sleep(0.001)


def test_a_slow_log_disk_never_blocks_the_event_loop(slow_disk: SlowDisk, caplog: pytest.LogCaptureFixture) -> None:
    budget = 64 * 1024
    chunk = bytes(range(256)) * 16  # 4 KiB

    async def scenario() -> tuple[ConsoleStream, int, int]:
        stream = ConsoleStream("guest", log_path=slow_disk.path, log_buffer=budget)
        ticker = Ticker()
        stream.output(b"first line\n")
        await until(slow_disk.entered.is_set, "the writer to reach the disk")  # and stay there
        turns = ticker.turns
        for _ in range(64):  # 256 KiB: four times the budget, all while the disk is stuck
            stream.output(chunk)
        await ticker.turns_taken(10)
        assert not slow_disk.gave_up, "guest output waited for the log disk on the event loop"
        assert not slow_disk.gate.is_set() and ticker.turns > turns  # all that while the disk was stuck
        assert stream.logfile is not None
        queued, dropped = stream.logfile.queued, stream.logfile.bytes_dropped
        assert queued <= budget
        assert stream.bytes_out == len(b"first line\n") + 64 * len(chunk)  # the guest lost nothing
        assert stream.scrollback.snapshot()[-len(chunk) :] == chunk
        slow_disk.open_gate()
        await until(lambda: stream.logfile.queued == 0, "the writer to catch up")
        stream.output(b"after the stall\n")
        await stream.aclose()
        ticker.stop()
        return stream, queued, dropped

    stream, queued, dropped = asyncio.run(scenario())
    assert stream.logfile is not None
    assert dropped == stream.logfile.bytes_dropped == len(b"first line\n") + 64 * len(chunk) - queued
    logged = slow_disk.path.read_bytes()
    notes = DROP_NOTE.findall(logged)
    assert [int(count) for count in notes] == [dropped]  # the log file says what is missing, once
    assert logged.endswith(b"after the stall\n")
    assert len(DROP_NOTE.sub(b"", logged)) + dropped == stream.bytes_out
    warnings = [r for r in caplog.records if "cannot keep up" in r.getMessage()]
    assert len(warnings) == 1


def test_closing_writes_everything_queued_without_blocking_the_loop(slow_disk: SlowDisk) -> None:
    lines = [f"line {n}\n".encode() for n in range(200)]

    async def scenario() -> None:
        stream = ConsoleStream("guest", log_path=slow_disk.path)
        ticker = Ticker()
        for line in lines:
            stream.output(line)
        await until(slow_disk.entered.is_set, "the writer to reach the disk")
        closing = asyncio.ensure_future(stream.aclose())
        await ticker.turns_taken(10)  # the loop runs while the close waits for the disk
        assert not closing.done()
        slow_disk.open_gate()
        async with asyncio.timeout(TIMEOUT):
            await closing
        ticker.stop()
        assert not slow_disk.gave_up

    asyncio.run(scenario())
    assert slow_disk.path.read_bytes() == b"".join(lines)


def test_reopen_and_rotation_keep_the_order_of_output_while_the_disk_is_slow(slow_disk: SlowDisk) -> None:
    moved = slow_disk.path.with_name("guest.log.old")
    rotated = slow_disk.path.with_name("guest.log.1")

    async def scenario() -> None:
        stream = ConsoleStream("guest", log_path=slow_disk.path, log_max=4096)
        stream.output(b"one ")
        await until(slow_disk.entered.is_set, "the writer to reach the disk")
        stream.output(b"two ")
        slow_disk.path.rename(moved)  # logrotate moves the file, then sends SIGHUP
        stream.reopen_log()
        stream.output(b"three ")
        stream.output(b"x" * 4090)  # exactly log-max
        stream.output(b"four")  # past log-max: the writer rotates first
        slow_disk.open_gate()
        await stream.aclose()

    asyncio.run(scenario())
    assert moved.read_bytes() == b"one two "
    assert rotated.read_bytes() == b"three " + b"x" * 4090  # the SIGHUP-reopened file, rotated in turn
    assert slow_disk.path.read_bytes() == b"four"


def test_a_log_that_cannot_be_reopened_keeps_the_old_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "guest.log"
    log = ConsoleLog("guest", str(path), log_max=1 << 20)
    log.write(b"before ")
    moved = tmp_path / "guest.log.old"
    path.rename(moved)
    path.mkdir()  # something in the way: the reopen fails
    with caplog.at_level(logging.ERROR, logger="pvcore.console"):
        log.reopen()
        log.write(b"after")
        log.close()
    assert moved.read_bytes() == b"before after"
    assert "cannot reopen log file" in caplog.text and "still writing to the old file" in caplog.text
    assert log.errors == 1
