"""The vhost-user back end: a front end's messages translated into a core ring session.

The front end is whichever VMM speaks vhost-user (QEMU with any accelerator,
cloud-hypervisor, crosvm, Firecracker...); nothing here depends on the
hypervisor underneath.

:class:`VhostUserConnection` serves one frontend connection. It owns a fresh
:class:`~pvcore.ring.session.VirtioSession` for the device and turns each
message into the session call it means: features, the memory table (mapped
through the hypervisor's memory primitive), queue sizes, ring addresses (frontend
user addresses translated to guest addresses), bases, kick/call/err eventfds
(opened through the hypervisor's notification primitive), enabling and stopping
rings. The ring and the device logic are the core's.

Ring start rules (vhost-user "Ring states"): a ring runs when it has a kick fd
and is enabled. With VHOST_USER_F_PROTOCOL_FEATURES negotiated rings start
disabled until SET_VRING_ENABLE 1; without it they are enabled at once.
GET_VRING_BASE stops a ring after its in-flight requests and forgets its kick
fd, so the frontend must send SET_VRING_KICK again to restart it.

A message that breaks the protocol closes its connection with one logged
line; the device is reset and the front door keeps serving new connections
(and every other device keeps running).

:class:`VhostUserFrontDoor` is the :class:`~pvcore.contract.FrontDoor`: in
server mode it listens on a Unix socket (mode 0600; a stale socket file is
replaced; it is removed on stop) and the front end connects (QEMU:
``-chardev socket,id=c0,path=S``); in client mode it connects to a socket the
front end listens on (QEMU: ``-chardev socket,id=c0,path=S,server=on``) and
reconnects when the front end goes away and comes back (backing off up to a
few seconds while connections end at once). A failed accept or connect is logged and retried.

In server mode a device takes up to :data:`MAX_CONNECTIONS` front ends at
once: a live migration's destination VMM connects to the same socket while
the source is still connected. Each connection has its own memory table,
rings and dirty log (its own session); a ring runs only once its own front
end started it. Ending a connection resets the device only when no other
connection is using it, so the source going away after the switch-over does
not disturb the destination. One more connection is refused with one log
line naming its peer (pid, uid). In client mode there is one connection.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pvcore.contract import EventFdChannel, FdMemoryLayout, FdRegion, Primitives
from pvcore.ring.dirtylog import ATOMIC_OR_AVAILABLE, DirtyLog
from pvcore.ring.inflight import InflightArea
from pvcore.ring.memory import GuestMemory, GuestMemoryError
from pvcore.ring.notify import Notifier
from pvcore.ring.session import SessionError, VirtioSession
from pvcore.ring.virtqueue import ring_sizes
from pvcore.streams.unix import bind_private_socket, handed_over, remove_socket_file
from pvcore.transports.vhost_user.queue_spread import QueueChannelError, QueueHost, QueuePeer, memory_message
from pvcore.virtio import DeviceError, VirtioDevice, bit
from pvcore.transports.vhost_user.protocol import (
    F_LOG_ALL,
    F_PROTOCOL_FEATURES,
    FLAG_REPLY,
    VERSION,
    VRING_F_LOG,
    VRING_INDEX_MASK,
    VRING_NOFD,
    Body,
    ConfigSpace,
    InflightDesc,
    LogDesc,
    MemoryTable,
    Message,
    ProtocolError,
    ProtocolFeature,
    Request,
    VringAddr,
    VringState,
    decode,
    encode,
    encode_config,
    encode_inflight,
    encode_state,
    encode_u64,
    read_message,
    send_message,
)

log = logging.getLogger("pvcore.vhost_user")

OFFERED_PROTOCOL_FEATURES = (
    bit(ProtocolFeature.MQ) | bit(ProtocolFeature.REPLY_ACK) | bit(ProtocolFeature.CONFIG)
    | bit(ProtocolFeature.RESET_DEVICE) | bit(ProtocolFeature.INFLIGHT_SHMFD)
    | (bit(ProtocolFeature.LOG_SHMFD) if ATOMIC_OR_AVAILABLE else 0)
)
"""Protocol features a pvcore backend offers (LOG_SHMFD where the log can be marked atomically;
no BACKEND_REQ, POSTCOPY...)."""

LOGGING_FEATURES = bit(F_LOG_ALL) if ATOMIC_OR_AVAILABLE else 0
"""Transport feature bits offered beside the device's: VHOST_F_LOG_ALL with LOG_SHMFD."""

MAX_CONNECTIONS = 2
"""Front ends a server-mode device takes at once: a guest's VMM, and during a live migration
the destination's beside the source's. One more is refused with one log line."""

