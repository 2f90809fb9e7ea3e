"""The NBD door's reply paths and connections sharing one export, against real clients
(libnbd's nbdcopy, QEMU's qemu-img) and a hand-driven one: big reads spliced from the page
cache, the buffer path for other stores, a file truncated under the export, a full socket,
I/O limits and counters on spliced reads, and multi-conn consistency."""

from __future__ import annotations

import hashlib
import os
import struct
import time
from collections.abc import Sequence
from pathlib import Path

from test_nbd import IMAGE_SIZE, RawClient, client, connect, image, run, serve, socket_of  # noqa: F401

from pvcore.devices.block.store import RawFileStore
from pvcore.streams import nbd
from pvcore.throttle import ThrottleGroups, ThrottleLimits

BIG = 256 * 1024


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


class CopyingStore(RawFileStore):
    """A store with its own read path: the door must not splice around it."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.reads = 0

    def readv(self, buffers: Sequence[memoryview], offset: int) -> int:
        self.reads += 1
        return super().readv(buffers, offset)


class RecordingStore(RawFileStore):
    """Records completed writes and flushes in order."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.events: list[str] = []

    def transfer_nowait(self, buffers: Sequence[memoryview], offset: int, *, write: bool) -> bool:
        return False

    def writev(self, buffers: Sequence[memoryview], offset: int, *, durable: bool = False) -> int:
        done = super().writev(buffers, offset, durable=durable)
        self.events.append(f"write {offset}")
        return done

    def sync(self) -> None:
        super().sync()
        self.events.append("sync")


def test_nbdcopy_big_reads_are_spliced_md5_equal(serve, image, tmp_path):
    door, uri = serve(image)
    out = tmp_path / "copy.img"
    client("nbdcopy", "--request-size=1048576", "--connections=1", uri, str(out))
    assert md5(out) == md5(image)
    assert door.spliced_reads >= IMAGE_SIZE // (1024 * 1024)
    counters = door.backend.counters()
    assert counters.bytes_read >= IMAGE_SIZE
    assert counters.errors == 0


def test_qemu_io_pattern_read_back_over_spliced_reads(serve, image):
    door, uri = serve(image)
    written = client("qemu-io", "-f", "raw", "-c", "write -P 0xa5 1M 1M", "-c", "read -P 0xa5 1M 1M",
                     "-c", "read -P 0xa5 1280k 256k", uri)
    assert "read 1048576/1048576 bytes" in written.stdout, written.stdout + written.stderr
    assert "Pattern verification failed" not in written.stdout + written.stderr
    assert door.spliced_reads == 2
    assert image.read_bytes()[1 << 20 : 2 << 20] == b"\xa5" * (1 << 20)


def test_other_stores_take_the_buffer_path(serve, image, tmp_path):
    store = CopyingStore(str(image))
    door, uri = serve(image, store=store)
    out = tmp_path / "copy.img"
    client("nbdcopy", "--request-size=1048576", uri, str(out))
    assert md5(out) == md5(image)
    assert door.spliced_reads == 0
    assert store.reads >= IMAGE_SIZE // (1024 * 1024)


def test_reads_that_do_not_fit_a_pipe_are_copied(serve, image, connect):
    door, uri = serve(image)
    raw = connect(uri)
    raw.go()
    data = image.read_bytes()
    assert raw.read(100, 1024 * 1024) == data[100 : 100 + 1024 * 1024]  # 257 pages: more than a 1 MiB pipe
    assert raw.read(4096, 2 * 1024 * 1024) == data[4096 : 4096 + 2 * 1024 * 1024]
    assert door.spliced_reads == 0
    assert raw.read(4096, 1024 * 1024) == data[4096 : 4096 + 1024 * 1024]
    assert door.spliced_reads == 1


def test_small_reads_are_copied_not_spliced(serve, image, connect):
    door, uri = serve(image)
    raw = connect(uri)
    raw.go()
    data = image.read_bytes()
    assert raw.read(4096, 4096) == data[4096:8192]
    assert raw.read(12345, nbd.SPLICE_MIN_BYTES - 1) == data[12345 : 12345 + nbd.SPLICE_MIN_BYTES - 1]
    assert door.spliced_reads == 0
    assert raw.read(12345, nbd.SPLICE_MIN_BYTES) == data[12345 : 12345 + nbd.SPLICE_MIN_BYTES]
    assert door.spliced_reads == 1


