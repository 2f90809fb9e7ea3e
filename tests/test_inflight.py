"""Inflight tracking: a back end that dies resumes, through its successor, every request it had in flight.

The ring engine's part is tested on a reference driver's queue with each crash
window made by hand (a back end "dies" by being dropped at that point); the
whole path runs in a real ``pvcore serve`` killed with SIGKILL while it has
completed later writes but not an earlier one, restarted with the same command
line, and reconnected by a front end that hands back the region (vhost-user's
INFLIGHT_SHMFD, as QEMU's vhost-user-blk does).
"""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import struct
import sys
import time
from pathlib import Path

import pytest

from pvcore.devices.block.virtio_blk import REQUEST_HEADER, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT
from pvcore.ring.inflight import HEADER, InflightArea, InflightError, queue_region_size
from pvcore.ring.virtqueue import Virtqueue
from pvcore.testing.driver import DriverQueue, GuestRam
from pvcore.testing.serve_process import ServeProcess
from pvcore.testing.vhost_user_frontend import FrontendError, VhostUserFrontend

SIZE = 8


@pytest.fixture
def ring():
    with GuestRam(1 << 20) as ram:
        area, fd = InflightArea.create(1, SIZE)
        os.close(fd)
        try:
            yield ram, DriverQueue(ram, SIZE), area
        finally:
            area.close()


def backend(ram: GuestRam, driver: DriverQueue, area: InflightArea) -> Virtqueue:
    """A new back end's view of the ring, started as a vhost-user back end starts it (base = used index)."""
    return Virtqueue(ram.memory, SIZE, driver.desc_addr, driver.avail_addr, driver.used_addr,
                     next_avail=driver.used_idx(), inflight=area.queue(0, SIZE))


def post(driver: DriverQueue, count: int) -> list[int]:
    return [driver.add([bytes([n])], [1]) for n in range(count)]


def test_out_of_order_completions_leave_exactly_the_unanswered_heads_in_flight(ring):
    ram, driver, area = ring
    heads = post(driver, 4)
    vq = backend(ram, driver, area)
    taken = [vq.take().head for _ in range(4)]
    assert taken == heads
    for head in (heads[3], heads[1]):  # later requests finish first
        vq.push_used(head, 1)
    vq.publish()
    assert sorted(u.head for u in driver.used()) == sorted([heads[3], heads[1]])
    more = post(driver, 2)
    assert vq.take().head == more[0]  # taken, then the back end dies with it in flight
    successor = backend(ram, driver, area)
    assert successor.resubmit == [heads[0], heads[2], more[0]]  # oldest first
    assert successor.pending() == 4  # three resubmitted, then the one never taken
    order = [successor.take().head for _ in range(4)]
    assert order == [heads[0], heads[2], more[0], more[1]]
    for head in order:
        successor.push_used(head, 1)
    successor.publish()
    assert sorted(u.head for u in driver.used()) == sorted(order)  # each once: the driver checks duplicates
    assert backend(ram, driver, area).resubmit == []


def test_death_before_the_used_index_moved_resubmits_the_batch(ring):
    ram, driver, area = ring
    heads = post(driver, 3)
    vq = backend(ram, driver, area)
    for _ in heads:
        vq.take()
    for head in heads:
        vq.push_used(head, 1)
    vq.inflight.batch_publishing(heads)  # dies here: used elements written, index not yet stored
    successor = backend(ram, driver, area)
    assert successor.resubmit == heads
    assert successor.next_avail == (driver.used_idx() + 3) & 0xFFFF


def test_death_after_the_used_index_moved_does_not_resubmit_what_the_guest_saw(ring):
    ram, driver, area = ring
    heads = post(driver, 3)
    vq = backend(ram, driver, area)
    for _ in heads:
        vq.take()
    for head in heads[:2]:
        vq.push_used(head, 1)
    vq.inflight.batch_publishing(heads[:2])
    ram.memory.write_u16(driver.used_addr + 2, vq.next_used)  # dies here: index stored, flags not cleared
    successor = backend(ram, driver, area)
    assert successor.resubmit == [heads[2]]
    assert successor.next_avail == (driver.used_idx() + 1) & 0xFFFF
    assert [u.head for u in driver.used()] == heads[:2]


def test_a_fresh_region_starts_at_the_front_ends_base(ring):
    ram, driver, area = ring
    vq = Virtqueue(ram.memory, SIZE, driver.desc_addr, driver.avail_addr, driver.used_addr, next_avail=0,
                   inflight=area.queue(0, SIZE))
    assert vq.resubmit == [] and vq.next_avail == 0
    assert HEADER.unpack_from(area._view, 0)[1:3] == (1, SIZE)  # version 1, desc_num


