"""A ring session: one device as one frontend configured it, running its queues.

Transports (the core's vhost-user, the in-process loopback, a plugin's own
such as the loophv example's) translate their own messages into calls on
:class:`VirtioSession`: negotiate features, install guest memory, configure and
start queues with kick/call notifiers, stop them. The session owns what is the
same for all of them: validating that configuration, running each queue on the
event loop when it is kicked, batching completions into few interrupts, and
failing only this device when the guest breaks the ring.

Interrupt policy (per queue), adaptive to how the driver submits:

* A driver that runs one request at a time (nothing of ours is waiting to be
  published when its next request arrives) is answered at once: completions
  made while a kick is being processed are published at the end of that pass,
  and later ones (asynchronous I/O) as soon as no request is left in flight.
* A driver that runs several at once shows it: a request arrives while an
  earlier completion is still unpublished. Then the queue batches: it holds
  completions so that the requests the driver posts meanwhile are answered
  with one publication and one interrupt. It publishes as soon as every
  request it has is completed and the batch has reached its size, else when
  the oldest unpublished completion has waited ``max_interrupt_delay``
  seconds. The size is what the driver had outstanding with us in the
  previous batch; after a batch that reached its size it is one more (the
  driver kept up: try a bigger batch), but never more than the largest
  batch the driver has filled since it last failed to fill one in time (so
  a driver with a fixed number of requests waits out the delay once, not
  every other batch). A batch that nobody joined (no request arrived while
  it was held) switches the queue back to answering at once.

Either way no completion waits longer than ``max_interrupt_delay``: a held
completion always has its publication scheduled. The driver's
VIRTQ_AVAIL_F_NO_INTERRUPT flag, or with EVENT_IDX its ``used_event``, then
decides whether a publication raises an interrupt at all.

Polling (``poll_max_ns`` > 0; see :mod:`pvcore.ring.poll` for how the window
adapts): a pass that ends with a window open keeps kicks disabled (the used
ring's NO_NOTIFY flag, or with EVENT_IDX an ``avail_event`` left behind) and
looks at the avail index on each loop iteration until the window ends, so
other callbacks and completions still run meanwhile. A request seen is
served at once; when the window ends the queue re-enables kicks and then
reads the avail index again before it sleeps, so a request the driver posted
while it still saw kicks disabled is not left waiting for a kick that never
comes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import attrs

from pvcore.ring.memory import GuestMemory, GuestMemoryError, gather, scatter
from pvcore.ring.notify import Notifier
from pvcore.ring.poll import PollWindow
from pvcore.ring.virtqueue import DescriptorChain, Virtqueue, VirtqueueError
from pvcore.virtio import (
    TRANSPORT_FEATURES,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    VirtioDevice,
)

if TYPE_CHECKING:
    from pvcore.ring.dirtylog import DirtyLog
    from pvcore.ring.inflight import InflightArea

log = logging.getLogger("pvcore.ring")

DEFAULT_INTERRUPT_DELAY = 0.0002
MIN_BATCH = 2
"""The smallest batch a batching queue publishes without waiting out its delay."""


class SessionError(Exception):
    """The frontend asked for something the session cannot do; the message says what."""


@attrs.define
class QueueSetup:
    """What the frontend has told us about one queue so far."""

    size: int = 0
    desc_addr: int | None = None
    avail_addr: int | None = None
    used_addr: int | None = None
    base: int = 0
    kick: Notifier | None = None
    call: Notifier | None = None
    err: Notifier | None = None
    enabled: bool = True
    log_addr: int | None = None
    """Guest-physical address to log the used ring's writes at (migration), or None: not logged."""


