"""Block device engine: the backend (store, priorities, barriers) and virtio-blk through the loopback."""

from __future__ import annotations

import asyncio
import os
import struct
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from pvcore.devices.block import (
    BlockBackend,
    BlockOp,
    BlockRequest,
    BlockResult,
    BlockStatus,
    CacheMode,
    RawFileStore,
    VirtioBlock,
    create_block_device,
    ioprio,
    ioprio_rank,
)
from pvcore.devices.block.backend import (
    IOPRIO_CLASS_BE,
    IOPRIO_CLASS_IDLE,
    IOPRIO_CLASS_NONE,
    IOPRIO_CLASS_RT,
    ioprio_steps,
)
from pvcore.devices.block.virtio_blk import (
    VIRTIO_BLK_F_CONFIG_WCE,
    VIRTIO_BLK_F_DISCARD,
    VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_WRITE_ZEROES,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
)
from pvcore.testing.loopback import Loopback
from pvcore.virtio import VIRTIO_ID_BLOCK, DeviceError, bit

DISK_SIZE = 1 << 20
SECTOR = 512
RT = ioprio(IOPRIO_CLASS_RT, 0)
BE = ioprio(IOPRIO_CLASS_BE, 4)
IDLE = ioprio(IOPRIO_CLASS_IDLE, 0)


