"""The attach point of a console: a Unix socket a person connects to.

:class:`ConsoleAttachPoint` serves one :class:`~pvcore.devices.console.stream.ConsoleStream`
on a Unix stream socket (mode 0600, e.g. ``<run_dir>/console-<name>.sock``)
with asyncio. The protocol is the raw byte stream in both directions: on
connect the person receives the scrollback, then live guest output; what the
person sends is guest input. Closing the connection detaches; connecting
again re-attaches (and shows the scrollback again).

One person at a time: a second connection while someone is attached is
*refused* with a one-line message naming the console, and closed; nothing it
sends reaches the guest. Refusing
(rather than taking over) means nobody's session is cut off by someone else
typing the same command; the daemon can still end a session with
:meth:`ConsoleAttachPoint.hangup`.

Backpressure: output for the person is queued in the socket transport up to
``peer_buffer`` bytes; beyond that it is dropped for this person only and
counted in :attr:`SocketPeer.dropped`. The log and the scrollback still get
every byte, and nothing waits for the person.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import stat

from pvcore.devices.console.stream import ConsoleStream
from pvcore.virtio import DeviceError

log = logging.getLogger("pvcore.console")

DEFAULT_PEER_BUFFER = 256 * 1024
"""Bytes of output queued for a slow person before their output is dropped."""

READ_CHUNK = 4096
REFUSAL_LINGER = 5.0
"""Seconds a refused second person's connection is kept open to deliver the refusal."""
SUN_PATH_MAX = 107


class SocketPeer:
    """An attached person on a socket connection; never blocks the sender."""

    def __init__(self, writer: asyncio.StreamWriter, limit: int) -> None:
        self.writer = writer
        self.limit = limit
        self.dropped = 0

    def deliver(self, data: bytes) -> None:
        """Queue ``data`` for the person, dropping what exceeds the buffer limit."""
        transport = self.writer.transport
        if transport.is_closing():
            return
        room = self.limit - transport.get_write_buffer_size()
        if room < len(data):
            self.dropped += len(data) - max(room, 0)
            if room <= 0:
                return
            data = data[:room]
        self.writer.write(data)

    def hangup(self, reason: str) -> None:
        """Tell the person ``reason`` and close the connection."""
        transport = self.writer.transport
        if not transport.is_closing():
            self.writer.write(f"\r\npvcore: {reason}\r\n".encode())
            self.writer.close()


class ConsoleAttachPoint:
    """A Unix socket at ``socket_path`` through which one person at a time attaches to ``stream``."""

    def __init__(
        self, stream: ConsoleStream, socket_path: str | os.PathLike[str], *, peer_buffer: int = DEFAULT_PEER_BUFFER
    ) -> None:
        self.stream = stream
        self.socket_path = os.fspath(socket_path)
        self.peer_buffer = max(peer_buffer, stream.scrollback.limit)
        self.refused = 0
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[asyncio.StreamWriter] = set()
        if len(os.fsencode(self.socket_path)) > SUN_PATH_MAX:
            raise DeviceError(
                f"console {stream.name}: socket path {self.socket_path} is longer than {SUN_PATH_MAX} bytes; "
                "use a shorter run directory"
            )

    def __repr__(self) -> str:
        return f"ConsoleAttachPoint({self.stream.name!r}, {self.socket_path!r})"

    async def start(self) -> None:
        """Create the socket (0600) and start accepting people."""
        if self._server is not None:
            return
        self._remove_stale_socket()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        bound = False
        try:
            os.fchmod(sock.fileno(), 0o600)  # Linux: the mode the socket file is created with
            sock.bind(self.socket_path)
            bound = True
            os.chmod(self.socket_path, 0o600)
            self._server = await asyncio.start_unix_server(self._serve, sock=sock)
        except OSError as exc:
            sock.close()
            if bound:
                os.unlink(self.socket_path)
            raise DeviceError(
                f"console {self.stream.name}: cannot listen on {self.socket_path}: {exc.strerror}; "
                "check that the run directory exists and is writable by the daemon"
            ) from None
        log.info("console %s: attach with socket %s", self.stream.name, self.socket_path)

    def _remove_stale_socket(self) -> None:
        try:
            info = os.lstat(self.socket_path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(info.st_mode):
            raise DeviceError(
                f"console {self.stream.name}: {self.socket_path} exists and is not a socket; remove it or rename the console"
            )
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.setblocking(False)
        try:
            probe.connect(self.socket_path)
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(self.socket_path)
            return
        except BlockingIOError:
            pass
        except OSError as exc:
            if exc.errno != errno.EAGAIN:
                raise DeviceError(f"console {self.stream.name}: cannot check {self.socket_path}: {exc.strerror}") from None
        finally:
            probe.close()
        raise DeviceError(
            f"console {self.stream.name}: socket {self.socket_path} is in use by another process; "
            "is another pvcore daemon serving this console?"
        )

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = SocketPeer(writer, self.peer_buffer)
        self._connections.add(writer)
        if not self.stream.attach(peer):
            self.refused += 1
            await self._refuse(reader, writer)
            return
        try:
            while data := await reader.read(READ_CHUNK):
                self.stream.input(peer, data)
        except ConnectionError:
            pass
        finally:
            self._connections.discard(writer)
            self.stream.detach(peer)
            if peer.dropped:
                log.info("console %s: %d output bytes dropped for a slow client", self.stream.name, peer.dropped)
            writer.close()

    async def _refuse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Tell a second person the console is taken, then discard what they send until they go.

        Reading until their end of file (or :data:`REFUSAL_LINGER` seconds)
        rather than closing at once keeps the message from being lost to a
        connection reset when they had typed something already.
        """
        message = f"console {self.stream.name} is already attached elsewhere; detach that session first (Ctrl-])"
        try:
            writer.write(f"\r\npvcore: {message}\r\n".encode())
            writer.write_eof()
            async with asyncio.timeout(REFUSAL_LINGER):
                while await reader.read(READ_CHUNK):
                    pass
        except (TimeoutError, ConnectionError):
            pass
        finally:
            self._connections.discard(writer)
            writer.close()

    def hangup(self, reason: str = "disconnected by the daemon") -> None:
        """End the attached person's session, if any."""
        peer = self.stream.peer
        if peer is not None:
            self.stream.detach(peer)
            peer.hangup(reason)

    async def close(self) -> None:
        """Stop listening, hang up the attached person, remove the socket file."""
        if self._server is None:
            return
        server, self._server = self._server, None
        server.close()
        self.hangup(f"console {self.stream.name} is shutting down")
        for writer in list(self._connections):
            writer.close()
        await server.wait_closed()
        try:
            os.unlink(self.socket_path)
        except FileNotFoundError:
            pass
