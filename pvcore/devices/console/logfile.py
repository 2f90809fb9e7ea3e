"""A console's log file, written off the event loop.

The event loop never waits for the disk. :meth:`ConsoleLog.write` puts the
guest's bytes in a bounded buffer and returns at once; a thread of the log's
own appends them to the file in order, rotates the file to ``LOG.1`` when it
would grow past ``log_max``, and reopens it by name when asked (SIGHUP, after
an outside log rotation), in the order those requests and the output came.

When the disk is slower than the guest and ``buffer_limit`` bytes already
wait, further output is dropped and counted in :attr:`ConsoleLog.bytes_dropped`;
nothing ever waits for room. Output is taken again once the writer has caught
up to half the buffer, behind a line in the log file itself that says how
many bytes are missing at that place. The first drop is logged.
:meth:`ConsoleLog.close` (or :meth:`ConsoleLog.aclose` from the event loop)
writes everything still queued before it returns.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import threading
from typing import Any

from pvcore.virtio import DeviceError

log = logging.getLogger("pvcore.console")

DEFAULT_LOG_BUFFER = 1024 * 1024
"""Bytes of output that may wait for a slow disk before further output is dropped."""
MIN_LOG_BUFFER = 4096
"""The smallest buffer allowed: room for a drop note and some output behind it."""

_REOPEN = object()
_CLOSE = object()


def _drop_note(count: int) -> bytes:
    return f"\r\n[pvcore: {count} bytes of console output dropped here: the log file could not keep up]\r\n".encode()


class ConsoleLog:
    """The log file at ``path`` of console ``name``, appended to by a writer thread.

    The file is opened (created 0600) here, so a bad path is a
    :class:`DeviceError` at once. :meth:`write`, :meth:`reopen` and
    :meth:`close` may be called from any thread; only :meth:`close` blocks.
    """

    def __init__(self, name: str, path: str, *, log_max: int, buffer_limit: int = DEFAULT_LOG_BUFFER) -> None:
        if buffer_limit < MIN_LOG_BUFFER:
            raise ValueError(f"console {name}: a log buffer of {buffer_limit} bytes is less than {MIN_LOG_BUFFER}")
        self.name = name
        self.path = path
        self.log_max = log_max
        self.buffer_limit = buffer_limit
        self.bytes_dropped = 0
        """Output that never reached the file because the buffer was full."""
        self.errors = 0
        """Failed writes, rotations and reopens since the file was last (re)opened."""
        try:
            self._fd, self._size = self._open()
        except OSError as exc:
            raise DeviceError(
                f"console {name}: cannot open log file {path}: {exc.strerror}; "
                "check that its directory exists and is writable by the daemon"
            ) from None
        self._items: collections.deque[Any] = collections.deque()
        self._queued = 0
        self._unreported = 0
        self._closed = False
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._thread = threading.Thread(target=self._run, name=f"pvcore-console-log-{name}", daemon=True)
        self._thread.start()

    def __repr__(self) -> str:
        return f"ConsoleLog({self.name!r}, {self.path!r})"

    @property
    def queued(self) -> int:
        """Bytes waiting to be written (including the write under way)."""
        return self._queued

    def write(self, data: bytes) -> None:
        """Queue ``data`` for the file; what does not fit in the buffer is dropped and counted."""
        if not data:
            return
        with self._lock:
            if self._closed:
                return
            if self._unreported:  # dropping: resume only once the writer has caught up halfway
                if self._queued > self.buffer_limit // 2:
                    self._drop(len(data))
                    return
                self._enqueue(_drop_note(self._unreported))
                self._unreported = 0
            room = self.buffer_limit - self._queued
            if len(data) > room:
                self._drop(len(data) - room)
                data = data[:room]
            if data:
                self._enqueue(bytes(data))

    def reopen(self) -> None:
        """Have the writer open the file again by name, after what is queued now (e.g. on SIGHUP).

        If the new file cannot be opened the error is logged and output keeps
        going to the old one.
        """
        with self._lock:
            if not self._closed:
                self._items.append(_REOPEN)
                self._wake.notify()

    def close(self) -> None:
        """Write what is queued, close the file and end the writer (blocks until it has)."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._items.append(_CLOSE)
                self._wake.notify()
        self._thread.join()

    async def aclose(self) -> None:
        """:meth:`close`, waited for on a worker thread so the event loop keeps running."""
        await asyncio.to_thread(self.close)

    def _enqueue(self, data: bytes) -> None:
        self._items.append(data)
        self._queued += len(data)
        self._wake.notify()

    def _drop(self, count: int) -> None:
        if not self.bytes_dropped:
            log.warning(
                "console %s: log %s cannot keep up (slow disk?); output beyond %d waiting bytes is dropped "
                "and the log file says where",
                self.name, self.path, self.buffer_limit,
            )
        self.bytes_dropped += count
        self._unreported += count

    def _run(self) -> None:
        """The writer thread: one item at a time, in order; an unexpected failure costs that item only."""
        while True:
            with self._lock:
                while not self._items:
                    self._wake.wait()
                item = self._items.popleft()
            if item is _CLOSE:
                try:
                    os.close(self._fd)
                except OSError as exc:
                    log.warning("console %s: closing log %s: %s", self.name, self.path, exc.strerror or exc)
                if self.bytes_dropped:
                    log.info("console %s: %d bytes of output never reached log %s", self.name, self.bytes_dropped,
                             self.path)
                return
            try:
                if item is _REOPEN:
                    self._reopen()
                else:
                    self._append(item)
            except Exception:
                log.exception("console %s: log %s: writing failed", self.name, self.path)
            finally:
                if item is not _REOPEN:
                    with self._lock:
                        self._queued -= len(item)

    def _open(self) -> tuple[int, int]:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            return fd, os.fstat(fd).st_size
        except OSError:
            os.close(fd)
            raise

    def _append(self, data: bytes) -> None:
        if self._size + len(data) > self.log_max:
            self._rotate()
        view = memoryview(data)
        try:
            while view:
                written = os.write(self._fd, view)
                self._size += written
                view = view[written:]
        except OSError as exc:
            self._error(f"writing log {self.path} failed: {exc.strerror}")

    def _rotate(self) -> None:
        """Move the full log to ``LOG.1`` (replacing an older one) and start a new one."""
        try:
            os.replace(self.path, self.path + ".1")
        except OSError as exc:
            self._error(f"rotating log {self.path} failed: {exc.strerror}")
            return
        if self._reopen():
            log.info("console %s: log %s reached %d bytes; the older part is in %s.1", self.name, self.path,
                     self.log_max, self.path)

    def _reopen(self) -> bool:
        try:
            fd, size = self._open()
        except OSError as exc:
            log.error("console %s: cannot reopen log file %s: %s; still writing to the old file", self.name,
                      self.path, exc.strerror)
            self.errors += 1
            return False
        os.close(self._fd)
        self._fd, self._size = fd, size
        self.errors = 0
        return True

    def _error(self, message: str) -> None:
        if not self.errors:
            log.warning("console %s: %s", self.name, message)
        self.errors += 1
