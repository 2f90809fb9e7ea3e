"""The chardev front door: a guest console reached as QEMU's chardev byte stream.

For hypervisors whose device model owns the console ring (QEMU's
virtio-serial, isa-serial, spapr-vty...), QEMU hands the backend a plain byte
stream. :class:`ChardevFrontDoor` listens on a Unix socket (mode 0600) and
QEMU connects to it::

    -chardev socket,id=con0,path=S,reconnect=1 -serial chardev:con0

Bytes QEMU sends (what the guest wrote) go to
:meth:`~pvcore.devices.console.stream.ConsoleStream.output`; bytes the stream
has for the guest (its ``on_input`` callback) are written to QEMU. When QEMU
goes away (guest shut down, QEMU restarted) the door keeps listening and the
next connection carries on; input that arrives while QEMU is not connected,
or that QEMU does not read fast enough (more than ``input_buffer`` bytes
queued), is dropped and counted, so the daemon never waits for QEMU. One QEMU
at a time: a second connection while one is open is refused and closed.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable

from pvcore.devices.console.stream import ConsoleStream
from pvcore.streams.unix import UnixListener, peer_description

log = logging.getLogger("pvcore.streams")

READ_CHUNK = 4096
DEFAULT_INPUT_BUFFER = 64 * 1024
"""Bytes of guest input queued for a QEMU that is not reading, before input is dropped."""


class ChardevFrontDoor:
    """Serves ``stream`` to the QEMU chardev that connects to ``socket_path``."""

    def __init__(
        self, stream: ConsoleStream, socket_path: str | os.PathLike[str], *, input_buffer: int = DEFAULT_INPUT_BUFFER
    ) -> None:
        self.stream = stream
        self.socket_path = os.fspath(socket_path)
        self.input_buffer = input_buffer
        self.description = f"chardev socket {self.socket_path} (QEMU: -chardev socket,path={self.socket_path},reconnect=1)"
        self.connections = 0
        self.input_dropped = 0
        self._listener = UnixListener(self.socket_path, self._serve, what=f"console {stream.name} chardev")
        self._writer: asyncio.StreamWriter | None = None
        self._tasks: set[asyncio.Task[object]] = set()
        self._previous_on_input: Callable[[bytes], None] | None = None

    def __repr__(self) -> str:
        return f"ChardevFrontDoor({self.stream.name!r}, {self.socket_path!r})"

    @property
    def connected(self) -> bool:
        """Whether QEMU is connected now."""
        return self._writer is not None

    async def start(self) -> None:
        """Listen for QEMU and route the stream's input to it."""
        await self._listener.start()
        self._previous_on_input = self.stream.on_input
        self.stream.on_input = self._to_guest
        log.info("console %s: chardev socket %s", self.stream.name, self.socket_path)

    async def stop(self) -> None:
        """Stop listening, close QEMU's connection, remove the socket file."""
        await self._listener.stop()
        if self.stream.on_input == self._to_guest:
            self.stream.on_input = self._previous_on_input
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def _to_guest(self, data: bytes) -> None:
        writer = self._writer
        if writer is None or writer.transport.is_closing():
            self.input_dropped += len(data)
            return
        room = self.input_buffer - writer.transport.get_write_buffer_size()
        if room < len(data):
            self.input_dropped += len(data) - max(room, 0)
            if room <= 0:
                return
            data = data[:room]
        writer.write(data)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if self._writer is not None:
            log.warning(
                "console %s: refused a second chardev connection (%s) while QEMU is connected",
                self.stream.name,
                peer_description(writer),
            )
            writer.close()
            return
        self._tasks.add(task)
        self._writer = writer
        self.connections += 1
        log.info("console %s: QEMU connected (%s)", self.stream.name, peer_description(writer))
        reason = "QEMU closed the connection"
        try:
            while data := await reader.read(READ_CHUNK):
                self.stream.output(data)
        except ConnectionError as exc:
            reason = f"connection lost: {exc}"
        except asyncio.CancelledError:
            reason = "front door stopped"
            raise
        finally:
            self._writer = None
            self._tasks.discard(task)
            writer.close()
            log.info("console %s: QEMU disconnected: %s", self.stream.name, reason)