class RunningQueue:
    """A started queue: the device's handle for reading, writing and completing chains."""

    def __init__(self, session: VirtioSession, index: int, vq: Virtqueue, setup: QueueSetup) -> None:
        self.session = session
        self.index = index
        self.vq = vq
        self.kick = setup.kick
        self.call = setup.call
        self.in_flight = 0
        self.completions = 0
        self.interrupts = 0
        self.kicks = 0
        self._processing = False
        self._batching = False
        self._overlapped = False
        self._depth = 0
        self._batch_target = MIN_BATCH
        self._batch_ceiling = vq.size
        self._flush_handle: asyncio.TimerHandle | None = None
        self._stopped = False
        self._detached = False
        self._idle: asyncio.Event | None = None
        self.poll: PollWindow | None = PollWindow(session.poll_max_ns) if session.poll_max_ns > 0 else None
        """The adaptive polling window and its counters (None: polling is off)."""
        self._poll_handle: asyncio.Handle | None = None
        self._poll_start = 0
        self._poll_deadline = 0
        self._asleep_since = 0

    @property
    def memory(self) -> GuestMemory:
        """The guest memory this queue's buffers live in."""
        return self.vq.memory

    def read(self, chain: DescriptorChain) -> bytes:
        """All readable bytes of ``chain``, concatenated."""
        return gather(self.vq.memory, chain.readable)

    def write(self, chain: DescriptorChain, data: bytes | memoryview) -> int:
        """Write ``data`` into the writable buffers of ``chain``; return the bytes written."""
        return scatter(self.vq.memory, chain.writable, data)

    def on_kick(self) -> None:
        """The driver kicked: drain the available ring."""
        if self.kick is not None:
            self.kick.consume()
        self.kicks += 1
        if self._asleep_since:
            assert self.poll is not None
            self.poll.woke(time.monotonic_ns() - self._asleep_since)
            self._asleep_since = 0
        self.process()

    def process(self) -> None:
        """Pop and hand available chains to the device, then publish.

        One pass handles at most a queue's worth of chains: a guest that keeps
        posting gets the rest in a later loop pass (kicks stay disabled
        meanwhile), so it cannot hold the event loop that other guests share.
        A driver can never have more than the queue size in flight; one that
        does is posting chains it did not get back, and fails its device.
        With a polling window open the pass ends with kicks still disabled and
        the window starts (see the module's polling).
        """
        if self._stopped or self.session.broken:
            return
        if self._poll_handle is not None:  # a kick came during a window: that window caught work
            self._end_poll_window(True)
        device = self.session.device
        vq = self.vq
        budget = vq.size
        polling = self.poll is not None and self.poll.window_ns > 0
        self._processing = True
        try:
            while budget:
                vq.disable_kicks()
                for _ in range(min(vq.pending(), budget)):
                    chain = vq.take()
                    if self.in_flight >= vq.size:
                        raise VirtqueueError(
                            f"chain {chain.head} made available with {self.in_flight} already in flight "
                            f"(queue size {vq.size})"
                        )
                    budget -= 1
                    held = vq.unpublished()
                    if held:  # the driver did not wait for what we completed
                        self._overlapped = True
                    self.in_flight += 1
                    if self.in_flight + held > self._depth:
                        self._depth = self.in_flight + held
                    try:
                        device.handle(self, chain)
                    except Exception as exc:  # a device bug fails this device, not the daemon
                        log.exception("%s: device error on queue %d", self.session.name, self.index)
                        self.session.fail(f"queue {self.index}: device error: {exc}")
                        return
                if polling:
                    if budget and not vq.pending():
                        break
                elif budget and not vq.enable_kicks():
                    break
            else:
                self.session.loop.call_soon(self.process)
        except (VirtqueueError, GuestMemoryError) as exc:
            self.session.fail(f"queue {self.index}: {exc}")
            return
        finally:
            self._processing = False
        if self._batching or self._overlapped:
            self._publish_when_batch_done()
        else:
            self.flush()
        if not budget:
            return  # the next pass is already scheduled
        if polling:
            self._start_poll_window()
        elif self.poll is not None:
            self._asleep_since = time.monotonic_ns()

    def _start_poll_window(self) -> None:
        assert self.poll is not None
        self.poll.started()
        self._poll_start = time.monotonic_ns()
        self._poll_deadline = self._poll_start + self.poll.window_ns
        self._poll_handle = self.session.loop.call_soon(self._poll_once)

    def _end_poll_window(self, caught: bool) -> None:
        assert self.poll is not None
        if self._poll_handle is not None:
            self._poll_handle.cancel()
            self._poll_handle = None
        elapsed = time.monotonic_ns() - self._poll_start
        if caught:
            self.poll.hit(elapsed)
        else:
            self.poll.missed(elapsed)

    def _poll_once(self) -> None:
        """One look at the avail index while the window is open (one loop iteration).

        Between looks the loop thread yields the CPU and with it the GIL: the
        process's other threads (the block engine's I/O workers completing
        requests) would otherwise wait for it up to the interpreter's switch
        interval while the loop spins.
        """
        self._poll_handle = None
        if self._stopped or self.session.broken:
            return
        try:
            pending = self.vq.pending()
        except (VirtqueueError, GuestMemoryError) as exc:
            self.session.fail(f"queue {self.index}: {exc}")
            return
        if pending:
            self._end_poll_window(True)
            self.process()
        elif time.monotonic_ns() < self._poll_deadline:
            os.sched_yield()
            self._poll_handle = self.session.loop.call_soon(self._poll_once)
        else:
            self._end_poll_window(False)
            self.sleep()

    def sleep(self) -> None:
        """The window passed: re-enable kicks, then read the avail index once more before sleeping.

        A driver that posted after the window's last look, while it still saw
        kicks disabled, did not kick: that request is served now.
        """
        try:
            arrived = self.vq.enable_kicks()
        except (VirtqueueError, GuestMemoryError) as exc:
            self.session.fail(f"queue {self.index}: {exc}")
            return
        if arrived:
            self.process()
        else:
            self._asleep_since = time.monotonic_ns()

    def complete(self, chain: DescriptorChain, written: int) -> None:
        """The device finished ``chain`` having written ``written`` bytes to it.

        Dropped if the device is broken or the queue was handed back to the
        frontend (a late completion after :meth:`stop` gave up waiting).
        """
        if self.session.broken or self._detached:
            return
        try:
            dirty = self.session.dirty_log
            if dirty is not None:  # a migration is logging: what the device wrote, then the used ring
                dirty.mark_buffers(chain.writable, written)
            self.vq.push_used(chain.head, written)
        except GuestMemoryError as exc:
            self.session.fail(f"queue {self.index}: {exc}")
            return
        self.in_flight -= 1
        self.completions += 1
        if self._processing:
            return
        if self._stopped:
            self.flush()
        elif self._batching or self._overlapped:
            self._publish_when_batch_done()
        elif self.in_flight <= 0:
            self.flush()  # the driver waits for this one alone: publish now, not one loop pass later
        else:
            self._schedule_flush(self.session.max_interrupt_delay)

    def _publish_when_batch_done(self) -> None:
        """Batching: publish now if the driver has likely nothing left to post, else within the delay."""
        held = self.vq.unpublished()
        if not held:
            return
        if self.in_flight <= 0 and held >= self._batch_target:
            self.flush(filled=True)
        else:
            self._schedule_flush(self.session.max_interrupt_delay)

    def _schedule_flush(self, delay: float) -> None:
        if self._flush_handle is None:  # else a flush is already due, at least as soon
            self._flush_handle = self.session.loop.call_later(delay, self.flush)

    def flush(self, *, filled: bool = False) -> None:
        """Publish every pushed completion and interrupt the driver if it wants one.

        Whether requests overlapped in this batch decides whether the next one
        is held, and the most the driver had outstanding with us in it sizes
        the next (see the module's interrupt policy): one more if this batch
        ``filled`` to its size before the delay ran out, up to the ceiling
        that a batch the delay had to publish sets.
        """
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        depth = max(MIN_BATCH, self._depth)
        if not self._overlapped:  # back to answering at once: a later burst may grow batches again
            self._batch_ceiling = self.vq.size
        elif filled:
            self._batch_ceiling = max(self._batch_ceiling, depth)
        else:  # the delay ran out: the driver could not fill this batch
            self._batch_ceiling = depth
        self._batch_target = min(depth + 1 if filled else depth, self._batch_ceiling)
        self._batching, self._overlapped = self._overlapped, False
        self._depth = max(self.in_flight, 0)
        if self.session.broken:
            return
        try:
            if self.vq.publish() and self.vq.needs_interrupt() and self.call is not None:
                self.interrupts += 1
                self.call.signal()
        except GuestMemoryError as exc:
            self.session.fail(f"queue {self.index}: {exc}")
            return
        if self._idle is not None and self.in_flight <= 0:
            self._idle.set()

    async def stop(self, timeout: float = 10.0) -> int:
        """Stop taking kicks, let in-flight requests finish, publish; return the next avail index."""
        self._stopped = True
        self._cancel_poll()
        if self.kick is not None and self.kick.fileno() >= 0:
            self.session.loop.remove_reader(self.kick.fileno())
        self.session.device.queue_stopping(self)
        if self.in_flight > 0 and not self.session.broken:
            self._idle = asyncio.Event()
            try:
                await asyncio.wait_for(self._idle.wait(), timeout)
            except TimeoutError:
                log.warning("%s: queue %d stopped with %d requests unfinished", self.session.name, self.index, self.in_flight)
        self.flush()
        self._detached = True
        return self.vq.next_avail

    def _cancel_poll(self) -> None:
        if self._poll_handle is not None:
            self._poll_handle.cancel()
            self._poll_handle = None

    def detach(self) -> None:
        """Stop at once without waiting (the session is going away)."""
        self._stopped = True
        self._detached = True
        self._cancel_poll()
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if self.kick is not None and self.kick.fileno() >= 0:
            self.session.loop.remove_reader(self.kick.fileno())


