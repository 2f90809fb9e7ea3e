"""Media change (`pvcore ctl swap-media`): a block device's backing file replaced while it serves.

In the engine, with a slow store: the swap waits for the request in flight,
requests made meanwhile wait (not fail) and are served from the new file.
Through `pvcore serve` and its control socket, with the Python vhost-user
front end reading continuously, eight requests at a time: no read fails,
every read is wholly the old file's or wholly the new one's, and every read
made after the swap answered is the new one's. Refusals (missing file, a
directory, a character device, another size, a failing flush of the old
file) are one error and the device keeps its file. Under I/O limits, the
requests the throttle holds back finish on the old file and none is lost.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pvcore.devices.block.backend import BlockBackend, BlockOp, BlockRequest, BlockResult, BlockStatus
from pvcore.devices.block.media import MediaError, change_medium
from pvcore.devices.block.store import RawFileStore
from pvcore.testing.faulty_store import FaultyStore

MIB = 1 << 20
CHUNK = 64 * 1024


def image(path: Path, byte: int, size: int = 4 * MIB) -> Path:
    path.write_bytes(bytes([byte]) * size)
    return path


def read_request(offset: int, length: int = 4096) -> tuple[BlockRequest, bytearray]:
    buffer = bytearray(length)
    return BlockRequest(BlockOp.READ, offset, length, buffers=[memoryview(buffer)]), buffer


def test_swap_waits_for_the_request_in_flight_and_serves_the_held_ones_from_the_new_file(tmp_path: Path) -> None:
    old, new = image(tmp_path / "old.img", 0xAA), image(tmp_path / "new.img", 0xBB)
    slow = FaultyStore(RawFileStore(str(old)), delay=0.5)
    backend = BlockBackend(slow, workers=2)  # type: ignore[arg-type]

    async def scenario() -> tuple[list[BlockResult], bytearray, bytearray, str, bool]:
        loop = asyncio.get_running_loop()
        results: list[BlockResult] = []
        answered = [loop.create_future(), loop.create_future()]
        first, first_data = read_request(0)
        second, second_data = read_request(MIB)
        with slow.injecting("slow"):
            backend.submit(first, lambda r: (results.append(r), answered[0].set_result(None)))
            swap = asyncio.ensure_future(asyncio.to_thread(change_medium, backend, str(new)))
            await asyncio.sleep(0.2)  # the first read sleeps in the old store; the swap waits for it
            swapping_while_in_flight = not swap.done()
            backend.submit(second, lambda r: (results.append(r), answered[1].set_result(None)))
            was = await swap
        await asyncio.gather(*answered)
        return results, first_data, second_data, was, swapping_while_in_flight

    try:
        results, first_data, second_data, was, swapping_while_in_flight = asyncio.run(scenario())
    finally:
        backend.close()
    assert swapping_while_in_flight
    assert was == str(old)
    assert [r.status for r in results] == [BlockStatus.OK, BlockStatus.OK]
    assert first_data == b"\xaa" * 4096  # in flight at the swap: finished on the old file
    assert second_data == b"\xbb" * 4096  # made during the swap: held, then served by the new file
    assert backend.store.path == str(new) and backend.counters().errors == 0


def test_a_read_only_device_swaps_and_stays_read_only(tmp_path: Path) -> None:
    old, new = image(tmp_path / "old.img", 1), image(tmp_path / "new.img", 2)
    backend = BlockBackend(RawFileStore(str(old), readonly=True))

    async def read_and_write() -> tuple[BlockResult, bytes, BlockResult]:
        loop = asyncio.get_running_loop()
        read, data = read_request(4096)
        done = loop.create_future()
        backend.submit(read, done.set_result)
        write = BlockRequest(BlockOp.WRITE, 0, 4096, buffers=[memoryview(bytes(4096))])
        written = loop.create_future()
        backend.submit(write, written.set_result)
        return await done, bytes(data), await written

    try:
        assert change_medium(backend, str(new)) == str(old)
        read, data, write = asyncio.run(read_and_write())
    finally:
        backend.close()
    assert read.ok and data == b"\x02" * 4096
    assert write.status is BlockStatus.READ_ONLY
    assert new.read_bytes() == b"\x02" * (4 * MIB)


def test_a_throttled_device_finishes_what_its_group_holds_back_on_the_old_file(tmp_path: Path) -> None:
    """Requests sent before the swap, held back by I/O limits, go to the file they were sent for; none fails.

    Writes too: a write acknowledged before the swap lands in the old file, never in the new medium.
    """
    from pvcore.throttle import ThrottleGroup, ThrottleLimits

    old, new = image(tmp_path / "old.img", 0x0A), image(tmp_path / "new.img", 0x0B)
    group = ThrottleGroup("g", ThrottleLimits.parse_text("iops=40"))
    backend = BlockBackend(RawFileStore(str(old)), throttle=group.join("disk"))

    async def scenario() -> tuple[list[tuple[BlockResult, bytearray]], BlockResult, bytearray]:
        loop = asyncio.get_running_loop()
        pending = []
        for index in range(40):  # a second's worth at 40 IOPS: most wait in the throttle
            request, data = read_request(index * 4096)
            done = loop.create_future()
            backend.submit(request, done.set_result)
            pending.append((done, data))
        written = loop.create_future()
        backend.submit(BlockRequest(BlockOp.WRITE, 100 * 4096, 4096, buffers=[memoryview(b"\x77" * 4096)]), written.set_result)
        await asyncio.sleep(0.2)
        await asyncio.to_thread(change_medium, backend, str(new))
        results = [(await done, data) for done, data in pending]
        assert (await written).ok
        after, data = read_request(0)
        done = loop.create_future()
        backend.submit(after, done.set_result)
        return results, await done, data

    try:
        results, after, after_data = asyncio.run(scenario())
    finally:
        backend.close()
    assert all(result.ok for result, _ in results)
    assert all(bytes(data) == b"\x0a" * 4096 for _, data in results), "every read sent before the swap read the old file"
    assert after.ok and bytes(after_data) == b"\x0b" * 4096
    assert old.read_bytes()[100 * 4096:101 * 4096] == b"\x77" * 4096
    assert new.read_bytes()[100 * 4096:101 * 4096] == b"\x0b" * 4096


def test_a_failing_flush_of_the_old_file_swaps_nothing(tmp_path: Path) -> None:
    """The old file's writes must be durable before it is let go: if its fdatasync fails, the device keeps it."""
    old, new = image(tmp_path / "old.img", 0x5A), image(tmp_path / "new.img", 0xA5)
    faulty = FaultyStore(RawFileStore(str(old)))
    backend = BlockBackend(faulty)  # type: ignore[arg-type]
    try:
        with faulty.injecting("fdatasync"), pytest.raises(MediaError, match="flushing the current store failed"):
            change_medium(backend, str(new))
        assert backend.store is faulty and faulty.injected == 1
    finally:
        backend.close()


