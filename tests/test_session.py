"""VirtioSession through the in-process Loopback: round trips, failure isolation, setup checks, batching."""

from __future__ import annotations

import asyncio
import select
import threading
import time

import pytest

from pvcore.testing.driver import DeviceProtocolError
from pvcore.ring.notify import EventFdNotifier
from pvcore.ring.session import RunningQueue, SessionError, VirtioSession
from pvcore.ring.virtqueue import DescriptorChain
from pvcore.testing.loopback import Loopback, LoopbackError
from pvcore.virtio import TRANSPORT_FEATURES, VIRTIO_RING_F_EVENT_IDX, VirtioDevice, bit


class EchoDevice(VirtioDevice):
    """Writes every chain's readable bytes back into its writable buffers."""

    device_id = 0xFFFE

    def __init__(self, queues: int = 1) -> None:
        self.queues = queues
        self.handled = 0

    def num_queues(self) -> int:
        return self.queues

    def handle(self, queue: RunningQueue, chain: DescriptorChain) -> None:
        self.handled += 1
        queue.complete(chain, queue.write(chain, queue.read(chain)))


class ThreadedEchoDevice(EchoDevice):
    """Echoes from a worker thread once ``batch`` chains are held, completing back on the loop.

    ``pause`` spaces the completions out so that each is published on its own.
    """

    def __init__(self, batch: int, pause: float = 0.0) -> None:
        super().__init__()
        self.batch = batch
        self.pause = pause
        self.held: list[tuple[RunningQueue, DescriptorChain]] = []
        self.workers: list[threading.Thread] = []

    def handle(self, queue: RunningQueue, chain: DescriptorChain) -> None:
        self.held.append((queue, chain))
        if len(self.held) == self.batch:
            work, self.held = self.held, []
            worker = threading.Thread(target=self._complete_all, args=(work,))
            self.workers.append(worker)
            worker.start()

    def _complete_all(self, work: list[tuple[RunningQueue, DescriptorChain]]) -> None:
        for queue, chain in work:
            data = queue.read(chain)
            queue.session.loop.call_soon_threadsafe(lambda q=queue, c=chain, d=data: q.complete(c, q.write(c, d)))
            if self.pause:
                time.sleep(self.pause)


class OverclaimingDevice(EchoDevice):
    """A buggy device: claims one byte more than the chain can hold."""

    def handle(self, queue: RunningQueue, chain: DescriptorChain) -> None:
        queue.complete(chain, chain.writable_len + 1)


@pytest.mark.parametrize(("event_idx", "indirect"), [(True, True), (True, False), (False, True), (False, False)])
def test_requests_round_trip(event_idx: bool, indirect: bool) -> None:
    with Loopback(EchoDevice(), queue_size=32, event_idx=event_idx, indirect=indirect) as lb:
        used = lb.request(0, [b"hello", b" world"], [4, 7])
        assert (used.written, used.data) == (11, b"hello world")
        used = lb.request(0, [b"abc"], [8], indirect=indirect)
        assert (used.written, used.data) == (3, b"abc")
        heads = [lb.submit(0, [bytes([i]) * (i + 1)], [i + 1]) for i in range(16)]
        results = lb.wait_used(0, len(heads))
        assert sorted(u.head for u in results) == sorted(heads)
        assert sorted(u.data for u in results) == sorted(bytes([i]) * (i + 1) for i in range(16))
        assert lb.queues[0].outstanding == 0
        assert lb.device.handled == 18
        raised = lb.run_in_loop(lambda: lb.session.running[0].interrupts)
        assert lb.interrupts(0) == raised > 0


def test_hostile_chain_breaks_only_its_own_session() -> None:
    with Loopback(EchoDevice(), name="victim") as bad, Loopback(EchoDevice(), name="other") as other:
        with Loopback(EchoDevice(), name="same-loop", loop=bad.loop) as neighbour:
            assert bad.request(0, [b"ok"], [2]).data == b"ok"
            bad.queues[0].post_head(bad.queues[0].size + 3)
            bad.kick(0)
            reason = bad.wait_error()
            assert "head index" in reason and "out of range" in reason
            assert bad.session.broken == reason
            assert bad.run_in_loop(lambda: bad.session.running[0].vq.next_avail) == 2
            with pytest.raises(LoopbackError, match="device needs reset"):
                bad.request(0, [b"again"], [5], timeout=1)
            with pytest.raises(SessionError, match="needs reset"):
                bad.run_in_loop(bad.session.start_queue, 0)
            for survivor in (other, neighbour):
                assert survivor.session.broken is None
                assert survivor.request(0, [b"still here"], [16]).data == b"still here"