_HANDLER_ERRORS = (SessionError, GuestMemoryError, DeviceError, ValueError, OSError, QueueChannelError)

SHORT_CONNECTION = 1.0
"""A client-mode connection that ends sooner than this many seconds makes the next attempt wait."""

MAX_RECONNECT_DELAY = 5.0
"""The longest wait (seconds) between client-mode attempts while connections keep ending at once."""


class VhostUserConnection:
    """One frontend connection driving a fresh ring session of ``device``."""

    def __init__(
        self, device: VirtioDevice, sock: socket.socket, *, primitives: Primitives, name: str, number: int = 1,
        alone: Callable[[VhostUserConnection], bool] | None = None, poll_max_ns: int = 0,
        peers: Sequence[QueuePeer] = (),
    ) -> None:
        self.device = device
        self.peers = list(peers)[: max(device.num_queues() - 1, 0)]
        """Queue channels to the workers that serve some of this connection's queues (``spread=on``):
        queue ``i`` is served by ``peers[i % (len(peers) + 1) - 1]``, or here when that is -1. Channels
        to workers beyond the device's queues are closed at once: they would serve nothing."""
        for idle in list(peers)[len(self.peers):]:
            idle.close()
        self.lost: str | None = None
        """Why a worker hosting queues of this connection was lost (the connection then ends)."""
        self.poll_max_ns = poll_max_ns
        """Each queue's longest polling window in ns (0: off; see :mod:`pvcore.ring.poll`)."""
        self.alone = alone or (lambda connection: True)
        """Whether no other connection uses the device (then ending this session resets it)."""
        self.dirty_log: DirtyLog | None = None
        self.log_all = False
        self.inflight: InflightArea | None = None
        self.number = number
        self.sock = sock
        self.primitives = primitives
        self.name = name
        self.loop = asyncio.get_running_loop()
        self.session = VirtioSession(device, name=name, loop=self.loop, poll_max_ns=poll_max_ns)
        self.memory: GuestMemory | None = None
        self.protocol_features = 0
        self.owned = False
        self.closing = False
        queues = device.num_queues()
        self.enabled = [False] * queues
        self.kick_ready = [False] * queues
        self.completions = [0] * queues
        self.interrupts = [0] * queues
        self.polled = {"polls": 0, "polls_caught": 0, "poll_ns": 0}
        """What the polling of this connection's stopped queues did (live queues keep their own counts)."""
        self._failing: asyncio.Task[None] | None = None
        self.session.on_fail = self._session_failed
        for peer in self.peers:
            peer.watch(self._peer_lost, self._host_broke)

    def __repr__(self) -> str:
        return f"VhostUserConnection({self.name!r})"

    async def serve(self) -> None:
        """Answer messages until the frontend leaves or breaks the protocol; then clean up."""
        reason, level = "front door stopped", logging.INFO
        try:
            while (message := await read_message(self.loop, self.sock)) is not None:
                await self._dispatch(message)
            reason = "frontend closed the connection"
        except ProtocolError as exc:
            reason, level = f"protocol error: {exc}", logging.WARNING
        except ConnectionError as exc:
            reason, level = f"connection lost: {exc}", logging.WARNING
        except Exception as exc:  # a bug must cost this connection only, never the daemon
            log.exception("%s: internal error", self.name)
            reason, level = f"internal error: {exc}", logging.ERROR
        finally:
            self.closing = True
            if self.lost:
                reason, level = self.lost, logging.WARNING
            try:
                await self._end_failing()
                await self._end_session()
            finally:
                self.sock.close()
                for peer in self.peers:
                    peer.close()
                counts = "; ".join(
                    f"queue {index}: {done} completions, {irqs} interrupts"
                    for index, (done, irqs) in enumerate(zip(self.completions, self.interrupts))
                )
                if self.poll_max_ns:
                    counts += (f"; polling (max {self.poll_max_ns // 1000} us): {self.polled['polls']} windows, "
                               f"{self.polled['polls_caught']} caught a request, {self.polled['poll_ns'] // 1000} us")
                log.log(
                    level, "%s: frontend disconnected (connection %d): %s; %s", self.name, self.number, reason, counts
                )

    def _peer_lost(self, reason: str) -> None:
        """A worker hosting queues went away: end this connection (the front end reconnects, and its next
        connection is spread over the workers then serving)."""
        if self.closing or self.lost:
            return
        self.lost = f"{reason}; its queues cannot go on"
        log.warning("%s: %s; ending the connection", self.name, self.lost)
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _host_broke(self, reason: str) -> None:
        """The guest broke a ring another worker serves: the whole device needs reset, as without spreading."""
        self.session.fail(reason)

    def _session_failed(self, reason: str) -> None:
        """The device needs reset: the workers hosting its other queues stop them too."""
        if self.peers and self._failing is None:
            self._failing = self.loop.create_task(self._fail_hosts(reason))

    async def _fail_hosts(self, reason: str) -> None:
        """Tell every worker hosting queues that the device needs reset (a task: a ring broke mid-pass)."""
        for peer in self.peers:
            try:
                await peer.request({"op": "fail", "reason": reason})
            except QueueChannelError as exc:
                log.log(logging.DEBUG if self.closing else logging.WARNING, "%s: %s", self.name, exc)

    async def _end_failing(self) -> None:
        """Let the hosts hear of a failure before anything else is said to them (a reset, the end)."""
        if self._failing is not None:
            await self._failing

    def _host(self, index: int) -> QueuePeer | None:
        """The worker that serves queue ``index`` (None: this one)."""
        turn = index % (len(self.peers) + 1)
        return self.peers[turn - 1] if turn else None

    async def _tell_hosts(self, message: dict[str, Any], fds: Sequence[int] = ()) -> None:
        """Send a request to every worker hosting queues of this connection and wait for their answers."""
        for peer in self.peers:
            await peer.request(message, fds)

    async def _dispatch(self, message: Message) -> None:
        request, body = decode(message)
        log.debug("%s: %s %s", self.name, request.name, body)
        try:
            reply = await self._handle(request, body, message)
        except ProtocolError:
            await self._nack(message, request)
            raise
        except _HANDLER_ERRORS as exc:
            await self._nack(message, request)
            raise ProtocolError(f"{request.name}: {exc}") from None
        finally:
            message.close_fds()
        if reply is not None:
            await self._reply(request, reply)
        elif message.need_reply and self._acks and request is not Request.GET_INFLIGHT_FD:
            await self._reply(request, encode_u64(0))  # GET_INFLIGHT_FD answered with its region

    @property
    def _acks(self) -> bool:
        return bool(self.protocol_features & bit(ProtocolFeature.REPLY_ACK))

    async def _reply(self, request: Request, payload: bytes) -> None:
        await self.loop.sock_sendall(self.sock, encode(request, payload, flags=VERSION | FLAG_REPLY))

    async def _reply_with_fd(self, request: Request, payload: bytes, fd: int) -> None:
        await send_message(self.loop, self.sock, encode(request, payload, flags=VERSION | FLAG_REPLY), [fd])

    async def _nack(self, message: Message, request: Request) -> None:
        if message.need_reply and self._acks:
            try:
                await self._reply(request, encode_u64(1))
            except OSError:
                pass  # the connection is being closed for the error anyway

    async def _handle(self, request: Request, body: Body, message: Message) -> bytes | None:
        session = self.session
        if request is Request.GET_FEATURES:
            return encode_u64(session.offered_features | bit(F_PROTOCOL_FEATURES) | LOGGING_FEATURES)
        if request is Request.SET_FEATURES:
            assert isinstance(body, int)
            if body & bit(F_LOG_ALL) and not LOGGING_FEATURES:
                raise ProtocolError("VHOST_F_LOG_ALL was never offered")
            session.negotiate(body & ~(bit(F_PROTOCOL_FEATURES) | bit(F_LOG_ALL)))
            self._set_logging(bool(body & bit(F_LOG_ALL)))
            if self.peers:
                await self._tell_hosts({"op": "features", "features": session.features})
                await self._tell_hosts({"op": "logging", "on": self.log_all})
            if not body & bit(F_PROTOCOL_FEATURES):
                for index in range(len(self.enabled)):
                    self.enabled[index] = True
                    await self._update_ring(index)
        elif request is Request.GET_PROTOCOL_FEATURES:
            return encode_u64(OFFERED_PROTOCOL_FEATURES)
        elif request is Request.SET_PROTOCOL_FEATURES:
            assert isinstance(body, int)
            if body & ~OFFERED_PROTOCOL_FEATURES:
                raise ProtocolError(f"protocol features {body & ~OFFERED_PROTOCOL_FEATURES:#x} were never offered")
            self.protocol_features = body
        elif request is Request.SET_OWNER:
            self.owned = True
        elif request is Request.RESET_OWNER:
            await self._stop_rings()
        elif request is Request.RESET_DEVICE:
            await self._end_session()
            await self._end_failing()  # a failure told after the reset would break the new session
            await self._tell_hosts({"op": "reset"})
            self.session = VirtioSession(self.device, name=self.name, loop=self.loop, poll_max_ns=self.poll_max_ns)
            self.session.on_fail = self._session_failed
            self._failing = None
            self.enabled = [False] * len(self.enabled)
        elif request is Request.GET_INFLIGHT_FD:
            assert isinstance(body, InflightDesc)
            await self._get_inflight(body)
        elif request is Request.SET_INFLIGHT_FD:
            assert isinstance(body, InflightDesc)
            await self._set_inflight(body, message)
        elif request is Request.SET_LOG_BASE:
            assert isinstance(body, LogDesc)
            await self._set_log_base(body, message)
            return b""  # LOG_SHMFD: an empty reply once the log is in place
        elif request is Request.SET_MEM_TABLE:
            assert isinstance(body, MemoryTable)
            await self._set_memory(body, message)
        elif request is Request.SET_VRING_NUM:
            assert isinstance(body, VringState)
            session.set_queue_size(body.index, body.num)
        elif request is Request.SET_VRING_ADDR:
            assert isinstance(body, VringAddr)
            self._set_addresses(body)
            await self._tell_running_host(body.index, "addresses")
        elif request is Request.SET_VRING_BASE:
            assert isinstance(body, VringState)
            session.queue_setup(body.index)
            if body.num > 0xFFFF:
                raise ProtocolError(f"queue {body.index}: base {body.num} is not a split-ring index")
            session.set_queue_base(body.index, body.num)
        elif request is Request.GET_VRING_BASE:
            assert isinstance(body, VringState)
            session.queue_setup(body.index)
            self.kick_ready[body.index] = False
            base = await self._stop_ring(body.index)
            return encode_state(VringState(body.index, base))
        elif request in (Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR):
            assert isinstance(body, int)
            await self._set_notifier(request, body, message)
        elif request is Request.GET_QUEUE_NUM:
            return encode_u64(len(self.enabled))
        elif request is Request.SET_VRING_ENABLE:
            assert isinstance(body, VringState)
            session.queue_setup(body.index)
            if body.num not in (0, 1):
                raise ProtocolError(f"queue {body.index}: enable value {body.num} is not 0 or 1")
            self.enabled[body.index] = bool(body.num)
            await self._update_ring(body.index)
        elif request is Request.GET_CONFIG:
            assert isinstance(body, ConfigSpace)
            data = self.device.config()[body.offset : body.offset + body.size]
            return encode_config(ConfigSpace(body.offset, body.size, body.flags, data.ljust(body.size, b"\0")))
        elif request is Request.SET_CONFIG:
            assert isinstance(body, ConfigSpace)
            if body.flags not in (0, 1):
                raise ProtocolError(f"SET_CONFIG flags {body.flags:#x} are neither frontend (0) nor migration (1)")
            self.device.write_config(body.offset, body.payload)
            await self._tell_hosts({"op": "config", "offset": body.offset, "data": bytes(body.payload).hex()})
        return None

    async def _set_memory(self, table: MemoryTable, message: Message) -> None:
        fds, message.fds = message.fds, []
        try:
            layout = FdMemoryLayout(
                tuple(
                    FdRegion(fd, r.guest_addr, r.size, r.user_addr, r.mmap_offset)
                    for fd, r in zip(fds, table.regions)
                )
            )
            memory = self.primitives.map_memory(layout)
            try:
                await self._tell_hosts(memory_message(layout.regions), [region.fd for region in layout.regions])
            except BaseException:
                _close_memory(memory)
                raise
        finally:
            for fd in fds:
                os.close(fd)
        old, self.memory = self.memory, memory
        self.session.set_memory(memory)
        _close_memory(old)

    def _check_inflight_queues(self, desc: InflightDesc) -> None:
        if not self.protocol_features & bit(ProtocolFeature.INFLIGHT_SHMFD):
            raise ProtocolError("inflight region without INFLIGHT_SHMFD negotiated")
        if desc.num_queues > len(self.enabled):
            raise ProtocolError(f"inflight region for {desc.num_queues} queues, the device has {len(self.enabled)}")

    async def _get_inflight(self, desc: InflightDesc) -> None:
        """GET_INFLIGHT_FD: make a fresh region for the front end to keep (and hand back after a restart)."""
        self._check_inflight_queues(desc)
        area, fd = InflightArea.create(desc.num_queues, desc.queue_size)
        try:
            self._use_inflight(area)
            await self._tell_hosts(_inflight_message(area.size, 0, desc), [fd])
            reply = InflightDesc(area.size, 0, desc.num_queues, desc.queue_size)
            await self._reply_with_fd(Request.GET_INFLIGHT_FD, encode_inflight(reply), fd)
        finally:
            os.close(fd)

    async def _set_inflight(self, desc: InflightDesc, message: Message) -> None:
        """SET_INFLIGHT_FD: the region a front end kept; rings started from now on resume from it."""
        self._check_inflight_queues(desc)
        fd = message.fds.pop()
        try:
            area = InflightArea.open(
                fd, size=desc.mmap_size, offset=desc.mmap_offset, num_queues=desc.num_queues,
                queue_size=desc.queue_size,
            )
            self._use_inflight(area)
            await self._tell_hosts(_inflight_message(desc.mmap_size, desc.mmap_offset, desc), [fd])
        finally:
            os.close(fd)

    def _use_inflight(self, area: InflightArea | None) -> None:
        old, self.inflight = self.inflight, area
        self.session.set_inflight(area)
        if old is not None:
            old.close()

    async def _set_log_base(self, desc: LogDesc, message: Message) -> None:
        """Map the dirty log (it may replace one in use while rings run: QEMU resizes it so)."""
        if not self.protocol_features & bit(ProtocolFeature.LOG_SHMFD):
            raise ProtocolError("SET_LOG_BASE without LOG_SHMFD negotiated")
        fd = message.fds.pop()
        try:
            log_ = DirtyLog(fd, desc.size, desc.offset)
            try:
                if self.memory is not None:
                    log_.check_covers(self.memory)
                for index, setup in enumerate(self.session.setups):
                    if setup.log_addr is not None and not log_.covers(setup.log_addr, self._used_len(index)):
                        raise ProtocolError(f"queue {index}: used ring log address {setup.log_addr:#x} is past the log")
                await self._tell_hosts({"op": "log", "size": desc.size, "offset": desc.offset}, [fd])
            except BaseException:
                log_.close()
                raise
        finally:
            os.close(fd)
        old, self.dirty_log = self.dirty_log, log_
        self._set_logging(self.log_all)
        self._close_log(old)
        log.info("%s: dirty log of %#x bytes mapped (covers %#x bytes of guest memory)", self.name, log_.size,
                 log_.pages * 4096)

    def _set_logging(self, on: bool) -> None:
        """VHOST_F_LOG_ALL was set (or cleared): mark every guest write while it is set and a log exists."""
        if on != self.log_all:
            log.info("%s: dirty page logging %s", self.name, "on" if on else "off")
        self.log_all = on
        self.session.set_dirty_log(self.dirty_log if on else None)

    def _close_log(self, dirty_log: DirtyLog | None) -> None:
        if dirty_log is not None:
            log.info("%s: dirty log of %#x bytes unmapped after %d marked writes", self.name, dirty_log.size,
                     dirty_log.marks)
            dirty_log.close()

    def _used_len(self, index: int) -> int:
        return ring_sizes(self.session.setups[index].size or 1)[2]

    def _set_addresses(self, addr: VringAddr) -> None:
        setup = self.session.queue_setup(addr.index)
        if addr.flags & ~VRING_F_LOG:
            raise ProtocolError(f"queue {addr.index}: unknown vring flags {addr.flags:#x}")
        if self.memory is None:
            raise ProtocolError(f"queue {addr.index}: ring addresses before SET_MEM_TABLE")
        desc_len, avail_len, used_len = ring_sizes(setup.size or 1)
        try:
            desc = self.memory.user_to_guest(addr.desc, desc_len)
            avail = self.memory.user_to_guest(addr.avail, avail_len)
            used = self.memory.user_to_guest(addr.used, used_len)
        except GuestMemoryError as exc:
            raise ProtocolError(f"queue {addr.index}: ring address not in the memory table: {exc}") from None
        log_addr = None
        if addr.flags & VRING_F_LOG:
            log_addr = addr.log
            try:
                self.memory.check(log_addr, used_len)
            except GuestMemoryError:
                raise ProtocolError(
                    f"queue {addr.index}: used ring log address {log_addr:#x}+{used_len:#x} is outside guest memory"
                ) from None
            if self.dirty_log is not None and not self.dirty_log.covers(log_addr, used_len):
                raise ProtocolError(f"queue {addr.index}: used ring log address {log_addr:#x} is past the log")
        self.session.set_queue_addresses(addr.index, desc, avail, used)
        self.session.set_queue_log(addr.index, log_addr)

    async def _set_notifier(self, request: Request, value: int, message: Message) -> None:
        index = value & VRING_INDEX_MASK
        if value & ~(VRING_INDEX_MASK | VRING_NOFD):
            raise ProtocolError(f"{request.name}: unknown bits in {value:#x}")
        which = {Request.SET_VRING_KICK: "kick", Request.SET_VRING_CALL: "call", Request.SET_VRING_ERR: "err"}[request]
        self.session.queue_setup(index)
        if value & VRING_NOFD:
            if which == "kick":
                raise ProtocolError(f"queue {index}: polling without a kick fd is not supported")
            self.session.clear_notifier(index, which)
            await self._tell_running_host(index, which)
            return
        notifier = self._open_notifier(message.fds.pop())
        try:
            self.session.set_notifiers(index, **{which: notifier})
        except BaseException:
            notifier.close()
            raise
        await self._tell_running_host(index, which)
        if which == "kick":
            self.kick_ready[index] = True
            await self._update_ring(index)

    def _open_notifier(self, fd: int) -> Notifier:
        try:
            return self.primitives.open_notifier(EventFdChannel(fd))
        except BaseException:
            os.close(fd)
            raise

    async def _update_ring(self, index: int) -> None:
        wanted = self.enabled[index] and self.kick_ready[index]
        host = self._host(index)
        running = index in (self.session.running if host is None else host.running)
        if wanted and not running:
            if host is None:
                self.session.start_queue(index)
            else:
                await self._start_hosted(index, host)
        elif running and not wanted:
            await self._stop_ring(index)

    async def _start_hosted(self, index: int, host: QueuePeer) -> None:
        """Start queue ``index`` on the worker ``host``: what the front end set up, checked here, goes there."""
        session = self.session
        if session.broken:
            raise SessionError(f"{self.name}: device needs reset ({session.broken})")
        setup = session.queue_setup(index)
        if session.memory is None or not setup.size or setup.desc_addr is None or setup.kick is None:
            raise SessionError(f"{self.name}: queue {index} cannot start before its memory, size, rings and kick")
        message = {"op": "start", "index": index, "size": setup.size, "desc": setup.desc_addr,
                   "avail": setup.avail_addr or 0, "used": setup.used_addr or 0, "base": setup.base,
                   "log_addr": setup.log_addr}
        notifiers = {which: getattr(setup, which) for which in ("kick", "call", "err")}
        message["notifiers"] = [which for which, notifier in notifiers.items() if notifier is not None]
        await host.request(message, [notifier.fileno() for notifier in notifiers.values() if notifier is not None])
        host.running.add(index)
        log.info("%s: queue %d served by %s", self.name, index, host.name)

    async def _tell_running_host(self, index: int, what: str) -> None:
        """Queue ``index`` runs on another worker: send it the ring addresses or notifier the front end changed."""
        host = self._host(index)
        if host is None or index not in host.running:
            return
        setup = self.session.queue_setup(index)
        if what == "addresses":
            await host.request({"op": "addresses", "index": index, "desc": setup.desc_addr,
                                "avail": setup.avail_addr or 0, "used": setup.used_addr or 0,
                                "log_addr": setup.log_addr})
            return
        notifier = getattr(setup, what)
        await host.request({"op": "notifier", "index": index, "which": what},
                           [] if notifier is None else [notifier.fileno()])

    async def _stop_ring(self, index: int) -> int:
        host = self._host(index)
        if host is not None:
            return await self._stop_hosted(index, host)
        queue = self.session.running.get(index)
        base = await self.session.stop_queue(index)
        if queue is not None:
            self.completions[index] += queue.completions
            self.interrupts[index] += queue.interrupts
            if queue.poll is not None:
                self.polled["polls"] += queue.poll.polls
                self.polled["polls_caught"] += queue.poll.caught
                self.polled["poll_ns"] += queue.poll.poll_ns
        return base

    async def _stop_hosted(self, index: int, host: QueuePeer) -> int:
        """Stop queue ``index`` on the worker ``host`` after its in-flight requests; where it stopped."""
        setup = self.session.queue_setup(index)
        if index not in host.running:
            return setup.base
        host.running.discard(index)
        reply = await host.request({"op": "stop", "index": index})
        base, counts = reply.get("base"), reply.get("counts")
        if not isinstance(base, int) or not 0 <= base <= 0xFFFF or not isinstance(counts, dict):
            raise QueueChannelError(f"{host.name}: queue {index} stopped with a bad answer {reply!r}")
        setup.base = base
        self.completions[index] += int(counts.get("completions", 0))
        self.interrupts[index] += int(counts.get("interrupts", 0))
        for key in self.polled:
            self.polled[key] += int(counts.get(key, 0))
        return base

    async def _stop_rings(self) -> None:
        for index in list(self.session.running):
            await self._stop_ring(index)
        for host in self.peers:
            for index in sorted(host.running):
                try:
                    await self._stop_hosted(index, host)
                except QueueChannelError as exc:
                    log.warning("%s: queue %d not stopped on its worker: %s", self.name, index, exc)
        self.kick_ready = [False] * len(self.kick_ready)

    async def _end_session(self) -> None:
        try:
            await self._stop_rings()
        finally:
            self.session.close(reset_device=self.alone(self))
            _close_memory(self.memory)
            self.memory = None
            self._use_inflight(None)
            self._close_log(self.dirty_log)
            self.dirty_log = None
            self.log_all = False


