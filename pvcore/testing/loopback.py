"""In-process loopback: the reference driver bound to a device's ring session.

This is a test harness, not a hypervisor plugin. It lets unit tests,
property tests and benchmarks exercise a :class:`~pvcore.virtio.VirtioDevice`
through the real ring engine without QEMU or a guest kernel:

* a background thread runs an asyncio event loop, and in it a
  :class:`~pvcore.ring.session.VirtioSession` for the device, configured the way
  a transport would (features, guest memory, queue sizes and addresses, eventfd
  kick/call/error notifiers, start);
* the calling thread plays the guest: it posts chains with
  :class:`~pvcore.testing.driver.DriverQueue`, kicks through the kick eventfd when
  the device asks for kicks, and waits for used chains by polling the call
  eventfd (re-checking the used ring, so a suppressed interrupt is no hang).

Interrupts seen on each queue's call eventfd are counted, so tests can check
interrupt batching. Example::

    with Loopback(MyDevice()) as lb:
        used = lb.request(0, [b"ping"], [4])
        assert used.data == b"ping"
"""

from __future__ import annotations

import asyncio
import inspect
import os
import select
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from pvcore.ring.notify import EventFdNotifier
from pvcore.ring.session import DEFAULT_INTERRUPT_DELAY, VirtioSession
from pvcore.testing.driver import DriverQueue, GuestRam, UsedBuffer
from pvcore.virtio import VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC, VirtioDevice, bit

DEFAULT_RAM_SIZE = 16 << 20
RECHECK_INTERVAL = 0.05
"""Longest sleep on the call eventfd before re-reading the used ring (interrupts may be suppressed)."""
LOOP_CALL_TIMEOUT = 30.0
"""Longest wait for :meth:`Loopback.run_in_loop` (stopping a queue may wait for in-flight requests)."""


class LoopbackError(Exception):
    """The device under test failed (its session is broken) while the driver waited on it."""


