"""Regression tests for what the fuzz targets (fuzz/, docs/fuzzing.md) found: each failed before its fix."""

from __future__ import annotations

import gc
import os
import time

from pvcore.devices.block import create_block_device
from pvcore.devices.block.virtio_blk import REQUEST_HEADER, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT
from pvcore.primitives import HypervisorPrimitives
from pvcore.testing.vhost_user_frontend import VhostUserFrontend
from pvcore.transports.vhost_user import VhostUserFrontDoor


def guest_ram_mappings() -> int:
    """Mappings of a guest RAM memfd in this process (the front end's and the back end's)."""
    gc.collect()
    with open("/proc/self/maps") as maps:
        return sum("memfd:pvcore-guest-ram" in line for line in maps)


def test_ended_session_leaves_no_guest_ram_mapped_by_an_idle_block_worker(loop_thread, tmp_path):
    """Found by fuzz target vhost_user_blk (leak check): a block worker thread kept its last job, whose
    buffers are views of guest RAM, while it waited for the next; so the RAM of a front end that had
    gone stayed mapped (and its inflight region with it) until that thread took other work."""
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(1 << 20))
    backend, device = create_block_device({"path": str(image)}, name="leak")
    door = VhostUserFrontDoor(device, tmp_path / "blk.sock", primitives=HypervisorPrimitives(), name="leak")
    loop_thread.run(door.start())
    try:
        before = guest_ram_mappings()
        with VhostUserFrontend.connect(tmp_path / "blk.sock", ram_size=1 << 20) as frontend:
            frontend.start(queue_size=16)
            write = frontend.request(0, [REQUEST_HEADER.pack(VIRTIO_BLK_T_OUT, 0, 8), b"x" * 4096], [1])
            read = frontend.request(0, [REQUEST_HEADER.pack(VIRTIO_BLK_T_IN, 0, 8)], [4096, 1])
            assert write.data == bytes([VIRTIO_BLK_S_OK]) and read.data == b"x" * 4096 + bytes([VIRTIO_BLK_S_OK])
        deadline = time.monotonic() + 10
        while door.live and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not door.live
        deadline = time.monotonic() + 5
        while guest_ram_mappings() > before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert guest_ram_mappings() == before, "the ended session's guest RAM is still mapped"
    finally:
        loop_thread.run(door.stop())
        backend.close()


def test_a_client_that_resets_its_connection_is_no_handler_failure(loop_thread, tmp_path, caplog):
    """Found by the soak (bench/soak.py): each misbehaving client that reset its connection to the
    control socket logged 'connection handler failed' with a traceback (2148 in 150 s), drowning real
    errors; a peer going away is the peer's doing, logged without a traceback."""
    import asyncio
    import logging
    import socket
    import struct

    from pvcore.streams.unix import UnixListener

    async def answer_after_the_client_left(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)
        await asyncio.sleep(0.2)
        for _ in range(50):
            writer.write(b"x" * 65536)
            await writer.drain()

    listener = UnixListener(tmp_path / "s.sock", answer_after_the_client_left, what="reset test")
    loop_thread.run(listener.start())
    try:
        with caplog.at_level(logging.INFO, logger="pvcore.streams"):
            with socket.socket(socket.AF_UNIX) as client:
                client.connect(str(tmp_path / "s.sock"))
                client.sendall(b"?")
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            time.sleep(1.0)
    finally:
        loop_thread.run(listener.stop())
    failures = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not failures, [r.getMessage() for r in failures]
    assert any("reset test" in r.getMessage() for r in caplog.records), "the client's leaving was not logged"
