"""Block durability, observed where it happens: the ``pwritev``/``fdatasync`` system calls.

A store wrapper that records its own ``sync()`` would still pass if
:meth:`RawFileStore.sync` stopped calling ``fdatasync``; so these tests wrap
:func:`os.pwritev` and :func:`os.fdatasync` themselves and check that each
write the backend acknowledges as durable was written with ``RWF_DSYNC`` or
followed by an ``fdatasync`` of its file before the acknowledgement — for
FLUSH, for writethrough and FUA writes, and for shutdown (a write acknowledged
in writeback mode is synced when the backend closes, and when ``pvcore serve``
gets SIGTERM).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pvcore.devices.block import BlockBackend, BlockOp, BlockRequest, BlockResult, CacheMode, RawFileStore
from pvcore.streams import nbd

DISK_SIZE = 1 << 20


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(DISK_SIZE))
    return path


class Syscalls:
    """Records, in order, the ``pwritev`` and ``fdatasync`` calls of this process and test completions.

    Events are ``("pwritev", fd, flags)``, ``("fdatasync", fd)`` and
    ``("done", label)``. With ``dsync_refused`` a ``pwritev`` asking for
    ``RWF_DSYNC`` fails with EOPNOTSUPP, as on a file system without it.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.events: list[tuple] = []
        self.dsync_refused = False
        real_pwritev, real_fdatasync = os.pwritev, os.fdatasync

        def pwritev(fd: int, buffers, offset: int, flags: int = 0) -> int:
            if self.dsync_refused and flags & os.RWF_DSYNC:
                raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))
            done = real_pwritev(fd, buffers, offset, flags)
            self.events.append(("pwritev", fd, flags))
            return done

        def fdatasync(fd: int) -> None:
            real_fdatasync(fd)
            self.events.append(("fdatasync", fd))

        monkeypatch.setattr(os, "pwritev", pwritev)
        monkeypatch.setattr(os, "fdatasync", fdatasync)

    def done(self, label: str):
        """A completion callback that records ``("done", label)``; it fails the test on an error result."""

        def callback(result: BlockResult) -> None:
            assert result.ok, result
            self.events.append(("done", label))

        return callback

    def index(self, label: str) -> int:
        """Where the completion ``label`` is in the event list."""
        return self.events.index(("done", label))

    def durable_before(self, fd: int, end: int) -> bool:
        """Whether every write to ``fd`` among the first ``end`` events is on stable storage by then.

        A write is, if it was made with RWF_DSYNC or an ``fdatasync(fd)``
        returned after it. At least one write must be there.
        """
        pending = False
        writes = 0
        for event in self.events[:end]:
            if event[0] == "pwritev" and event[1] == fd:
                writes += 1
                if not event[2] & os.RWF_DSYNC:
                    pending = True
            elif event == ("fdatasync", fd):
                pending = False
        return writes > 0 and not pending


@pytest.fixture
def syscalls(monkeypatch: pytest.MonkeyPatch) -> Syscalls:
    return Syscalls(monkeypatch)


def submit(backend: BlockBackend, request: BlockRequest, callback) -> None:
    """Submit ``request`` and wait until its callback has run."""

    async def scenario() -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def finished(result: BlockResult) -> None:
            callback(result)
            future.set_result(None)

        backend.submit(request, finished)
        await asyncio.wait_for(future, 10)

    asyncio.run(scenario())


def write(offset: int, data: bytes, *, fua: bool = False) -> BlockRequest:
    return BlockRequest(BlockOp.WRITE, offset, len(data), [memoryview(data)], fua=fua)


def test_flush_calls_fdatasync_after_the_writes_before_it(disk: Path, syscalls: Syscalls) -> None:
    store = RawFileStore(str(disk))
    backend = BlockBackend(store, cache=CacheMode.WRITEBACK)
    try:
        submit(backend, write(4096, b"\x11" * 4096), syscalls.done("write"))
        assert not syscalls.durable_before(store.fd, syscalls.index("write")), "writeback write was already durable"
        submit(backend, BlockRequest(BlockOp.FLUSH), syscalls.done("flush"))
        assert syscalls.durable_before(store.fd, syscalls.index("flush")), syscalls.events
    finally:
        backend.close()


@pytest.mark.parametrize("dsync", ["rwf-dsync", "refused"], ids=["rwf-dsync", "fdatasync-fallback"])
@pytest.mark.parametrize(
    ("cache", "fua"), [(CacheMode.WRITETHROUGH, False), (CacheMode.WRITEBACK, True)], ids=["writethrough", "fua"]
)
def test_durable_writes_are_on_stable_storage_when_acknowledged(
    disk: Path, syscalls: Syscalls, cache: CacheMode, fua: bool, dsync: str
) -> None:
    syscalls.dsync_refused = dsync == "refused"
    store = RawFileStore(str(disk))
    backend = BlockBackend(store, cache=cache)
    try:
        submit(backend, write(8192, b"\x22" * 4096, fua=fua), syscalls.done("first"))
        submit(backend, write(0, b"\x33" * 512, fua=fua), syscalls.done("second"))
        assert syscalls.durable_before(store.fd, syscalls.index("first")), syscalls.events
        assert syscalls.durable_before(store.fd, syscalls.index("second")), syscalls.events
    finally:
        backend.close()
    assert disk.read_bytes()[8192:12288] == b"\x22" * 4096


