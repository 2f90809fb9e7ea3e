"""The Loopback test harness itself: lifecycle, waiting, timeouts, interrupt counting."""

from __future__ import annotations

import asyncio
import os
import threading

import pytest

from pvcore.ring.session import RunningQueue
from pvcore.ring.virtqueue import DescriptorChain
from pvcore.testing.loopback import Loopback
from pvcore.virtio import VIRTIO_F_VERSION_1, VIRTIO_RING_F_INDIRECT_DESC, VirtioDevice, bit


class UppercaseDevice(VirtioDevice):
    """Queue ``n`` answers with the readable bytes upper-cased and prefixed by ``n``."""

    device_id = 0xFFFD

    def __init__(self, queues: int = 1) -> None:
        self.queues = queues
        self.reset_calls = 0

    def num_queues(self) -> int:
        return self.queues

    def handle(self, queue: RunningQueue, chain: DescriptorChain) -> None:
        reply = bytes([queue.index]) + queue.read(chain).upper()
        queue.complete(chain, queue.write(chain, reply))

    def reset(self) -> None:
        self.reset_calls += 1


class HoldingDevice(UppercaseDevice):
    """Keeps every chain until it is released or the queue stops."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[tuple[RunningQueue, DescriptorChain]] = []

    def handle(self, queue: RunningQueue, chain: DescriptorChain) -> None:
        self.held.append((queue, chain))

    def release(self, head: int) -> None:
        """Complete the held chain ``head`` (call in the loop thread)."""
        for i, (queue, chain) in enumerate(self.held):
            if chain.head == head:
                del self.held[i]
                queue.complete(chain, queue.write(chain, b"done"))
                return
        raise AssertionError(f"head {head} is not held")

    def queue_stopping(self, queue: RunningQueue) -> None:
        for held_queue, chain in self.held:
            held_queue.complete(chain, 0)
        self.held.clear()


def fd_is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_close_releases_everything_and_is_idempotent() -> None:
    device = UppercaseDevice()
    before = set(threading.enumerate())
    lb = Loopback(device)
    started = [thread for thread in threading.enumerate() if thread not in before]
    assert len(started) == 1  # counted by identity: a thread of an earlier test may end meanwhile
    assert lb.request(0, [b"abc"], [8]).data == b"\x00ABC"
    fds = [lb.ram.fd, lb.kicks[0].fileno(), lb.calls[0].fileno(), lb.errors[0].fileno()]
    assert all(fd_is_open(fd) for fd in fds)
    lb.close()
    lb.close()
    assert not started[0].is_alive()
    assert lb.loop.is_closed()
    assert device.reset_calls == 1
    assert lb.ram.fd == -1 and lb.kicks[0].fileno() == -1 and lb.calls[0].fileno() == -1
    assert not any(fd_is_open(fd) for fd in fds)


def test_context_manager_closes_on_error() -> None:
    threads = threading.active_count()
    with pytest.raises(RuntimeError, match="boom"):
        with Loopback(UppercaseDevice()) as lb:
            raise RuntimeError("boom")
    assert lb.loop.is_closed()
    assert threading.active_count() == threads


def test_run_in_loop_runs_there_awaits_and_propagates() -> None:
    with Loopback(UppercaseDevice()) as lb:
        loop_thread = lb.run_in_loop(threading.current_thread)
        assert loop_thread is not threading.current_thread()

        async def add(a: int, b: int) -> int:
            await asyncio.sleep(0)
            return a + b

        assert lb.run_in_loop(add, 2, b=3) == 5
        assert lb.run_in_loop(lambda: asyncio.get_running_loop()) is lb.loop
        with pytest.raises(ZeroDivisionError):
            lb.run_in_loop(lambda: 1 // 0)


def test_queues_are_independent() -> None:
    with Loopback(UppercaseDevice(queues=3), queue_size=8) as lb:
        for n in (2, 0, 1, 2):
            assert lb.request(n, [b"q"], [4]).data == bytes([n]) + b"Q"
        assert [lb.queues[n].avail_idx for n in range(3)] == [1, 1, 2]
        assert [lb.interrupts(n) for n in range(3)] == [1, 1, 2]


def test_request_keeps_other_completions_for_later() -> None:
    with Loopback(UppercaseDevice()) as lb:
        first = lb.submit(0, [b"first"], [8])
        second = lb.request(0, [b"second"], [8])
        assert second.head != first and second.data == b"\x00SECOND"
        (used,) = lb.wait_used(0, 1)
        assert (used.head, used.data) == (first, b"\x00FIRST")


def test_request_waits_for_a_late_completion() -> None:
    device = HoldingDevice()
    with Loopback(device) as lb:
        head = lb.submit(0, [b"late"], [8])
        lb.loop.call_soon_threadsafe(lb.loop.call_later, 0.05, device.release, head)  # the loop runs in its own thread
        (used,) = lb.wait_used(0, 1, timeout=30)  # returns as soon as it is used; generous for a loaded machine
        assert (used.head, used.data) == (head, b"done")


def test_timeout_names_the_queue_and_its_state() -> None:
    with Loopback(HoldingDevice()) as lb:
        with pytest.raises(TimeoutError) as caught:
            lb.request(0, [b"never"], [8], timeout=0.1)
        message = str(caught.value)
        assert "loopback: queue 0: timed out waiting for request with head" in message
        assert "avail idx 1" in message and "device used idx 0" in message and "1 outstanding" in message


def test_explicit_features_decide_the_driver_mode() -> None:
    features = bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_RING_F_INDIRECT_DESC)
    with Loopback(UppercaseDevice(), features=features) as lb:
        assert lb.session.features == features
        assert not lb.queues[0].event_idx and lb.queues[0].indirect
        assert lb.request(0, [b"x"], [2], indirect=True).data == b"\x00X"
    with Loopback(UppercaseDevice(), event_idx=False, indirect=False) as lb:
        assert lb.session.features == bit(VIRTIO_F_VERSION_1)


def test_shared_loop_survives_a_neighbour_closing() -> None:
    with Loopback(UppercaseDevice(), name="host") as host:
        with Loopback(UppercaseDevice(), name="guest", loop=host.loop) as guest:
            assert guest.request(0, [b"g"], [2]).data == b"\x00G"
            assert guest.session.loop is host.loop
        assert host.loop.is_running()
        assert host.request(0, [b"h"], [2]).data == b"\x00H"
