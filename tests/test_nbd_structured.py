"""Structured replies, holes and block status on the NBD door: real clients (libnbd's nbdinfo and
nbdcopy, QEMU's qemu-img) against sparse images, a daemon copying a mostly sparse 1 GiB image
(its counters read with ``pvcore ctl list --json``), a hand-driven structured client comparing
reads with a simple one, and what a hostile client may send."""

from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_nbd import RawClient, client, open_clients, run, serve  # noqa: F401

from pvcore.devices.block.extents import PAGE_SIZE, Extent, map_extents, page_holes, read_mapped
from pvcore.devices.block.store import RawFileStore
from pvcore.streams import nbd
from pvcore.testing.faulty_store import FaultyStore
from pvcore.testing.serve_process import ServeProcess

MIB = 1024 * 1024
SPARSE_SIZE = 64 * MIB
DATA = ((1 * MIB, 64 * 1024), (10 * MIB, 3 * MIB), (40 * MIB + 4096, 8192), (SPARSE_SIZE - MIB, MIB))
"""(offset, length) of the data in the sparse image; the rest is holes."""


def write_sparse(path: Path, size: int, data: tuple[tuple[int, int], ...], seed: int = 1) -> bytes:
    """A sparse file of ``size`` with random bytes at ``data``; returns its content."""
    rng = random.Random(seed)
    content = bytearray(size)
    with open(path, "wb") as out:
        out.truncate(size)
        for offset, length in data:
            chunk = rng.randbytes(length)
            out.seek(offset)
            out.write(chunk)
            content[offset : offset + length] = chunk
    return bytes(content)


class SparseImage(tuple):
    """(path, content) of the sparse test image; its repr leaves the 64 MiB of content out."""

    def __repr__(self) -> str:
        return f"SparseImage({self[0]})"


@pytest.fixture
def sparse(tmp_path: Path) -> SparseImage:
    path = tmp_path / "sparse.img"
    content = write_sparse(path, SPARSE_SIZE, DATA)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert any(e.hole for e in map_extents(fd, 0, SPARSE_SIZE)), "the file system keeps no holes"
    finally:
        os.close(fd)
    return SparseImage((path, content))


@pytest.fixture
def sconnect() -> Iterator[Callable[[str], StructuredClient]]:
    """Opens raw clients that can negotiate structured replies; all are closed afterwards."""
    yield from open_clients(StructuredClient)


class StructuredClient(RawClient):
    """A raw client that negotiates structured replies (and optionally base:allocation) and reads chunks."""

    def negotiate(self, *, meta: bool = True, name: bytes = b"") -> tuple[int, int]:
        self.greeting()
        self.sock.sendall(struct.pack(">I", nbd.NBD_FLAG_C_FIXED_NEWSTYLE | nbd.NBD_FLAG_C_NO_ZEROES))
        self.option(nbd.NBD_OPT_STRUCTURED_REPLY)
        assert self.option_reply()[1] == nbd.NBD_REP_ACK
        if meta:
            self.option(nbd.NBD_OPT_SET_META_CONTEXT, meta_request(name, [nbd.BASE_ALLOCATION]))
            assert self.option_reply() == (
                nbd.NBD_OPT_SET_META_CONTEXT, nbd.NBD_REP_META_CONTEXT,
                struct.pack(">I", nbd.ALLOCATION_CONTEXT_ID) + nbd.BASE_ALLOCATION,
            )
            assert self.option_reply()[1] == nbd.NBD_REP_ACK
        return self.choose(name)

    def chunk(self) -> tuple[int, int, int, bytes]:
        """(flags, type, handle, payload) of the next structured reply chunk."""
        magic, flags, kind, handle, length = struct.unpack(">IHHQI", self.recv(20))
        assert magic == nbd.NBD_STRUCTURED_REPLY_MAGIC, hex(magic)
        return flags, kind, handle, self.recv(length)

    def chunks(self) -> list[tuple[int, int, bytes]]:
        """(type, handle, payload) of every chunk up to the one with DONE (one request in flight)."""
        out = []
        while True:
            flags, kind, handle, payload = self.chunk()
            out.append((kind, handle, payload))
            if flags & nbd.NBD_REPLY_FLAG_DONE:
                return out

    def structured_read(self, offset: int, length: int, flags: int = 0) -> tuple[bytes, int, int]:
        """(data, data bytes on the wire, chunks) of a read, reassembled from its content chunks."""
        self.send_request(nbd.NBD_CMD_READ, 9, offset, length, flags=flags)
        data = bytearray(length)
        covered = bytearray(length)
        wire = 0
        chunks = self.chunks()
        for kind, handle, payload in chunks:
            assert handle == 9
            if kind == nbd.NBD_REPLY_TYPE_OFFSET_DATA:
                (start,) = struct.unpack_from(">Q", payload)
                size = len(payload) - 8
                data[start - offset : start - offset + size] = payload[8:]
                wire += size
            else:
                assert kind == nbd.NBD_REPLY_TYPE_OFFSET_HOLE, kind
                start, size = struct.unpack(">QI", payload)
                assert size > 0
            assert offset <= start and start + size <= offset + length
            assert not any(covered[start - offset : start - offset + size]), "overlapping chunks"
            covered[start - offset : start - offset + size] = b"\x01" * size
        assert all(covered), "the chunks do not cover the read"
        return bytes(data), wire, len(chunks)

    def error(self, handle: int) -> int:
        """The error value of a request answered by one ERROR chunk."""
        ((kind, got, payload),) = self.chunks()
        assert (kind, got) == (nbd.NBD_REPLY_TYPE_ERROR, handle)
        error, message_length = struct.unpack_from(">IH", payload)
        assert len(payload) == 6 + message_length and payload[6:].decode()
        return error

    def block_status(self, offset: int, length: int, flags: int = 0) -> list[tuple[int, int]]:
        self.send_request(nbd.NBD_CMD_BLOCK_STATUS, 11, offset, length, flags=flags)
        ((kind, handle, payload),) = self.chunks()
        assert (kind, handle) == (nbd.NBD_REPLY_TYPE_BLOCK_STATUS, 11)
        assert struct.unpack_from(">I", payload) == (nbd.ALLOCATION_CONTEXT_ID,)
        return [tuple(d) for d in struct.iter_unpack(">II", payload[4:])]


