"""The netdev stream front door: a QEMU NIC as a port on a pvcore switch.

QEMU's ``-netdev stream`` (QEMU 7.2 and later) carries Ethernet frames over a
stream socket, each frame preceded by its length as a 4-byte big-endian
integer. :class:`NetdevStreamFrontDoor` listens on a Unix socket (mode 0600)
and QEMU connects to it::

    -netdev stream,id=n0,server=off,addr.type=unix,addr.path=S -device spapr-vlan,netdev=n0,mac=M

The door is one :class:`~pvcore.devices.net.switch.Port` on a switch, with
the MAC the user configured, so the switch's anti-spoof filter drops any
frame QEMU sends from another source address. Frames the switch forwards to
the port are written to QEMU through a bounded output buffer: when QEMU does
not read fast enough (more than ``output_limit`` bytes waiting), or is not
connected, the frame is refused and the switch counts it as ``dropped_full``,
so the daemon never waits for one guest.

A frame length of 0, or more than :data:`~pvcore.devices.net.switch.MAX_FRAME_LEN`,
means the stream is corrupt or hostile: the connection is closed with a
logged reason and the door waits for QEMU to connect again. One QEMU at a
time: a second connection while one is open is refused and closed.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from pathlib import Path

from pvcore.devices.net.switch import MAX_FRAME_LEN, Port, Switch, format_mac, parse_mac
from pvcore.streams.unix import UnixListener, peer_description
from pvcore.throttle import Cost, Throttle

log = logging.getLogger("pvcore.net")

DEFAULT_OUTPUT_LIMIT = 256 * 1024
"""Bytes queued for a QEMU that is not reading before further frames are dropped."""

_LENGTH = struct.Struct(">I")


class StreamPort(Port):
    """A switch port whose station is the QEMU connected to a netdev stream socket."""

    def __init__(self, name: str, mac: bytes, *, output_limit: int = DEFAULT_OUTPUT_LIMIT) -> None:
        super().__init__(name, mac)
        if output_limit < _LENGTH.size + MAX_FRAME_LEN:
            raise ValueError(f"port {name}: output_limit {output_limit} cannot hold one largest frame")
        self.output_limit = output_limit
        self.writer: asyncio.StreamWriter | None = None

    def deliver(self, frame: bytes) -> bool:
        """Queue a frame for QEMU; False if QEMU is not connected or its output buffer is full."""
        writer = self.writer
        if writer is None or writer.transport.is_closing():
            return False
        if writer.transport.get_write_buffer_size() + _LENGTH.size + len(frame) > self.output_limit:
            return False
        writer.write(_LENGTH.pack(len(frame)) + frame)
        return True


class NetdevStreamFrontDoor:
    """Attaches a port with ``mac`` to ``switch`` and serves it to the QEMU that connects to ``socket_path``.

    ``mac`` is bytes or text such as ``52:54:00:12:34:56``; ``name`` is the
    port's name on the switch (default: derived from the socket path).
    """

    def __init__(
        self,
        switch: Switch,
        socket_path: Path | str,
        mac: bytes | str,
        *,
        name: str | None = None,
        output_limit: int = DEFAULT_OUTPUT_LIMIT,
        throttle: Throttle | None = None,
    ) -> None:
        station = parse_mac(mac) if isinstance(mac, str) else bytes(mac)
        self.switch = switch
        self.socket_path = Path(socket_path)
        self.port = StreamPort(name or f"stream:{self.socket_path}", station, output_limit=output_limit)
        self._what = f"net {self.port.name}"
        self.description = (
            f"netdev stream socket {self.socket_path} for MAC {format_mac(station)} on switch {switch.name} "
            f"(QEMU: -netdev stream,server=off,addr.type=unix,addr.path={self.socket_path})"
        )
        self.connections = 0
        self.throttle = throttle
        self._listener = UnixListener(self.socket_path, self._serve, what=self._what)

    def __repr__(self) -> str:
        return f"NetdevStreamFrontDoor({self.description})"

    @property
    def connected(self) -> bool:
        """Whether QEMU is connected now."""
        return self.port.writer is not None

    async def start(self) -> None:
        """Attach the port to the switch and listen for QEMU."""
        self.switch.attach(self.port)
        try:
            await self._listener.start()
        except BaseException:
            self.switch.detach(self.port)
            raise
        log.info("%s: serving %s", self._what, self.description)

    async def stop(self) -> None:
        """Stop listening, close QEMU's connection, detach the port and remove the socket."""
        await self._listener.stop()
        self.switch.detach(self.port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = peer_description(writer)
        if self.port.writer is not None:
            log.warning("%s: refused a second connection (%s) while QEMU is connected", self._what, peer)
            return
        self.port.writer = writer
        self.connections += 1
        log.info("%s: QEMU connected (%s)", self._what, peer)
        reason = "closed by QEMU"
        try:
            reason = await self._receive(reader)
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                reason = f"closed by QEMU in the middle of a frame ({len(exc.partial)} of {exc.expected} bytes)"
        except ConnectionError as exc:
            reason = f"connection lost: {exc.strerror or exc}"
        except asyncio.CancelledError:
            reason = "front door stopped"
            raise
        finally:
            self.port.writer = None
            log.info("%s: QEMU disconnected: %s", self._what, reason)

    async def _receive(self, reader: asyncio.StreamReader) -> str:
        """Hand every frame QEMU sends to the switch; returns why the stream was abandoned."""
        while True:
            (length,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
            if not 0 < length <= MAX_FRAME_LEN:
                log.warning(
                    "%s: frame length %d is outside 1..%d; the stream is corrupt, closing the connection",
                    self._what, length, MAX_FRAME_LEN,
                )
                return f"bad frame length {length}"
            frame = await reader.readexactly(length)
            if self.throttle is not None:
                await self.throttle.turn(Cost(True, 0, length))
            self.port.send(frame)