def test_hostile_chain_stops_every_queue_of_the_device() -> None:
    with Loopback(EchoDevice(queues=2)) as lb:
        assert lb.request(1, [b"one"], [3]).data == b"one"
        lb.queues[0].write_descriptor(0, lb.ram.size + 0x1000, 16, 0, 0)
        lb.queues[0].post_head(0)
        lb.kick(0)
        assert "outside guest memory" in lb.wait_error()
        handled = lb.device.handled
        lb.queues[1].add([b"two"], [3])
        lb.kick(1)
        with pytest.raises(LoopbackError):
            lb.wait_used(1, 1, timeout=1)
        assert lb.device.handled == handled


def test_start_queue_names_what_is_missing() -> None:
    async def scenario() -> None:
        session = VirtioSession(EchoDevice(), name="dev0")
        with pytest.raises(SessionError, match="dev0: queue 0 cannot start, missing: memory, size, ring addresses, kick"):
            session.start_queue(0)
        with Loopback(EchoDevice()) as lb:
            session.set_memory(lb.ram.memory)
            with pytest.raises(SessionError, match="missing: size, ring addresses, kick notifier$"):
                session.start_queue(0)
            session.set_queue_size(0, 8)
            with pytest.raises(SessionError, match="missing: ring addresses, kick notifier$"):
                session.start_queue(0)
            queue = lb.queues[0]
            session.set_queue_addresses(0, queue.desc_addr, queue.avail_addr, queue.used_addr)
            with pytest.raises(SessionError, match="missing: kick notifier$"):
                session.start_queue(0)
            session.set_queue_addresses(0, queue.desc_addr, queue.avail_addr, lb.ram.size - 8)
            session.set_notifiers(0, kick=EventFdNotifier())
            with pytest.raises(SessionError, match="queue 0: ring outside guest memory"):
                session.start_queue(0)
            with pytest.raises(SessionError, match="queue index 1 out of range"):
                session.start_queue(1)
            with pytest.raises(SessionError, match="size 6 is not a power of two"):
                session.set_queue_size(0, 6)
            session.close()

    asyncio.run(scenario())


def test_negotiating_unoffered_features_is_refused() -> None:
    async def scenario() -> None:
        session = VirtioSession(EchoDevice(), name="dev1")
        with pytest.raises(SessionError, match="never offered: 0x10000000000"):
            session.negotiate(TRANSPORT_FEATURES | bit(40))
        assert session.features == 0
        session.negotiate(bit(VIRTIO_RING_F_EVENT_IDX))
        assert session.features == bit(VIRTIO_RING_F_EVENT_IDX)

    asyncio.run(scenario())
    threads = threading.active_count()
    with pytest.raises(SessionError, match="never offered"):
        Loopback(EchoDevice(), features=bit(3))
    assert threading.active_count() == threads


def _let_the_loop_run(lb: Loopback) -> None:
    """Return once the loop has handled every notifier this thread made readable before (a kick).

    Round trips, not a sleep: a call's coroutine runs in a loop pass whose poll came after
    the kick was written, so the kick's reader (if the queue has one) runs in that pass at
    the latest; the second call starts only after that pass and so returns after it.
    """
    for _ in range(2):
        lb.run_in_loop(lambda: None)


def test_stop_queue_returns_next_avail_index_and_restart_resumes() -> None:
    with Loopback(EchoDevice(), queue_size=8) as lb:
        for i in range(5):
            assert lb.request(0, [bytes([i])], [1]).data == bytes([i])
        assert lb.run_in_loop(lb.session.stop_queue, 0) == 5
        assert lb.session.setups[0].base == 5
        assert lb.run_in_loop(lb.session.stop_queue, 0) == 5  # already stopped
        head = lb.queues[0].add([b"queued while stopped"], [32])
        lb.kick(0)
        _let_the_loop_run(lb)  # a queue still taking kicks would have served this one by now
        assert lb.device.handled == 5
        with pytest.raises(TimeoutError, match="queue 0: timed out waiting for 1 used chains"):
            lb.wait_used(0, 1, timeout=0)
        lb.run_in_loop(lb.session.start_queue, 0)
        used = lb.wait_used(0, 1)
        assert (used[0].head, used[0].data) == (head, b"queued while stopped")
        assert lb.request(0, [b"after"], [5]).data == b"after"