def meta_request(name: bytes, queries: list[bytes]) -> bytes:
    body = struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries))
    return body + b"".join(struct.pack(">I", len(q)) + q for q in queries)


def nbdinfo_map(uri: str) -> list[tuple[int, int, str]]:
    lines = client("nbdinfo", "--map", uri).stdout.splitlines()
    return [(int(offset), int(length), kind) for offset, length, _, kind in (line.split() for line in lines)]


def expected_map(size: int, data: tuple[tuple[int, int], ...]) -> list[tuple[int, int, str]]:
    result, position = [], 0
    for offset, length in sorted(data):
        if offset > position:
            result.append((position, offset - position, "hole,zero"))
        result.append((offset, length, "data"))
        position = offset + length
    if position < size:
        result.append((position, size - position, "hole,zero"))
    return result


# the extent map itself


def test_map_extents_and_page_holes(sparse):
    path, content = sparse
    store = RawFileStore(str(path), readonly=True)
    try:
        extents = store.extents(0, SPARSE_SIZE)
        assert [(e.offset, e.length, "hole,zero" if e.hole else "data") for e in extents] == expected_map(
            SPARSE_SIZE, DATA
        )
        assert store.extents(MIB + 4096, 100) == [Extent(MIB + 4096, 100, False)]
        assert map_extents(store.fd, 0, SPARSE_SIZE, limit=2) == extents[:2]
        # a hole sharing pages with data is data; one spanning whole pages stays a hole
        pieces = [Extent(0, 100, False), Extent(100, 3 * PAGE_SIZE, True), Extent(100 + 3 * PAGE_SIZE, 50, False)]
        assert page_holes(pieces, 0, 150 + 3 * PAGE_SIZE) == [
            Extent(0, PAGE_SIZE, False), Extent(PAGE_SIZE, 2 * PAGE_SIZE, True),
            Extent(3 * PAGE_SIZE, 150, False),
        ]
        # a sparse read into a pipe holds the data extents only, one after the other
        read, write = os.pipe()
        try:
            done, mapped = read_mapped(store, (), write, 10 * MIB - 4096, 8192)
            assert done == 4096 and [e.hole for e in mapped] == [True, False]
            assert os.read(read, 8192) == content[10 * MIB : 10 * MIB + 4096]
        finally:
            os.close(read)
            os.close(write)
    finally:
        store.close()


# real clients


def test_nbdinfo_map_shows_holes_and_data_where_they_are(serve, sparse):
    path, _ = sparse
    door, uri = serve(path)
    assert nbdinfo_map(uri) == expected_map(SPARSE_SIZE, DATA)
    assert client("nbdinfo", "--can", "structured-reply", uri).returncode == 0
    read_only_door, read_only_uri = serve(path, readonly=True)
    assert nbdinfo_map(read_only_uri) == expected_map(SPARSE_SIZE, DATA)
    assert door.backend.counters().maps >= 1 and door.backend.counters().errors == 0


