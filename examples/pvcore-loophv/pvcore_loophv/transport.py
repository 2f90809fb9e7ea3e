"""The loophv transport: guest RAM is a memfd, notification is eventfds, set up over a Unix socket.

JSON messages on a ``SOCK_SEQPACKET`` socket. The backend greets with
``{"features", "queues", "max_queue_size"}``; the guest answers once with
``{"features", "memory", "queues": [{"size", "desc", "avail", "used"}...]}`` and
its descriptors: RAM, an error eventfd, then a kick and a call eventfd per
queue. The backend replies ``{"ok": true}``, or ``{"error": why}`` and hangs up.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from pathlib import Path
from typing import Any

from pvcore.contract import EventFdChannel, FdMemoryLayout, FdRegion, Primitives
from pvcore.ring.memory import GuestMemoryError
from pvcore.ring.session import SessionError, VirtioSession
from pvcore.streams.unix import bind_private_socket
from pvcore.virtio import TRANSPORT_FEATURES, VirtioDevice

HYPERVISOR = "loophv"
log = logging.getLogger("pvcore.loophv")


class LoopConnection:
    """One guest connected to a device: a fresh ring session configured by its one setup message."""

    def __init__(self, device: VirtioDevice, sock: socket.socket, primitives: Primitives, name: str) -> None:
        self.sock, self.primitives, self.name = sock, primitives, name
        self.loop = asyncio.get_running_loop()
        self.session = VirtioSession(device, name=name, loop=self.loop)
        self.memory: Any = None
        self.send(features=TRANSPORT_FEATURES | device.features(), queues=device.num_queues(),
                  max_queue_size=device.max_queue_size)
        self.loop.add_reader(sock, self.receive)

    def send(self, **message: Any) -> None:
        """One message to the guest (lost if the guest is gone)."""
        try:
            self.sock.send(json.dumps(message).encode())
        except OSError as exc:
            log.info("%s: cannot reach the guest: %s", self.name, exc)

    def receive(self) -> None:
        """The setup message; anything after it, or end of file, ends the connection."""
        try:
            data, fds, _, _ = socket.recv_fds(self.sock, 65536, 2 + 2 * len(self.session.setups))
        except OSError as exc:
            data, fds = b"", []
            log.warning("%s: %s", self.name, exc)
        try:
            if not data or self.memory is not None:
                return self.hang_up("the guest left" if not data else "a second setup message")
            self.setup(json.loads(data), fds)
            self.send(ok=True)
        except (ValueError, KeyError, TypeError, SessionError, GuestMemoryError, OSError) as exc:
            self.send(error=str(exc))
            self.hang_up(f"guest refused: {exc}")
        finally:
            for fd in fds:
                os.close(fd)

    def notifier(self, fd: int) -> Any:
        """A notifier on a copy of a received eventfd (the received one is closed after setup)."""
        copy = os.dup(fd)
        try:
            return self.primitives.open_notifier(EventFdChannel(copy))
        except BaseException:
            os.close(copy)
            raise

    def setup(self, message: dict[str, Any], fds: list[int]) -> None:
        """Features, memory, each queue's size, addresses and notifiers, then start the queues."""
        queues = message["queues"]
        if len(queues) != len(self.session.setups) or len(fds) != 2 + 2 * len(queues):
            raise ValueError(f"expected {len(self.session.setups)} queues and {2 + 2 * len(self.session.setups)} fds")
        self.session.negotiate(int(message["features"]))
        region = FdRegion(fds[0], 0, int(message["memory"]), 0, 0)
        self.memory = self.primitives.map_memory(FdMemoryLayout((region,)))
        self.session.set_memory(self.memory)
        error = self.notifier(fds[1])
        for index, queue in enumerate(queues):
            kick, call = self.notifier(fds[2 + 2 * index]), self.notifier(fds[3 + 2 * index])
            self.session.configure_queue(index, size=int(queue["size"]), desc=int(queue["desc"]),
                                         avail=int(queue["avail"]), used=int(queue["used"]), kick=kick, call=call, err=error)
        for index in range(len(queues)):
            self.session.start_queue(index)

    def hang_up(self, reason: str) -> None:
        """Stop reading and close the connection on the loop, logging why."""
        log.info("%s: connection closed: %s", self.name, reason)
        self.loop.remove_reader(self.sock)
        self.loop.create_task(self.close())

    async def close(self) -> None:
        """Finish in-flight requests, then release the session, memory and socket."""
        self.loop.remove_reader(self.sock)
        await self.session.shutdown()
        if self.memory is not None:
            self.memory.close()
        self.sock.close()


class LoopFrontDoor:
    """Listens on a 0600 ``SOCK_SEQPACKET`` socket; one guest at a time."""

    def __init__(self, device: VirtioDevice, socket_path: Path | str, *, primitives: Primitives, name: str) -> None:
        self.device, self.socket_path, self.primitives, self.name = device, Path(socket_path), primitives, name
        self.description = f"loophv socket {self.socket_path}"
        self.connection: LoopConnection | None = None

    async def start(self) -> None:
        """Listen on the socket (the core's helper: 0600 from the start, a stale socket replaced)."""
        self.listener = bind_private_socket(self.socket_path, self.name, kind=socket.SOCK_SEQPACKET)
        asyncio.get_running_loop().add_reader(self.listener, self.accept)

    def accept(self) -> None:
        """A guest connects; another one while the first is there is turned away."""
        sock, _ = self.listener.accept()
        sock.setblocking(False)
        if self.connection is not None and self.connection.sock.fileno() >= 0:
            sock.close()
        else:
            self.connection = LoopConnection(self.device, sock, self.primitives, self.name)

    async def stop(self) -> None:
        """Stop listening, end the connection, remove the socket."""
        asyncio.get_running_loop().remove_reader(self.listener)
        self.listener.close()
        self.socket_path.unlink(missing_ok=True)
        if self.connection is not None and self.connection.sock.fileno() >= 0:
            await self.connection.close()