def _inflight_message(size: int, offset: int, desc: InflightDesc) -> dict[str, Any]:
    return {"op": "inflight", "size": size, "offset": offset, "num_queues": desc.num_queues,
            "queue_size": desc.queue_size}


def _close_memory(memory: GuestMemory | None) -> None:
    close = getattr(memory, "close", None)
    if close is not None:
        close()


class VhostUserFrontDoor:
    """A device served over vhost-user on ``socket_path`` (server or client mode)."""

    def __init__(
        self,
        device: VirtioDevice,
        socket_path: str | os.PathLike[str],
        *,
        primitives: Primitives,
        name: str,
        client: bool = False,
        retry_interval: float = 1.0,
        max_connections: int = MAX_CONNECTIONS,
        poll_max_ns: int = 0,
    ) -> None:
        self.device = device
        self.poll_max_ns = poll_max_ns
        """Each queue's longest polling window in ns (0: off), for every connection's session."""
        self.socket_path = Path(socket_path)
        self.primitives = primitives
        self.name = name
        self.client = client
        self.retry_interval = retry_interval
        self.description = f"vhost-user {'client' if client else 'server'} socket {self.socket_path}"
        self.connections = 0
        self.max_connections = max_connections
        self.live: dict[VhostUserConnection, asyncio.Task[None]] = {}
        """Connections being served (a closing one stays until its clean-up is done)."""
        self.hosted: dict[QueueHost, asyncio.Task[None]] = {}
        """Queues of other workers' connections served here (``spread=on``), by queue channel."""
        self._handed = False
        self._serving: set[asyncio.Task[None]] = set()
        self._listener: socket.socket | None = None
        self._socket_inode: tuple[int, int] | None = None
        self._task: asyncio.Task[None] | None = None
        self._connection_task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"VhostUserFrontDoor({self.name!r}, {self.description!r})"

    @property
    def connection(self) -> VhostUserConnection | None:
        """The newest connection being served, or None."""
        return next(reversed(self.live), None) if self.live else None

    def _alone(self, connection: VhostUserConnection) -> bool:
        """Whether nothing else uses the device: no other connection, no queue hosted for another worker."""
        return not self.hosted and not any(other is not connection and not other.closing for other in self.live)

    async def start(self) -> None:
        """Listen on the socket (server) or start connecting to it (client)."""
        loop = asyncio.get_running_loop()
        if self.client:
            self._task = loop.create_task(self._connect_loop())
            return
        if handed_over(self.socket_path, f"vhost-user {self.name}", self._adopt, self._host_queues):
            self._handed = True
            log.info("vhost-user %s: serving the connections and queues handed to this worker for %s", self.name,
                     self.socket_path)
            return
        self._listener = self._listen()
        self._task = loop.create_task(self._accept_loop())
        log.info("vhost-user %s: listening on %s", self.name, self.socket_path)

    async def stop(self) -> None:
        """Stop accepting, end the connection (finishing in-flight requests), remove the socket."""
        try:
            for task in (self._task, self._connection_task, *self._serving, *self.hosted.values()):
                if task is not None:
                    task.cancel()
                    try:
                        await task
                    except asyncio.CancelledError:
                        pass
                    except Exception:
                        log.exception("vhost-user %s: a front door task had failed before the stop", self.name)
        finally:
            self._task = self._connection_task = None
            if self._handed:
                self._handed = False
                remove_socket_file(Path(self.socket_path), None)  # tells the parent: no more connections here
            if self._listener is not None:
                self._listener.close()
                self._listener = None
                remove_socket_file(Path(self.socket_path), self._socket_inode)

    def _listen(self) -> socket.socket:
        listener = bind_private_socket(self.socket_path, f"vhost-user {self.name}")
        info = os.lstat(self.socket_path)
        self._socket_inode = (info.st_dev, info.st_ino)
        return listener

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._listener is not None
        failed_errno: int | None = None
        while True:
            try:
                sock, _ = await loop.sock_accept(self._listener)
            except OSError as exc:
                if exc.errno != failed_errno:
                    log.warning("vhost-user %s: accepting on %s failed (%s); retrying every %gs", self.name,
                                self.socket_path, exc.strerror or exc, self.retry_interval)
                    failed_errno = exc.errno
                await asyncio.sleep(self.retry_interval)
                continue
            failed_errno = None
            connected = sum(not connection.closing for connection in self.live)
            if connected >= self.max_connections:
                log.warning("vhost-user %s: refused a frontend (%s): %d connected, the limit is %d", self.name,
                            _peer(sock), connected, self.max_connections)
                sock.close()
                continue
            task = loop.create_task(self._serve(sock))
            self._serving.add(task)
            task.add_done_callback(self._serving.discard)

    def _adopt(self, sock: socket.socket, peers: list[tuple[str, socket.socket]]) -> None:
        """A connection the parent accepted and handed here, with queue channels to the other workers."""
        connected = sum(not connection.closing for connection in self.live)
        if connected >= self.max_connections:
            log.warning("vhost-user %s: refused a frontend (%s): %d connected, the limit is %d", self.name,
                        _peer(sock), connected, self.max_connections)
            sock.close()
            for _, channel in peers:
                channel.close()
            return
        queue_peers = [QueuePeer(channel, f"worker {name}") for name, channel in peers]
        task = asyncio.get_running_loop().create_task(self._serve(sock, queue_peers))
        self._serving.add(task)
        task.add_done_callback(self._serving.discard)

    def _host_queues(self, channel: socket.socket) -> None:
        """Another worker's connection opened a queue channel here: serve the queues it places here."""
        try:
            host = QueueHost(channel, self.device, primitives=self.primitives,
                             name=f"vhost-user {self.name} (queues of another worker's connection)",
                             poll_max_ns=self.poll_max_ns)
        except Exception:
            channel.close()
            log.exception("vhost-user %s: a queue channel could not be set up", self.name)
            return
        task = asyncio.get_running_loop().create_task(host.serve())
        self.hosted[host] = task
        task.add_done_callback(lambda _: self.hosted.pop(host, None))

    async def _connect_loop(self) -> None:
        loop = asyncio.get_running_loop()
        failed_errno: int | None = None
        delay = self.retry_interval
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, os.fspath(self.socket_path))
            except OSError as exc:
                sock.close()
                if exc.errno != failed_errno:
                    expected = isinstance(exc, (FileNotFoundError, ConnectionRefusedError))
                    log.log(logging.INFO if expected else logging.WARNING,
                            "vhost-user %s: waiting for a frontend to listen on %s (%s)", self.name,
                            self.socket_path, exc.strerror or exc)
                    failed_errno = exc.errno
                await asyncio.sleep(self.retry_interval)
                continue
            except BaseException:
                sock.close()
                raise
            failed_errno = None
            started = loop.time()
            self._connection_task = loop.create_task(self._serve(sock))
            await asyncio.shield(self._connection_task)
            if loop.time() - started >= SHORT_CONNECTION:
                delay = self.retry_interval
                continue
            await asyncio.sleep(delay)
            delay = min(delay * 2, max(self.retry_interval, MAX_RECONNECT_DELAY))

    async def _serve(self, sock: socket.socket, peers: Sequence[QueuePeer] = ()) -> None:
        """Serve one connection to its end; whatever it raises is logged here, so the
        accept or connect loop that waits for it always goes on."""
        sock.setblocking(False)
        self.connections += 1
        number = self.connections
        try:
            connection = VhostUserConnection(
                self.device, sock, primitives=self.primitives, name=f"vhost-user {self.name}", number=number,
                alone=self._alone, poll_max_ns=self.poll_max_ns, peers=peers,
            )
        except Exception:
            sock.close()
            for peer in peers:
                peer.close()
            log.exception("vhost-user %s: connection %d could not be set up", self.name, number)
            return
        task = asyncio.current_task()
        assert task is not None
        self.live[connection] = task
        others = sum(other is not connection for other in self.live)
        log.info("%s: frontend connected (connection %d) on %s (%s)%s", connection.name, number, self.socket_path,
                 _peer(sock), f"; {others} other connection(s) open" if others else "")
        try:
            await connection.serve()
        except Exception:
            log.exception("%s: connection %d failed while closing", connection.name, number)
        finally:
            self.live.pop(connection, None)


def _peer(sock: socket.socket) -> str:
    """Who is at the other end of a Unix socket: pid and uid (SO_PEERCRED)."""
    try:
        pid, uid, _gid = struct.unpack("=iII", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    except OSError:
        return "peer unknown"
    return f"pid {pid}, uid {uid}"

