"""A vhost-user frontend in Python: the front end's (QEMU's) side of the protocol, a test peer.

:class:`VhostUserFrontend` talks to a vhost-user backend over a Unix socket
the way QEMU does: it negotiates features and protocol features, shares guest
RAM (a memfd :class:`~pvcore.testing.driver.GuestRam`) with SET_MEM_TABLE, sets
up each vring (size, base, user addresses, eventfd kick/call/err) and enables
it. Requests are then posted with the core's reference driver
(:class:`~pvcore.testing.driver.DriverQueue`) and their completions collected
from the used ring, waking on the call eventfd. This exercises a backend's
protocol handling and data path in seconds, without booting a guest.

:meth:`VhostUserFrontend.send` writes any message, fds included, so tests can
send what no correct frontend would. All methods are called from one thread;
replies are awaited with a timeout.
"""

from __future__ import annotations

import os
import select
import socket
import time
from collections.abc import Sequence

from pvcore.testing.driver import DriverQueue, GuestRam, UsedBuffer
from pvcore.transports.vhost_user.protocol import (
    F_LOG_ALL,
    F_PROTOCOL_FEATURES,
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    HEADER,
    VERSION,
    VRING_F_LOG,
    ConfigSpace,
    InflightDesc,
    LogDesc,
    MemoryTable,
    ProtocolFeature,
    RegionDesc,
    Request,
    VringAddr,
    VringState,
    decode_config,
    decode_inflight,
    decode_state,
    decode_u64,
    encode,
    encode_addr,
    encode_config,
    encode_inflight,
    encode_log,
    encode_memory,
    encode_state,
    encode_u64,
)
from pvcore.virtio import VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC, bit

WANTED_PROTOCOL_FEATURES = (
    bit(ProtocolFeature.MQ) | bit(ProtocolFeature.REPLY_ACK) | bit(ProtocolFeature.CONFIG)
    | bit(ProtocolFeature.LOG_SHMFD) | bit(ProtocolFeature.INFLIGHT_SHMFD)
)
REPLIED_REQUESTS = frozenset(
    {
        Request.GET_FEATURES,
        Request.GET_PROTOCOL_FEATURES,
        Request.GET_VRING_BASE,
        Request.GET_QUEUE_NUM,
        Request.GET_CONFIG,
    }
)
RECHECK_INTERVAL = 0.05
"""Longest wait on a call eventfd before the used ring is read again (interrupts may be suppressed)."""


class FrontendError(Exception):
    """The backend answered wrongly, refused a request, or went away."""