def test_nbdcopy_and_qemu_img_convert_copy_sparse_and_read_only_data(serve, sparse, tmp_path):
    path, content = sparse
    data_bytes = sum(length for _, length in DATA)
    door, uri = serve(path)
    for name, argv in (
        ("nbdcopy", ["nbdcopy", uri]),
        ("qemu-img", ["qemu-img", "convert", "-f", "raw", "-O", "raw", uri]),
    ):
        before = door.backend.counters().bytes_read
        out = tmp_path / f"{name}.img"
        client(*argv, str(out))
        assert out.read_bytes() == content, name
        assert out.stat().st_blocks * 512 <= 2 * data_bytes, f"{name}: the copy is not sparse"
        assert door.backend.counters().bytes_read - before <= 2 * data_bytes, name


def test_qemu_io_reads_holes_as_zeros_without_reading_them(serve, sparse):
    path, content = sparse
    door, uri = serve(path)
    result = client(
        "qemu-io", "-f", "raw", "-c", "read -P 0 2M 8M", "-c", f"read -P 0 {13 * MIB} {27 * MIB}", uri
    )
    assert "Pattern verification failed" not in result.stdout + result.stderr
    assert door.backend.counters().bytes_read == 0


def test_sparse_1g_image_copied_through_the_daemon_moves_only_its_data(tmp_path):
    """``pvcore serve`` over a 1 GiB image with 4 MiB of data: nbdcopy and qemu-img convert
    produce identical sparse copies, and the device's counters (``pvcore ctl list --json``)
    show only the data was read."""
    size = 1024 * MIB
    data = ((0, MIB), (300 * MIB, 2 * MIB), (size - MIB, MIB))
    image = tmp_path / "big.img"
    write_sparse(image, size, data, seed=7)
    sock = tmp_path / "big.sock"
    env = dict(os.environ, PVCORE_RUN_DIR=str(tmp_path / "run"))
    command = [sys.executable, "-m", "pvcore.cli", "serve", "--hypervisor", "lpar",
               f"block:name=big,path={image},socket={sock},readonly=on"]
    daemon = ServeProcess(command, tmp_path / "serve.log", env=env)
    daemon.start()
    try:
        uri = f"nbd+unix:///?socket={sock}"

        def bytes_read() -> int:
            done = subprocess.run([sys.executable, "-m", "pvcore.cli", "ctl", "list", "--json"],
                                  capture_output=True, text=True, timeout=60, env=env, check=True)
            (device,) = [d for d in json.loads(done.stdout) if d["name"] == "big"]
            return device["counters"]["bytes_read"]

        data_bytes = sum(length for _, length in data)
        for name, argv in (("nbdcopy", ["nbdcopy", uri]),
                           ("qemu-img", ["qemu-img", "convert", "-f", "raw", "-O", "raw", uri])):
            before = bytes_read()
            out = tmp_path / f"{name}.img"
            subprocess.run([*argv, str(out)], check=True, timeout=120)
            moved = bytes_read() - before
            assert data_bytes <= moved <= 2 * data_bytes, f"{name} made pvcore read {moved} bytes"
            assert out.stat().st_size == size and out.stat().st_blocks * 512 <= 4 * data_bytes, name
            assert subprocess.run(["cmp", str(image), str(out)], timeout=120).returncode == 0, name
            out.unlink()
    finally:
        daemon.terminate()


# a hand-driven structured client


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, SPARSE_SIZE - 1), st.integers(1, 3 * MIB)), min_size=1, max_size=8))
def test_structured_reads_equal_simple_reads(serve, sparse, sconnect, reads):
    path, content = sparse
    door, uri = serve(path)
    simple, structured = sconnect(uri), sconnect(uri)
    simple.go()
    structured.negotiate(meta=False)
    for offset, length in reads:
        length = min(length, SPARSE_SIZE - offset)
        expected = content[offset : offset + length]
        assert simple.read(offset, length) == expected
        data, _, _ = structured.structured_read(offset, length)
        assert data == expected
        data, wire, chunks = structured.structured_read(offset, length, flags=nbd.NBD_CMD_FLAG_DF)
        assert (data, wire, chunks) == (expected, length, 1)