class VirtioSession:
    """One device's state as its frontend set it up, and its running queues."""

    def __init__(
        self,
        device: VirtioDevice,
        *,
        name: str,
        loop: asyncio.AbstractEventLoop | None = None,
        max_interrupt_delay: float = DEFAULT_INTERRUPT_DELAY,
        poll_max_ns: int = 0,
    ) -> None:
        self.device = device
        self.name = name
        self.loop = loop or asyncio.get_running_loop()
        self.max_interrupt_delay = max_interrupt_delay
        if poll_max_ns < 0:
            raise SessionError(f"{name}: poll_max_ns must be >= 0, not {poll_max_ns}")
        self.poll_max_ns = poll_max_ns
        """The longest polling window of each queue started from now on, in ns (0: no polling)."""
        self.offered_features = TRANSPORT_FEATURES | device.features()
        self.features = 0
        self.memory: GuestMemory | None = None
        self.setups = [QueueSetup() for _ in range(device.num_queues())]
        self.running: dict[int, RunningQueue] = {}
        self.broken: str | None = None
        self.dirty_log: DirtyLog | None = None
        """While a migration logs dirty pages: every guest write of this session is marked in it."""
        self.inflight: InflightArea | None = None
        """Where queues started from now on record what they have in flight (and resume from it)."""
        self.on_fail: Callable[[str], None] | None = None
        """Called with the reason once :meth:`fail` has stopped the session (queues spread over workers
        tell each other, :mod:`pvcore.transports.vhost_user.queue_spread`)."""

    def set_inflight(self, area: InflightArea | None) -> None:
        """Track in-flight requests in ``area`` (None: do not) for queues started from now on.

        A queue that starts with a region first resumes what a previous back
        end left in it (see :mod:`pvcore.ring.inflight`): the requests it had
        in flight are handed to the device again before any new one.
        """
        self.inflight = area

    def set_dirty_log(self, log: DirtyLog | None) -> None:
        """Start (a log) or stop (None) marking guest writes; running queues follow at once.

        Data the device writes into a chain's buffers is marked when the chain
        completes (up to the length written), before its used element; the
        used ring's writes are marked at the queue's ``log_addr`` if the
        front end asked for them to be logged.
        """
        self.dirty_log = log
        for index, queue in self.running.items():
            self._log_used_ring(queue.vq, self.setups[index])

    def set_queue_log(self, index: int, log_addr: int | None) -> None:
        """Log queue ``index``'s used-ring writes at guest address ``log_addr`` (None: do not)."""
        setup = self.queue_setup(index)
        setup.log_addr = log_addr
        queue = self.running.get(index)
        if queue is not None:
            self._log_used_ring(queue.vq, setup)

    def _log_used_ring(self, vq: Virtqueue, setup: QueueSetup) -> None:
        if self.dirty_log is not None and setup.log_addr is not None:
            vq.log_used_addr = setup.log_addr
            vq.dirty_log = self.dirty_log
        else:
            vq.dirty_log = None

    def __repr__(self) -> str:
        return f"VirtioSession({self.name!r})"

    def negotiate(self, features: int) -> None:
        """Accept the driver's feature set; it must be a subset of what was offered."""
        extra = features & ~self.offered_features
        if extra:
            raise SessionError(f"{self.name}: driver accepted features never offered: {extra:#x}")
        if features == self.features and self.running:
            return  # the same set again (vhost-user re-sends it to switch logging): nothing to redo
        self.features = features
        self.device.activate(features)

    def set_memory(self, memory: GuestMemory) -> None:
        """Install (or replace) the guest memory the rings and buffers live in."""
        self.memory = memory
        for queue in self.running.values():
            queue.vq.memory = memory

    def queue_setup(self, index: int) -> QueueSetup:
        """The setup record of queue ``index``; an out-of-range index is a :class:`SessionError`."""
        if not 0 <= index < len(self.setups):
            raise SessionError(f"{self.name}: queue index {index} out of range (device has {len(self.setups)})")
        return self.setups[index]

    def set_queue_size(self, index: int, size: int) -> None:
        """The driver chose a queue size."""
        limit = self.device.max_queue_size
        if size < 1 or size > limit or size & (size - 1):
            raise SessionError(f"{self.name}: queue {index} size {size} is not a power of two up to {limit}")
        self.queue_setup(index).size = size

    def set_queue_addresses(self, index: int, desc: int, avail: int, used: int) -> None:
        """Guest addresses of a queue's descriptor table, available and used rings."""
        setup = self.queue_setup(index)
        setup.desc_addr, setup.avail_addr, setup.used_addr = desc, avail, used

    def set_queue_base(self, index: int, base: int) -> None:
        """The available index the queue resumes from."""
        self.queue_setup(index).base = base & 0xFFFF

    def set_notifiers(
        self, index: int, *, kick: Notifier | None = None, call: Notifier | None = None, err: Notifier | None = None
    ) -> None:
        """Install the kick, call or error notifier of a queue (replacing and closing old ones)."""
        setup = self.queue_setup(index)
        for attr, new in (("kick", kick), ("call", call), ("err", err)):
            if new is None:
                continue
            old = getattr(setup, attr)
            if old is not None and old is not new:
                if attr == "kick" and index in self.running:
                    self.loop.remove_reader(old.fileno())
                old.close()
            setattr(setup, attr, new)
            queue = self.running.get(index)
            if queue is not None and attr in ("kick", "call"):
                setattr(queue, attr, new)
                if attr == "kick":
                    self.loop.add_reader(new.fileno(), queue.on_kick)

    def clear_notifier(self, index: int, which: str) -> None:
        """Drop and close queue ``index``'s ``call`` or ``err`` notifier (the frontend polls instead)."""
        if which not in ("call", "err"):
            raise SessionError(f"{self.name}: only call and err notifiers can be cleared, not {which}")
        setup = self.queue_setup(index)
        old = getattr(setup, which)
        setattr(setup, which, None)
        queue = self.running.get(index)
        if queue is not None and which == "call":
            queue.call = None
        if old is not None:
            old.close()

    def configure_queue(
        self,
        index: int,
        *,
        size: int,
        desc: int,
        avail: int,
        used: int,
        kick: Notifier | None = None,
        call: Notifier | None = None,
        err: Notifier | None = None,
    ) -> None:
        """All a transport learned about one queue in one go: size, ring addresses, notifiers."""
        self.set_queue_size(index, size)
        self.set_queue_addresses(index, desc, avail, used)
        self.set_notifiers(index, kick=kick, call=call, err=err)

    def start_queue(self, index: int) -> RunningQueue:
        """Start serving queue ``index``; every part of its setup must be present."""
        if self.broken:
            raise SessionError(f"{self.name}: device needs reset ({self.broken})")
        setup = self.queue_setup(index)
        if index in self.running:
            return self.running[index]
        missing = [
            what
            for what, value in (
                ("memory", self.memory),
                ("size", setup.size or None),
                ("ring addresses", setup.desc_addr),
                ("kick notifier", setup.kick),
            )
            if value is None
        ]
        if missing:
            raise SessionError(f"{self.name}: queue {index} cannot start, missing: {', '.join(missing)}")
        assert self.memory is not None and setup.desc_addr is not None
        try:
            inflight = None
            if self.inflight is not None and index < self.inflight.num_queues:
                inflight = self.inflight.queue(index, setup.size)
            vq = Virtqueue(
                self.memory,
                setup.size,
                setup.desc_addr,
                setup.avail_addr or 0,
                setup.used_addr or 0,
                event_idx=bool(self.features & (1 << VIRTIO_RING_F_EVENT_IDX)),
                indirect=bool(self.features & (1 << VIRTIO_RING_F_INDIRECT_DESC)),
                next_avail=setup.base,
                inflight=inflight,
            )
        except (VirtqueueError, GuestMemoryError) as exc:
            raise SessionError(f"{self.name}: queue {index}: {exc}") from None
        if vq.resubmit:
            log.info("%s: queue %d resumes %d requests a previous back end had in flight (heads %s)", self.name,
                     index, len(vq.resubmit), ",".join(map(str, vq.resubmit)))
        self._log_used_ring(vq, setup)
        queue = RunningQueue(self, index, vq, setup)
        self.running[index] = queue
        self.device.queue_started(queue)
        assert setup.kick is not None
        self.loop.add_reader(setup.kick.fileno(), queue.on_kick)
        queue.process()
        return queue

    async def stop_queue(self, index: int) -> int:
        """Stop queue ``index`` after its in-flight requests; return where it stopped."""
        setup = self.queue_setup(index)
        queue = self.running.pop(index, None)
        if queue is None:
            return setup.base
        base = await queue.stop()
        setup.base = base
        return base

    def fail(self, reason: str) -> None:
        """The guest broke the protocol: stop every queue of this device and report it.

        This is VIRTIO's DEVICE_NEEDS_RESET: the frontend is told through each
        queue's error notifier; other devices and sessions are untouched.
        """
        if self.broken:
            return
        self.broken = reason
        log.error("%s: device needs reset: %s", self.name, reason)
        for queue in self.running.values():
            queue.detach()
        for setup in self.setups:
            if setup.err is not None:
                setup.err.signal()
        if self.on_fail is not None:
            self.on_fail(reason)

    async def shutdown(self) -> None:
        """Stop every running queue (letting in-flight requests finish), then :meth:`close`."""
        for index in list(self.running):
            await self.stop_queue(index)
        self.close()

    def close(self, *, reset_device: bool = True) -> None:
        """End the session at once: detach queues, close notifiers, reset the device.

        ``reset_device=False`` leaves the device alone: another session of the
        same device (a migration's destination, connected beside its source)
        is still using it.
        """
        for queue in self.running.values():
            queue.detach()
        self.running.clear()
        self.dirty_log = None
        for setup in self.setups:
            for notifier in (setup.kick, setup.call, setup.err):
                if notifier is not None:
                    notifier.close()
        self.setups = [QueueSetup() for _ in self.setups]
        if reset_device:
            self.device.reset()

    def stats(self) -> dict[str, int]:
        """Counters summed over running queues: kicks, completions, interrupts, and polling's
        (``polls``, ``polls_caught``, ``poll_ns``; ``poll_window_ns`` is the widest window now)."""
        totals = {"kicks": 0, "completions": 0, "interrupts": 0, "polls": 0, "polls_caught": 0, "poll_ns": 0,
                  "poll_window_ns": 0}
        for queue in self.running.values():
            totals["kicks"] += queue.kicks
            totals["completions"] += queue.completions
            totals["interrupts"] += queue.interrupts
            if queue.poll is not None:
                totals["polls"] += queue.poll.polls
                totals["polls_caught"] += queue.poll.caught
                totals["poll_ns"] += queue.poll.poll_ns
                totals["poll_window_ns"] = max(totals["poll_window_ns"], queue.poll.window_ns)
        return totals