@pytest.mark.parametrize(
    ("target", "error"),
    [
        ("missing.img", "missing.img: No such file or directory"),
        (".", "is not a regular file or block device"),
        ("/dev/null", "is not a regular file or block device"),
        ("small.img", "the new store has 1048576 bytes, the device 4194304"),
    ],
)
def test_a_refused_swap_leaves_the_old_file_served(tmp_path: Path, target: str, error: str) -> None:
    old = image(tmp_path / "old.img", 7)
    image(tmp_path / "small.img", 8, MIB)
    backend = BlockBackend(RawFileStore(str(old)))
    try:
        path = target if target.startswith("/") else str(tmp_path / target)
        with pytest.raises(MediaError, match=error):
            change_medium(backend, path)
        assert backend.store.path == str(old) and backend.store.fd >= 0
        assert change_medium(backend, str(image(tmp_path / "third.img", 9))) == str(old)  # not left paused
    finally:
        backend.close()


class ContinuousReader(threading.Thread):
    """Reads 64 KiB chunks over vhost-user, eight requests at a time, until stopped; keeps (time, status, data)."""

    def __init__(self, frontend) -> None:
        super().__init__(daemon=True)
        self.frontend = frontend
        self.reads: list[tuple[float, int, bytes]] = []
        self.failure: BaseException | None = None
        self._stopping = threading.Event()

    def run(self) -> None:
        from pvcore.devices.block.virtio_blk import REQUEST_HEADER, VIRTIO_BLK_T_IN

        try:
            batch = 0
            while not self._stopping.is_set():
                sectors = [((batch * 8 + i) * CHUNK % (4 * MIB)) // 512 for i in range(8)]
                submitted = time.monotonic()
                for sector in sectors:
                    self.frontend.submit(0, [REQUEST_HEADER.pack(VIRTIO_BLK_T_IN, 0, sector)], [CHUNK, 1])
                for used in self.frontend.wait_used(0, 8, timeout=60.0):
                    self.reads.append((submitted, used.data[-1], used.data[:-1]))
                batch += 1
        except BaseException as exc:  # reported by the test
            self.failure = exc

    def stop(self) -> None:
        self._stopping.set()
        self.join(60)


def test_swap_media_through_pvcore_ctl_while_a_front_end_reads(tmp_path: Path) -> None:
    from pvcore.testing.vhost_user_frontend import VhostUserFrontend

    old, new = image(tmp_path / "old.img", 0x11), image(tmp_path / "new.img", 0x22)
    image(tmp_path / "small.img", 0x33, MIB)
    sock = tmp_path / "vm1-cdrom.sock"
    run_dir = tmp_path / "run"
    env = dict(os.environ, PVCORE_RUN_DIR=str(run_dir))
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        serve = subprocess.Popen(
            [sys.executable, "-m", "pvcore.cli", "serve", "--hypervisor", "kvm", f"block:path={old},socket={sock},readonly=on"],
            stdout=out, stderr=subprocess.STDOUT, env=env,
        )

    def ctl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "pvcore.cli", "ctl", *args], capture_output=True, text=True,
                              timeout=120, env=env)

    try:
        deadline = time.monotonic() + 60
        while " device(s); default hypervisor " not in log.read_text():
            assert serve.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        for args, error in [
            (("swap-media", "vm1-cdrom", str(tmp_path / "small.img")), "the new store has 1048576 bytes"),
            (("swap-media", "vm1-cdrom", str(tmp_path / "nope.img")), "No such file or directory"),
            (("swap-media", "vm1-nope", str(new)), "no block device named 'vm1-nope'"),
        ]:
            done = ctl(*args)
            lines = done.stderr.strip().splitlines()
            assert done.returncode == 2 and len(lines) == 1 and error in lines[0], (args, done.stderr)
        frontend = VhostUserFrontend.connect(sock, timeout=60.0)
        frontend.start(num_queues=1, queue_size=64)
        reader = ContinuousReader(frontend)
        reader.start()
        time.sleep(1.0)
        done = ctl("swap-media", "vm1-cdrom", str(new))
        swapped = time.monotonic()
        time.sleep(1.0)
        reader.stop()
        frontend.close()
        listed = ctl("list", "--json")
    finally:
        if serve.poll() is None:
            serve.send_signal(signal.SIGTERM)
        serve.wait(60)
    assert done.returncode == 0 and done.stdout.strip() == f"vm1-cdrom: now {new} (was {old})", done.stderr
    assert reader.failure is None, reader.failure
    assert {status for _, status, _ in reader.reads} == {0}  # VIRTIO_BLK_S_OK: no read failed
    kinds = [(at, data[:1] * len(data) == data and data[:1]) for at, _, data in reader.reads]
    assert all(kind in (b"\x11", b"\x22") for _, kind in kinds), "a read mixed the two files or read neither"
    assert any(kind == b"\x11" for _, kind in kinds) and any(kind == b"\x22" for _, kind in kinds)
    assert all(kind == b"\x22" for at, kind in kinds if at > swapped)
    assert '"errors": 0' in listed.stdout
    print(f"swap-media under reads: {len(reader.reads)} reads of 64 KiB, none failed")