def test_holes_send_no_data_bytes_spliced_or_buffered(serve, sparse, sconnect):
    path, content = sparse
    door, uri = serve(path)
    raw = sconnect(uri)
    assert raw.negotiate() == (SPARSE_SIZE, door.transmission_flags | nbd.NBD_FLAG_SEND_DF)
    # a small read is served on the spot when the page cache has it (a hole's zero pages too), and counted read
    assert raw.structured_read(2 * MIB, 64 * 1024) == (bytes(64 * 1024), 0, 1)
    before = door.backend.counters().bytes_read
    assert raw.structured_read(24 * MIB, 4 * MIB) == (bytes(4 * MIB), 0, 1)  # too big for a pipe: buffer path
    assert door.backend.counters().bytes_read == before  # the hole was not read at all
    assert raw.structured_read(20 * MIB, 512 * 1024) == (bytes(512 * 1024), 0, 1)  # splice path
    assert door.spliced_reads == 1
    data, wire, chunks = raw.structured_read(40 * MIB - 256 * 1024, 768 * 1024)  # spliced: hole, 8 KiB data, hole
    assert data == content[40 * MIB - 256 * 1024 : 40 * MIB + 512 * 1024]
    assert (wire, chunks, door.spliced_reads) == (8192, 3, 2)
    data, wire, chunks = raw.structured_read(8 * MIB, 8 * MIB)  # buffer path: hole, 3 MiB data, hole
    assert data == content[8 * MIB : 16 * MIB] and (wire, chunks) == (3 * MIB, 3)


def test_block_status(serve, sparse, sconnect):
    path, _ = sparse
    door, uri = serve(path, readonly=True)
    raw = sconnect(uri)
    raw.negotiate()
    hole = nbd.NBD_STATE_HOLE | nbd.NBD_STATE_ZERO
    assert raw.block_status(0, 16 * MIB) == [
        (MIB, hole), (64 * 1024, 0), (9 * MIB - 64 * 1024, hole), (3 * MIB, 0), (3 * MIB, hole)
    ]
    assert raw.block_status(MIB + 4096, 4096) == [(4096, 0)]
    assert raw.block_status(0, 16 * MIB, flags=nbd.NBD_CMD_FLAG_REQ_ONE) == [(MIB, hole)]
    assert raw.block_status(SPARSE_SIZE - 512, 512) == [(512, 0)]


def test_hostile_structured_requests(serve, sparse, sconnect):
    path, content = sparse
    door, uri = serve(path)
    raw = sconnect(uri)
    raw.negotiate()
    for handle, (offset, length, flags) in enumerate(
        ((0, 0, 0), (SPARSE_SIZE - 512, 1024, 0), (2**64 - 1, 2**32 - 1, 0), (0, 4096, nbd.NBD_CMD_FLAG_DF)), 1
    ):
        raw.send_request(nbd.NBD_CMD_BLOCK_STATUS, handle, offset, length, flags=flags)
        assert raw.error(handle) == nbd.NBD_EINVAL
    raw.send_request(nbd.NBD_CMD_READ, 5, SPARSE_SIZE - 512, 1024)
    assert raw.error(5) == nbd.NBD_EINVAL
    raw.send_request(nbd.NBD_CMD_READ, 6, 0, 512, flags=nbd.NBD_CMD_FLAG_REQ_ONE)
    assert raw.error(6) == nbd.NBD_EINVAL
    raw.send_request(nbd.NBD_CMD_FLUSH, 7, 0, 0)
    assert raw.chunks() == [(nbd.NBD_REPLY_TYPE_NONE, 7, b"")]
    for flags in (0, nbd.NBD_CMD_FLAG_DF):  # a read of nothing: no chunk may describe 0 bytes
        raw.send_request(nbd.NBD_CMD_READ, 8, MIB, 0, flags=flags)
        assert raw.chunks() == [(nbd.NBD_REPLY_TYPE_NONE, 8, b"")]
    assert raw.structured_read(MIB, 4096)[0] == content[MIB : MIB + 4096]

    no_context = sconnect(uri)  # structured replies, but base:allocation not selected
    no_context.negotiate(meta=False)
    no_context.send_request(nbd.NBD_CMD_BLOCK_STATUS, 1, 0, 4096)
    assert no_context.error(1) == nbd.NBD_EINVAL
    simple = sconnect(uri)  # no structured replies: block status is an unknown request, DF a bad flag
    simple.go()
    simple.send_request(nbd.NBD_CMD_BLOCK_STATUS, 1, 0, 4096)
    assert simple.reply() == (nbd.NBD_EINVAL, 1, b"")
    simple.send_request(nbd.NBD_CMD_READ, 2, 0, 4096, flags=nbd.NBD_CMD_FLAG_DF)
    assert simple.reply() == (nbd.NBD_EINVAL, 2, b"")
    assert simple.read(MIB, 512) == content[MIB : MIB + 512]

    # an option after GO (28 bytes, as long as a request) is no request: the connection ends, the daemon serves on
    raw.option(nbd.NBD_OPT_STRUCTURED_REPLY, bytes(12))
    assert raw.is_closed()
    assert nbdinfo_map(uri) == expected_map(SPARSE_SIZE, DATA)


