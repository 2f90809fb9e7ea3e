"""The NBD front door against real clients (libnbd's nbdinfo/nbdcopy, QEMU's qemu-img/qemu-io)
and against a hand-driven hostile client on a raw socket."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pvcore.devices.block.backend import BlockBackend
from pvcore.devices.block.store import RawFileStore
from pvcore.streams import nbd
from pvcore.streams.nbd import NbdFrontDoor
from pvcore.streams.unix import ListenerError

IMAGE_SIZE = 4 * 1024 * 1024 + 4096
CLIENT_TIMEOUT = 30


@pytest.fixture
def run() -> Iterator[Callable[[Any], Any]]:
    """Runs coroutines on an event loop in a background thread, as the daemon would."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def run_coroutine(coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(CLIENT_TIMEOUT)

    yield run_coroutine
    loop.call_soon_threadsafe(loop.stop)
    thread.join()
    loop.close()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(IMAGE_SIZE))
    return path


@pytest.fixture
def serve(run: Callable[[Any], Any], tmp_path: Path) -> Iterator[Callable[..., tuple[NbdFrontDoor, str]]]:
    """Start an NBD door over an image; returns (door, URI). Everything is stopped afterwards."""
    started: list[tuple[NbdFrontDoor, BlockBackend]] = []

    def start(
        path: Path, *, readonly: bool = False, export_name: str = "", store: RawFileStore | None = None, **options: Any
    ) -> tuple[NbdFrontDoor, str]:
        backend = BlockBackend(store or RawFileStore(str(path), readonly=readonly), name="disk0")
        socket_path = tmp_path / f"nbd{len(started)}.sock"
        door = NbdFrontDoor(backend, socket_path, export_name=export_name, **options)
        run(door.start())
        started.append((door, backend))
        return door, f"nbd+unix:///{export_name}?socket={socket_path}"

    yield start
    for door, backend in started:
        run(door.stop())
        backend.close()


def client(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=CLIENT_TIMEOUT, check=check)


# real clients


def test_nbdinfo_reports_size_and_flags(serve, image):
    door, uri = serve(image)
    assert client("nbdinfo", "--size", uri).stdout.strip() == str(IMAGE_SIZE)
    info = client("nbdinfo", "--json", uri).stdout
    assert '"is_read_only": false' in info
    assert '"can_multi_conn": true' in info
    assert '"can_zero": true' in info and '"can_trim": true' in info and '"can_fua": true' in info
    assert '"block_size_maximum": 33554432' in info
    assert client("nbdinfo", "--is", "read-only", uri, check=False).returncode != 0


def test_nbdcopy_export_to_file_equals_image(serve, image, tmp_path):
    door, uri = serve(image)
    out = tmp_path / "copy.img"
    client("nbdcopy", uri, str(out))
    assert out.read_bytes() == image.read_bytes()