def test_event_idx_batches_interrupts_for_async_completions() -> None:
    device = ThreadedEchoDevice(batch=64)
    with Loopback(device, queue_size=128, event_idx=True) as lb:
        heads = [lb.submit(0, [i.to_bytes(2, "little")], [2]) for i in range(64)]
        used = lb.wait_used(0, 64)
        for worker in device.workers:
            worker.join()
        assert sorted(u.head for u in used) == sorted(heads)
        assert sorted(u.data for u in used) == sorted(i.to_bytes(2, "little") for i in range(64))
        completions = lb.run_in_loop(lambda: lb.session.running[0].completions)
        interrupts = lb.interrupts(0)
        assert completions == 64
        assert 1 <= interrupts < completions


def test_used_event_defers_interrupts_for_spread_out_completions() -> None:
    device = ThreadedEchoDevice(batch=32, pause=0.001)
    with Loopback(device, queue_size=64, event_idx=True) as lb:
        lb.queues[0].defer_interrupts(32)
        for i in range(32):
            lb.submit(0, [bytes([i])], [1])
        assert len(lb.wait_used(0, 32)) == 32
        device.workers[0].join()
        assert lb.interrupts(0) == 1  # 32 publications, one interrupt: at the 32nd
        queue = lb.queues[0]
        assert lb.ram.memory.read_u16(queue.avail_addr + 4 + 2 * queue.size) == 32  # re-armed for the next


def _collect(lb: Loopback, count: int, timeout: float = 30.0) -> int:
    """Play the guest's interrupt handler until ``count`` chains are used; return how many were.

    ``timeout`` only catches a hang: it is far above any interrupt delay used here."""
    queue, call_fd = lb.queues[0], lb.calls[0].fileno()
    deadline = time.monotonic() + timeout
    collected = len(queue.used())
    while collected < count:
        assert time.monotonic() < deadline, f"only {collected} of {count} chains used"
        select.select([call_fd], [], [], 0.001)
        collected += len(queue.used())
    return collected


@pytest.mark.parametrize("event_idx", [True, False])
def test_a_driver_running_one_request_at_a_time_is_answered_at_once(event_idx: bool) -> None:
    # A request held for batching would wait this long: far beyond the requests' own 5 s
    # timeout and the 20 round trips' bound, however busy the machine, so only holding fails.
    delay = 60.0
    with Loopback(EchoDevice(), queue_size=16, event_idx=event_idx, max_interrupt_delay=delay) as lb:
        started = time.monotonic()
        for i in range(20):
            assert lb.request(0, [bytes([i])], [1]).data == bytes([i])
        assert time.monotonic() - started < delay / 2
        assert lb.interrupts(0) == 20


@pytest.mark.parametrize("event_idx", [True, False])
def test_a_driver_running_several_requests_at_once_gets_fewer_interrupts(event_idx: bool) -> None:
    # Each request is served in a pass of its own (the loop runs before the next is posted),
    # not however the threads happen to interleave; and the delay is long so that only the
    # batch the driver really left unfilled waits it out (once, in the second round): a round
    # is eight loop round trips, which a busy machine can stretch, but not to seconds.
    depth, rounds = 4, 10
    with Loopback(EchoDevice(), queue_size=16, event_idx=event_idx, max_interrupt_delay=2.0) as lb:
        queue = lb.queues[0]
        for _ in range(depth):  # the first requests arrive together, in one kick
            queue.add([b"x"], [1])
        lb.kick(0)
        completed = _collect(lb, depth)
        for round_ in range(2, rounds + 1):
            # Then one kick per request, collecting between them as an interrupt handler would:
            # each arrives while the ones before it are completed but held.
            for _ in range(depth):
                lb.submit(0, [b"x"], [1])
                _let_the_loop_run(lb)
                completed += len(queue.used())
            completed += _collect(lb, depth * round_ - completed)
        assert lb.run_in_loop(lambda: lb.session.running[0].completions) == depth * rounds
        assert lb.interrupts(0) <= depth * rounds // 2


@pytest.mark.parametrize("event_idx", [True, False])
def test_batches_grow_while_the_driver_keeps_filling_them(event_idx: bool) -> None:
    """A driver that has shown it runs several requests, then posts one per kick: each batch
    that fills before the delay runs out makes the next one bigger (a busy guest gets ever
    fewer interrupts), up to the queue size; one left to the delay sets the size back to
    what the driver managed, and batches grow no further than that."""
    with Loopback(EchoDevice(), queue_size=8, event_idx=event_idx, max_interrupt_delay=0.05) as lb:
        queue = lb.queues[0]

        def publications() -> list[int]:
            running = lb.session.running[0]
            sizes = []
            queue.add([], [1])
            queue.add([], [1])
            running.process()  # two requests in one pass: the driver runs several at once
            sizes.append(len(queue.used()))
            for _ in range(40):
                queue.add([], [1])
                running.process()
                if used := queue.used():
                    sizes.append(len(used))
            return sizes

        assert lb.run_in_loop(publications) == [2, 3, 4, 5, 6, 7, 8]
        assert _collect(lb, 7) == 7  # the last 7 never made a batch of 8: the delay published them

        def after_the_delay() -> list[int]:
            running = lb.session.running[0]
            sizes = []
            for _ in range(15):
                queue.add([], [1])
                running.process()
                if used := queue.used():
                    sizes.append(len(used))
            return sizes

        assert lb.run_in_loop(after_the_delay) == [7, 7]


