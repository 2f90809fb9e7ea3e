"""I/O limits: the leaky-bucket math and the group's round robin on a hand-moved clock, the block
backend's hold-back (inline path included) and a NIC's rate on a real event loop."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from pvcore.devices.block import BlockOp, BlockRequest, create_block_device
from pvcore.devices.net import Port, create_net_device, get_switch, parse_mac, parse_net_options
from pvcore.devices.net.virtio_net import NET_HDR, RX_QUEUE, TX_QUEUE
from pvcore.testing.fixtures import loop_thread  # noqa: F401  (a fixture)
from pvcore.testing.loopback import Loopback
from pvcore.throttle import Cost, Throttle, ThrottleError, ThrottleGroup, ThrottleGroups, ThrottleLimits
from pvcore.virtio import DeviceError

READ = Cost(False, 1, 4096)
WRITE = Cost(True, 1, 4096)
STEP = 0.0005


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def limited(text: str, clock: Clock, members: int = 1) -> tuple[ThrottleGroup, list[Throttle]]:
    group = ThrottleGroup("g", ThrottleLimits.parse_text(text), clock=clock)
    return group, [group.join(f"d{i}") for i in range(members)]


def hold(member: Throttle, cost: Cost, count: int, log: list[tuple[float, str]], clock: Clock) -> None:
    """Queue ``count`` requests of ``member`` (no event loop: the test pumps); each release is logged."""
    for _ in range(count):
        member.group.enqueue(member, cost, lambda: log.append((clock.now, member.name)), None)


def run_for(group: ThrottleGroup, clock: Clock, seconds: float) -> None:
    """Move the clock on in small steps, pumping the group as its timer would."""
    end = clock.now + seconds
    while clock.now < end:
        clock.now += STEP
        group.pump()


def released(log: list[tuple[float, str]], start: float, end: float, name: str | None = None) -> int:
    return sum(1 for at, who in log if start <= at < end and (name is None or who == name))


def test_a_bucket_lets_a_tenth_of_a_second_go_at_once_then_one_request_per_period() -> None:
    clock = Clock()
    group, (member,) = limited("iops=500", clock)
    went = 0
    while group.try_go(member, READ):
        went += 1
    assert went == 51  # levels 0..50 are within the capacity of 50: the 51st overshoots
    clock.now += 0.0019
    assert not group.try_go(member, READ)
    clock.now += 0.0002
    assert group.try_go(member, READ)


def test_held_requests_go_at_the_rate_in_order() -> None:
    clock = Clock()
    group, (member,) = limited("iops=500", clock)
    log: list[tuple[float, str]] = []
    hold(member, READ, 4000, log, clock)
    start = clock.now
    assert released(log, start, start + 1e-9) == 51
    run_for(group, clock, 5.0)
    assert abs(released(log, start, clock.now) - (51 + 5 * 500)) <= 2
    assert abs(released(log, start + 2, start + 4) - 1000) <= 2
    assert abs(member.throttled_seconds() - 5.0) < 0.01


def test_a_burst_runs_at_the_burst_rate_for_burst_length_then_at_the_rate() -> None:
    clock = Clock()
    group, (member,) = limited("iops=100,iops-burst=1000,burst-length=2", clock)
    log: list[tuple[float, str]] = []
    hold(member, READ, 5000, log, clock)
    start = clock.now
    run_for(group, clock, 5.0)
    assert released(log, start + 0.5, start + 1.5) == pytest.approx(1000, rel=0.02)
    # by 2 s the bucket is full: its capacity (1000 - 100) * 2 plus what drained at 100/s
    assert released(log, start, start + 2.0) == pytest.approx(1800 + 200, rel=0.02)
    assert released(log, start + 3.0, start + 5.0) == pytest.approx(200, abs=3)


def test_a_bps_limit_lets_a_big_request_overshoot_and_keeps_the_long_run_rate() -> None:
    clock = Clock()
    group, (member,) = limited("bps=1M", clock)
    big = Cost(False, 1, 256 * 1024)
    log: list[tuple[float, str]] = []
    hold(member, big, 100, log, clock)
    start = clock.now
    assert released(log, start, start + 1e-9) == 1  # 256 KiB > the 100 kB capacity, yet it goes: never refused
    run_for(group, clock, 5.0)
    moved = released(log, start, clock.now) * big.nbytes
    assert 5_000_000 <= moved <= 5_000_000 + 100_000 + big.nbytes


def test_a_write_limit_never_holds_reads_back() -> None:
    clock = Clock()
    group, (member,) = limited("iops-write=10", clock)
    log: list[tuple[float, str]] = []
    hold(member, WRITE, 50, log, clock)
    reads: list[tuple[float, str]] = []
    hold(member, READ, 50, reads, clock)
    start = clock.now
    assert len(reads) == 50 and released(log, start, start + 1e-9) == 2
    run_for(group, clock, 1.0)
    assert released(log, start, clock.now) == pytest.approx(12, abs=1)


def test_a_flooding_device_cannot_starve_another_of_its_group() -> None:
    clock = Clock()
    group, (flood, quiet) = limited("iops=100", clock, members=2)
    log: list[tuple[float, str]] = []
    hold(flood, READ, 1000, log, clock)
    run_for(group, clock, 1.0)
    joined = clock.now
    hold(quiet, READ, 40, log, clock)
    run_for(group, clock, 0.6)
    assert released(log, joined, clock.now, "d1") == pytest.approx(30, abs=2)
    assert released(log, joined, clock.now, "d0") == pytest.approx(30, abs=2)
    order = [who for at, who in log if at >= joined][:20]
    assert all(a != b for a, b in zip(order, order[1:])), order  # strictly in turn while both wait


def test_new_limits_apply_to_requests_already_held() -> None:
    clock = Clock()
    group, (member,) = limited("iops=10", clock)
    log: list[tuple[float, str]] = []
    hold(member, READ, 500, log, clock)
    run_for(group, clock, 1.0)
    group.set_limits(ThrottleLimits.parse_text("iops=200"))
    changed = clock.now
    run_for(group, clock, 1.0)
    assert released(log, changed, clock.now) == pytest.approx(221, abs=2)
    group.set_limits(ThrottleLimits.parse_text("off"))
    assert len(log) == 500


def test_release_all_lets_held_requests_go_at_once_in_order() -> None:
    clock = Clock()
    group, (member,) = limited("iops=1", clock)
    order: list[int] = []
    for index in range(5):
        member.group.enqueue(member, READ, lambda index=index: order.append(index), None)
    assert order == [0]
    member.release_all()
    assert order == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("iops=0", "must be more than 0"),
        ("iops=-5", "positive whole number"),
        ("bps=lots", "positive whole number"),
        ("iops=500,speed=3", "unknown limit speed"),
        ("iops-burst=900", "needs iops="),
        ("iops=500,iops-burst=500", "must be above iops=500"),
        ("iops=500,burst-length=3", "needs iops-burst= or bps-burst="),
        ("iops=100,iops-burst=200,burst-length=0", "burst-length=0"),
        ("iops=1,iops=2", "given twice"),
        ("iops", "not key=value"),
    ],
)
def test_bad_limits_are_refused_with_the_key(text: str, message: str) -> None:
    with pytest.raises(ThrottleError, match=message):
        ThrottleLimits.parse_text(text)


def test_limits_read_back_as_written() -> None:
    limits = ThrottleLimits.parse_text("iops=500,bps-write=50M,bps=100M,bps-burst=200M,burst-length=2.5")
    assert str(limits) == "iops=500,bps=100000000,bps-write=50000000,bps-burst=200000000,burst-length=2.5"
    assert ThrottleLimits.parse_text(str(limits)) == limits
    assert str(ThrottleLimits.parse_text("off")) == "off"


def test_a_group_takes_devices_that_agree_and_refuses_one_that_does_not() -> None:
    groups = ThrottleGroups()
    limits = ThrottleLimits.parse_text("iops=500")
    with pytest.raises(ThrottleError, match="needs its limits on its first device"):
        groups.join("a", ThrottleLimits(), "g")
    first = groups.join("a", limits, "g")
    second = groups.join("b", ThrottleLimits(), "g")  # no limits: takes the group's
    assert first is not None and second is not None and first.group is second.group
    with pytest.raises(ThrottleError, match="differ from the group's iops=500"):
        groups.join("c", ThrottleLimits.parse_text("iops=400"), "g")
    assert [m.name for m in first.group.members] == ["a", "b"]
    assert groups.join("solo", ThrottleLimits(), None) is None
    first.leave()
    second.leave()
    assert groups.names() == []


# -- the block backend ------------------------------------------------------------------------------


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(1 << 20))
    return path


def read_request() -> BlockRequest:
    return BlockRequest(BlockOp.READ, 0, 4096, [memoryview(bytearray(4096))])


async def run_requests(backend, count: int) -> tuple[int, float]:
    """Offer ``count`` reads as a front door does (inline first); how many went inline, and the seconds all took."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    left = count
    inline = 0

    def finished(result) -> None:
        nonlocal left
        assert result.ok, result
        left -= 1
        if left == 0:
            done.set_result(None)

    start = time.monotonic()
    for _ in range(count):
        request = read_request()
        if backend.serve_now(request):
            inline += 1
            left -= 1
        else:
            backend.submit(request, finished)
    if left:
        await asyncio.wait_for(done, 60)
    return inline, time.monotonic() - start


