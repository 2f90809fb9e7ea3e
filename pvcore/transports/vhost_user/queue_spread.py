"""A vhost-user disk's queues spread over the worker processes (``spread=on``, ``queues=N``).

A vhost-user device has one socket, so one process reads its messages: the
worker its parent handed the front end's connection to (the *leader*, see
:mod:`pvcore.spread`). With its connection the parent hands the leader one
channel (a SOCK_SEQPACKET pair) to each other worker that serves the device,
and that worker the other end. Queue ``i`` is served by participant ``i mod
(1 + channels)``: 0 is the leader, ``j`` the worker at the end of channel
``j``. The leader keeps answering every message and checking every value the
front end sends (its session holds each queue's setup), and tells the worker
hosting a queue what that queue needs, in the order the front end said it:

* the negotiated features, the memory table (its fds), the in-flight region,
  the dirty log and whether logging is on, and the device configuration the
  front end writes: every host gets them as they come;
* ``start``: the queue's size, ring addresses, base, used-ring log address
  and its kick, call and error eventfds; the host maps nothing of its own,
  it uses what it was sent, through its hypervisor plugin's primitives;
* a notifier or ring address the front end changes on a running queue
  (QEMU switches a queue's call fd, and turns on used-ring logging when a
  migration starts);
* ``stop`` (GET_VRING_BASE, the end of the connection): the host stops the
  queue after its in-flight requests and answers where it stopped;
* ``reset`` (RESET_DEVICE): the host forgets the session, its memory,
  in-flight region and log;
* ``fail``: the device needs reset (the guest broke a ring the leader
  serves): the host stops its queues and signals their error fds. The other
  way, a host whose ring the guest broke sends the leader an unasked
  ``broken`` notice, and the leader fails the whole device, as one process
  would.

Each request waits for the host's answer, so the front end's ack means the
host has done it too. The host serves its queues with its own instance of
the device (its own block engine on the same file, as a spread NBD export
does): data goes straight between the guest's memory and the file in every
worker, and a FLUSH on any queue is an ``fdatasync`` of the one file.

A host that dies, or answers with an error, ends the leader's connection
(logged with the reason); the front end reconnects (QEMU: ``reconnect=``)
and its next connection is spread over the workers then serving. A host
whose channel ends (the leader's connection ended, or the leader died)
stops its queues and forgets them. The channel's messages are JSON objects
of at most :data:`MAX_MESSAGE` bytes with up to :data:`MAX_FDS` descriptors;
the host checks their shape and leaves every value to its session's checks,
as for a front end's message.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from collections.abc import Callable, Sequence
from typing import Any

from pvcore.contract import EventFdChannel, FdMemoryLayout, FdRegion, Primitives
from pvcore.ring.dirtylog import DirtyLog
from pvcore.ring.inflight import InflightArea
from pvcore.ring.memory import GuestMemory, GuestMemoryError
from pvcore.ring.notify import Notifier
from pvcore.ring.session import SessionError, VirtioSession
from pvcore.virtio import DeviceError, VirtioDevice

log = logging.getLogger("pvcore.vhost_user")

MAX_MESSAGE = 65536
"""The longest message on a queue channel (a memory table of a few hundred regions fits)."""
MAX_FDS = 253
"""The most descriptors one message carries (SCM_MAX_FD)."""
REPLY_TIMEOUT = 30.0
"""Seconds the leader waits for a host's answer before it ends the connection (a hung host)."""
NOTIFIERS = ("kick", "call", "err")


class QueueChannelError(Exception):
    """A queue channel failed: its peer went away, answered wrongly, refused a request, or is hung."""


async def _send(sock: socket.socket, message: dict[str, Any], fds: Sequence[int] = ()) -> None:
    data = json.dumps(message).encode()
    loop = asyncio.get_running_loop()
    while True:
        try:
            socket.send_fds(sock, [data], list(fds))
            return
        except BlockingIOError:
            await _ready(loop, sock, writable=True)


