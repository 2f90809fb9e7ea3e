"""The shared I/O thread pool: bound, threads on demand, idle shrink, turns between devices, per-device barriers."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from pvcore.devices.block import BlockBackend, BlockOp, BlockRequest, BlockResult, RawFileStore
from pvcore.devices.block.iopool import (
    MAX_THREADS,
    MIN_THREADS,
    IOPool,
    PoolStats,
    default_max_threads,
    set_thread_bound,
    share_cpus,
    shared_pool,
    thread_bound_setting,
)

DISK_SIZE = 1 << 20


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(DISK_SIZE))
    return path


class Gate:
    """Tenants that block on an event in their turn, counting how many run at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.open = threading.Event()
        self.running = 0
        self.most = 0
        self.done = 0

    def tenant(self) -> Tenant:
        return Tenant(self)


class Tenant:
    """One turn that waits for the gate."""

    def __init__(self, gate: Gate) -> None:
        self.gate = gate

    def pool_turn(self) -> bool:
        gate = self.gate
        with gate.lock:
            gate.running += 1
            gate.most = max(gate.most, gate.running)
        gate.open.wait(10)
        with gate.lock:
            gate.running -= 1
            gate.done += 1
        return False


def wait_until(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_the_bound_follows_the_cpus() -> None:
    bound = default_max_threads()
    assert MIN_THREADS <= bound <= MAX_THREADS
    assert bound == min(MAX_THREADS, max(MIN_THREADS, 4 * len(os.sched_getaffinity(0))))
    assert shared_pool().max_threads == bound


def test_threads_start_on_demand_up_to_the_bound_and_end_when_idle() -> None:
    pool = IOPool(max_threads=3, idle_timeout=0.3, stall=60, name="test-bound")
    assert pool.threads == 0
    gate = Gate()
    pool.schedule(gate.tenant())
    assert wait_until(lambda: gate.running == 1)
    assert pool.threads == 1
    for _ in range(9):
        pool.schedule(gate.tenant())
    assert wait_until(lambda: gate.running == 3)
    time.sleep(0.1)
    assert pool.threads == 3 and gate.most == 3
    assert sum(t.name.startswith("test-bound") and "watch" not in t.name for t in threading.enumerate()) == 3
    gate.open.set()
    assert wait_until(lambda: gate.done == 10)
    assert gate.most == 3 and pool.peak_threads == 3
    assert wait_until(lambda: pool.threads == 0, 5), "idle threads did not end"
    assert wait_until(  # the watcher sleeps out its stall=60
        lambda: not any(t.name.startswith("test-bound") and "watch" not in t.name for t in threading.enumerate()), 5
    )
    gate2 = Gate()
    gate2.open.set()
    pool.schedule(gate2.tenant())
    assert wait_until(lambda: gate2.done == 1), "a pool whose threads ended did not start one again"


def test_an_idle_thread_takes_new_work_instead_of_a_new_thread_starting() -> None:
    pool = IOPool(max_threads=8, idle_timeout=5, name="test-reuse")
    gate = Gate()
    gate.open.set()
    for _ in range(20):
        pool.schedule(gate.tenant())
        assert wait_until(lambda: gate.done >= 1)
        gate.done = 0
    assert pool.peak_threads == 1


def test_a_failing_turn_does_not_end_the_thread(caplog) -> None:
    pool = IOPool(max_threads=1, idle_timeout=5, name="test-fail")

    class Broken:
        def pool_turn(self) -> bool:
            raise SystemExit("a bug")

    gate = Gate()
    gate.open.set()
    pool.schedule(Broken())
    pool.schedule(gate.tenant())
    assert wait_until(lambda: gate.done == 1)
    assert pool.threads == 1 and "a device's turn failed" in caplog.text


def test_threads_stuck_in_the_kernel_do_not_stall_the_other_devices() -> None:
    """Every thread of the bound blocked: after ``stall`` with no turn taken a thread beyond it serves the rest."""
    pool = IOPool(max_threads=2, stall=0.2, idle_timeout=1, name="test-stuck")
    stuck = Gate()
    for _ in range(2):  # a device has one turn queued at a time: each of these stands for a hung device
        pool.schedule(stuck.tenant())
    assert wait_until(lambda: stuck.running == 2)
    served = Gate()
    served.open.set()
    started = time.monotonic()
    pool.schedule(served.tenant())
    assert wait_until(lambda: served.done == 1, 5), "a stuck pool served nothing more"
    assert time.monotonic() - started >= 0.15  # not at once: only after a stall
    for _ in range(18):
        pool.schedule(stuck.tenant())
    assert wait_until(lambda: stuck.running == pool.hard_max_threads == 8, 10)
    time.sleep(0.5)
    assert stuck.running == 8 and pool.threads == 8, "threads beyond the hard bound"
    assert pool.stats().stall_threads == 8 - 2  # every thread beyond the bound, and no other
    stuck.open.set()
    assert wait_until(lambda: stuck.done == 20)
    assert wait_until(lambda: pool.threads == 0, 5)
    assert wait_until(lambda: not any(t.name.startswith("test-stuck") for t in threading.enumerate()), 5)


def test_many_idle_disks_start_no_thread(disk: Path) -> None:
    before = threading.active_count()
    pool = IOPool(name="test-idle")
    backends = [BlockBackend(RawFileStore(str(disk)), name=f"d{n}", pool=pool) for n in range(200)]
    try:
        assert threading.active_count() == before and pool.threads == 0
    finally:
        for backend in backends:
            backend.close()


class SlowStore(RawFileStore):
    """A store whose reads take ``delay`` seconds and never take the inline path."""

    delay = 0.005

    def transfer_nowait(self, buffers: Sequence[memoryview], offset: int, *, write: bool) -> bool:
        return False

    def readv(self, buffers: Sequence[memoryview], offset: int) -> int:
        time.sleep(self.delay)
        return super().readv(buffers, offset)


def read(offset: int = 0, length: int = 512) -> BlockRequest:
    return BlockRequest(BlockOp.READ, offset, length, [memoryview(bytearray(length))])


def test_a_busy_device_does_not_starve_another(disk: Path) -> None:
    """One thread, one device with 200 queued reads: another device's read runs after about one of them."""
    pool = IOPool(max_threads=1, name="test-fair")
    busy = BlockBackend(SlowStore(str(disk)), name="busy", workers=4, pool=pool)
    other = BlockBackend(SlowStore(str(disk)), name="other", pool=pool)
    order: list[str] = []

    async def scenario() -> None:
        done = asyncio.Event()
        for n in range(200):
            busy.submit(read(512 * n), lambda r: order.append("busy"))
        await asyncio.sleep(0.02)
        other.submit(read(), lambda r: (order.append("other"), done.set()))
        await asyncio.wait_for(done.wait(), 10)

    try:
        asyncio.run(scenario())
    finally:
        busy.close()
        other.close()
    position = order.index("other")
    # Turns alternate: the other read waits behind the busy reads done before it came (about 4 in 20 ms)
    # and at most one more, not behind the busy device's 200 (a first-come queue of requests would).
    assert position < 30, f"the other device waited behind {position} reads"
    assert busy.counters().bytes_read == 200 * 512 and not busy.counters().errors


def test_a_flush_waits_for_earlier_writes_of_its_own_device_only(disk: Path, tmp_path: Path) -> None:
    class GatedWrites(RawFileStore):
        def __init__(self, path: str) -> None:
            super().__init__(path)
            self.entered = threading.Event()
            self.opened = threading.Event()

        def transfer_nowait(self, buffers: Sequence[memoryview], offset: int, *, write: bool) -> bool:
            return False

        def writev(self, buffers: Sequence[memoryview], offset: int, *, durable: bool = False) -> int:
            self.entered.set()
            assert self.opened.wait(10)
            return super().writev(buffers, offset, durable=durable)

    second = tmp_path / "second.img"
    second.write_bytes(bytes(DISK_SIZE))
    pool = IOPool(max_threads=4, name="test-barrier")
    gated = GatedWrites(str(disk))
    first = BlockBackend(gated, name="first", pool=pool)
    other = BlockBackend(RawFileStore(str(second)), name="other", pool=pool)
    order: list[str] = []

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        first_flushed, other_flushed = asyncio.Event(), asyncio.Event()
        data = memoryview(bytes(512))
        first.submit(BlockRequest(BlockOp.WRITE, 0, 512, [data]), lambda r: order.append("first write"))
        assert await loop.run_in_executor(None, gated.entered.wait, 5)
        first.submit(BlockRequest(BlockOp.FLUSH), lambda r: (order.append("first flush"), first_flushed.set()))
        other.submit(BlockRequest(BlockOp.WRITE, 0, 512, [data]), lambda r: order.append("other write"))
        other.submit(BlockRequest(BlockOp.FLUSH), lambda r: (order.append("other flush"), other_flushed.set()))
        await asyncio.wait_for(other_flushed.wait(), 5)
        await asyncio.sleep(0.05)
        assert "first flush" not in order, "a flush did not wait for its device's earlier write"
        gated.opened.set()
        await asyncio.wait_for(first_flushed.wait(), 5)

    try:
        asyncio.run(scenario())
    finally:
        gated.opened.set()
        first.close()
        other.close()
    assert order == ["other write", "other flush", "first write", "first flush"]


def test_workers_caps_a_devices_requests_in_the_pool(disk: Path) -> None:
    class Counting(SlowStore):
        lock = threading.Lock()
        running = 0
        most = 0

        def readv(self, buffers: Sequence[memoryview], offset: int) -> int:
            with self.lock:
                Counting.running += 1
                Counting.most = max(Counting.most, Counting.running)
            try:
                return super().readv(buffers, offset)
            finally:
                with self.lock:
                    Counting.running -= 1

    pool = IOPool(max_threads=8, name="test-cap")
    backend = BlockBackend(Counting(str(disk)), name="capped", workers=2, pool=pool)
    results: list[BlockResult] = []

    async def scenario() -> None:
        done = asyncio.Event()
        for n in range(40):
            backend.submit(read(512 * n), lambda r: (results.append(r), len(results) == 40 and done.set()))
        await asyncio.wait_for(done.wait(), 10)

    try:
        asyncio.run(scenario())
    finally:
        backend.close()
    assert all(r.ok for r in results) and Counting.most == 2
    # a thread ending its turn takes the next one: a disk capped at 2 needs 2 threads, not the pool's 8
    assert pool.peak_threads == 2


def test_close_drains_its_device_while_the_pool_serves_others(disk: Path) -> None:
    pool = IOPool(max_threads=2, name="test-close")
    closing = BlockBackend(SlowStore(str(disk)), name="closing", pool=pool)
    serving = BlockBackend(SlowStore(str(disk)), name="serving", pool=pool)
    results: dict[str, list[BlockResult]] = {"closing": [], "serving": []}

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        for n in range(30):
            closing.submit(read(512 * n), results["closing"].append)
        await loop.run_in_executor(None, closing.close)
        assert closing.counters().in_flight == 0
        await asyncio.sleep(0.05)  # the callbacks are delivered on this loop
        assert len(results["closing"]) == 30 and all(r.ok for r in results["closing"])
        late: asyncio.Future[BlockResult] = loop.create_future()
        closing.submit(read(), late.set_result)
        assert not (await asyncio.wait_for(late, 5)).ok
        served: asyncio.Future[BlockResult] = loop.create_future()
        serving.submit(read(), served.set_result)
        assert (await asyncio.wait_for(served, 5)).ok

    try:
        asyncio.run(scenario())
    finally:
        serving.close()


def test_a_worker_process_bounds_its_pool_by_its_share_of_the_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert default_max_threads() == MAX_THREADS == 64
    try:
        share_cpus(4)
        assert default_max_threads() == 16
        share_cpus(16)
        assert default_max_threads() == MIN_THREADS
    finally:
        share_cpus(1)


def test_stats_count_threads_busy_ones_queued_turns_and_turns_taken() -> None:
    pool = IOPool(max_threads=2, idle_timeout=0.3, stall=60, name="test-stats")
    assert pool.stats() == PoolStats(threads=0, busy=0, max_threads=2, queued=0, turns=0, stall_threads=0)
    gate = Gate()
    for _ in range(5):
        pool.schedule(gate.tenant())
    assert wait_until(lambda: gate.running == 2)
    assert pool.stats() == PoolStats(threads=2, busy=2, max_threads=2, queued=3, turns=2, stall_threads=0)
    gate.open.set()
    assert wait_until(lambda: gate.done == 5)
    assert wait_until(lambda: pool.stats().busy == 0)
    assert pool.stats() == PoolStats(threads=2, busy=0, max_threads=2, queued=0, turns=5, stall_threads=0)
    assert wait_until(lambda: pool.stats().threads == 0, 5)


def test_the_thread_bound_setting_bounds_the_shared_pool_and_new_ones() -> None:
    shared = shared_pool()
    try:
        set_thread_bound(3)
        assert thread_bound_setting() == 3
        assert shared.max_threads == 3 and shared.hard_max_threads == 12
        assert IOPool(name="test-set").max_threads == 3
        assert IOPool(max_threads=5, name="test-set").max_threads == 5  # a pool given its own bound keeps it
        for bad in (0, -1, 1025):
            with pytest.raises(ValueError, match="io-threads"):
                set_thread_bound(bad)
        assert shared.max_threads == 3
    finally:
        set_thread_bound(None)
    assert thread_bound_setting() is None and shared.max_threads == default_max_threads()


def test_raising_the_bound_starts_threads_for_turns_already_waiting() -> None:
    pool = IOPool(max_threads=1, idle_timeout=1, stall=60, name="test-raise")
    gate = Gate()
    for _ in range(3):
        pool.schedule(gate.tenant())
    assert wait_until(lambda: gate.running == 1)
    pool.set_max_threads(3)
    assert wait_until(lambda: gate.running == 3), "the turns waiting got no new thread"
    gate.open.set()
    assert wait_until(lambda: gate.done == 3)