def test_the_inline_path_serves_only_what_the_limits_allow(image: Path) -> None:
    backend, _ = create_block_device({"path": str(image), "iops": "100"}, name="t-inline")
    try:
        inline, elapsed = asyncio.run(run_requests(backend, 61))
    finally:
        backend.close()
    assert inline <= 11  # the bucket's capacity (10) and the one that overshoots it; the page cache may serve fewer
    assert 0.45 <= elapsed < 3.0  # 50 more at 100 per second
    assert backend.counters().reads == 61


def test_closing_a_throttled_device_finishes_its_held_requests_at_once(image: Path) -> None:
    backend, _ = create_block_device({"path": str(image), "iops": "1"}, name="t-close")

    async def main() -> float:
        loop = asyncio.get_running_loop()
        results: list[bool] = []
        for _ in range(6):
            backend.submit(read_request(), lambda result: results.append(result.ok))
        await asyncio.sleep(0.1)
        start = time.monotonic()
        await loop.run_in_executor(None, backend.close)
        await asyncio.sleep(0.1)
        assert results == [True] * 6
        return time.monotonic() - start

    assert asyncio.run(main()) < 2.0


def test_devices_of_a_group_share_it_and_a_disagreeing_one_changes_nothing(image: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.img"
    other.write_bytes(bytes(1 << 20))
    groups = ThrottleGroups()
    a, _ = create_block_device({"path": str(image), "iops": "200", "group": "shared"}, name="a", groups=groups)
    b, _ = create_block_device({"path": str(other), "group": "shared"}, name="b", groups=groups)
    try:
        with pytest.raises(DeviceError, match="block c: group=shared: limits iops=100 differ"):
            create_block_device({"path": str(other), "iops": "100", "group": "shared"}, name="c", groups=groups)
        assert a.throttle is not None and b.throttle is not None and a.throttle.group is b.throttle.group
        assert [m.name for m in a.throttle.group.members] == ["a", "b"]

        async def both() -> list[tuple[int, float]]:
            return await asyncio.gather(run_requests(a, 150), run_requests(b, 150))

        (_, took_a), (_, took_b) = asyncio.run(both())
        assert 1.2 <= max(took_a, took_b) < 4.0  # 300 requests at 200/s for the two, not 150 each at 200/s
        assert abs(took_a - took_b) < 0.3  # in turn: both finish together
    finally:
        a.close()
        b.close()
    assert groups.names() == []


# -- a NIC's rate -------------------------------------------------------------------------------------


class Recorder(Port):
    """A station on the switch that keeps what it gets."""

    def __init__(self, name: str, mac: bytes) -> None:
        super().__init__(name, mac)
        self.frames: list[bytes] = []

    def deliver(self, frame: bytes) -> bool:
        self.frames.append(frame)
        return True


GUEST_MAC = parse_mac("52:54:00:00:01:0a")
PEER_MAC = parse_mac("52:54:00:00:01:0b")


def test_a_nic_rate_holds_transmitted_and_received_frames_to_it() -> None:
    switch = get_switch("throttle-test")
    nic = create_net_device({"mac": "52:54:00:00:01:0a", "switch": "throttle-test", "rate": "400k"}, name="t-nic")
    peer = Recorder("peer", PEER_MAC)
    switch.attach(peer)
    frames = [PEER_MAC + GUEST_MAC + b"\x08\x00" + bytes([n]) * 1000 for n in range(30)]  # 1014 bytes each
    try:
        with Loopback(nic, name="t-nic") as lb:
            start = time.monotonic()
            for frame in frames:
                lb.submit(TX_QUEUE, [NET_HDR.pack(0, 0, 0, 0, 0, 0, 0) + frame], [])
            lb.wait_used(TX_QUEUE, len(frames), timeout=10)
            took = time.monotonic() - start
            # 30 420 bytes at 50 000 bytes/s, the first 5 000 (the capacity) and one frame at once
            assert 0.35 <= took < 2.0
            assert lb.run_in_loop(lambda: list(peer.frames)) == frames

            for _ in range(40):
                lb.submit(RX_QUEUE, [], [2048])
            start = time.monotonic()
            for frame in frames:
                lb.run_in_loop(peer.send, GUEST_MAC + PEER_MAC + frame[12:])
            used = lb.wait_used(RX_QUEUE, len(frames), timeout=10)
            assert 0.35 <= time.monotonic() - start < 2.0
            assert [u.data[NET_HDR.size + 12 :] for u in used] == [f[12:] for f in frames]
            assert nic.throttle is not None and nic.throttle.throttled_seconds() > 0.5
    finally:
        nic.close()
        switch.detach(peer)


def test_set_limits_changes_a_nic_rate_and_a_block_device_without_limits(image: Path) -> None:
    from pvcore.contract import DeviceConfig
    from pvcore.device_limits import describe_limits, set_limits
    from pvcore.devices.classes import NetServedDevice, ServedDevice

    endpoint = parse_net_options({"mac": "52:54:00:00:01:0c", "switch": "throttle-test-2"}, name="t-nic2")
    nic = NetServedDevice(DeviceConfig("net", "t-nic2"), endpoint)
    assert describe_limits(nic) == {"limits": "off", "group": None}
    assert set_limits(nic, "rate=10M") == {"limits": "rate=10000000", "group": None}
    for bad, message in (("rate=0", "must be more than 0"), ("iops=5", "a NIC takes rate="), ("rate=-1", "positive")):
        with pytest.raises(ThrottleError, match=message):
            set_limits(nic, bad)
    assert describe_limits(nic)["limits"] == "rate=10000000"
    assert endpoint.throttle is not None and endpoint.throttle.group.limits.bps_write == 1_250_000
    assert set_limits(nic, "off")["limits"] == "off"

    backend, virtio = create_block_device({"path": str(image)}, name="t-late")
    disk = ServedDevice(DeviceConfig("block", "t-late"), virtio, backend)
    try:
        assert backend.throttle is None
        with pytest.raises(ThrottleError, match="t-late: unknown limit group"):
            set_limits(disk, "iops=5,group=g")
        assert backend.throttle is None
        assert set_limits(disk, "iops=50") == {"limits": "iops=50", "group": None}
        _, took = asyncio.run(run_requests(backend, 30))
        assert took >= 0.3  # 30 reads, the first 6 at once, at 50 per second
    finally:
        backend.close()


def test_the_netdev_stream_door_holds_what_qemu_sends_to_the_rate(tmp_path: Path) -> None:
    from pvcore.streams.netdev_stream import NetdevStreamFrontDoor

    endpoint = parse_net_options({"mac": "52:54:00:00:01:0d", "switch": "throttle-test-3", "rate": "400k"}, name="t-s")
    peer = Recorder("peer3", PEER_MAC)
    endpoint.switch.attach(peer)
    station = parse_mac("52:54:00:00:01:0d")
    frames = [PEER_MAC + station + b"\x08\x00" + bytes([n]) * 1000 for n in range(30)]

    async def main() -> float:
        door = NetdevStreamFrontDoor(
            endpoint.switch, tmp_path / "n.sock", endpoint.mac, name="t-s", throttle=endpoint.throttle
        )
        await door.start()
        try:
            reader, writer = await asyncio.open_unix_connection(str(tmp_path / "n.sock"))
            start = time.monotonic()
            writer.write(b"".join(len(frame).to_bytes(4, "big") + frame for frame in frames))
            await writer.drain()
            while len(peer.frames) < len(frames) and time.monotonic() - start < 10:
                await asyncio.sleep(0.01)
            took = time.monotonic() - start
            writer.close()
            return took
        finally:
            await door.stop()

    try:
        took = asyncio.run(main())
    finally:
        endpoint.switch.detach(peer)
    assert peer.frames == frames
    assert 0.35 <= took < 2.0  # 30 420 bytes at 50 000 bytes/s, the first 5 000 and one frame at once


def test_a_vhost_user_disk_is_held_to_its_limits_and_a_flush_waits_behind_held_writes(loop_thread, tmp_path: Path) -> None:
    from pvcore.devices.block.virtio_blk import REQUEST_HEADER, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_OUT
    from pvcore.primitives import HypervisorPrimitives
    from pvcore.testing.vhost_user_frontend import VhostUserFrontend
    from pvcore.transports.vhost_user import VhostUserFrontDoor

    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    backend, device = create_block_device({"path": str(image), "iops-write": "50"}, name="t-vu")
    door = VhostUserFrontDoor(device, tmp_path / "blk.sock", primitives=HypervisorPrimitives(), name="t-vu")
    loop_thread.run(door.start())
    try:
        with VhostUserFrontend.connect(tmp_path / "blk.sock") as frontend:
            frontend.start(queue_size=128)
            start = time.monotonic()
            writes = [
                frontend.submit(0, [REQUEST_HEADER.pack(VIRTIO_BLK_T_OUT, 0, 8 * n), bytes([n]) * 4096], [1])
                for n in range(40)
            ]
            flush = frontend.submit(0, [REQUEST_HEADER.pack(VIRTIO_BLK_T_FLUSH, 0, 0)], [1])
            used = frontend.wait_used(0, len(writes) + 1, timeout=30)
            took = time.monotonic() - start
            assert all(u.data == bytes([VIRTIO_BLK_S_OK]) for u in used)
            assert used[-1].head == flush  # the flush completes after every write submitted before it
            assert sorted(u.head for u in used[:-1]) == sorted(writes)
    finally:
        loop_thread.run(door.stop())
        backend.close()
    assert 0.5 <= took < 5.0  # 40 writes at 50 per second, the first 6 at once
    assert image.read_bytes()[39 * 8 * 512] == 39


def test_a_pacer_holds_one_frame_until_its_turn_and_forgets_it_on_reset() -> None:
    """Pacer (a stream door's NIC rate): the frame after the bucket is full waits; retry runs once its turn comes,
    and that frame then goes without spending again; a reset before the turn makes the turn retry nothing."""
    from pvcore.throttle import Pacer

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        throttle = ThrottleGroup("nic", ThrottleLimits(bps_write=10_000)).join("nic")
        pacer = Pacer(throttle, write=True)
        retries: list[float] = []
        started = time.monotonic()
        assert pacer.may_go(1_000, lambda: retries.append(-3.0), loop)  # the bucket holds 1000 (0.1 s of the rate)
        assert pacer.may_go(1_000, lambda: retries.append(-3.0), loop)  # may overshoot it once
        assert not pacer.may_go(1_000, lambda: retries.append(time.monotonic() - started), loop)
        assert not pacer.may_go(1_000, lambda: retries.append(-1.0), loop)  # still waiting: no second wait
        while not retries:
            await asyncio.sleep(0.01)
        assert retries[0] >= 0.09  # the overshoot drained (1000 bytes: 0.1 s at 10 kB/s)
        assert pacer.may_go(1_000, lambda: None, loop)  # paid by its turn
        assert not pacer.may_go(1_000, lambda: retries.append(-2.0), loop)
        pacer.reset()
        await asyncio.sleep(0.3)
        assert retries == [retries[0]]  # the forgotten wait's turn retried nothing
        assert Pacer(None, write=True).may_go(10**9, lambda: None, loop)

    asyncio.run(scenario())