class VhostUserFrontend:
    """One connection to a vhost-user backend, with guest RAM and driver queues of its own.

    Build it with :meth:`connect` (the backend listens) or :meth:`accept`
    (the backend connects to us), then :meth:`start` the device.
    """

    def __init__(
        self, sock: socket.socket, *, ram_size: int = 16 << 20, timeout: float = 5.0, sealed_ram: bool = True
    ) -> None:
        self.sock = sock
        self.timeout = timeout
        sock.settimeout(timeout)
        self.ram = GuestRam(ram_size, sealed=sealed_ram)
        self.features = 0
        self.offered = 0
        self.protocol_features = 0
        self.queues: dict[int, DriverQueue] = {}
        self.kicks: dict[int, int] = {}
        self.calls: dict[int, int] = {}
        self.errs: dict[int, int] = {}
        self._collected: dict[int, list[UsedBuffer]] = {}
        self.inflight: tuple[int, InflightDesc] | None = None
        """The inflight region's fd and description, once :meth:`start` asked the back end for one."""

    @classmethod
    def connect(cls, path: str | os.PathLike[str], **kwargs: float | bool) -> VhostUserFrontend:
        """Connect to a backend listening on ``path``."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(os.fspath(path))
        except OSError:
            sock.close()
            raise
        return cls(sock, **kwargs)

    @classmethod
    def accept(cls, listener: socket.socket, *, timeout: float = 5.0, **kwargs: float | bool) -> VhostUserFrontend:
        """Wait for a backend in client mode to connect to ``listener``."""
        listener.settimeout(timeout)
        sock, _ = listener.accept()
        return cls(sock, timeout=timeout, **kwargs)

    def __enter__(self) -> VhostUserFrontend:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection, the eventfds and the guest RAM."""
        self.sock.close()
        for fds in (self.kicks, self.calls, self.errs):
            for fd in fds.values():
                os.close(fd)
            fds.clear()
        if self.inflight is not None:
            os.close(self.inflight[0])
            self.inflight = None
        self.ram.close()

    def send(self, request: int, payload: bytes = b"", fds: Sequence[int] = (), *, flags: int = VERSION) -> None:
        """Send one raw message (any request, payload, flags and fds)."""
        data = encode(request, payload, flags=flags)
        if fds:
            socket.send_fds(self.sock, [data], list(fds))
        else:
            self.sock.sendall(data)

    def receive(self) -> tuple[int, int, bytes]:
        """Read one message from the backend: (request, flags, payload)."""
        header = self._read_exact(HEADER.size)
        request, flags, size = HEADER.unpack(header)
        return request, flags, self._read_exact(size)

    def _read_exact(self, size: int) -> bytes:
        data = bytearray()
        while len(data) < size:
            chunk = self.sock.recv(size - len(data))
            if not chunk:
                raise FrontendError("the backend closed the connection")
            data += chunk
        return bytes(data)

    def call(self, request: Request, payload: bytes = b"", fds: Sequence[int] = ()) -> bytes | None:
        """Send ``request``; return its reply payload, or check its ack when REPLY_ACK was negotiated."""
        acked = request not in REPLIED_REQUESTS and bool(self.protocol_features & bit(ProtocolFeature.REPLY_ACK))
        self.send(request, payload, fds, flags=VERSION | (FLAG_NEED_REPLY if acked else 0))
        if request not in REPLIED_REQUESTS and not acked:
            return None
        reply_request, flags, reply = self.receive()
        if reply_request != request or not flags & FLAG_REPLY:
            raise FrontendError(f"{request.name}: got reply to request {reply_request} with flags {flags:#x}")
        if acked:
            if len(reply) != 8 or decode_u64(reply) != 0:
                raise FrontendError(f"{request.name}: backend refused it (ack {reply.hex()})")
            return None
        return reply

    def _reply_u64(self, request: Request) -> int:
        reply = self.call(request)
        assert reply is not None
        if len(reply) != 8:
            raise FrontendError(f"{request.name}: reply of {len(reply)} bytes, expected 8")
        return decode_u64(reply)

    def get_features(self) -> int:
        """GET_FEATURES."""
        return self._reply_u64(Request.GET_FEATURES)

    def get_protocol_features(self) -> int:
        """GET_PROTOCOL_FEATURES."""
        return self._reply_u64(Request.GET_PROTOCOL_FEATURES)

    def get_queue_num(self) -> int:
        """GET_QUEUE_NUM."""
        return self._reply_u64(Request.GET_QUEUE_NUM)

    def get_config(self, offset: int, size: int) -> bytes:
        """GET_CONFIG of ``size`` bytes at ``offset``."""
        reply = self.call(Request.GET_CONFIG, encode_config(ConfigSpace(offset, size, 0, bytes(size))))
        assert reply is not None
        return decode_config(reply).payload

    def get_inflight_fd(self, num_queues: int, queue_size: int) -> tuple[int, InflightDesc]:
        """GET_INFLIGHT_FD: the back end makes an inflight region; returns its fd (now ours) and description."""
        self.send(Request.GET_INFLIGHT_FD, encode_inflight(InflightDesc(0, 0, num_queues, queue_size)))
        header, fds, _flags, _ = socket.recv_fds(self.sock, HEADER.size, 1)
        try:
            if len(header) != HEADER.size or len(fds) != 1:
                raise FrontendError(f"GET_INFLIGHT_FD: reply of {len(header)} header bytes with {len(fds)} fds")
            request, flags, size = HEADER.unpack(header)
            if request != Request.GET_INFLIGHT_FD or not flags & FLAG_REPLY:
                raise FrontendError(f"GET_INFLIGHT_FD: got reply to request {request} with flags {flags:#x}")
            return fds[0], decode_inflight(self._read_exact(size))
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise

    def set_inflight_fd(self, fd: int, desc: InflightDesc) -> None:
        """SET_INFLIGHT_FD: hand a kept inflight region (``fd`` stays ours) to the back end."""
        self.call(Request.SET_INFLIGHT_FD, encode_inflight(desc), [fd])

    def get_vring_base(self, index: int) -> int:
        """GET_VRING_BASE: stop the ring; return where the backend stopped."""
        reply = self.call(Request.GET_VRING_BASE, encode_state(VringState(index, 0)))
        assert reply is not None
        state = decode_state(reply)
        if state.index != index:
            raise FrontendError(f"GET_VRING_BASE for queue {index} answered for queue {state.index}")
        return state.num

    def start(
        self, *, num_queues: int | None = None, queue_size: int = 128, features: int | None = None,
        inflight: bool = False,
    ) -> None:
        """The handshake QEMU makes, then every queue set up and enabled.

        ``features`` defaults to everything offered except the protocol-features
        bit and VHOST_F_LOG_ALL (a front end sets that one only to migrate, see
        :meth:`start_logging`). With ``inflight`` the back end makes an
        inflight region (GET_INFLIGHT_FD), kept as :attr:`inflight` and handed
        back (SET_INFLIGHT_FD) before the rings, as QEMU's vhost-user-blk does.
        """
        num_queues = self._handshake(num_queues, features)
        if inflight:
            self.inflight = self.get_inflight_fd(num_queues, queue_size)
            self.set_inflight_fd(*self.inflight)
        self.set_mem_table()
        for index in range(num_queues):
            self.setup_queue(index, queue_size)
            if self.offered & bit(F_PROTOCOL_FEATURES):
                self.enable_queue(index)

    def _handshake(self, num_queues: int | None, features: int | None) -> int:
        offered = self.get_features()
        if offered & bit(F_PROTOCOL_FEATURES):
            self.protocol_features = self.get_protocol_features() & WANTED_PROTOCOL_FEATURES
            self.call(Request.SET_PROTOCOL_FEATURES, encode_u64(self.protocol_features))
        if num_queues is None:
            num_queues = self.get_queue_num()
        self.call(Request.SET_OWNER)
        if features is None:
            features = offered & ~(bit(F_PROTOCOL_FEATURES) | bit(F_LOG_ALL))
        self.offered = offered
        self.features = features
        self.call(Request.SET_FEATURES, encode_u64(features | (offered & bit(F_PROTOCOL_FEATURES))))
        return num_queues

    def reconnect(self, sock: socket.socket) -> None:
        """What QEMU does when a back end comes back: the same guest RAM and rings over a new connection.

        Each ring resumes at its used index (QEMU's base after a lost back
        end); the :attr:`inflight` region, if :meth:`start` got one, is handed
        to the new back end, which resumes what its predecessor had in flight.
        """
        self.sock.close()
        self.sock = sock
        sock.settimeout(self.timeout)
        self._handshake(len(self.queues), self.features)
        if self.inflight is not None:
            self.set_inflight_fd(*self.inflight)
        self.set_mem_table()
        for index, queue in self.queues.items():
            self._configure_queue(index, queue, queue.used_idx())
            if self.offered & bit(F_PROTOCOL_FEATURES):
                self.enable_queue(index)

    def set_log_base(self, fd: int, size: int, offset: int = 0) -> None:
        """SET_LOG_BASE with LOG_SHMFD: the log is ``size`` bytes of ``fd`` from ``offset``; waits for the reply."""
        self.send(Request.SET_LOG_BASE, encode_log(LogDesc(size, offset)), [fd])
        reply_request, flags, _ = self.receive()
        if reply_request != Request.SET_LOG_BASE or not flags & FLAG_REPLY:
            raise FrontendError(f"SET_LOG_BASE: got reply to request {reply_request} with flags {flags:#x}")

    def start_logging(self, fd: int, size: int, offset: int = 0) -> None:
        """What QEMU does as a migration starts: SET_LOG_BASE, features with LOG_ALL, rings with VRING_F_LOG."""
        self.set_log_base(fd, size, offset)
        self.set_logging(True)

    def set_logging(self, on: bool) -> None:
        """SET_FEATURES with or without VHOST_F_LOG_ALL, then SET_VRING_ADDR of every ring with(out) VRING_F_LOG."""
        protocol = self.offered & bit(F_PROTOCOL_FEATURES)
        self.call(Request.SET_FEATURES, encode_u64(self.features | protocol | (bit(F_LOG_ALL) if on else 0)))
        for index, queue in self.queues.items():
            addresses = VringAddr(
                index, VRING_F_LOG if on else 0, self.user_addr(queue.desc_addr), self.user_addr(queue.used_addr),
                self.user_addr(queue.avail_addr), queue.used_addr if on else 0,
            )
            self.call(Request.SET_VRING_ADDR, encode_addr(addresses))

    def set_mem_table(self) -> None:
        """SET_MEM_TABLE with the guest RAM memfd as the one region."""
        ram = self.ram
        table = MemoryTable((RegionDesc(ram.guest_addr, ram.size, ram.user_addr, 0),))
        self.call(Request.SET_MEM_TABLE, encode_memory(table), [ram.fd])

    def user_addr(self, guest_addr: int) -> int:
        """This process's address of a guest address (what vhost-user ring addresses are)."""
        return self.ram.user_addr + guest_addr - self.ram.guest_addr

    def setup_queue(self, index: int, size: int, *, base: int = 0) -> DriverQueue:
        """SET_VRING_NUM/BASE/ADDR and eventfd KICK/CALL/ERR for a fresh driver queue."""
        queue = DriverQueue(
            self.ram,
            size,
            event_idx=bool(self.features & bit(VIRTIO_RING_F_EVENT_IDX)),
            indirect=bool(self.features & bit(VIRTIO_RING_F_INDIRECT_DESC)),
            start_index=base,
        )
        self.queues[index] = queue
        self._collected[index] = []
        self._configure_queue(index, queue, base)
        return queue

    def _configure_queue(self, index: int, queue: DriverQueue, base: int) -> None:
        self.call(Request.SET_VRING_NUM, encode_state(VringState(index, queue.size)))
        self.call(Request.SET_VRING_BASE, encode_state(VringState(index, base)))
        addresses = VringAddr(
            index, 0, self.user_addr(queue.desc_addr), self.user_addr(queue.used_addr), self.user_addr(queue.avail_addr)
        )
        self.call(Request.SET_VRING_ADDR, encode_addr(addresses))
        for request, fds in ((Request.SET_VRING_KICK, self.kicks), (Request.SET_VRING_CALL, self.calls),
                             (Request.SET_VRING_ERR, self.errs)):
            if index in fds:
                os.close(fds.pop(index))
            fds[index] = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            self.call(request, encode_u64(index), [fds[index]])

    def enable_queue(self, index: int, enabled: bool = True) -> None:
        """SET_VRING_ENABLE."""
        self.call(Request.SET_VRING_ENABLE, encode_state(VringState(index, int(enabled))))

    def submit(self, index: int, readable: Sequence[bytes], writable_lens: Sequence[int], *,
               indirect: bool = False) -> int:
        """Post one chain on queue ``index`` and kick if the backend wants it; return its head."""
        queue = self.queues[index]
        head = queue.add(readable, writable_lens, indirect=indirect)
        if queue.kick_needed():
            os.eventfd_write(self.kicks[index], 1)
        return head

    def wait_used(self, index: int, count: int, timeout: float | None = None) -> list[UsedBuffer]:
        """Wait until ``count`` chains of queue ``index`` are used; return them (oldest first)."""
        queue, collected = self.queues[index], self._collected[index]
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            collected.extend(queue.used())
            if len(collected) >= count:
                done, collected[:] = collected[:count], collected[count:]
                return done
            left = deadline - time.monotonic()
            if left <= 0:
                raise FrontendError(f"queue {index}: {len(collected)} of {count} chains used before the timeout")
            ready, _, _ = select.select([self.calls[index]], [], [], min(left, RECHECK_INTERVAL))
            if ready:
                try:
                    os.eventfd_read(self.calls[index])
                except BlockingIOError:
                    pass

    def request(self, index: int, readable: Sequence[bytes], writable_lens: Sequence[int], *,
                timeout: float | None = None, indirect: bool = False) -> UsedBuffer:
        """Post one chain, wait for it to be used and return it."""
        head = self.submit(index, readable, writable_lens, indirect=indirect)
        used = self.wait_used(index, 1, timeout)[0]
        if used.head != head:
            raise FrontendError(f"queue {index}: waited for head {head}, got {used.head}")
        return used

    def error_signalled(self, index: int) -> bool:
        """Whether the backend signalled queue ``index``'s error eventfd (device needs reset)."""
        try:
            return os.eventfd_read(self.errs[index]) > 0
        except BlockingIOError:
            return False
