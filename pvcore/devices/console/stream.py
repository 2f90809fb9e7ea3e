"""A guest console as a byte stream, whatever carries it.

:class:`ConsoleStream` is the console engine. A transport (virtio-console, a
QEMU chardev socket, a Xen console ring) calls :meth:`ConsoleStream.output`
with the bytes the guest wrote and sets :attr:`ConsoleStream.on_input` to
receive the bytes the guest should read. Guest output goes to three places:

* the log file, if one is configured (opened for append, created 0600;
  :meth:`ConsoleStream.reopen_log` after the file was rotated, e.g. on
  SIGHUP). Every byte goes there, attached person or not, unless the disk
  cannot keep up: the file is written by a
  :class:`~pvcore.devices.console.logfile.ConsoleLog` thread through a bounded
  buffer, so a slow disk never stalls the event loop, and output that does
  not fit in the buffer is dropped from the log (and counted), never waited for;
* the scrollback, a ring buffer of the most recent bytes (64 KiB by default)
  that a person who attaches later is shown first;
* the attached person, if any (a :class:`ConsolePeer`), who must accept the
  bytes without ever blocking the guest: a slow peer drops bytes (and counts
  them), the guest and the daemon never wait for it.

Input is accepted only from the attached peer: :meth:`ConsoleStream.input`
ignores bytes from any other. All methods are called on the daemon's event
loop thread, except :meth:`ConsoleStream.close`, which waits for the log to
be written and so belongs before the loop runs or after it stopped
(:meth:`ConsoleStream.aclose` is the form for the loop).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Protocol

from pvcore.devices.console.logfile import DEFAULT_LOG_BUFFER, ConsoleLog

log = logging.getLogger("pvcore.console")

DEFAULT_SCROLLBACK = 64 * 1024
"""Bytes of recent guest output kept for a person who attaches later."""
DEFAULT_LOG_MAX = 64 * 1024 * 1024
"""Bytes a console log may reach before it is rotated to ``LOG.1``: a guest that never stops
printing must not fill the host's disk."""


class ConsolePeer(Protocol):
    """The person attached to a console, as the stream sees them."""

    def deliver(self, data: bytes) -> None:
        """Send guest output to the person; must never block (drop instead)."""

    def hangup(self, reason: str) -> None:
        """End the connection, telling the person ``reason``."""


class Scrollback:
    """A bounded buffer of the most recent ``limit`` bytes appended to it."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"scrollback of {limit} bytes (must be at least 1)")
        self.limit = limit
        self._data = bytearray()

    def __len__(self) -> int:
        return len(self._data)

    def append(self, data: bytes) -> None:
        """Add ``data``, forgetting the oldest bytes beyond the limit."""
        if len(data) >= self.limit:
            self._data[:] = data[-self.limit :]
            return
        self._data += data
        excess = len(self._data) - self.limit
        if excess > 0:
            del self._data[:excess]

    def snapshot(self) -> bytes:
        """The kept bytes, oldest first."""
        return bytes(self._data)


class ConsoleStream:
    """One guest console: output to log, scrollback and attached peer; input from the peer only.

    ``log_buffer`` bounds the output waiting for a slow log disk (see
    :class:`~pvcore.devices.console.logfile.ConsoleLog`).
    """

    def __init__(
        self,
        name: str,
        *,
        log_path: str | os.PathLike[str] | None = None,
        scrollback: int = DEFAULT_SCROLLBACK,
        log_max: int = DEFAULT_LOG_MAX,
        log_buffer: int = DEFAULT_LOG_BUFFER,
    ) -> None:
        self.name = name
        self.log_path = os.fspath(log_path) if log_path is not None else None
        self.log_max = log_max
        self.scrollback = Scrollback(scrollback)
        self.on_input: Callable[[bytes], None] | None = None
        self.peer: ConsolePeer | None = None
        self.bytes_out = 0
        self.bytes_in = 0
        self.input_refused = 0
        self.logfile: ConsoleLog | None = None
        """The log file's writer, if a log is configured."""
        if self.log_path is not None:
            self.logfile = ConsoleLog(name, self.log_path, log_max=log_max, buffer_limit=log_buffer)

    def __repr__(self) -> str:
        return f"ConsoleStream({self.name!r}, log={self.log_path!r})"

    def reopen_log(self) -> None:
        """Open the log file again by name (after rotation), after the output queued so far.

        The log's writer does it; if the new file cannot be opened it logs
        why and output keeps going to the old file.
        """
        if self.logfile is not None:
            self.logfile.reopen()

    def output(self, data: bytes) -> None:
        """The guest wrote ``data``: log it, keep it in the scrollback, show it to the peer."""
        if not data:
            return
        self.bytes_out += len(data)
        if self.logfile is not None:
            self.logfile.write(data)
        self.scrollback.append(data)
        if self.peer is not None:
            self.peer.deliver(data)

    def attach(self, peer: ConsolePeer) -> bool:
        """Make ``peer`` the attached person and send it the scrollback; False if someone is attached."""
        if self.peer is not None:
            return False
        self.peer = peer
        backlog = self.scrollback.snapshot()
        if backlog:
            peer.deliver(backlog)
        log.info("console %s: attached", self.name)
        return True

    def detach(self, peer: ConsolePeer) -> None:
        """``peer`` went away (detach or hangup); a no-op if it is not the attached one."""
        if self.peer is peer:
            self.peer = None
            log.info("console %s: detached", self.name)

    def input(self, peer: ConsolePeer, data: bytes) -> bool:
        """``peer`` typed ``data`` for the guest; accepted only from the attached peer."""
        if peer is not self.peer or self.on_input is None:
            self.input_refused += len(data)
            return False
        self.bytes_in += len(data)
        self.on_input(data)
        return True

    def close(self) -> None:
        """Hang up the attached peer, write the queued log output and close the log (blocks until written)."""
        self._hang_up()
        if self.logfile is not None:
            self.logfile.close()

    async def aclose(self) -> None:
        """:meth:`close` for the event loop: the loop keeps running while the log is written."""
        self._hang_up()
        if self.logfile is not None:
            await self.logfile.aclose()

    def _hang_up(self) -> None:
        if self.peer is not None:
            peer, self.peer = self.peer, None
            peer.hangup(f"console {self.name} closed")