def test_file_truncated_under_the_export_gets_eio_and_the_stream_stays_in_step(serve, image, connect):
    data = image.read_bytes()
    door, uri = serve(image)
    raw = connect(uri)
    raw.go()
    assert raw.read(0, BIG) == data[:BIG]
    os.truncate(image, IMAGE_SIZE // 2)
    for offset in (IMAGE_SIZE // 2 - BIG // 2, IMAGE_SIZE // 2 + 4096):  # straddling the new end, then past it
        raw.send_request(nbd.NBD_CMD_READ, 9, offset, BIG)
        assert raw.reply(BIG) == (nbd.NBD_EIO, 9, b"")
    assert raw.read(4096, BIG) == data[4096 : 4096 + BIG]
    assert raw.read(100, 4096) == data[100:4196]
    assert door.spliced_reads == 2
    assert door.backend.counters().errors == 2


def test_full_socket_sends_the_rest_in_order(serve, image, connect):
    data = image.read_bytes()
    door, uri = serve(image)
    raw = connect(uri)
    raw.go()
    offsets = [(i * 777 * 4096) % (IMAGE_SIZE - 1024 * 1024) for i in range(12)]
    for handle, offset in enumerate(offsets):  # 12 MiB asked before any reply is read: the socket fills
        raw.send_request(nbd.NBD_CMD_READ, handle, offset, 1024 * 1024)
    time.sleep(1)
    replies = {}
    for _ in offsets:
        error, handle, payload = raw.reply(1024 * 1024)
        assert error == 0
        replies[handle] = payload
    for handle, offset in enumerate(offsets):
        assert replies[handle] == data[offset : offset + 1024 * 1024], handle
    assert nbd.MAX_PIPES <= door.spliced_reads <= len(offsets)  # the rest, with every pipe busy, took buffers
    assert door.socket_full_waits > 0
    assert raw.read(0, 4096) == data[:4096]


def test_spliced_reads_obey_io_limits_and_are_timed(serve, image, connect):
    door, uri = serve(image)
    backend = door.backend
    backend.measure_service_time()
    backend.throttle = ThrottleGroups().join("disk0", ThrottleLimits(bps_read=1024 * 1024), None)
    raw = connect(uri)
    raw.go()
    data = image.read_bytes()
    started = time.monotonic()
    for i in range(8):  # 2 MiB at 1 MiB/s
        assert raw.read(i * BIG, BIG) == data[i * BIG : (i + 1) * BIG]
    assert time.monotonic() - started >= 1.0
    assert door.spliced_reads == 8
    assert backend.counters().reads == 8
    assert backend.counters().bytes_read == 8 * BIG
    assert backend.service_times().observations == 8


def test_multi_conn_writes_seen_by_other_connections_and_flush_covers_them(serve, image, connect):
    store = RecordingStore(str(image))
    door, uri = serve(image, store=store)
    first, second = connect(uri), connect(uri)
    assert first.go()[1] & nbd.NBD_FLAG_CAN_MULTI_CONN
    assert second.go()[1] & nbd.NBD_FLAG_CAN_MULTI_CONN
    payload = os.urandom(BIG)
    first.send_request(nbd.NBD_CMD_WRITE, 1, 3 * BIG, BIG, payload=payload)
    assert first.reply() == (0, 1, b"")
    assert second.read(3 * BIG, BIG) == payload  # a completed write is seen by every connection
    second.send_request(nbd.NBD_CMD_FLUSH, 2, 0, 0)
    assert second.reply() == (0, 2, b"")
    assert store.events == [f"write {3 * BIG}", "sync"]  # the other connection's flush synced after it


def test_nbdcopy_over_several_connections_md5_equal(serve, image, tmp_path):
    source = tmp_path / "source.img"
    source.write_bytes(os.urandom(IMAGE_SIZE))
    door, uri = serve(image)
    client("nbdcopy", "--connections=4", "--flush", str(source), uri)
    assert door._next_id >= 2  # libnbd opened more than one connection because CAN_MULTI_CONN is offered
    assert md5(image) == md5(source)
    out = tmp_path / "back.img"
    client("nbdcopy", "--connections=4", uri, str(out))
    assert md5(out) == md5(source)


def test_big_writes_reuse_buffers_and_land_in_order(serve, image, connect, tmp_path):
    door, uri = serve(image)
    raw = connect(uri)
    raw.go()
    first, second = os.urandom(BIG), os.urandom(BIG)
    raw.send_request(nbd.NBD_CMD_WRITE, 1, 0, BIG, payload=first)
    raw.send_request(nbd.NBD_CMD_WRITE, 2, IMAGE_SIZE - BIG // 2, BIG, payload=second)  # past the end: refused
    raw.send_request(nbd.NBD_CMD_WRITE, 3, BIG, BIG, payload=second)
    replies = {raw.reply()[:2] for _ in range(3)}
    assert replies == {(0, 1), (nbd.NBD_ENOSPC, 2), (0, 3)}
    for handle in range(4, 12):  # the same length again and again: kept buffers are refilled, never mixed up
        payload = bytes([handle]) * BIG
        raw.send_request(nbd.NBD_CMD_WRITE, handle, handle * BIG, BIG, payload=payload)
        assert raw.reply() == (0, handle, b"")
    assert raw.read(0, 2 * BIG) == first + second
    content = image.read_bytes()
    assert all(content[h * BIG : (h + 1) * BIG] == bytes([h]) * BIG for h in range(4, 12))
    source = tmp_path / "source.img"
    source.write_bytes(os.urandom(IMAGE_SIZE))
    client("nbdcopy", "--request-size=1048576", "--flush", str(source), uri)
    assert md5(image) == md5(source)


def resident_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_a_client_cannot_make_a_connection_keep_payload_buffers_without_bound(serve, image, connect):
    """Refused writes' buffers are dropped and kept ones are bounded, whatever lengths a client picks."""
    door, uri = serve(image)
    raw = connect(uri)
    raw.go()
    before = resident_bytes()
    for handle in range(20):  # 8 MiB and more each, past the end of the export: refused
        length = (8 << 20) + handle * 4096
        raw.send_request(nbd.NBD_CMD_WRITE, handle, 0, length, payload=bytes(length))
        assert raw.reply() == (nbd.NBD_ENOSPC, handle, b"")
    for handle in range(20, 60):  # forty lengths of 512 KiB and more, each written once
        length = (512 << 10) + handle * 4096
        raw.send_request(nbd.NBD_CMD_WRITE, handle, 0, length, payload=bytes(length))
        assert raw.reply() == (0, handle, b"")
    grown = resident_bytes() - before
    assert grown < 48 << 20, f"the daemon grew by {grown >> 20} MiB"