def pattern(length: int, seed: int = 1) -> bytes:
    """Deterministic non-zero test data (period 251, so it never lines up with sectors)."""
    cycle = bytes((i * 7 + seed) % 251 + 1 for i in range(251))
    return (cycle * (length // 251 + 1))[:length]


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(pattern(DISK_SIZE, seed=3))
    return path


class GatedStore(RawFileStore):
    """A raw file whose I/O at ``gate_offset`` blocks until the test opens the gate; records I/O order."""

    def __init__(self, path: Path, *, gate_offset: int, readonly: bool = False) -> None:
        super().__init__(str(path), readonly=readonly)
        self.gate_offset = gate_offset
        self.entered = threading.Event()
        self.opened = threading.Event()
        self.events: list[tuple[str, int]] = []
        self.durable_writes: list[bool] = []

    def _gate(self, offset: int) -> None:
        if offset == self.gate_offset and not self.opened.is_set():
            self.entered.set()
            assert self.opened.wait(5), "test never opened the gate"

    def transfer_nowait(self, buffers: Sequence[memoryview], offset: int, *, write: bool) -> bool:
        # a gated store models slow storage: nothing can be served without waiting
        return False

    def readv(self, buffers: Sequence[memoryview], offset: int) -> int:
        self._gate(offset)
        done = super().readv(buffers, offset)
        self.events.append(("read", offset))
        return done

    def writev(self, buffers: Sequence[memoryview], offset: int, *, durable: bool = False) -> int:
        self._gate(offset)
        done = super().writev(buffers, offset, durable=durable)
        self.durable_writes.append(durable)
        self.events.append(("write", offset))
        return done

    def sync(self) -> None:
        super().sync()
        self.events.append(("sync", -1))


async def run(backend: BlockBackend, request: BlockRequest) -> BlockResult:
    """Submit one request and wait for its result on this loop."""
    future: asyncio.Future[BlockResult] = asyncio.get_running_loop().create_future()
    backend.submit(request, future.set_result)
    return await asyncio.wait_for(future, 5)


def read_request(offset: int, length: int, priority: int = 0) -> tuple[BlockRequest, bytearray]:
    buffer = bytearray(length)
    return BlockRequest(BlockOp.READ, offset, length, [memoryview(buffer)], priority), buffer


# ---------------------------------------------------------------- backend


def test_backend_write_read_flush(disk: Path) -> None:
    backend = BlockBackend(RawFileStore(str(disk)))

    async def scenario() -> None:
        data = pattern(8192, seed=9)
        view = memoryview(data)
        write = BlockRequest(BlockOp.WRITE, 4096, 8192, [view[:100], view[100:5000], view[5000:]])
        assert (await run(backend, write)) == BlockResult(BlockStatus.OK, 8192)
        request, buffer = read_request(4096, 8192)
        assert (await run(backend, request)).ok
        assert bytes(buffer) == data
        assert (await run(backend, BlockRequest(BlockOp.FLUSH))).ok

    try:
        asyncio.run(scenario())
        assert disk.read_bytes()[4096 : 4096 + 8192] == pattern(8192, seed=9)
        counters = backend.counters()
        assert (counters.requests, counters.reads, counters.writes, counters.flushes) == (3, 1, 1, 1)
        assert (counters.bytes_read, counters.bytes_written, counters.errors, counters.in_flight) == (8192, 8192, 0, 0)
    finally:
        backend.close()


@pytest.mark.parametrize("fallback", [False, True], ids=["fallocate", "write-zeros"])
def test_backend_discard_and_write_zeroes_read_back_zeros(disk: Path, fallback: bool) -> None:
    store = RawFileStore(str(disk))
    if fallback:
        store._punch_hole = store._zero_range = False
    backend = BlockBackend(store)

    async def scenario() -> None:
        assert (await run(backend, BlockRequest(BlockOp.DISCARD, 8192, 8192))).ok
        assert (await run(backend, BlockRequest(BlockOp.WRITE_ZEROES, 65536, 4096))).ok
        assert (await run(backend, BlockRequest(BlockOp.WRITE_ZEROES, 131072, 1000, may_unmap=True))).ok

    try:
        asyncio.run(scenario())
    finally:
        backend.close()
    content = disk.read_bytes()
    original = pattern(DISK_SIZE, seed=3)
    assert len(content) == DISK_SIZE
    assert content[8192:16384] == bytes(8192)
    assert content[65536:69632] == bytes(4096)
    assert content[131072:132072] == bytes(1000)
    assert content[:8192] == original[:8192]
    assert content[16384:65536] == original[16384:65536]
    assert content[132072:] == original[132072:]


def test_backend_readonly_refuses_modifications(disk: Path) -> None:
    before = disk.read_bytes()
    backend = BlockBackend(RawFileStore(str(disk), readonly=True))

    async def scenario() -> list[BlockResult]:
        data = memoryview(bytes(512))
        return [
            await run(backend, BlockRequest(BlockOp.WRITE, 0, 512, [data])),
            await run(backend, BlockRequest(BlockOp.DISCARD, 0, 512)),
            await run(backend, BlockRequest(BlockOp.WRITE_ZEROES, 0, 512)),
            await run(backend, read_request(0, 512)[0]),
        ]

    try:
        results = asyncio.run(scenario())
    finally:
        backend.close()
    assert [r.status for r in results] == [BlockStatus.READ_ONLY] * 3 + [BlockStatus.OK]
    assert disk.read_bytes() == before


def test_backend_rejects_bad_ranges_without_raising(disk: Path) -> None:
    backend = BlockBackend(RawFileStore(str(disk)))

    async def scenario() -> list[BlockStatus]:
        buffer = memoryview(bytearray(512))
        requests = [
            BlockRequest(BlockOp.READ, DISK_SIZE - 256, 512, [buffer]),
            BlockRequest(BlockOp.READ, -512, 512, [buffer]),
            BlockRequest(BlockOp.READ, 0, 1024, [buffer]),
            BlockRequest(BlockOp.READ, 0, 512, [memoryview(bytes(512))]),
            BlockRequest(BlockOp.DISCARD, DISK_SIZE, 1),
            BlockRequest(BlockOp.WRITE_ZEROES, 2**64, 512),
        ]
        return [(await run(backend, r)).status for r in requests]

    try:
        statuses = asyncio.run(scenario())
        assert statuses == [
            BlockStatus.OUT_OF_RANGE,
            BlockStatus.INVALID,
            BlockStatus.INVALID,
            BlockStatus.INVALID,
            BlockStatus.OUT_OF_RANGE,
            BlockStatus.OUT_OF_RANGE,
        ]
        assert backend.counters().errors == 6
        assert backend.counters().in_flight == 0
    finally:
        backend.close()


def test_ioprio_rank_orders_classes_and_levels() -> None:
    ordered = [ioprio(IOPRIO_CLASS_RT, 0), ioprio(IOPRIO_CLASS_RT, 7), ioprio(IOPRIO_CLASS_BE, 0), BE,
               ioprio(IOPRIO_CLASS_BE, 7), IDLE]
    ranks = [ioprio_rank(p) for p in ordered]
    assert ranks == sorted(ranks) and len(set(ranks)) == len(ranks)
    assert [ioprio_steps(p) for p in ordered] == [0, 7, 8, 12, 15, 16]
    assert ioprio_rank(ioprio(IOPRIO_CLASS_NONE, 0)) == ioprio_rank(BE)
    assert ioprio_rank(ioprio(6, 2)) == ioprio_rank(BE)  # unknown class: as if none
    assert ioprio_rank(ioprio(IOPRIO_CLASS_RT, 100)) == ioprio_rank(ioprio(IOPRIO_CLASS_RT, 7))


def frozen_clock() -> float:
    """A clock that never moves: no request ages, so priorities order strictly (and independently of load)."""
    return 0.0


def test_backend_runs_high_priority_first(disk: Path) -> None:
    store = GatedStore(disk, gate_offset=0)
    backend = BlockBackend(store, workers=1, clock=frozen_clock)
    order: list[str] = []

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        done = asyncio.Event()

        def record(label: str):
            def callback(result: BlockResult) -> None:
                assert result.ok
                order.append(label)
                if len(order) == 6:
                    done.set()

            return callback

        backend.submit(read_request(0, 512)[0], record("blocker"))
        assert await loop.run_in_executor(None, store.entered.wait, 5)
        for label, offset, priority in [
            ("idle", 512, IDLE),
            ("be-first", 1024, BE),
            ("rt", 1536, RT),
            ("be-second", 2048, BE),
            ("be-high", 2560, ioprio(IOPRIO_CLASS_BE, 0)),
        ]:
            backend.submit(read_request(offset, 512, priority)[0], record(label))
        store.opened.set()
        await asyncio.wait_for(done.wait(), 5)

    try:
        asyncio.run(scenario())
    finally:
        backend.close()
    assert order == ["blocker", "rt", "be-high", "be-first", "be-second", "idle"]


@pytest.mark.parametrize("low", ["idle-read", "idle-flush"])
def test_ageing_lets_a_waiting_low_priority_request_overtake_later_ones(disk: Path, low: str) -> None:
    """With ageing 0.05 s, IDLE (step 16) waiting since t=0 runs before BE4 (step 12) submitted before
    t=0.2 s and after any submitted later; a FLUSH ages the same way (the clock is the test's)."""
    now = [100.0]
    store = GatedStore(disk, gate_offset=0)
    backend = BlockBackend(store, workers=1, ageing=0.05, clock=lambda: now[0])
    best_effort = [SECTOR * (8 + i) for i in range(16)]

    async def scenario() -> list[tuple[str, int]]:
        loop = asyncio.get_running_loop()
        finished: list[BlockResult] = []
        all_done = asyncio.Event()

        def record(result: BlockResult) -> None:
            assert result.ok
            finished.append(result)
            if len(finished) == 2 + len(best_effort):
                all_done.set()

        backend.submit(read_request(0, SECTOR)[0], record)  # holds the only worker at the gate
        assert await loop.run_in_executor(None, store.entered.wait, 5)
        if low == "idle-flush":
            backend.submit(BlockRequest(BlockOp.FLUSH, priority=IDLE), record)
        else:
            backend.submit(read_request(SECTOR, SECTOR, IDLE)[0], record)
        for i, offset in enumerate(best_effort):
            now[0] = 100.0 + 0.0125 + 0.025 * i  # the 8th (i=7) at 0.1875 s, the 9th at 0.2125 s
            backend.submit(read_request(offset, SECTOR, BE)[0], record)
        store.opened.set()
        await asyncio.wait_for(all_done.wait(), 5)
        return list(store.events)

    try:
        events = asyncio.run(scenario())
    finally:
        backend.close()
    low_event = ("sync", -1) if low == "idle-flush" else ("read", SECTOR)
    expected = [("read", 0)] + [("read", o) for o in best_effort[:8]] + [low_event]
    expected += [("read", o) for o in best_effort[8:]]
    assert events == expected


def test_an_idle_request_completes_under_constant_best_effort_load(disk: Path) -> None:
    """A BE load that always has requests queued does not starve an IDLE request (real clock, default ageing)."""

    class SlowStore(RawFileStore):
        def transfer_nowait(self, buffers: Sequence[memoryview], offset: int, *, write: bool) -> bool:
            return False

        def readv(self, buffers: Sequence[memoryview], offset: int) -> int:
            time.sleep(0.001)  # slow storage: 32 queued requests are work for at least 32 ms
            return super().readv(buffers, offset)

    backend = BlockBackend(SlowStore(str(disk)), workers=1)
    depth = 32

    async def scenario() -> tuple[int, int]:
        loop = asyncio.get_running_loop()
        load_done = [0]
        running = [True]
        drained = asyncio.Event()
        outstanding = [0]

        def submit_load(offset: int) -> None:
            outstanding[0] += 1

            def again(result: BlockResult) -> None:
                assert result.ok
                outstanding[0] -= 1
                load_done[0] += 1
                if running[0]:
                    submit_load(offset)
                elif not outstanding[0]:
                    drained.set()

            backend.submit(read_request(offset, SECTOR, BE)[0], again)

        for i in range(depth):
            submit_load(SECTOR * (8 + i))
        while load_done[0] < 2 * depth:  # the load is running
            await asyncio.sleep(0.01)
        before = load_done[0]
        idle: asyncio.Future[BlockResult] = loop.create_future()
        backend.submit(read_request(0, SECTOR, IDLE)[0], idle.set_result)
        try:
            result = await asyncio.wait_for(idle, 30)  # about 0.2 s here; without ageing never, while the load runs
        finally:
            during = load_done[0] - before
            running[0] = False
            await asyncio.wait_for(drained.wait(), 10)
        assert result.ok
        return before, during

    try:
        before, during = asyncio.run(scenario())
    finally:
        backend.close()
    assert before >= 2 * depth and during >= depth, (before, during)


def test_flush_waits_for_earlier_requests_only(disk: Path) -> None:
    store = GatedStore(disk, gate_offset=4096)
    backend = BlockBackend(store, workers=2)
    order: list[str] = []

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        later_read = asyncio.Event()
        flushed = asyncio.Event()
        data = memoryview(pattern(512, seed=5))
        backend.submit(BlockRequest(BlockOp.WRITE, 4096, 512, [data]), lambda r: order.append("write"))
        assert await loop.run_in_executor(None, store.entered.wait, 5)
        backend.submit(BlockRequest(BlockOp.FLUSH), lambda r: (order.append("flush"), flushed.set()))
        backend.submit(read_request(0, 512)[0], lambda r: (order.append("read"), later_read.set()))
        await asyncio.wait_for(later_read.wait(), 5)
        await asyncio.sleep(0.05)
        assert "flush" not in order, "the flush did not wait for the write before it"
        store.opened.set()
        await asyncio.wait_for(flushed.wait(), 5)

    try:
        asyncio.run(scenario())
    finally:
        backend.close()
    assert order == ["read", "write", "flush"]
    assert store.events.index(("write", 4096)) < store.events.index(("sync", -1))


def test_writethrough_and_fua_make_writes_durable(disk: Path) -> None:
    store = GatedStore(disk, gate_offset=-1)
    backend = BlockBackend(store, cache=CacheMode.WRITEBACK)
    data = memoryview(bytes(512))

    async def scenario() -> None:
        await run(backend, BlockRequest(BlockOp.WRITE, 0, 512, [data]))
        await run(backend, BlockRequest(BlockOp.WRITE, 0, 512, [data], fua=True))
        backend.cache = CacheMode.WRITETHROUGH
        await run(backend, BlockRequest(BlockOp.WRITE, 0, 512, [data]))

    try:
        asyncio.run(scenario())
    finally:
        backend.close()
    assert store.durable_writes == [False, True, True]


def test_closed_backend_fails_requests(disk: Path) -> None:
    backend = BlockBackend(RawFileStore(str(disk)))
    backend.close()

    async def scenario() -> BlockResult:
        return await run(backend, read_request(0, 512)[0])

    assert asyncio.run(scenario()).status is BlockStatus.IO_ERROR


# ---------------------------------------------------------------- factory


def test_factory_parses_options(disk: Path) -> None:
    backend, device = create_block_device(
        {"path": str(disk), "readonly": "ON", "cache": "writethrough", "queues": "3", "serial": "disk-0", "workers": "2"},
        name="vda",
    )
    try:
        assert backend.readonly and backend.cache is CacheMode.WRITETHROUGH
        assert device.num_queues() == 3 and device.serial == b"disk-0"
        assert device.device_id == VIRTIO_ID_BLOCK == 2
        assert device.features() & bit(VIRTIO_BLK_F_RO)
        assert not device.features() & bit(VIRTIO_BLK_F_DISCARD)
    finally:
        backend.close()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"path": "/nonexistent/x.img"}, "path=/nonexistent/x.img: no such file"),
        ({}, "path= is required"),
        ({"path": "{disk}", "readonly": "maybe"}, "readonly=maybe: expected on or off"),
        ({"path": "{disk}", "cache": "none"}, "cache=none: expected writeback or writethrough"),
        ({"path": "{disk}", "queues": "0"}, "queues=0: must be between 1 and"),
        ({"path": "{disk}", "queues": "two"}, "queues=two: expected a whole number"),
        ({"path": "{disk}", "serial": "x" * 21}, "at most 20"),
        ({"path": "{disk}", "serial": "é"}, "printable ASCII"),
        ({"path": "{disk}", "size": "1G"}, "unknown option size"),
        ({"path": "{dir}"}, "is a directory"),
        ({"path": "{empty}"}, "smaller than one 512-byte sector"),
    ],
)
def test_factory_reports_bad_options(disk: Path, options: dict[str, str], message: str) -> None:
    empty = disk.parent / "empty.img"
    empty.touch()
    paths = {"disk": str(disk), "dir": str(disk.parent), "empty": str(empty)}
    options = {key: value.format(**paths) for key, value in options.items()}
    with pytest.raises(DeviceError, match="^block vda: ") as error:
        create_block_device(options, name="vda")
    assert message in str(error.value)