async def _receive(sock: socket.socket) -> tuple[dict[str, Any], list[int]] | None:
    """The next message and its descriptors, or None at the end of the channel."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            data, fds, flags, _ = socket.recv_fds(sock, MAX_MESSAGE, MAX_FDS)
        except BlockingIOError:
            await _ready(loop, sock, writable=False)
            continue
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            _close_all(fds)
            raise QueueChannelError("a message or its descriptors did not fit")
        if not data:
            _close_all(fds)
            return None
        try:
            message = json.loads(data)
        except ValueError:
            message = None
        if not isinstance(message, dict):
            _close_all(fds)
            raise QueueChannelError("a message that is not a JSON object")
        return message, fds


async def _ready(loop: asyncio.AbstractEventLoop, sock: socket.socket, *, writable: bool) -> None:
    ready = loop.create_future()
    fd = sock.fileno()
    add, remove = (loop.add_writer, loop.remove_writer) if writable else (loop.add_reader, loop.remove_reader)
    add(fd, lambda: ready.done() or ready.set_result(None))
    try:
        await ready
    finally:
        if sock.fileno() == fd:  # a descriptor closed meanwhile may be another socket's by now
            remove(fd)


def _close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        os.close(fd)


def memory_message(regions: Sequence[FdRegion]) -> dict[str, Any]:
    """The ``memory`` request for a memory table (its fds go with it, in order)."""
    return {"op": "memory", "regions": [[r.guest_addr, r.size, r.user_addr, r.offset] for r in regions]}


class QueuePeer:
    """The leader's end of one queue channel: requests to the worker that hosts some of its queues."""

    def __init__(self, sock: socket.socket, name: str) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.name = name
        self.running: set[int] = set()
        """The queues started on this host and not stopped since."""
        self._lock = asyncio.Lock()
        self._lost: Callable[[str], None] | None = None
        self._broken: Callable[[str], None] | None = None
        self._closed = False
        self._loop = asyncio.get_running_loop()

    def __repr__(self) -> str:
        return f"QueuePeer({self.name!r})"

    async def request(self, message: dict[str, Any], fds: Sequence[int] = ()) -> dict[str, Any]:
        """Send one request with ``fds`` (the channel dups them) and return the host's answer.

        :class:`QueueChannelError` if the host refused it, is gone or did not answer in time.
        """
        async with self._lock:
            if self._closed:
                raise QueueChannelError(f"{self.name}: the channel is closed")
            try:
                async with asyncio.timeout(REPLY_TIMEOUT):
                    await _send(self.sock, message, fds)
                    reply = await self._answer()
            except TimeoutError:
                reason = f"no answer to {message.get('op')} in {REPLY_TIMEOUT:g} s"
            except OSError as exc:
                reason = f"channel failed: {exc.strerror or exc}"
            except QueueChannelError as exc:
                reason = str(exc)
            except BaseException:  # cancelled between a request and its answer: out of step, nobody to tell
                self._lost = None
                self._closed = True
                self._close_socket()
                raise
            else:
                if self._closed:  # closed while the answer came: finish the close now
                    self._close_socket()
                else:
                    self._watch()
                if not reply.get("ok"):
                    raise QueueChannelError(f"{self.name}: {message.get('op')} refused: {reply.get('error')}")
                return reply
            self._fail(reason)  # an answer may still come, to be taken for the next request's: never reuse
            raise QueueChannelError(f"{self.name}: {reason}")

    async def _answer(self) -> dict[str, Any]:
        """The answer to the request just sent; a host's notice that came first is acted on."""
        while True:
            received = await _receive(self.sock)
            if received is None:
                raise QueueChannelError("the worker hosting queues went away")
            message, fds = received
            _close_all(fds)
            if message.get("op") != "broken":
                return message
            self._notice(message)

    def _notice(self, message: dict[str, Any]) -> None:
        """A host's unasked notice: the guest broke a ring it serves."""
        if self._broken is not None:
            self._broken(f"{self.name}: {message.get('reason')}")

    def watch(self, lost: Callable[[str], None], broken: Callable[[str], None]) -> None:
        """Call ``lost(reason)`` once if the host goes away (or speaks out of turn), and ``broken(reason)``
        when the guest broke a ring the host serves (the device needs a reset)."""
        self._lost = lost
        self._broken = broken
        self._watch()

    def _watch(self) -> None:
        if self._lost is not None and self.sock.fileno() != -1:
            self._loop.add_reader(self.sock.fileno(), self._check)

    def _check(self) -> None:
        if self._lock.locked():
            return  # a request is reading its answer
        try:
            data, fds, _flags, _ = socket.recv_fds(self.sock, MAX_MESSAGE, MAX_FDS, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError as exc:
            self._fail(f"channel failed: {exc.strerror or exc}")
            return
        _close_all(fds)
        try:
            message = json.loads(data) if data else None
        except ValueError:
            message = None
        if isinstance(message, dict) and message.get("op") == "broken":
            self._notice(message)
        else:
            self._fail("the worker hosting queues went away" if not data else "a message nobody asked for")

    def _fail(self, reason: str) -> None:
        """The channel cannot be used any more: close it and tell the leader once."""
        lost, self._lost = self._lost, None
        self._closed = True
        self._close_socket()
        if lost is not None:
            lost(f"{self.name}: {reason}")

    def close(self) -> None:
        """End the channel: the host stops whatever it still runs. A request waiting for its answer
        ends at once (the channel is shut down under it) and closes the socket on its way out."""
        self._lost = None
        self._closed = True
        if self._lock.locked():
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
            return
        self._close_socket()

    def _close_socket(self) -> None:
        if self.sock.fileno() != -1:
            self._loop.remove_reader(self.sock.fileno())
            self.sock.close()


class QueueHost:
    """A worker's end of one queue channel: the queues of another worker's connection served here.

    ``device`` is this worker's instance of the spread device, ``primitives``
    its hypervisor plugin's memory and notification primitives. Its running
    queues' counters are this worker's (:attr:`session`); a stopped queue's go
    back to the leader with the answer to ``stop``.
    """

    def __init__(
        self, sock: socket.socket, device: VirtioDevice, *, primitives: Primitives, name: str, poll_max_ns: int = 0,
    ) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.device = device
        self.primitives = primitives
        self.name = name
        self.poll_max_ns = poll_max_ns
        self._told_to_fail = False
        """The leader said the device needs reset: not to be reported back to it."""
        self.session = self._new_session()
        self.memory: GuestMemory | None = None
        self.inflight: InflightArea | None = None
        self.dirty_log: DirtyLog | None = None
        self.logging = False

    def __repr__(self) -> str:
        return f"QueueHost({self.name!r})"

    def _new_session(self) -> VirtioSession:
        """A fresh session of the device (at the start, and when the front end resets it)."""
        session = VirtioSession(self.device, name=self.name, loop=asyncio.get_running_loop(),
                                poll_max_ns=self.poll_max_ns)
        session.on_fail = self._report_broken
        self._told_to_fail = False
        return session

    def _report_broken(self, reason: str) -> None:
        """The guest broke a ring served here: tell the leader, which stops the whole device (unasked)."""
        if self._told_to_fail:
            return
        try:
            self.sock.send(json.dumps({"op": "broken", "reason": reason}).encode(), socket.MSG_DONTWAIT)
        except OSError as exc:  # the leader is gone, or its end is full: end the channel, so that it ends the connection
            log.warning("%s: could not tell the leader the device needs reset: %s", self.name, exc.strerror or exc)
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)

    async def serve(self) -> None:
        """Answer the leader's requests until the channel ends; then stop and forget every queue."""
        reason = "the leader's connection ended"
        try:
            while (received := await _receive(self.sock)) is not None:
                message, fds = received
                try:
                    reply = await self._handle(message, fds)
                except (QueueChannelError, SessionError, GuestMemoryError, DeviceError, ValueError, TypeError,
                        KeyError, OSError) as exc:
                    reply = {"ok": False, "error": str(exc) or type(exc).__name__}
                finally:
                    _close_all(fds)
                await _send(self.sock, reply)
        except QueueChannelError as exc:
            reason = str(exc)
        except OSError as exc:
            reason = f"channel failed: {exc.strerror or exc}"
        except Exception as exc:  # a bug must cost these queues only, never the worker
            log.exception("%s: internal error", self.name)
            reason = f"internal error: {exc}"
        finally:
            try:
                for index in list(self.session.running):
                    await self.session.stop_queue(index)
            finally:
                self.session.close(reset_device=False)
                self._use_memory(None)
                self._use_inflight(None)
                self._use_log(None)
                self.sock.close()
                log.info("%s: queues hosted here ended: %s", self.name, reason)

    async def _handle(self, message: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        op = message.get("op")
        session = self.session
        if op == "features":
            session.negotiate(_int(message, "features"))
        elif op == "memory":
            self._set_memory(message, fds)
        elif op == "inflight":
            self._use_inflight(self._open_inflight(message, fds) if fds else None)
        elif op == "log":
            self._use_log(DirtyLog(_one(fds), _int(message, "size"), _int(message, "offset")) if fds else None)
        elif op == "logging":
            self.logging = bool(message.get("on"))
            session.set_dirty_log(self.dirty_log if self.logging else None)
        elif op == "config":
            self.device.write_config(_int(message, "offset"), bytes.fromhex(str(message.get("data", ""))))
        elif op == "start":
            return self._start(message, fds)
        elif op == "addresses":
            index = _int(message, "index")
            session.set_queue_addresses(index, _int(message, "desc"), _int(message, "avail"), _int(message, "used"))
            session.set_queue_log(index, _optional_int(message, "log_addr"))
        elif op == "notifier":
            self._set_notifier(_int(message, "index"), str(message.get("which")), fds)
        elif op == "stop":
            return await self._stop(_int(message, "index"))
        elif op == "reset":
            self._reset()
        elif op == "fail":
            self._told_to_fail = True
            session.fail(str(message.get("reason", "the leader's device needs reset")))
        else:
            raise ValueError(f"unknown request {op!r}")
        return {"ok": True}

    def _reset(self) -> None:
        """The front end reset the device (its queues are stopped): forget its memory, region and log."""
        if self.session.running:
            raise ValueError(f"reset with queues {sorted(self.session.running)} running")
        self.session.close(reset_device=False)
        self.session = self._new_session()
        self._use_memory(None)
        self._use_inflight(None)
        self._use_log(None)
        self.logging = False

    def _set_memory(self, message: dict[str, Any], fds: list[int]) -> None:
        regions = message.get("regions")
        if not isinstance(regions, list) or len(regions) != len(fds) or not regions:
            raise ValueError("a memory table whose regions and descriptors do not match")
        layout = FdMemoryLayout(tuple(FdRegion(fd, *(_int_value(v) for v in region)) for fd, region in zip(fds, regions)
                                      if isinstance(region, list) and len(region) == 4))
        if len(layout.regions) != len(fds):
            raise ValueError("a memory region that is not four numbers")
        self._use_memory(self.primitives.map_memory(layout))

    def _use_memory(self, memory: GuestMemory | None) -> None:
        old, self.memory = self.memory, memory
        if memory is not None:
            self.session.set_memory(memory)
        close = getattr(old, "close", None)
        if close is not None:
            close()

    def _open_inflight(self, message: dict[str, Any], fds: list[int]) -> InflightArea:
        return InflightArea.open(
            _one(fds), size=_int(message, "size"), offset=_int(message, "offset"),
            num_queues=_int(message, "num_queues"), queue_size=_int(message, "queue_size"),
        )

    def _use_inflight(self, area: InflightArea | None) -> None:
        old, self.inflight = self.inflight, area
        self.session.set_inflight(area)
        if old is not None:
            old.close()

    def _use_log(self, dirty_log: DirtyLog | None) -> None:
        old, self.dirty_log = self.dirty_log, dirty_log
        self.session.set_dirty_log(dirty_log if self.logging else None)
        if old is not None:
            old.close()

    def _notifiers(self, names: object, fds: list[int]) -> dict[str, Notifier]:
        if not isinstance(names, list) or len(names) != len(fds) or not set(names) <= set(NOTIFIERS):
            raise ValueError("notifier names that do not match the descriptors")
        opened: dict[str, Notifier] = {}
        try:
            for which, fd in zip(names, fds):
                opened[which] = self.primitives.open_notifier(EventFdChannel(os.dup(fd)))
        except BaseException:
            for notifier in opened.values():
                notifier.close()
            raise
        return opened

    def _start(self, message: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        session = self.session
        index = _int(message, "index")
        setup = session.queue_setup(index)
        if index in session.running:
            raise ValueError(f"queue {index} is running already")
        session.set_queue_size(index, _int(message, "size"))
        session.set_queue_addresses(index, _int(message, "desc"), _int(message, "avail"), _int(message, "used"))
        session.set_queue_base(index, _int(message, "base"))
        session.set_queue_log(index, _optional_int(message, "log_addr"))
        notifiers = self._notifiers(message.get("notifiers"), fds)
        for which in ("call", "err"):
            if which not in notifiers and getattr(setup, which) is not None:
                session.clear_notifier(index, which)
        try:
            session.set_notifiers(index, **notifiers)
        except BaseException:
            for notifier in notifiers.values():
                notifier.close()
            raise
        session.start_queue(index)
        log.info("%s: queue %d started here", self.name, index)
        return {"ok": True}

    def _set_notifier(self, index: int, which: str, fds: list[int]) -> None:
        if which not in NOTIFIERS:
            raise ValueError(f"no notifier {which!r}")
        if not fds:
            self.session.clear_notifier(index, which)
            return
        notifiers = self._notifiers([which], fds)
        try:
            self.session.set_notifiers(index, **notifiers)
        except BaseException:
            notifiers[which].close()
            raise

    async def _stop(self, index: int) -> dict[str, Any]:
        queue = self.session.running.get(index)
        base = await self.session.stop_queue(index)
        counts = {"completions": 0, "interrupts": 0, "polls": 0, "polls_caught": 0, "poll_ns": 0}
        if queue is not None:
            counts.update(completions=queue.completions, interrupts=queue.interrupts)
            if queue.poll is not None:
                counts.update(polls=queue.poll.polls, polls_caught=queue.poll.caught, poll_ns=queue.poll.poll_ns)
            log.info("%s: queue %d stopped here at %d", self.name, index, base)
        return {"ok": True, "base": base, "counts": counts}


def _int_value(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{value!r} is not a whole number >= 0")
    return value


def _int(message: dict[str, Any], key: str) -> int:
    if key not in message:
        raise KeyError(f"{key} is missing")
    return _int_value(message[key])


def _optional_int(message: dict[str, Any], key: str) -> int | None:
    return None if message.get(key) is None else _int(message, key)


def _one(fds: list[int]) -> int:
    if len(fds) != 1:
        raise ValueError(f"{len(fds)} descriptors where one was expected")
    return fds[0]