def _region(area: InflightArea) -> memoryview:
    return area._view


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda v: struct.pack_into("<H", v, 8, 7), "version 7"),
        (lambda v: struct.pack_into("<H", v, 10, SIZE * 2), "for 16 descriptors"),
        (lambda v: struct.pack_into("<H", v, 14, 100), "past the region"),
        (lambda v: (struct.pack_into("<H", v, 14, 0xFFFF), struct.pack_into("<H", v, 12, 500)), "links to head 500"),
        (lambda v: struct.pack_into("<B", v, 16 + 16 * 3, 9), "inflight flag 9"),
    ],
    ids=["version", "desc_num", "used index far ahead", "last batch head out of range", "flag value"],
)
def test_a_corrupt_region_fails_the_queue_with_a_reason(ring, corrupt, message):
    ram, driver, area = ring
    post(driver, 1)
    vq = backend(ram, driver, area)
    vq.take()
    corrupt(_region(area))
    with pytest.raises(InflightError, match=message):
        backend(ram, driver, area)


def test_a_region_from_the_front_end_is_checked_before_it_is_mapped(tmp_path):
    needed = queue_region_size(128)
    unsealed = os.memfd_create("inflight", os.MFD_CLOEXEC)
    sealed_small = os.memfd_create("inflight", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(unsealed, needed)
        with pytest.raises(InflightError, match="not sealed"):
            InflightArea.open(unsealed, size=needed, offset=0, num_queues=1, queue_size=128)
        os.ftruncate(sealed_small, needed // 2)
        fcntl.fcntl(sealed_small, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
        with pytest.raises(InflightError, match="past the end"):
            InflightArea.open(sealed_small, size=needed, offset=0, num_queues=1, queue_size=128)
        with pytest.raises(InflightError, match="cannot hold"):
            InflightArea.open(sealed_small, size=64, offset=0, num_queues=1, queue_size=128)
        with pytest.raises(InflightError, match="power of two"):
            InflightArea.open(sealed_small, size=needed, offset=0, num_queues=1, queue_size=100)
        with pytest.raises(InflightError, match="queues"):
            InflightArea.create(0, 128)
    finally:
        os.close(unsealed)
        os.close(sealed_small)


# --- the whole path: a real daemon killed with requests in flight, restarted with the same command ---

SECTOR = 512
HELD_SECTOR = 8
DISK = 1 << 20


def wait_for(predicate, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def serve_process(tmp_path: Path) -> ServeProcess:
    return ServeProcess(
        [sys.executable, "-m", "pvcore.testing.stalled_writes", "--hold-while", str(tmp_path / "hold"),
         "--range", f"{HELD_SECTOR * SECTOR}:{(HELD_SECTOR + 1) * SECTOR}", "--",
         "serve", "--hypervisor", "kvm", f"block:name=disk,path={tmp_path / 'disk.img'},socket={tmp_path / 'disk.sock'}"],
        tmp_path / "serve.log", env=dict(os.environ, PVCORE_RUN_DIR=str(tmp_path / "run")),
    )


def write_request(sector: int, fill: int) -> list[bytes]:
    return [REQUEST_HEADER.pack(VIRTIO_BLK_T_OUT, 0, sector), bytes([fill]) * SECTOR]


def test_kill_9_with_out_of_order_completions_resubmits_the_held_write_exactly_once(tmp_path):
    (tmp_path / "disk.img").write_bytes(bytes(DISK))
    (tmp_path / "hold").touch()
    daemon = serve_process(tmp_path)
    daemon.start()
    try:
        frontend = VhostUserFrontend.connect(tmp_path / "disk.sock", timeout=20.0)
        frontend.start(num_queues=1, queue_size=64, inflight=True)
        held = frontend.submit(0, write_request(HELD_SECTOR, 0xA0), [1])
        wait_for(lambda: "stalled-writes: holding write" in daemon.text(), "the held write")
        later = {frontend.submit(0, write_request(HELD_SECTOR + n, 0xA0 + n), [1]): n for n in range(1, 4)}
        done = frontend.wait_used(0, 3, timeout=20.0)
        assert {u.head for u in done} == set(later) and all(u.data == bytes([VIRTIO_BLK_S_OK]) for u in done)
        assert daemon.stop(signal.SIGKILL) == -signal.SIGKILL
        (tmp_path / "hold").unlink()
        daemon.start()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(tmp_path / "disk.sock"))
        frontend.reconnect(sock)
        resumed = frontend.wait_used(0, 1, timeout=20.0)
        assert [(u.head, u.data) for u in resumed] == [(held, bytes([VIRTIO_BLK_S_OK]))]
        read = frontend.request(0, [REQUEST_HEADER.pack(VIRTIO_BLK_T_IN, 0, HELD_SECTOR)], [4 * SECTOR, 1])
        assert read.data == b"".join(bytes([0xA0 + n]) * SECTOR for n in range(4)) + bytes([VIRTIO_BLK_S_OK])
        with pytest.raises(FrontendError):
            frontend.wait_used(0, 1, timeout=0.5)  # nothing answered twice
        frontend.close()
        assert f"queue 0 resumes 1 requests a previous back end had in flight (heads {held})" in daemon.text()
        assert (tmp_path / "disk.img").read_bytes()[HELD_SECTOR * SECTOR :][:SECTOR] == bytes([0xA0]) * SECTOR
    finally:
        daemon.terminate()
