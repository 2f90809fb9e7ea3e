"""The FIFO front door: host entropy through a named pipe for QEMU's ``rng-random``.

QEMU 7.2's spapr-rng deadlocks with an ``rng-egd`` backend (its H_RANDOM
handler waits while the main loop is not polling the chardev), so a pseries
(PAPR) guest gets its entropy from a FIFO that QEMU reads instead::

    -object rng-random,id=rng0,filename=FIFO -device spapr-rng,rng=rng0

:class:`RngFifoFrontDoor` creates the FIFO (mode 0600), shrinks its pipe
buffer to :data:`PIPE_SIZE` bytes, and opens it read-write and non-blocking: opening never waits for a reader, and a reader never sees
end-of-file when there is no writer. Whenever the pipe has room the door asks
the domain's :class:`~pvcore.devices.rng.EntropySource` for that many bytes
and writes them; while the rate limit holds a request back, the door waits
for it and does not poll the pipe. So the FIFO holds at most one pipe buffer
of entropy and the rate limit bounds what the reader gets beyond that. The
bytes are never logged.

A restarted daemon must reach the reader the last one fed: QEMU opens the
FIFO once, at start, and keeps that open file, so a FIFO replaced by a new
one at the same path would never give QEMU another byte (and a pseries
guest's next H_RANDOM would wait for ever). So a FIFO already at the path
that this user owns with mode 0600 (what a daemon killed with SIGKILL leaves)
is reused, not replaced; anything else there that is a FIFO is replaced.
Stopping the door removes the FIFO only when no reader has it open; while
QEMU still reads it, it stays for the next daemon. While no daemon writes,
the reader gets what is left in the pipe, then waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import stat
import struct
import termios
from pathlib import Path

from pvcore.devices.rng import EntropyRequest, EntropySource

log = logging.getLogger("pvcore.rng")

FIFO_MODE = 0o600
PIPE_SIZE = 4096
"""The pipe buffer asked for: one page, so little entropy waits in the kernel."""


class FifoError(Exception):
    """The FIFO could not be created or opened; the message names the path and the fix."""


def _bytes_queued(fd: int) -> int:
    """Bytes waiting in the pipe behind ``fd`` (FIONREAD)."""
    return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))[0]


class RngFifoFrontDoor:
    """Keeps the FIFO at ``fifo_path`` topped up with entropy from ``source``."""

    def __init__(self, source: EntropySource, fifo_path: Path | str, *, pipe_size: int = PIPE_SIZE) -> None:
        self.source = source
        self.fifo_path = Path(fifo_path)
        self.pipe_size = pipe_size
        self.description = (
            f"entropy FIFO {self.fifo_path} for rng {source.name} "
            f"(QEMU: -object rng-random,id=rng0,filename={self.fifo_path})"
        )
        self.bytes_written = 0
        self.bytes_dropped = 0
        """Entropy that did not fit in the pipe after all (discarded, never kept)."""
        self._what = f"rng {source.name} fifo"
        self._fd = -1
        self._capacity = pipe_size
        self._inode: tuple[int, int] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: EntropyRequest | None = None

    def __repr__(self) -> str:
        return f"RngFifoFrontDoor({self.source.name!r}, {str(self.fifo_path)!r})"

    @property
    def capacity(self) -> int:
        """The pipe buffer size the kernel granted."""
        return self._capacity

    async def start(self) -> None:
        """Create and open the FIFO and begin filling it."""
        if self._fd >= 0:
            return
        self._loop = asyncio.get_running_loop()
        self._create()
        try:
            self._fd = os.open(self.fifo_path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW)
            info = os.fstat(self._fd)
            if (info.st_dev, info.st_ino) != self._inode:
                raise OSError(f"{self.fifo_path} was replaced while it was being opened")
            fcntl.fcntl(self._fd, fcntl.F_SETPIPE_SZ, self.pipe_size)
            self._capacity = fcntl.fcntl(self._fd, fcntl.F_GETPIPE_SZ)
        except OSError as exc:
            self._close()
            raise FifoError(f"{self._what}: cannot open FIFO {self.fifo_path}: {exc.strerror or exc}") from None
        self._loop.add_writer(self._fd, self._top_up)
        log.info("%s: serving %s (pipe buffer %d bytes)", self._what, self.description, self._capacity)

    async def stop(self) -> None:
        """Stop filling and close the FIFO; remove it unless a reader (QEMU) still has it open."""
        if self._fd < 0:
            return
        self._close()
        log.info("%s: stopped after writing %d bytes", self._what, self.bytes_written)

    def _create(self) -> None:
        path = self.fifo_path
        if not path.parent.is_dir():
            raise FifoError(f"{self._what}: directory {path.parent} does not exist; create it first")
        try:
            existing = path.lstat()
        except FileNotFoundError:
            existing = None
        if existing is not None:
            if not stat.S_ISFIFO(existing.st_mode):
                raise FifoError(f"{self._what}: {path} exists and is not a FIFO; remove it or choose another path")
            if existing.st_uid == os.geteuid() and stat.S_IMODE(existing.st_mode) == FIFO_MODE:
                # Left by an earlier daemon: a reader that kept it open (QEMU's rng-random) is fed again.
                log.info("%s: reusing FIFO %s left by an earlier daemon", self._what, path)
                self._inode = (existing.st_dev, existing.st_ino)
                return
            log.info("%s: replacing stale FIFO %s (not mode 0600 or not ours)", self._what, path)
            path.unlink()
        try:
            os.mkfifo(path, FIFO_MODE)
            os.chmod(path, FIFO_MODE)
        except OSError as exc:
            raise FifoError(f"{self._what}: cannot create FIFO {path}: {exc.strerror or exc}") from None
        info = path.lstat()
        self._inode = (info.st_dev, info.st_ino)

    def _top_up(self) -> None:
        """The pipe has room: ask for entropy to fill it, and stop polling until it arrives."""
        if self._loop is None or self._fd < 0:
            return
        self._loop.remove_writer(self._fd)
        room = max(self._capacity - _bytes_queued(self._fd), 1)
        request = self.source.request(room, self._write)
        if not request.done:
            self._pending = request

    def _write(self, data: bytes) -> None:
        """Entropy arrived: write what fits, drop the rest, and wait for room again."""
        self._pending = None
        if self._loop is None or self._fd < 0:
            return
        try:
            written = os.write(self._fd, data)
        except BlockingIOError:
            written = 0
        except OSError as exc:
            log.error(
                "%s: writing to %s failed: %s; no more entropy goes to this FIFO",
                self._what, self.fifo_path, exc.strerror or exc,
            )
            return
        self.bytes_written += written
        self.bytes_dropped += len(data) - written
        self._loop.add_writer(self._fd, self._top_up)

    def _close(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None
        if self._fd >= 0:
            if self._loop is not None:
                self._loop.remove_writer(self._fd)
            os.close(self._fd)
            self._fd = -1
        inode, self._inode = self._inode, None
        if inode is not None:
            with contextlib.suppress(FileNotFoundError):
                info = self.fifo_path.lstat()
                if (info.st_dev, info.st_ino) != inode:
                    return
                if self._has_reader():
                    log.info("%s: a reader still has %s open; leaving it for the next daemon", self._what, self.fifo_path)
                    return
                self.fifo_path.unlink()

    def _has_reader(self) -> bool:
        """Whether some process has the FIFO open for reading (a non-blocking write-only open fails with ENXIO if not)."""
        try:
            fd = os.open(self.fifo_path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            return False
        os.close(fd)
        return True
