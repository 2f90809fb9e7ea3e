"""The NBD front door's option haggling and transmission phase (simple and structured replies, block status),
fed a hostile client's byte stream.

Two exports run on the loop: A read-write over a 64 KiB file, B read-only
over another. The first input byte picks the door (even: A, odd: B); the
rest is the client's whole stream. Checked after each input: both backing
files keep their size (nothing written past the export), B's content is
unchanged (read-only means it), B still serves a well-behaved client a
read, and no fd, task or thread leaks.
"""

from __future__ import annotations

import hashlib
import os
import struct
import tempfile
from pathlib import Path

from fuzz.harness import Baseline, InvariantError, loop_thread, send_and_drain
from pvcore.devices.block import create_block_device
from pvcore.streams.nbd import (
    BASE_ALLOCATION,
    NBD_CMD_BLOCK_STATUS,
    NBD_CMD_DISC,
    NBD_CMD_FLAG_DF,
    NBD_CMD_FLAG_REQ_ONE,
    NBD_CMD_FLUSH,
    NBD_CMD_READ,
    NBD_CMD_TRIM,
    NBD_CMD_WRITE,
    NBD_CMD_WRITE_ZEROES,
    NBD_FLAG_C_FIXED_NEWSTYLE,
    NBD_FLAG_C_NO_ZEROES,
    NBD_OPT_EXPORT_NAME,
    NBD_OPT_GO,
    NBD_OPT_INFO,
    NBD_OPT_LIST,
    NBD_OPT_LIST_META_CONTEXT,
    NBD_OPT_SET_META_CONTEXT,
    NBD_OPT_STRUCTURED_REPLY,
    NBD_OPTS_MAGIC,
    NBD_REQUEST_MAGIC,
    NBD_SIMPLE_REPLY_MAGIC,
    NbdFrontDoor,
)

SIZE = 64 * 1024
_state: dict[str, object] = {}


def _option(option: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", NBD_OPTS_MAGIC, option, len(data)) + data


def _request(command: int, handle: int, offset: int, length: int, flags: int = 0, data: bytes = b"") -> bytes:
    return struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, flags, command, handle, offset, length) + data


def good_session() -> bytes:
    """A well-behaved client: fixed newstyle, EXPORT_NAME "", read 512 bytes at 4096, disconnect."""
    flags = struct.pack(">I", NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES)
    return flags + _option(NBD_OPT_EXPORT_NAME) + _request(NBD_CMD_READ, 7, 4096, 512) + _request(NBD_CMD_DISC, 8, 0, 0)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def setup() -> None:
    """Two exports over two files on the fuzz loop."""
    directory = Path(tempfile.mkdtemp(prefix="pvcore-fuzz-nbd-"))
    doors, files = [], []
    for name, readonly in (("a", False), ("b", True)):
        image = directory / f"{name}.img"
        image.write_bytes(os.urandom(SIZE))
        backend, _device = create_block_device({"path": str(image)}, name=f"fuzz-{name}")
        door = NbdFrontDoor(backend, directory / f"{name}.sock", readonly=readonly)
        loop_thread().run(door.start())
        doors.append(door)
        files.append(image)
    _state.update(doors=doors, files=files, b_digest=_digest(files[1]), b_block=files[1].read_bytes()[4096:4608])
    _keeps_serving()
    _state["baseline"] = Baseline()


def _keeps_serving() -> None:
    reply = send_and_drain(_state["doors"][1].socket_path, good_session())
    expected = struct.pack(">IIQ", NBD_SIMPLE_REPLY_MAGIC, 0, 7) + _state["b_block"]
    if expected not in reply:
        raise InvariantError("the read-only export no longer serves a well-behaved client's read")


def one_input(data: bytes) -> None:
    """Send one client stream to the chosen door, then check both exports."""
    if not data:
        return
    doors, files = _state["doors"], _state["files"]
    send_and_drain(doors[data[0] % 2].socket_path, data[1:])
    for image in files:
        if image.stat().st_size != SIZE:
            raise InvariantError(f"{image.name} is {image.stat().st_size} bytes after the input, the export is {SIZE}")
    if _digest(files[1]) != _state["b_digest"]:
        raise InvariantError("the read-only export's backing file changed")
    _keeps_serving()
    _state["baseline"].check()


def seeds() -> dict[str, bytes]:
    """Client streams in the shapes nbdinfo, nbdcopy and qemu-nbd clients send (see fuzz/seeds.py for captured ones)."""
    flags = struct.pack(">I", NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES)
    info = struct.pack(">I", 0) + struct.pack(">H", 2) + struct.pack(">HH", 0, 3)
    meta = struct.pack(">II", 0, 1) + struct.pack(">I", len(BASE_ALLOCATION)) + BASE_ALLOCATION
    return {
        "read": b"\0" + good_session(),
        "haggle": b"\0" + flags + _option(NBD_OPT_STRUCTURED_REPLY) + _option(NBD_OPT_LIST) + _option(NBD_OPT_INFO, info)
        + _option(NBD_OPT_GO, info) + _request(NBD_CMD_WRITE, 1, 512, 8, data=b"pvcore!!")
        + _request(NBD_CMD_FLUSH, 2, 0, 0) + _request(NBD_CMD_TRIM, 3, 0, 4096)
        + _request(NBD_CMD_WRITE_ZEROES, 4, 8192, 4096) + _request(NBD_CMD_DISC, 5, 0, 0),
        "structured-block-status": b"\1" + flags + _option(NBD_OPT_STRUCTURED_REPLY)
        + _option(NBD_OPT_LIST_META_CONTEXT, meta[:4] + struct.pack(">I", 0))
        + _option(NBD_OPT_SET_META_CONTEXT, meta) + _option(NBD_OPT_GO, info)
        + _request(NBD_CMD_BLOCK_STATUS, 1, 0, SIZE)
        + _request(NBD_CMD_BLOCK_STATUS, 2, 512, 4096, NBD_CMD_FLAG_REQ_ONE)
        + _request(NBD_CMD_READ, 3, 0, 8192, NBD_CMD_FLAG_DF) + _request(NBD_CMD_READ, 4, 4096, 512)
        + _request(NBD_CMD_DISC, 5, 0, 0),
        "readonly-write": b"\1" + flags + _option(NBD_OPT_EXPORT_NAME) + _request(NBD_CMD_WRITE, 1, 0, 4, data=b"evil"),
    }