# ---------------------------------------------------------------- virtio-blk through the loopback


def header(kind: int, sector: int = 0, priority: int = 0) -> bytes:
    return struct.pack("<IIQ", kind, priority, sector)


def segment(sector: int, sectors: int, flags: int = 0) -> bytes:
    return struct.pack("<QII", sector, sectors, flags)


def make_device(disk: Path, *, readonly: bool = False, queues: int = 1, workers: int = 4,
                store: RawFileStore | None = None, clock=time.monotonic) -> VirtioBlock:
    backend = BlockBackend(store or RawFileStore(str(disk), readonly=readonly), workers=workers, name="vda",
                           clock=clock)
    return VirtioBlock(backend, name="vda", queues=queues, serial=b"pvcore-serial-01")


@pytest.fixture
def device(disk: Path):
    device = make_device(disk)
    yield device
    device.backend.close()


def wait_until(condition, timeout: float = 5.0) -> None:
    """Poll ``condition`` until it holds (a few milliseconds in practice)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.001)


def read_sectors(lb: Loopback, sector: int, count: int, queue: int = 0) -> bytes:
    used = lb.request(queue, [header(VIRTIO_BLK_T_IN, sector)], [count * SECTOR, 1])
    assert used.written == count * SECTOR + 1
    assert used.data[-1] == VIRTIO_BLK_S_OK
    return used.data[:-1]


@pytest.mark.parametrize("event_idx", [True, False], ids=["event-idx", "no-event-idx"])
def test_virtio_write_read_flush(disk: Path, device: VirtioBlock, event_idx: bool) -> None:
    data = pattern(3 * SECTOR, seed=11)
    with Loopback(device, event_idx=event_idx) as lb:
        used = lb.request(0, [header(VIRTIO_BLK_T_OUT, 10), data[:700], data[700:]], [1])
        assert (used.written, used.data) == (1, bytes([VIRTIO_BLK_S_OK]))
        assert read_sectors(lb, 10, 3) == data
        one_buffer = lb.request(0, [header(VIRTIO_BLK_T_IN, 10)], [3 * SECTOR + 1], indirect=True)
        assert one_buffer.data == data + bytes([VIRTIO_BLK_S_OK])
        flushed = lb.request(0, [header(VIRTIO_BLK_T_FLUSH)], [1])
        assert flushed.data == bytes([VIRTIO_BLK_S_OK])
        assert disk.read_bytes()[10 * SECTOR : 13 * SECTOR] == data


def test_virtio_discard_and_write_zeroes(disk: Path, device: VirtioBlock) -> None:
    with Loopback(device) as lb:
        discard = lb.request(0, [header(VIRTIO_BLK_T_DISCARD), segment(8, 8) + segment(40, 2)], [1])
        assert discard.data == bytes([VIRTIO_BLK_S_OK])
        zeroes = lb.request(0, [header(VIRTIO_BLK_T_WRITE_ZEROES), segment(64, 4), segment(80, 1, flags=1)], [1])
        assert zeroes.data == bytes([VIRTIO_BLK_S_OK])
        assert read_sectors(lb, 8, 8) == bytes(8 * SECTOR)
        assert read_sectors(lb, 40, 2) == bytes(2 * SECTOR)
        assert read_sectors(lb, 64, 4) == bytes(4 * SECTOR)
        assert read_sectors(lb, 80, 1) == bytes(SECTOR)
        assert read_sectors(lb, 16, 1) == pattern(DISK_SIZE, seed=3)[16 * SECTOR : 17 * SECTOR]
    content = disk.read_bytes()
    assert content[8 * SECTOR : 16 * SECTOR] == bytes(8 * SECTOR)
    assert content[64 * SECTOR : 68 * SECTOR] == bytes(4 * SECTOR)


def test_virtio_readonly_refuses_writes(disk: Path) -> None:
    before = disk.read_bytes()
    device = make_device(disk, readonly=True)
    try:
        with Loopback(device) as lb:
            assert lb.session.offered_features & bit(VIRTIO_BLK_F_RO)
            refused = [
                lb.request(0, [header(VIRTIO_BLK_T_OUT, 0), bytes(SECTOR)], [1]),
                lb.request(0, [header(VIRTIO_BLK_T_DISCARD), segment(0, 1)], [1]),
                lb.request(0, [header(VIRTIO_BLK_T_WRITE_ZEROES), segment(0, 1)], [1]),
            ]
            assert [u.data for u in refused] == [bytes([VIRTIO_BLK_S_IOERR])] * 3
            assert read_sectors(lb, 0, 1) == before[:SECTOR]
    finally:
        device.backend.close()
    assert disk.read_bytes() == before


def test_virtio_get_id_returns_serial(device: VirtioBlock) -> None:
    with Loopback(device) as lb:
        used = lb.request(0, [header(VIRTIO_BLK_T_GET_ID)], [20, 1])
        assert used.written == 21
        assert used.data == b"pvcore-serial-01\0\0\0\0" + bytes([VIRTIO_BLK_S_OK])


def test_virtio_config_space_layout(disk: Path, device: VirtioBlock) -> None:
    config = device.config()
    assert len(config) == 60
    assert struct.unpack_from("<Q", config, 0)[0] == DISK_SIZE // SECTOR  # capacity
    assert struct.unpack_from("<I", config, 12)[0] == device.max_queue_size - 2  # seg_max
    assert struct.unpack_from("<I", config, 20)[0] == 512  # blk_size
    assert config[32] == 1  # writeback
    assert config[33] == 0  # unused0
    assert struct.unpack_from("<H", config, 34)[0] == 1  # num_queues
    max_discard_sectors, max_discard_seg, alignment, max_wz_sectors, max_wz_seg = struct.unpack_from("<5I", config, 36)
    assert max_discard_sectors > 0 and max_discard_seg > 0 and alignment > 0
    assert max_wz_sectors > 0 and max_wz_seg > 0
    assert config[56] == 1  # write_zeroes_may_unmap
    assert config[57:60] == bytes(3)
    features = device.features()
    for wanted in (VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_WRITE_ZEROES, 2, 6, 12):
        assert features & bit(wanted)
    for absent in (0, 7, VIRTIO_BLK_F_RO):  # BARRIER, SCSI, RO
        assert not features & bit(absent)
    four_queues = make_device(disk, queues=4)
    try:
        assert struct.unpack_from("<H", four_queues.config(), 34)[0] == 4
    finally:
        four_queues.backend.close()


def test_virtio_writeback_config_switches_cache_mode(device: VirtioBlock) -> None:
    with Loopback(device) as lb:
        assert device.backend.cache is CacheMode.WRITEBACK
        lb.run_in_loop(device.write_config, 32, b"\x00")
        assert device.backend.cache is CacheMode.WRITETHROUGH and device.config()[32] == 0
        lb.run_in_loop(device.write_config, 30, b"\x00\x00\x01\x00")
        assert device.backend.cache is CacheMode.WRITEBACK and device.config()[32] == 1
        lb.run_in_loop(device.write_config, 0, b"\x00" * 8)  # capacity is read-only
        assert device.config()[:8] == struct.pack("<Q", DISK_SIZE // SECTOR)
    assert device.backend.cache is CacheMode.WRITEBACK


def test_virtio_writeback_config_needs_config_wce(disk: Path, device: VirtioBlock) -> None:
    with Loopback(device) as probe:
        offered = probe.session.offered_features
    with Loopback(device, features=offered & ~bit(VIRTIO_BLK_F_CONFIG_WCE)) as lb:
        lb.run_in_loop(device.write_config, 32, b"\x00")
        assert device.backend.cache is CacheMode.WRITEBACK
    with Loopback(device, features=offered & ~bit(VIRTIO_BLK_F_FLUSH)) as lb:
        assert device.backend.cache is CacheMode.WRITETHROUGH, "a driver that cannot flush gets writethrough"
    assert device.backend.cache is CacheMode.WRITEBACK


def test_virtio_many_requests_in_flight_batch_interrupts(disk: Path, device: VirtioBlock) -> None:
    original = pattern(DISK_SIZE, seed=3)
    with Loopback(device, queue_size=256, event_idx=True) as lb:
        heads = {lb.submit(0, [header(VIRTIO_BLK_T_IN, 8 * i)], [4096, 1]): i for i in range(64)}
        used = lb.wait_used(0, 64)
        assert sorted(u.head for u in used) == sorted(heads)
        for u in used:
            i = heads[u.head]
            assert u.written == 4097
            assert u.data == original[4096 * i : 4096 * (i + 1)] + bytes([VIRTIO_BLK_S_OK])
        stats = lb.run_in_loop(lb.session.stats)
        assert stats["completions"] == 64
        assert lb.interrupts(0) < 64


def test_virtio_priority_high_before_low_under_load(disk: Path) -> None:
    store = GatedStore(disk, gate_offset=0)
    device = make_device(disk, store=store, workers=1, clock=frozen_clock)
    try:
        with Loopback(device) as lb:
            blocker = lb.submit(0, [header(VIRTIO_BLK_T_IN, 0)], [SECTOR, 1])
            assert store.entered.wait(5)
            idle = lb.submit(0, [header(VIRTIO_BLK_T_IN, 1, IDLE)], [SECTOR, 1])
            best_effort = lb.submit(0, [header(VIRTIO_BLK_T_IN, 2, BE)], [SECTOR, 1])
            realtime = lb.submit(0, [header(VIRTIO_BLK_T_IN, 3, RT)], [SECTOR, 1])
            wait_until(lambda: device.backend.counters().requests == 4)
            store.opened.set()
            used = lb.wait_used(0, 4)
            assert [u.head for u in used] == [blocker, realtime, best_effort, idle]
            assert all(u.data[-1] == VIRTIO_BLK_S_OK for u in used)
    finally:
        device.backend.close()


def test_virtio_flush_is_a_barrier(disk: Path) -> None:
    store = GatedStore(disk, gate_offset=20 * SECTOR)
    device = make_device(disk, store=store, workers=2)
    data = pattern(SECTOR, seed=17)
    try:
        with Loopback(device) as lb:
            write = lb.submit(0, [header(VIRTIO_BLK_T_OUT, 20), data], [1])
            assert store.entered.wait(5)
            flush = lb.submit(0, [header(VIRTIO_BLK_T_FLUSH)], [1])
            read = lb.submit(0, [header(VIRTIO_BLK_T_IN, 0)], [SECTOR, 1])
            first = lb.wait_used(0, 1)
            assert [u.head for u in first] == [read]
            assert ("sync", -1) not in store.events
            store.opened.set()
            rest = lb.wait_used(0, 2)
            assert [u.head for u in rest] == [write, flush]
            assert all(u.data[-1] == VIRTIO_BLK_S_OK for u in first + rest)
            assert store.events.index(("write", 20 * SECTOR)) < store.events.index(("sync", -1))
    finally:
        device.backend.close()


@pytest.mark.parametrize(
    ("readable", "writable", "status"),
    [
        ([b"\x00" * 8], [1], VIRTIO_BLK_S_IOERR),  # header too short
        ([header(VIRTIO_BLK_T_IN, 0)], [100, 1], VIRTIO_BLK_S_IOERR),  # not whole sectors
        ([header(VIRTIO_BLK_T_OUT, 0), bytes(700)], [1], VIRTIO_BLK_S_IOERR),
        ([header(VIRTIO_BLK_T_IN, DISK_SIZE // SECTOR)], [SECTOR, 1], VIRTIO_BLK_S_IOERR),  # past the end
        ([header(VIRTIO_BLK_T_IN, 2**64 - 1)], [SECTOR, 1], VIRTIO_BLK_S_IOERR),
        ([header(VIRTIO_BLK_T_OUT, DISK_SIZE // SECTOR - 1), bytes(2 * SECTOR)], [1], VIRTIO_BLK_S_IOERR),
        ([header(99)], [1], VIRTIO_BLK_S_UNSUPP),  # unknown type
        ([header(VIRTIO_BLK_T_DISCARD), segment(0, 1, flags=1)], [1], VIRTIO_BLK_S_UNSUPP),  # discard + unmap
        ([header(VIRTIO_BLK_T_DISCARD), segment(0, 1, flags=2)], [1], VIRTIO_BLK_S_IOERR),  # unknown flag
        ([header(VIRTIO_BLK_T_DISCARD), bytes(10)], [1], VIRTIO_BLK_S_IOERR),  # partial segment
        ([header(VIRTIO_BLK_T_DISCARD)], [1], VIRTIO_BLK_S_IOERR),  # no segment
        ([header(VIRTIO_BLK_T_WRITE_ZEROES), segment(DISK_SIZE // SECTOR, 1)], [1], VIRTIO_BLK_S_IOERR),
        ([header(VIRTIO_BLK_T_WRITE_ZEROES), segment(0, 1) * 33], [1], VIRTIO_BLK_S_IOERR),  # too many
    ],
)
def test_virtio_malformed_requests_fail_alone(
    disk: Path, device: VirtioBlock, readable: list[bytes], writable: list[int], status: int
) -> None:
    before = disk.read_bytes()
    with Loopback(device) as lb:
        used = lb.request(0, readable, writable)
        assert used.written == sum(writable)
        assert used.data[-1] == status
        assert read_sectors(lb, 0, 1) == before[:SECTOR]
        assert lb.session.broken is None
    assert disk.read_bytes() == before


def test_virtio_request_without_status_byte_is_returned(device: VirtioBlock) -> None:
    with Loopback(device) as lb:
        used = lb.request(0, [header(VIRTIO_BLK_T_IN, 0)], [])
        assert used.written == 0
        assert read_sectors(lb, 0, 1) == pattern(SECTOR, seed=3)
        assert lb.session.broken is None


def test_virtio_multiqueue(disk: Path) -> None:
    device = make_device(disk, queues=2)
    data = pattern(SECTOR, seed=23)
    try:
        with Loopback(device) as lb:
            assert lb.request(1, [header(VIRTIO_BLK_T_OUT, 5), data], [1]).data == bytes([VIRTIO_BLK_S_OK])
            assert read_sectors(lb, 5, 1, queue=0) == data
            assert read_sectors(lb, 5, 1, queue=1) == data
    finally:
        device.backend.close()


def test_virtio_partial_last_sector_is_hidden(tmp_path: Path) -> None:
    path = tmp_path / "odd.img"
    path.write_bytes(bytes(2 * SECTOR + 100))
    backend, device = create_block_device({"path": str(path)}, name="vdb")
    try:
        assert device.capacity == 2
        with Loopback(device) as lb:
            used = lb.request(0, [header(VIRTIO_BLK_T_IN, 2)], [SECTOR, 1])
            assert used.data[-1] == VIRTIO_BLK_S_IOERR
    finally:
        backend.close()
    assert os.path.getsize(path) == 2 * SECTOR + 100


def test_idle_device_serves_cached_reads_and_writes_without_a_worker(disk: Path) -> None:
    """At queue depth 1 a page-cache hit is served on the loop thread (RWF_NOWAIT), correctly."""
    store = RawFileStore(str(disk))
    backend = BlockBackend(store, workers=1)
    calls: list[str] = []
    original = store.transfer_nowait

    def spy(buffers: Sequence[memoryview], offset: int, *, write: bool) -> bool:
        done = original(buffers, offset, write=write)
        calls.append(("write" if write else "read") + (" inline" if done else " deferred"))
        return done

    store.transfer_nowait = spy  # type: ignore[method-assign]

    async def scenario() -> tuple[BlockResult, bytes]:
        loop = asyncio.get_running_loop()
        data = memoryview(bytearray(b"\xa5" * 4096))
        write = BlockRequest(BlockOp.WRITE, 8192, 4096, [data])
        if backend.serve_now(write):  # a file system refusing no-wait writes sends it to a worker
            wrote = BlockResult(BlockStatus.OK, 4096)
        else:
            written: asyncio.Future[BlockResult] = loop.create_future()
            backend.submit(write, written.set_result)
            wrote = await written
        target = memoryview(bytearray(4096))
        assert backend.serve_now(BlockRequest(BlockOp.READ, 8192, 4096, [target]))
        return wrote, bytes(target)

    try:
        wrote, data = asyncio.run(scenario())
    finally:
        backend.close()
    assert wrote.ok and data == b"\xa5" * 4096
    assert disk.read_bytes()[8192 : 8192 + 4096] == b"\xa5" * 4096
    assert "read inline" in calls, calls


def test_serve_now_only_while_no_request_waits_and_never_for_a_bad_request(disk: Path) -> None:
    """serve_now does a cached read on the spot and counts it, also beside a request running on a thread;
    while a request waits for a thread, and for bad or big requests, it leaves them to submit()."""

    class CachedGatedStore(GatedStore):
        transfer_nowait = RawFileStore.transfer_nowait  # cached data is served; worker reads wait at the gate

    store = CachedGatedStore(disk, gate_offset=0)
    backend = BlockBackend(store, workers=1)
    expected = disk.read_bytes()

    async def scenario() -> None:
        request, buffer = read_request(4096, 4096)
        assert backend.serve_now(request)
        assert bytes(buffer) == expected[4096:8192]
        counters = backend.counters()
        assert (counters.requests, counters.reads, counters.bytes_read, counters.in_flight) == (1, 1, 4096, 0)

        past_end, _ = read_request(len(expected), 512)
        assert not backend.serve_now(past_end)
        huge, _ = read_request(0, 256 * 1024)
        assert not backend.serve_now(huge)
        assert backend.counters().requests == 1  # refused requests are left to submit(), which counts them

        loop = asyncio.get_running_loop()
        held: asyncio.Future[BlockResult] = loop.create_future()
        backend.submit(huge, held.set_result)  # too big to serve inline: a worker takes it and waits at the gate
        assert await asyncio.to_thread(store.entered.wait, 5)
        beside, beside_buffer = read_request(16384, 4096)
        assert backend.serve_now(beside)  # one running on a thread is overtaken by no one: served on the spot
        assert bytes(beside_buffer) == expected[16384:20480]
        write = BlockRequest(BlockOp.WRITE, offset=20480, length=4096, buffers=(memoryview(bytearray(4096)),))
        assert not backend.serve_now(write)  # a write only on an idle device: it could wait for a lock on the loop
        queued: asyncio.Future[BlockResult] = loop.create_future()
        backend.submit(huge, queued.set_result)  # workers=1: this one waits for the thread
        busy_request, busy_buffer = read_request(8192, 4096)
        assert not backend.serve_now(busy_request)  # a request waits: it must not be overtaken
        assert not any(busy_buffer)
        store.opened.set()
        assert (await asyncio.wait_for(held, 5)).ok
        assert (await asyncio.wait_for(queued, 5)).ok
        assert backend.serve_now(busy_request) and bytes(busy_buffer) == expected[8192:12288]

    try:
        asyncio.run(scenario())
    finally:
        backend.close()


def test_submit_never_runs_the_callback_before_returning(disk: Path) -> None:
    """Even a request the page cache could serve at once completes in a later loop pass."""
    backend = BlockBackend(RawFileStore(str(disk)), workers=1)

    async def scenario() -> None:
        results: list[BlockResult] = []
        completed = asyncio.get_running_loop().create_future()

        def callback(result: BlockResult) -> None:
            results.append(result)
            completed.set_result(None)

        request, buffer = read_request(0, 4096)
        backend.submit(request, callback)
        assert results == []
        await asyncio.wait_for(completed, 10)
        assert len(results) == 1 and results[0].ok and bytes(buffer) == disk.read_bytes()[:4096]

    try:
        asyncio.run(scenario())
    finally:
        backend.close()


def test_large_requests_never_run_on_the_loop_thread(disk: Path) -> None:
    """An inline copy is capped: a guest cannot stall the shared loop with one huge cached read."""
    store = RawFileStore(str(disk))
    backend = BlockBackend(store, workers=1)
    inline: list[int] = []
    original = store.transfer_nowait

    def spy(buffers: Sequence[memoryview], offset: int, *, write: bool) -> bool:
        inline.append(sum(len(b) for b in buffers))
        return original(buffers, offset, write=write)

    store.transfer_nowait = spy  # type: ignore[method-assign]
    size = 256 * 1024
    target = memoryview(bytearray(size))

    async def scenario() -> BlockResult:
        loop = asyncio.get_running_loop()
        request = BlockRequest(BlockOp.READ, 0, size, [target])
        assert not backend.serve_now(request)
        read: asyncio.Future[BlockResult] = loop.create_future()
        backend.submit(request, read.set_result)
        return await read

    try:
        result = asyncio.run(scenario())
    finally:
        backend.close()
    assert result.ok and bytes(target) == disk.read_bytes()[:size]
    assert inline == []


def test_whole_page_writes_go_inline_only_while_dirty_memory_is_low(disk: Path, tmp_path: Path) -> None:
    """Where buffered RWF_NOWAIT writes are refused, small whole-page writes run on the loop thread
    only while the host's dirty memory is far below the kernel's writeback threshold."""
    from pvcore.devices.block.store import DirtyPageGauge

    proc = tmp_path / "proc"
    (proc / "sys/vm").mkdir(parents=True)
    (proc / "sys/vm/dirty_background_bytes").write_text("0\n")
    (proc / "sys/vm/dirty_background_ratio").write_text("10\n")

    def dirty(kib: int) -> None:
        (proc / "meminfo").write_text(
            "MemFree: 1000000 kB\nActive(file): 500000 kB\nInactive(file): 500000 kB\n"
            f"Dirty: {kib} kB\nWriteback: 0 kB\n"
        )

    clock = [0.0]
    store = RawFileStore(str(disk), dirty_pages=DirtyPageGauge(proc=str(proc), clock=lambda: clock[0]))
    store._nowait[True] = False  # as on a file system refusing buffered RWF_NOWAIT writes
    page = [memoryview(bytearray(b"\x5a" * 4096))]
    try:
        dirty(1000)
        assert store.transfer_nowait(page, 4096, write=True)
        assert disk.read_bytes()[4096:8192] == b"\x5a" * 4096
        assert not store.transfer_nowait([page[0][:512]], 4096, write=True)  # not whole pages
        dirty(150000)
        clock[0] += 0.1
        assert not store.transfer_nowait(page, 4096, write=True)
    finally:
        store.close()


def test_reads_from_tmpfs_are_served_inline_though_it_refuses_rwf_nowait() -> None:
    """tmpfs refuses RWF_NOWAIT reads, yet its pages are the storage: a cached read there is still
    served on the loop thread, every time (each one took two thread hand-offs before, ~130 ms a
    request in a PV dom0 under TCG)."""
    from pvcore.devices.block.store import memory_backed

    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK):
        pytest.skip("/dev/shm is not a writable directory here: no tmpfs to put an image on")
    path = shm / f"pvcore-test-{os.getpid()}.img"
    path.write_bytes(bytes(range(256)) * 64)
    store = RawFileStore(str(path))
    try:
        proc_fd = os.open("/proc/self/stat", os.O_RDONLY)
        try:
            assert not memory_backed(proc_fd)
        finally:
            os.close(proc_fd)
        assert memory_backed(store.fd)
        backend = BlockBackend(store, workers=1)
        try:
            for round_ in range(3):  # the first RWF_NOWAIT refusal must not send later reads to a worker
                target = memoryview(bytearray(4096))
                assert backend.serve_now(BlockRequest(BlockOp.READ, 4096 * (round_ % 4), 4096, [target])), round_
                assert bytes(target) == path.read_bytes()[4096 * (round_ % 4) : 4096 * (round_ % 4 + 1)]
            assert backend.counters().reads == 3
        finally:
            backend.close()
    finally:
        path.unlink()