@pytest.mark.parametrize("event_idx", [True, False])
@pytest.mark.parametrize("depth", [2, 4])
def test_a_driver_with_a_fixed_depth_waits_out_the_delay_once(event_idx: bool, depth: int) -> None:
    """A driver keeping ``depth`` requests out, reposting each as its answer comes: batches
    grow to ``depth``, one bigger batch is tried and left to the delay, and from then on
    every batch is published as it fills (not every other one after the delay).

    A batch waits out the delay exactly when the driver has posted all it may and nothing
    has been published: processing runs to completion inside ``run_in_loop``, so whatever
    the queue publishes at once is in the used ring when it returns. Waits are counted
    that way, not by the clock; the delay is long so that pauses of this thread on a busy
    machine never outlast it and publish a batch early."""
    delay, total = 1.0, 40 * depth
    with Loopback(EchoDevice(), queue_size=16, event_idx=event_idx, max_interrupt_delay=delay) as lb:
        queue, call_fd = lb.queues[0], lb.calls[0].fileno()

        def process() -> None:
            lb.session.running[0].process()

        for _ in range(depth):  # the first requests in one pass: the driver runs several at once
            queue.add([b"x"], [1])
        lb.run_in_loop(process)
        done, posted, waits = 0, depth, 0
        while done < total:
            if used := queue.used():
                done += len(used)
                continue
            if posted - done < depth and posted < total:
                queue.add([b"x"], [1])
                posted += 1
                lb.run_in_loop(process)
                continue
            waits += 1  # nothing answered, nothing more to post: only the delay publishes now
            started = time.monotonic()
            while not queue.has_used():
                assert time.monotonic() - started < delay + 30, f"{done} of {total} answered"
                select.select([call_fd], [], [], 0.001)
        assert waits <= 1, f"{waits} batches waited out the delay"
        assert lb.run_in_loop(lambda: lb.session.running[0].interrupts) <= total // depth + 2


def test_driver_catches_a_device_that_overclaims_written_bytes() -> None:
    with Loopback(OverclaimingDevice()) as lb:
        with pytest.raises(DeviceProtocolError, match="claims 5 bytes written, chain has 4"):
            lb.request(0, [b"x"], [4])


class HoldingDevice(EchoDevice):
    """Keeps every chain (as a console or rng device does while it waits for data)."""

    def handle(self, queue: RunningQueue, chain: DescriptorChain) -> None:
        self.handled += 1


def test_more_chains_in_flight_than_the_queue_holds_fails_the_device() -> None:
    device = HoldingDevice()
    with Loopback(device, queue_size=8) as lb:
        queue = lb.queues[0]
        head = queue.add([b"x"], [])
        lb.kick(0)
        for _ in range(8):  # the same head again and again, never given back
            time.sleep(0.02)
            queue.post_head(head)
            lb.kick(0)
        reason = lb.wait_error()
    assert "already in flight" in reason and "queue size 8" in reason
    assert device.handled == 8


class RepostingDevice(EchoDevice):
    """Completes each chain and, like a guest vCPU that never stops, posts its head again at once."""

    def __init__(self) -> None:
        super().__init__()
        self.driver = None

    def handle(self, queue: RunningQueue, chain: DescriptorChain) -> None:
        self.handled += 1
        queue.complete(chain, 0)
        self.driver.post_head(chain.head)


def test_a_guest_that_never_stops_posting_cannot_hold_the_shared_loop() -> None:
    device = RepostingDevice()
    with Loopback(device, queue_size=8) as lb:
        device.driver = lb.queues[0]
        other = threading.Event()
        lb.queues[0].add([b"x"], [])
        lb.kick(0)
        lb.loop.call_soon_threadsafe(other.set)
        assert other.wait(5), "the event loop never ran anything else"
        deadline = time.monotonic() + 5
        while lb.run_in_loop(lambda: lb.ram.memory.read_u16(lb.queues[0].used_addr + 2)) == 0:
            assert time.monotonic() < deadline, "completions were never published"
            time.sleep(0.001)  # a batch is held for at most the session's interrupt delay
        lb.run_in_loop(lambda: lb.session.running[0].detach())
    assert device.handled > 8
