"""The EGD front door: host entropy for QEMU's ``rng-egd`` backend.

QEMU's ``-object rng-egd,chardev=C`` speaks the Entropy Gathering Daemon
protocol to a chardev; :class:`EgdFrontDoor` serves it from one domain's
:class:`~pvcore.devices.rng.EntropySource` on a Unix socket (mode 0600)::

    -chardev socket,id=egd0,path=S -object rng-egd,id=rng0,chardev=egd0 -device virtio-rng-pci,rng=rng0

Commands (one byte each, arguments after it):

* ``0x00`` entropy level: answered with a 32-bit big-endian count of bits,
  the most one rate window can give (the source keeps no pool);
* ``0x01 N`` non-blocking read: answered with one length byte and as many of
  the N bytes as the rate limit allows right now (possibly none);
* ``0x02 N`` blocking read (what QEMU sends, N at most 255): answered with
  exactly N bytes, waiting for the rate limit's next window when needed;
* ``0x03 BITS(2) N DATA(N)`` write entropy: accepted and ignored, because a
  guest's bytes never feed the host's or another domain's entropy;
* anything else (``0x04``, report PID, included) is refused by closing the
  connection with a logged reason, since the protocol has no error reply.

Requests on one connection are answered in order. A door made with
``unasked_bytes=N`` sends N bytes on each new connection before any request:
QEMU's rng-egd (the only client of such a door) reconnecting to a restarted
daemon may still wait for the answer to a request it sent to the previous one,
and it never sends that request again. EGD answers carry no framing, so QEMU
hands those bytes to its oldest waiting request, or to its next one. A door
other clients use must not do this (they would read the bytes as the answer to
their first command). The entropy bytes go from
the source straight to the socket and are never logged. QEMU's ``rng-egd``
uses one connection, so by default one client at a time is served and a
second one is refused (closed at once, with a logged line). Each connection
is its own task; a slow or hostile client holds only its own requests (the
rate limit is the domain's, shared by all its consumers).
"""

from __future__ import annotations

import asyncio
import logging
import struct
from pathlib import Path

from pvcore.devices.rng import MAX_REQUEST_BYTES, EntropySource
from pvcore.streams.unix import UnixListener, peer_description

log = logging.getLogger("pvcore.rng")

EGD_ENTROPY_LEVEL = 0x00
EGD_READ_NONBLOCKING = 0x01
EGD_READ_BLOCKING = 0x02
EGD_WRITE_ENTROPY = 0x03

MAX_CONNECTIONS = 1
"""Clients served at once by default: QEMU's rng-egd opens one connection."""

QEMU_UNASKED_BYTES = 255
"""What a door for QEMU's rng-egd sends unasked at connect: the most one request asks (QEMU splits
larger ones), so a request lost with a restarted daemon is answered, whatever guest made it."""

_U32 = struct.Struct(">I")
_WRITE_HEADER = struct.Struct(">HB")


class EgdProtocolError(Exception):
    """A client sent something the EGD protocol does not allow; the connection is closed."""


class EgdFrontDoor:
    """Serves ``source`` over the EGD protocol on the Unix socket ``socket_path`` to ``max_connections`` clients."""

    def __init__(
        self,
        source: EntropySource,
        socket_path: Path | str,
        *,
        max_connections: int = MAX_CONNECTIONS,
        unasked_bytes: int = 0,
    ) -> None:
        if not 0 <= unasked_bytes <= MAX_REQUEST_BYTES:
            raise ValueError(f"unasked_bytes={unasked_bytes}: must be 0 to {MAX_REQUEST_BYTES}")
        self.source = source
        self.socket_path = Path(socket_path)
        self.max_connections = max_connections
        self.unasked_bytes = unasked_bytes
        self.description = (
            f"EGD socket {self.socket_path} for rng {source.name} "
            f"(QEMU: -chardev socket,id=egd0,path={self.socket_path} -object rng-egd,id=rng0,chardev=egd0)"
        )
        self.connections = 0
        self._what = f"rng {source.name} egd"
        self._listener = UnixListener(self.socket_path, self._serve, what=self._what)

    def __repr__(self) -> str:
        return f"EgdFrontDoor({self.source.name!r}, {str(self.socket_path)!r})"

    @property
    def connection_count(self) -> int:
        """How many clients are connected now."""
        return self._listener.connection_count

    @property
    def entropy_level_bits(self) -> int:
        """What ``0x00`` answers: the bits one rate window gives (capped to 32 bits)."""
        window = self.source.rate.max_bytes if self.source.rate is not None else MAX_REQUEST_BYTES
        return min(8 * window, 0xFFFFFFFF)

    async def start(self) -> None:
        """Listen on the socket."""
        await self._listener.start()
        log.info("%s: serving %s", self._what, self.description)

    async def stop(self) -> None:
        """Stop listening, drop every connection (held reads are cancelled), remove the socket."""
        await self._listener.stop()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        client = f"client {self.connections} ({peer_description(writer)})"
        if self._listener.connection_count > self.max_connections:
            log.warning("%s: %s refused: already %d connection(s)", self._what, client, self.max_connections)
            return
        log.info("%s: %s connected", self._what, client)
        reason = "closed by the client"
        try:
            await self._send(self.unasked_bytes, writer)
            await writer.drain()
            while command := await reader.read(1):
                await self._command(command[0], reader, writer)
                await writer.drain()
        except EgdProtocolError as exc:
            log.warning("%s: %s: %s; closing the connection", self._what, client, exc)
            reason = str(exc)
        except asyncio.IncompleteReadError:
            reason = "closed by the client in the middle of a command"
        except ConnectionError as exc:
            reason = f"connection lost: {exc.strerror or exc}"
        except asyncio.CancelledError:
            reason = "front door stopped"
            raise
        finally:
            log.info("%s: %s disconnected: %s", self._what, client, reason)

    async def _command(self, command: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if command == EGD_READ_BLOCKING:
            await self._send((await reader.readexactly(1))[0], writer)
        elif command == EGD_READ_NONBLOCKING:
            data = self._read_now((await reader.readexactly(1))[0])
            writer.write(bytes((len(data),)) + data)
        elif command == EGD_ENTROPY_LEVEL:
            writer.write(_U32.pack(self.entropy_level_bits))
        elif command == EGD_WRITE_ENTROPY:
            _bits, length = _WRITE_HEADER.unpack(await reader.readexactly(_WRITE_HEADER.size))
            await reader.readexactly(length)
        else:
            raise EgdProtocolError(f"command {command:#04x} is not supported")

    async def _send(self, size: int, writer: asyncio.StreamWriter) -> None:
        """Write exactly ``size`` bytes of the source, waiting for the rate limit's windows as needed."""
        while size > 0:
            data = await self.source.read(size)
            writer.write(data)
            size -= len(data)

    def _read_now(self, size: int) -> bytes:
        """Up to ``size`` bytes if the rate limit gives them at once, else nothing."""
        if size == 0:
            return b""
        received: list[bytes] = []
        request = self.source.request(size, received.append)
        if not request.done:
            request.cancel()
            return b""
        return received[0]