class Loopback:
    """One device served by a ring session on a background loop, driven from this thread.

    ``features`` defaults to everything the session offers, minus EVENT_IDX
    or INDIRECT_DESC when ``event_idx`` or ``indirect`` is false. When
    ``features`` is given it is negotiated as is, and the driver queues use
    EVENT_IDX and indirect descriptors exactly when those bits are in it.
    ``loop`` shares the running event loop of another Loopback (several
    devices served by one loop, as in the daemon); by default the Loopback
    starts and owns a loop thread of its own. ``poll_max_ns`` turns on the
    session's adaptive polling (see :mod:`pvcore.ring.poll`). Use it as a
    context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        device: VirtioDevice,
        *,
        queue_size: int = 128,
        event_idx: bool = True,
        indirect: bool = True,
        features: int | None = None,
        ram_size: int = DEFAULT_RAM_SIZE,
        name: str = "loopback",
        max_interrupt_delay: float = DEFAULT_INTERRUPT_DELAY,
        loop: asyncio.AbstractEventLoop | None = None,
        poll_max_ns: int = 0,
    ) -> None:
        self.device = device
        self.name = name
        self.ram = GuestRam(ram_size)
        self._thread: threading.Thread | None = None
        if loop is None:
            loop = asyncio.new_event_loop()
            self._thread = threading.Thread(target=loop.run_forever, name=f"{name}-loop", daemon=True)
            self._thread.start()
        self.loop = loop
        self._closed = False
        self.queues: list[DriverQueue] = []
        self.kicks: list[EventFdNotifier] = []
        self.calls: list[EventFdNotifier] = []
        self.errors: list[EventFdNotifier] = []
        self._interrupts: list[int] = []
        self._collected: list[list[UsedBuffer]] = []
        try:
            self.session: VirtioSession = self.run_in_loop(
                VirtioSession, device, name=name, loop=loop, max_interrupt_delay=max_interrupt_delay,
                poll_max_ns=poll_max_ns,
            )
            if features is None:
                features = self.session.offered_features
                if not event_idx:
                    features &= ~bit(VIRTIO_RING_F_EVENT_IDX)
                if not indirect:
                    features &= ~bit(VIRTIO_RING_F_INDIRECT_DESC)
            self.features = features
            self.run_in_loop(self.session.negotiate, features)
            self.run_in_loop(self.session.set_memory, self.ram.memory)
            for index in range(device.num_queues()):
                self._start_queue(index, queue_size)
        except BaseException:
            self.close()
            raise

    def __repr__(self) -> str:
        return f"Loopback({self.name!r}, queues={len(self.queues)})"

    def __enter__(self) -> Loopback:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _start_queue(self, index: int, size: int) -> None:
        queue = DriverQueue(
            self.ram,
            size,
            event_idx=bool(self.features & bit(VIRTIO_RING_F_EVENT_IDX)),
            indirect=bool(self.features & bit(VIRTIO_RING_F_INDIRECT_DESC)),
        )
        kick, call, err = EventFdNotifier(), EventFdNotifier(), EventFdNotifier()
        self.queues.append(queue)
        self.kicks.append(kick)
        self.calls.append(call)
        self.errors.append(err)
        self._interrupts.append(0)
        self._collected.append([])
        self.run_in_loop(
            self.session.configure_queue, index, size=size, desc=queue.desc_addr, avail=queue.avail_addr,
            used=queue.used_addr, kick=kick, call=call, err=err,
        )
        self.run_in_loop(self.session.start_queue, index)

    def run_in_loop(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``fn(*args, **kwargs)`` in the loop thread (awaiting it if it returns an awaitable).

        Returns its result or raises its exception here; gives up after
        :data:`LOOP_CALL_TIMEOUT` seconds with TimeoutError.
        """

        async def call() -> Any:
            result = fn(*args, **kwargs)
            if inspect.isawaitable(result):
                result = await result
            return result

        return asyncio.run_coroutine_threadsafe(call(), self.loop).result(LOOP_CALL_TIMEOUT)

    def kick(self, queue_index: int) -> None:
        """Kick the device on a queue unconditionally (as a notify register write would)."""
        os.eventfd_write(self.kicks[queue_index].fileno(), 1)

    def submit(
        self, queue_index: int, readable: Sequence[bytes], writable_lens: Sequence[int], *, indirect: bool = False
    ) -> int:
        """Post one chain, kick if the device wants it, and return the head."""
        queue = self.queues[queue_index]
        head = queue.add(readable, writable_lens, indirect=indirect)
        if queue.kick_needed():
            self.kick(queue_index)
        return head

    def request(
        self,
        queue_index: int,
        readable: Sequence[bytes],
        writable_lens: Sequence[int],
        *,
        indirect: bool = False,
        timeout: float = 5.0,
    ) -> UsedBuffer:
        """Post one chain and wait for it to be used; other chains used meanwhile are kept for later."""
        head = self.submit(queue_index, readable, writable_lens, indirect=indirect)
        deadline = time.monotonic() + timeout
        collected = self._collected[queue_index]
        while True:
            for i, used in enumerate(collected):
                if used.head == head:
                    return collected.pop(i)
            self._wait_for_more(queue_index, deadline, f"request with head {head}")

    def wait_used(self, queue_index: int, count: int, timeout: float = 5.0) -> list[UsedBuffer]:
        """Wait until ``count`` chains of the queue are used; return them in used-ring order."""
        deadline = time.monotonic() + timeout
        collected = self._collected[queue_index]
        while len(collected) < count:
            self._wait_for_more(queue_index, deadline, f"{count} used chains (have {len(collected)})")
        result = collected[:count]
        del collected[:count]
        return result

    def _wait_for_more(self, queue_index: int, deadline: float, waiting_for: str) -> None:
        """Collect used chains into the queue's backlog, sleeping on the call eventfd if none."""
        queue = self.queues[queue_index]
        call_fd = self.calls[queue_index].fileno()
        while True:
            self._count_interrupts(queue_index)
            found = queue.used()
            if found:
                self._collected[queue_index].extend(found)
                return
            if self.session.broken:
                raise LoopbackError(f"{self.name}: queue {queue_index}: device needs reset: {self.session.broken}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"{self.name}: queue {queue_index}: timed out waiting for {waiting_for}; "
                    f"avail idx {queue.avail_idx}, device used idx {queue.used_idx()}, "
                    f"driver last used {queue.last_used_idx}, {queue.outstanding} outstanding, "
                    f"{self._interrupts[queue_index]} interrupts seen"
                )
            select.select([call_fd], [], [], min(remaining, RECHECK_INTERVAL))

    def _count_interrupts(self, queue_index: int) -> None:
        self._interrupts[queue_index] += self.calls[queue_index].consume()

    def interrupts(self, queue_index: int) -> int:
        """How many interrupts the device has raised on the queue so far.

        Waits for the loop to finish what it is running first, so an interrupt
        raised just after the used index it covers is counted.
        """
        self.run_in_loop(lambda: None)
        self._count_interrupts(queue_index)
        return self._interrupts[queue_index]

    def wait_error(self, timeout: float = 5.0) -> str:
        """Wait until the session reports DEVICE_NEEDS_RESET on an error eventfd; return its reason."""
        fds = [err.fileno() for err in self.errors]
        readable, _, _ = select.select(fds, [], [], timeout)
        if not readable:
            raise TimeoutError(f"{self.name}: no error signalled within {timeout}s (broken: {self.session.broken})")
        assert self.session.broken is not None
        return self.session.broken

    def close(self) -> None:
        """Stop the queues and the session in the loop, stop an owned loop thread, free the RAM (idempotent)."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.loop.is_running() and hasattr(self, "session"):
                self.run_in_loop(self.session.shutdown)
        finally:
            if self._thread is not None:
                self.loop.call_soon_threadsafe(self.loop.stop)
                self._thread.join()
                self.loop.close()
            for notifier in (*self.kicks, *self.calls, *self.errors):
                notifier.close()
            self.ram.close()