@pytest.mark.parametrize("op", [BlockOp.DISCARD, BlockOp.WRITE_ZEROES])
def test_writethrough_discard_and_write_zeroes_call_fdatasync(disk: Path, syscalls: Syscalls, op: BlockOp) -> None:
    store = RawFileStore(str(disk))
    backend = BlockBackend(store, cache=CacheMode.WRITETHROUGH)
    try:
        submit(backend, BlockRequest(op, 4096, 4096), syscalls.done("zeroed"))
        assert ("fdatasync", store.fd) in syscalls.events[: syscalls.index("zeroed")], syscalls.events
    finally:
        backend.close()


def test_close_syncs_writes_acknowledged_in_writeback_mode(disk: Path, syscalls: Syscalls) -> None:
    store = RawFileStore(str(disk))
    fd = store.fd
    backend = BlockBackend(store, cache=CacheMode.WRITEBACK)
    submit(backend, write(4096, b"\x44" * 4096), syscalls.done("write"))
    assert not syscalls.durable_before(fd, syscalls.index("write")), "writeback write was already durable"
    backend.close()
    assert syscalls.durable_before(fd, len(syscalls.events)), syscalls.events
    assert store.fd == -1


def test_a_failed_flush_on_close_is_logged_and_the_store_still_closes(
    disk: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    store = RawFileStore(str(disk))
    backend = BlockBackend(store, name="vdz")

    def failing_fdatasync(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fdatasync", failing_fdatasync)
    with caplog.at_level(logging.ERROR, logger="pvcore.block"):
        backend.close()
    assert "vdz: flush on close failed" in caplog.text and os.strerror(errno.EIO) in caplog.text
    assert store.fd == -1


def test_readonly_close_does_not_sync(disk: Path, syscalls: Syscalls) -> None:
    backend = BlockBackend(RawFileStore(str(disk), readonly=True))
    backend.close()
    assert not any(event[0] == "fdatasync" for event in syscalls.events)


# ---------------------------------------------------------------- pvcore serve, SIGTERM

BOOTSTRAP = textwrap.dedent(
    """
    import os, sys
    real_fdatasync = os.fdatasync
    record = open(os.environ["SYNC_LOG"], "a", buffering=1)

    def fdatasync(fd):
        real_fdatasync(fd)
        record.write(os.readlink(f"/proc/self/fd/{fd}") + "\\n")

    os.fdatasync = fdatasync
    from pvcore.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)
"""Runs ``pvcore`` with every ``fdatasync`` the process completes written to $SYNC_LOG (the file synced)."""


def recv_exactly(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        assert chunk, f"connection closed after {len(data)} of {count} bytes"
        data += chunk
    return data


def nbd_connect(path: Path) -> socket.socket:
    """Open an NBD connection through the fixed newstyle handshake (NBD_OPT_GO on the default export)."""
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(20)
    sock.connect(str(path))
    recv_exactly(sock, 18)  # NBDMAGIC, IHAVEOPT, handshake flags
    sock.sendall(struct.pack(">I", nbd.NBD_FLAG_C_FIXED_NEWSTYLE | nbd.NBD_FLAG_C_NO_ZEROES))
    sock.sendall(struct.pack(">QII", nbd.NBD_OPTS_MAGIC, nbd.NBD_OPT_GO, 6) + struct.pack(">IH", 0, 0))
    while True:
        _, _, reply, length = struct.unpack(">QIII", recv_exactly(sock, 20))
        recv_exactly(sock, length)
        if reply == nbd.NBD_REP_ACK:
            return sock
        assert reply == nbd.NBD_REP_INFO, hex(reply)


def test_sigterm_syncs_a_write_acknowledged_with_cache_writeback(tmp_path: Path, disk: Path) -> None:
    """`pvcore serve` (lpar's NBD door) acknowledges a writeback write; after SIGTERM it has been fdatasynced."""
    sock_path, sync_log, out_path = tmp_path / "vda.sock", tmp_path / "syncs", tmp_path / "serve.log"
    sync_log.touch()
    env = dict(os.environ, PVCORE_RUN_DIR=str(tmp_path / "run"), SYNC_LOG=str(sync_log))
    with open(out_path, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", BOOTSTRAP, "serve", "--hypervisor", "lpar",
             f"block:path={disk},socket={sock_path},cache=writeback"],
            stdout=out, stderr=subprocess.STDOUT, env=env,
        )
    try:
        deadline = time.monotonic() + 30
        while "serving " not in out_path.read_text() and proc.poll() is None:
            assert time.monotonic() < deadline, out_path.read_text()
            time.sleep(0.05)
        assert proc.poll() is None, out_path.read_text()
        client = nbd_connect(sock_path)
        data = b"\x5a" * 4096
        client.sendall(struct.pack(">IHHQQI", nbd.NBD_REQUEST_MAGIC, 0, nbd.NBD_CMD_WRITE, 1, 8192, len(data)) + data)
        magic, error, handle = struct.unpack(">IIQ", recv_exactly(client, 16))
        assert (magic, error, handle) == (nbd.NBD_SIMPLE_REPLY_MAGIC, 0, 1)
        assert str(disk.resolve()) not in sync_log.read_text().splitlines(), "the writeback write was synced before shutdown"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, out_path.read_text()
        client.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert str(disk.resolve()) in sync_log.read_text().splitlines(), out_path.read_text()
    assert disk.read_bytes()[8192 : 8192 + 4096] == data
    assert "Traceback" not in out_path.read_text()
