"""Fault injection under the block engine: a failing, full, slow disk, a failing fdatasync, a dying I/O thread.

The store is wrapped by :class:`~pvcore.testing.faulty_store.FaultyStore`.
Through virtio-blk (the Python vhost-user front end) the request that meets
the fault gets VIRTIO_BLK_S_IOERR and through NBD (qemu-io, a real NBD
client) an error (EIO, ENOSPC): never success for data that was not
written; and once the fault clears, the device serves again.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from pvcore.devices.block import create_block_device
from pvcore.devices.block.iopool import shared_pool
from pvcore.devices.block.virtio_blk import (
    REQUEST_HEADER,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
)
from pvcore.primitives import HypervisorPrimitives
from pvcore.streams.nbd import NbdFrontDoor
from pvcore.testing.faulty_store import FaultyStore
from pvcore.testing.vhost_user_frontend import VhostUserFrontend
from pvcore.transports.vhost_user import VhostUserFrontDoor

SIZE = 1 << 20
OK, IOERR = bytes([VIRTIO_BLK_S_OK]), bytes([VIRTIO_BLK_S_IOERR])


@pytest.fixture
def disk(tmp_path, loop_thread):
    """A block device over a 1 MiB file with a FaultyStore, served over vhost-user and NBD."""
    image = tmp_path / "disk.img"
    original = os.urandom(SIZE)
    image.write_bytes(original)
    backend, device = create_block_device({"path": str(image)}, name="faulty")
    faulty = FaultyStore(backend.store)
    backend.store = faulty
    vhost = VhostUserFrontDoor(device, tmp_path / "blk.sock", primitives=HypervisorPrimitives(), name="faulty")
    nbd = NbdFrontDoor(backend, tmp_path / "nbd.sock")
    loop_thread.run(vhost.start())
    loop_thread.run(nbd.start())
    frontend = VhostUserFrontend.connect(tmp_path / "blk.sock", ram_size=4 << 20)
    frontend.start(queue_size=64)

    class Disk:
        pass

    disk = Disk()
    disk.image, disk.original, disk.store, disk.frontend, disk.backend = image, original, faulty, frontend, backend
    disk.uri = f"nbd+unix:///?socket={tmp_path / 'nbd.sock'}"
    yield disk
    frontend.close()
    loop_thread.run(vhost.stop())
    loop_thread.run(nbd.stop())
    backend.close()


def write(disk, sector: int, data: bytes) -> bytes:
    return disk.frontend.request(0, [REQUEST_HEADER.pack(VIRTIO_BLK_T_OUT, 0, sector), data], [1]).data


def read(disk, sector: int, length: int) -> bytes:
    return disk.frontend.request(0, [REQUEST_HEADER.pack(VIRTIO_BLK_T_IN, 0, sector)], [length, 1]).data


def flush(disk) -> bytes:
    return disk.frontend.request(0, [REQUEST_HEADER.pack(VIRTIO_BLK_T_FLUSH, 0, 0)], [1]).data


def qemu_io(disk, *commands: str) -> str:
    argv = ["qemu-io", "-f", "raw"]
    for command in commands:
        argv += ["-c", command]
    result = subprocess.run([*argv, disk.uri], capture_output=True, text=True, timeout=60)
    return result.stdout + result.stderr


def qemu_io_flush_fails(disk) -> bool:
    """Whether qemu-io's flush over NBD failed (qemu-io prints nothing then, but exits 1)."""
    result = subprocess.run(["qemu-io", "-f", "raw", "-c", "flush", disk.uri], capture_output=True, timeout=60)
    return result.returncode != 0


@pytest.mark.parametrize("fault", ["eio", "enospc"])
def test_failing_writes_are_io_errors_never_success_and_the_device_recovers(disk, fault):
    with disk.store.injecting(fault):
        assert write(disk, 8, b"\x11" * 4096) == IOERR
        output = qemu_io(disk, "write -P 0x22 65536 4096")
        assert ("No space left on device" if fault == "enospc" else "Input/output error") in output, output
    assert disk.store.injected >= 2
    assert disk.image.read_bytes() == disk.original, "a refused write changed the disk"
    assert write(disk, 8, b"\x33" * 4096) == OK
    assert read(disk, 8, 4096) == b"\x33" * 4096 + OK
    assert "Pattern verification failed" not in qemu_io(disk, "write -P 0x44 65536 4096", "read -P 0x44 65536 4096")
    assert disk.image.read_bytes()[65536:69632] == b"\x44" * 4096


def test_failing_reads_are_io_errors_and_the_device_recovers(disk):
    with disk.store.injecting("eio"):
        assert read(disk, 0, 4096)[-1:] == IOERR
        assert "Input/output error" in qemu_io(disk, "read 0 4096")
    assert read(disk, 0, 4096) == disk.original[:4096] + OK


def test_flush_over_nbd_succeeds_without_a_fault(disk):
    assert not qemu_io_flush_fails(disk)
    assert flush(disk) == OK


def test_failed_fdatasync_fails_that_flush_and_every_later_one(disk):
    """After fdatasync failed, writes acknowledged before it may be lost (the kernel drops the failed
    pages' dirty state), so no later flush may report them durable: pvcore keeps failing flushes, as
    QEMU's file-posix does, until the device is reopened. Reads and writes go on."""
    assert write(disk, 16, b"\x55" * 4096) == OK
    with disk.store.injecting("fdatasync"):
        assert flush(disk) == IOERR
        assert qemu_io_flush_fails(disk)
    assert disk.store.injected >= 1
    assert flush(disk) == IOERR, "a flush after a failed fdatasync claimed the earlier writes durable"
    assert qemu_io_flush_fails(disk)
    assert write(disk, 24, b"\x66" * 4096) == OK
    assert read(disk, 24, 4096) == b"\x66" * 4096 + OK


def test_slow_disk_completes_correctly_and_the_loop_stays_responsive(disk, loop_thread):
    with disk.store.injecting("slow"):
        disk.store.delay = 0.3
        started = time.monotonic()
        head = disk.frontend.submit(0, [REQUEST_HEADER.pack(VIRTIO_BLK_T_IN, 0, 100)], [4096, 1])
        latency = []
        for _ in range(5):
            ping = time.monotonic()
            loop_thread.call(lambda: None)
            latency.append(time.monotonic() - ping)
        (used,) = disk.frontend.wait_used(0, 1, timeout=10)
        assert used.head == head and used.data == disk.original[51200:55296] + OK
        assert time.monotonic() - started >= 0.3
    assert max(latency) < 0.25, f"the event loop stalled behind the slow disk: {latency}"
    assert write(disk, 8, b"\x77" * 512) == OK


def io_threads() -> int:
    """The shared pool's threads alive now (a thread that ending took with it is gone from this count)."""
    return sum(thread.name.startswith(shared_pool().name) for thread in threading.enumerate())


def test_an_io_thread_dying_answers_its_request_and_the_others_serve_on(disk):
    with disk.store.injecting("die"):
        assert write(disk, 8, b"\x88" * 4096) == IOERR
    assert disk.image.read_bytes()[4096:8192] == disk.original[4096:8192]
    for n in range(12):
        assert write(disk, 32 + 8 * n, bytes([n]) * 4096) == OK
        assert read(disk, 32 + 8 * n, 4096) == bytes([n]) * 4096 + OK
    # A thread the pool counts but that is gone would be one that died: the count can only lag the other
    # way (a thread timing out leaves the count just before it ends).
    assert 1 <= shared_pool().threads <= io_threads(), "an I/O thread died and the pool still counts it"