def test_structured_option_haggling(serve, sparse, sconnect):
    path, _ = sparse
    door, uri = serve(path, export_name="disk0")
    raw = sconnect(uri)
    raw.greeting()
    raw.sock.sendall(struct.pack(">I", nbd.NBD_FLAG_C_FIXED_NEWSTYLE))
    good = meta_request(b"disk0", [nbd.BASE_ALLOCATION])
    raw.option(nbd.NBD_OPT_SET_META_CONTEXT, good)  # before structured replies
    assert raw.option_reply()[1] == nbd.NBD_REP_ERR_INVALID
    raw.option(nbd.NBD_OPT_STRUCTURED_REPLY, b"x")
    assert raw.option_reply()[1] == nbd.NBD_REP_ERR_INVALID
    raw.option(nbd.NBD_OPT_STRUCTURED_REPLY)
    assert raw.option_reply()[1] == nbd.NBD_REP_ACK
    raw.option(nbd.NBD_OPT_STRUCTURED_REPLY)  # twice
    assert raw.option_reply()[1] == nbd.NBD_REP_ERR_INVALID
    for bad in (good[:-1], good + b"x", meta_request(b"disk0", [b"noseparator"]), struct.pack(">I", 2**31),
                meta_request(b"disk0", [b"base:\xff"]), b""):
        raw.option(nbd.NBD_OPT_SET_META_CONTEXT, bad)
        assert raw.option_reply()[1] == nbd.NBD_REP_ERR_INVALID, bad
    raw.option(nbd.NBD_OPT_SET_META_CONTEXT, meta_request(b"other", [nbd.BASE_ALLOCATION]))
    assert raw.option_reply()[1] == nbd.NBD_REP_ERR_UNKNOWN
    raw.option(nbd.NBD_OPT_LIST_META_CONTEXT, meta_request(b"disk0", []))
    assert raw.option_reply() == (nbd.NBD_OPT_LIST_META_CONTEXT, nbd.NBD_REP_META_CONTEXT,
                                  bytes(4) + nbd.BASE_ALLOCATION)
    assert raw.option_reply()[1] == nbd.NBD_REP_ACK
    raw.option(nbd.NBD_OPT_LIST_META_CONTEXT, meta_request(b"", [b"base:"]))
    assert raw.option_reply()[1] == nbd.NBD_REP_META_CONTEXT
    assert raw.option_reply()[1] == nbd.NBD_REP_ACK
    for unmatched in ([b"base:"], [b"base:nosuch", b"qemu:dirty-bitmap:x"], []):  # base: lists but selects nothing
        raw.option(nbd.NBD_OPT_SET_META_CONTEXT, meta_request(b"disk0", unmatched))
        assert raw.option_reply()[1] == nbd.NBD_REP_ACK, unmatched
    raw.option(nbd.NBD_OPT_GO, struct.pack(">I", 5) + b"disk0" + struct.pack(">H", 0))
    replies = [raw.option_reply()]
    while replies[-1][1] != nbd.NBD_REP_ACK:
        replies.append(raw.option_reply())
    raw.send_request(nbd.NBD_CMD_BLOCK_STATUS, 1, 0, 4096)  # the last SET selected nothing
    magic, flags, kind, handle, length = struct.unpack(">IHHQI", raw.recv(20))
    assert (kind, handle) == (nbd.NBD_REPLY_TYPE_ERROR, 1)
    assert struct.unpack(">I", raw.recv(length)[:4]) == (nbd.NBD_EINVAL,)


def test_a_failing_disk_fails_block_status_and_reads_not_the_connection(serve, sparse, sconnect):
    path, content = sparse
    store = FaultyStore(RawFileStore(str(path)))
    door, uri = serve(path, store=store)
    raw = sconnect(uri)
    raw.negotiate()
    with store.injecting("eio"):
        raw.send_request(nbd.NBD_CMD_BLOCK_STATUS, 1, 0, MIB)
        assert raw.error(1) == nbd.NBD_EIO
        raw.send_request(nbd.NBD_CMD_READ, 2, MIB, 4096)
        assert raw.error(2) == nbd.NBD_EIO
    assert raw.block_status(MIB, 4096) == [(4096, 0)]
    assert raw.structured_read(MIB, 4096)[0] == content[MIB : MIB + 4096]