def test_nbdcopy_file_into_export_lands_in_backing_file(serve, image, tmp_path, run):
    source = tmp_path / "source.img"
    content = os.urandom(IMAGE_SIZE // 2) + bytes(IMAGE_SIZE // 4) + os.urandom(IMAGE_SIZE // 4)
    source.write_bytes(content)
    door, uri = serve(image)
    client("nbdcopy", "--flush", str(source), uri)
    assert image.read_bytes() == content
    assert client("qemu-img", "compare", "-f", "raw", "-F", "raw", str(source), uri).returncode == 0


def test_qemu_io_write_pattern_zeroes_and_discard(serve, image):
    before = image.read_bytes()
    door, uri = serve(image)
    result = client(
        "qemu-io", "-f", "raw",
        "-c", "write -P 0xab 0 64k",
        "-c", "write -f -P 0xcd 64k 4k",
        "-c", "write -z 128k 64k",
        "-c", "write -z -u 192k 64k",
        "-c", "discard 256k 64k",
        "-c", "flush",
        "-c", "read -P 0xab 0 64k",
        uri,
    )
    assert "Pattern verification failed" not in result.stdout + result.stderr
    after = image.read_bytes()
    assert after[: 64 << 10] == b"\xab" * (64 << 10)
    assert after[64 << 10 : 68 << 10] == b"\xcd" * 4096
    assert after[68 << 10 : 128 << 10] == before[68 << 10 : 128 << 10]
    assert after[128 << 10 : 320 << 10] == bytes(192 << 10)
    assert after[320 << 10 :] == before[320 << 10 :]


def test_readonly_export_refuses_writes(serve, image):
    before = image.read_bytes()
    door, uri = serve(image, readonly=True)
    assert client("nbdinfo", "--is", "read-only", uri, check=False).returncode == 0
    result = client("qemu-io", "-f", "raw", "-c", "write -P 0x11 0 4k", uri, check=False)
    assert "write failed" in result.stdout + result.stderr or result.returncode != 0
    assert image.read_bytes() == before


def test_named_export_and_default_name(serve, image):
    door, uri = serve(image, export_name="disk0")
    assert client("nbdinfo", "--size", uri).stdout.strip() == str(IMAGE_SIZE)
    listing = client("nbdinfo", "--list", "--json", uri).stdout
    assert '"export-name": "disk0"' in listing
    wrong = uri.replace("/disk0?", "/other?")
    assert client("nbdinfo", "--size", wrong, check=False).returncode != 0


# a raw client, for what real clients never send


class RawClient:
    """A minimal NBD client that speaks the wire format by hand."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(path)

    def recv(self, count: int) -> bytes:
        data = b""
        while len(data) < count:
            chunk = self.sock.recv(count - len(data))
            if not chunk:
                raise EOFError(f"closed after {len(data)} of {count} bytes")
            data += chunk
        return data

    def is_closed(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def greeting(self) -> int:
        magic, opts_magic, flags = struct.unpack(">QQH", self.recv(18))
        assert (magic, opts_magic) == (nbd.NBD_MAGIC, nbd.NBD_OPTS_MAGIC)
        return flags

    def option(self, option: int, data: bytes = b"") -> None:
        self.sock.sendall(struct.pack(">QII", nbd.NBD_OPTS_MAGIC, option, len(data)) + data)

    def option_reply(self) -> tuple[int, int, bytes]:
        magic, option, reply, length = struct.unpack(">QIII", self.recv(20))
        assert magic == nbd.NBD_REP_MAGIC
        return option, reply, self.recv(length)

    def go(self, name: bytes = b"") -> tuple[int, int]:
        """Handshake with NBD_OPT_GO; returns (size, transmission flags)."""
        self.greeting()
        self.sock.sendall(struct.pack(">I", nbd.NBD_FLAG_C_FIXED_NEWSTYLE | nbd.NBD_FLAG_C_NO_ZEROES))
        return self.choose(name)

    def choose(self, name: bytes = b"") -> tuple[int, int]:
        """NBD_OPT_GO for export ``name``, ending the handshake; returns (size, transmission flags)."""
        self.option(nbd.NBD_OPT_GO, struct.pack(">I", len(name)) + name + struct.pack(">H", 0))
        size = flags = None
        while True:
            _, reply, data = self.option_reply()
            if reply == nbd.NBD_REP_ACK:
                return size, flags
            assert reply == nbd.NBD_REP_INFO, hex(reply)
            if struct.unpack_from(">H", data)[0] == nbd.NBD_INFO_EXPORT:
                size, flags = struct.unpack_from(">QH", data, 2)

    def send_request(
        self, command: int, handle: int, offset: int, length: int, flags: int = 0, payload: bytes = b""
    ) -> None:
        header = struct.pack(">IHHQQI", nbd.NBD_REQUEST_MAGIC, flags, command, handle, offset, length)
        self.sock.sendall(header + payload)

    def reply(self, read_length: int = 0) -> tuple[int, int, bytes]:
        """(error, handle, data); data is read only for a successful read of ``read_length``."""
        magic, error, handle = struct.unpack(">IIQ", self.recv(16))
        assert magic == nbd.NBD_SIMPLE_REPLY_MAGIC
        return error, handle, self.recv(read_length) if not error and read_length else b""

    def read(self, offset: int, length: int) -> bytes:
        self.send_request(nbd.NBD_CMD_READ, 7, offset, length)
        error, handle, data = self.reply(length)
        assert (error, handle) == (0, 7)
        return data

    def close(self) -> None:
        self.sock.close()


def socket_of(uri: str) -> str:
    return uri.split("socket=", 1)[1]


def open_clients(kind: type[RawClient]) -> Iterator[Callable[[str], RawClient]]:
    """A fixture's body: opens raw clients of ``kind`` to an export's URI; all are closed afterwards."""
    clients: list[RawClient] = []

    def open_client(uri: str) -> RawClient:
        clients.append(kind(socket_of(uri)))
        return clients[-1]

    yield open_client
    for raw in clients:
        raw.close()


@pytest.fixture
def connect() -> Iterator[Callable[[str], RawClient]]:
    """Opens raw clients to an export's URI; all are closed afterwards."""
    yield from open_clients(RawClient)
    

def test_hostile_requests_get_errors_and_others_keep_working(serve, image, connect):
    content = image.read_bytes()
    door, uri = serve(image)
    bad, good = connect(uri), connect(uri)
    assert bad.go() == (IMAGE_SIZE, door.transmission_flags)
    good.go()
    assert good.read(0, 4096) == content[:4096]

    bad.send_request(nbd.NBD_CMD_READ, 1, IMAGE_SIZE - 512, 1024)
    assert bad.reply() == (nbd.NBD_EINVAL, 1, b"")
    bad.send_request(nbd.NBD_CMD_READ, 2, 0, nbd.MAX_REQUEST_LEN + 1)
    assert bad.reply() == (nbd.NBD_EINVAL, 2, b"")
    bad.send_request(99, 3, 0, 0)
    assert bad.reply() == (nbd.NBD_EINVAL, 3, b"")
    bad.send_request(nbd.NBD_CMD_READ, 4, 0, 512, flags=nbd.NBD_CMD_FLAG_NO_HOLE)
    assert bad.reply() == (nbd.NBD_EINVAL, 4, b"")
    bad.send_request(nbd.NBD_CMD_WRITE, 5, IMAGE_SIZE - 512, 1024, payload=b"\xee" * 1024)
    assert bad.reply() == (nbd.NBD_ENOSPC, 5, b"")
    bad.send_request(nbd.NBD_CMD_WRITE_ZEROES, 6, IMAGE_SIZE, 1)
    assert bad.reply() == (nbd.NBD_ENOSPC, 6, b"")
    bad.send_request(nbd.NBD_CMD_TRIM, 8, 2**64 - 1, 2**32 - 1)
    assert bad.reply() == (nbd.NBD_EINVAL, 8, b"")
    # the refused write's payload was skipped: the stream is still in step
    assert bad.read(IMAGE_SIZE - 512, 512) == content[-512:]

    bad.sock.sendall(b"\x00" * 28)
    assert bad.is_closed()
    assert good.read(4096, 4096) == content[4096:8192]
    assert image.read_bytes() == content


def test_oversized_write_is_refused_and_closes(serve, image, connect):
    content = image.read_bytes()
    door, uri = serve(image)
    bad, good = connect(uri), connect(uri)
    bad.go()
    good.go()
    bad.send_request(nbd.NBD_CMD_WRITE, 1, 0, nbd.MAX_REQUEST_LEN + 1, payload=b"\xee" * 4096)
    assert bad.reply() == (nbd.NBD_EINVAL, 1, b"")
    assert bad.is_closed()
    assert good.read(0, 8192) == content[:8192]
    assert image.read_bytes() == content


def test_handshake_violations_close_the_connection(serve, image, connect):
    door, uri = serve(image)
    unknown_flags = connect(uri)
    unknown_flags.greeting()
    unknown_flags.sock.sendall(struct.pack(">I", 0x80))
    assert unknown_flags.is_closed()

    bad_option_magic = connect(uri)
    bad_option_magic.greeting()
    bad_option_magic.sock.sendall(struct.pack(">I", 1) + b"NOTMAGIC" + bytes(8))
    assert bad_option_magic.is_closed()

    huge_option = connect(uri)
    huge_option.greeting()
    huge_option.sock.sendall(struct.pack(">I", 1))
    huge_option.sock.sendall(struct.pack(">QII", nbd.NBD_OPTS_MAGIC, nbd.NBD_OPT_GO, 2**31))
    assert huge_option.is_closed()

    unknown_export = connect(uri)
    unknown_export.greeting()
    unknown_export.sock.sendall(struct.pack(">I", 1))
    unknown_export.option(nbd.NBD_OPT_EXPORT_NAME, b"nosuch")
    assert unknown_export.is_closed()

    assert client("nbdinfo", "--size", uri).stdout.strip() == str(IMAGE_SIZE)


def test_option_haggling(serve, image, connect):
    door, uri = serve(image, export_name="disk0")
    raw = connect(uri)
    assert raw.greeting() == nbd.NBD_FLAG_FIXED_NEWSTYLE | nbd.NBD_FLAG_NO_ZEROES
    raw.sock.sendall(struct.pack(">I", nbd.NBD_FLAG_C_FIXED_NEWSTYLE))
    raw.option(5)  # STARTTLS
    assert raw.option_reply()[1] == nbd.NBD_REP_ERR_UNSUP
    raw.option(nbd.NBD_OPT_LIST, b"x")
    assert raw.option_reply()[1] == nbd.NBD_REP_ERR_INVALID
    raw.option(nbd.NBD_OPT_LIST)
    assert raw.option_reply() == (nbd.NBD_OPT_LIST, nbd.NBD_REP_SERVER, struct.pack(">I", 5) + b"disk0")
    assert raw.option_reply()[1] == nbd.NBD_REP_ACK
    raw.option(nbd.NBD_OPT_INFO, struct.pack(">I", 5) + b"other" + struct.pack(">H", 0))
    assert raw.option_reply()[1] == nbd.NBD_REP_ERR_UNKNOWN
    raw.option(nbd.NBD_OPT_INFO, struct.pack(">I", 50) + b"disk0")
    assert raw.option_reply()[1] == nbd.NBD_REP_ERR_INVALID
    raw.option(nbd.NBD_OPT_INFO, struct.pack(">I", 5) + b"disk0" + struct.pack(">HH", 1, nbd.NBD_INFO_NAME))
    replies = []
    while not replies or replies[-1][1] != nbd.NBD_REP_ACK:
        replies.append(raw.option_reply())
    infos = {struct.unpack_from(">H", data)[0]: data[2:] for _, kind, data in replies if kind == nbd.NBD_REP_INFO}
    assert infos[nbd.NBD_INFO_EXPORT] == struct.pack(">QH", IMAGE_SIZE, door.transmission_flags)
    assert infos[nbd.NBD_INFO_NAME] == b"disk0"
    raw.option(nbd.NBD_OPT_EXPORT_NAME, b"disk0")
    size, flags = struct.unpack(">QH", raw.recv(10))
    assert (size, flags) == (IMAGE_SIZE, door.transmission_flags)
    assert raw.recv(124) == bytes(124)  # NO_ZEROES was not asked for
    assert len(raw.read(0, 512)) == 512
    raw.send_request(nbd.NBD_CMD_DISC, 0, 0, 0)
    assert raw.is_closed()

    aborted = connect(uri)
    aborted.greeting()
    aborted.sock.sendall(struct.pack(">I", 1))
    aborted.option(nbd.NBD_OPT_ABORT)
    assert aborted.option_reply()[:2] == (nbd.NBD_OPT_ABORT, nbd.NBD_REP_ACK)
    assert aborted.is_closed()


def test_many_requests_in_flight_matched_by_handle(serve, image, connect):
    content = image.read_bytes()
    door, uri = serve(image)
    raw = connect(uri)
    raw.go()
    requests = {handle: (handle * 8192 % (IMAGE_SIZE - 65536), 512 + handle * 100) for handle in range(1, 101)}
    for handle, (offset, length) in requests.items():
        raw.send_request(nbd.NBD_CMD_READ, handle, offset, length)
    raw.send_request(nbd.NBD_CMD_FLUSH, 1000, 0, 0)
    seen = {}
    for _ in range(len(requests) + 1):
        error, handle, _ = raw.reply()
        assert error == 0
        if handle != 1000:
            offset, length = requests[handle]
            seen[handle] = raw.recv(length)
        else:
            seen[handle] = b""
    assert set(seen) == set(requests) | {1000}
    for handle, (offset, length) in requests.items():
        assert seen[handle] == content[offset : offset + length]


def test_socket_is_private_and_a_stale_one_is_replaced(serve, image, tmp_path, run):
    stale = tmp_path / "nbd0.sock"
    leftover = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    leftover.bind(str(stale))
    leftover.close()
    door, uri = serve(image)
    assert stat.S_IMODE(stale.stat().st_mode) == 0o600
    assert client("nbdinfo", "--size", uri).stdout.strip() == str(IMAGE_SIZE)

    backend = BlockBackend(RawFileStore(str(image)), name="again")
    try:
        in_use = NbdFrontDoor(backend, stale)
        with pytest.raises(ListenerError, match="in use"):
            run(in_use.start())
        not_a_socket = tmp_path / "file"
        not_a_socket.write_text("x")
        with pytest.raises(ListenerError, match="not a socket"):
            run(NbdFrontDoor(backend, not_a_socket).start())
    finally:
        backend.close()
    run(door.stop())
    assert not stale.exists()


def test_stop_answers_in_flight_requests_then_closes(serve, image, connect, run):
    content = image.read_bytes()
    door, uri = serve(image)
    raw = connect(uri)
    raw.go()
    assert door.connection_count == 1
    for handle in range(1, 33):
        raw.send_request(nbd.NBD_CMD_READ, handle, 0, 65536)
    deadline = time.monotonic() + 5
    while door.backend.counters().requests < 32 and time.monotonic() < deadline:
        time.sleep(0.001)
    run(door.stop())
    handles = set()
    for _ in range(32):
        error, handle, data = raw.reply(65536)
        assert error == 0 and data == content[:65536]
        handles.add(handle)
    assert handles == set(range(1, 33))
    assert raw.is_closed()
    assert door.connection_count == 0


def test_connections_beyond_the_limit_are_refused(serve, image, connect):
    content = image.read_bytes()
    door, uri = serve(image, max_connections=2)
    first, second = connect(uri), connect(uri)
    first.go()
    second.go()
    third = connect(uri)
    assert third.is_closed()
    assert first.read(0, 512) == content[:512]
    assert second.read(512, 512) == content[512:1024]
    assert door.connection_count == 2


def test_requests_behind_the_handshake_and_cut_anywhere(serve, image, connect):
    """Requests sent in the handshake's own write are served, and so are requests cut at any byte."""
    content = bytearray(image.read_bytes())
    door, uri = serve(image)
    raw = connect(uri)
    raw.greeting()
    small, big = os.urandom(3000), os.urandom(100 * 1024)  # big: received into a kept payload buffer

    def request(command: int, handle: int, offset: int, length: int, payload: bytes = b"") -> bytes:
        return struct.pack(">IHHQQI", nbd.NBD_REQUEST_MAGIC, 0, command, handle, offset, length) + payload

    go = struct.pack(">QII", nbd.NBD_OPTS_MAGIC, nbd.NBD_OPT_GO, 6) + struct.pack(">IH", 0, 0)
    raw.sock.sendall(
        struct.pack(">I", nbd.NBD_FLAG_C_FIXED_NEWSTYLE | nbd.NBD_FLAG_C_NO_ZEROES) + go
        + request(nbd.NBD_CMD_WRITE, 1, 8192, len(small), small) + request(nbd.NBD_CMD_READ, 2, 8000, 4000)
    )
    while raw.option_reply()[1] != nbd.NBD_REP_ACK:
        pass
    replies = replies_by_handle(raw, {1: 0, 2: 4000})
    assert replies[1] == (0, b"") and replies[2][0] == 0
    assert replies[2][1] in (content[8000:12000], bytes(content[8000:8192]) + small + bytes(content[11192:12000]))
    content[8192 : 8192 + len(small)] = small

    stream = (
        request(nbd.NBD_CMD_WRITE, 3, 65536, len(big), big) + request(nbd.NBD_CMD_READ, 4, 65000, 2000)
        + request(nbd.NBD_CMD_WRITE, 5, 100, len(small), small) + request(nbd.NBD_CMD_READ, 6, 0, 4096)
    )
    content[65536 : 65536 + len(big)] = big
    content[100 : 100 + len(small)] = small
    sizes = [1, 2, 3, 5, 7, 28, 29, 4095]  # splits inside headers, at their edges and inside payloads
    position = index = 0
    while position < len(stream):
        raw.sock.sendall(stream[position : position + sizes[index % len(sizes)]])
        position += sizes[index % len(sizes)]
        index += 1
        if index % 64 == 0:
            time.sleep(0.001)  # let the server see the pieces apart
    replies = replies_by_handle(raw, {3: 0, 4: 2000, 5: 0, 6: 4096})
    assert {handle: error for handle, (error, _) in replies.items()} == {3: 0, 4: 0, 5: 0, 6: 0}
    assert image.read_bytes() == bytes(content)
    assert raw.read(65000, 2000) == content[65000:67000] and raw.read(0, 4096) == content[:4096]


def replies_by_handle(raw: RawClient, read_lengths: dict[int, int]) -> dict[int, tuple[int, bytes]]:
    """The replies to the requests of ``read_lengths`` (handle: bytes a read returns), in whatever order they come."""
    replies = {}
    for _ in read_lengths:
        magic, error, handle = struct.unpack(">IIQ", raw.recv(16))
        assert magic == nbd.NBD_SIMPLE_REPLY_MAGIC and handle in read_lengths and handle not in replies
        replies[handle] = (error, raw.recv(read_lengths[handle]) if not error else b"")
    return replies


def test_a_client_that_reads_no_replies_is_not_read_from_until_it_does(serve, image, connect):
    """Replies the client does not take stop the reading of its requests; when it reads, all come, in step."""
    content = image.read_bytes()
    door, uri = serve(image)
    raw = connect(uri)
    raw.go()
    count, length = 400, 60 * 1024  # 24 MiB of replies: far beyond the socket and the 4 MiB of held replies
    offsets = [(handle * 40960) % (IMAGE_SIZE - length) for handle in range(count)]
    sent = threading.Event()

    def send_all() -> None:
        raw.sock.sendall(b"".join(
            struct.pack(">IHHQQI", nbd.NBD_REQUEST_MAGIC, 0, nbd.NBD_CMD_READ, handle, offsets[handle], length)
            for handle in range(count)
        ))
        sent.set()

    sender = threading.Thread(target=send_all, daemon=True)
    sender.start()
    time.sleep(1.0)
    started = door.backend.counters().requests
    assert started < count, "every request was read although no reply was taken"
    time.sleep(0.5)
    assert door.backend.counters().requests == started  # still paused: nothing more is read
    for expected in range(count):
        error, handle, data = raw.reply(length)
        assert (error, handle) == (0, expected) and data == content[offsets[handle] : offsets[handle] + length]
    sender.join(10)
    assert sent.is_set() and door.backend.counters().requests == count
