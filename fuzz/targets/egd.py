"""The EGD front door (QEMU rng-egd's protocol) fed a hostile client's byte stream.

Two domains' doors run on the loop, each on its own entropy source. Every
input goes to domain A's door; then domain B's door must still answer a
blocking read. Checked: A's reply is exactly what a reference model of the
protocol expects for the input (lengths per command, stopping at the first
unsupported command or the end of a command's arguments); no 8-byte run of
B's entropy appears in A's reply (no byte given to two domains); no fd,
task or thread leaks.
"""

from __future__ import annotations

import struct
import tempfile
from pathlib import Path

from fuzz.harness import Baseline, InvariantError, loop_thread, send_and_drain
from pvcore.devices.rng import EntropySource
from pvcore.streams.egd import EgdFrontDoor

_state: dict[str, object] = {}


def expected_reply(data: bytes) -> list[tuple[str, int]]:
    """The replies an EGD server owes for ``data``: ("level", 4), ("nb", max N), ("read", N) in order."""
    replies, at = [], 0
    while at < len(data):
        command = data[at]
        if command == 0:
            replies.append(("level", 4))
            at += 1
        elif command in (1, 2):
            if at + 1 >= len(data):
                break
            replies.append(("nb" if command == 1 else "read", data[at + 1]))
            at += 2
        elif command == 3:
            if at + 4 > len(data):
                break
            length = data[at + 3]
            if at + 4 + length > len(data):
                break
            at += 4 + length
        else:
            break
    return replies


def _check_reply(data: bytes, reply: bytes) -> None:
    at = 0
    for kind, size in expected_reply(data):
        if kind == "nb":
            if at >= len(reply):
                raise InvariantError(f"non-blocking read of {size}: no length byte (reply {len(reply)} bytes)")
            given = reply[at]
            if given > size:
                raise InvariantError(f"non-blocking read of {size} answered with {given} bytes")
            at += 1 + given
        else:
            at += size
    if at != len(reply):
        raise InvariantError(f"reply of {len(reply)} bytes, the protocol gives {at} for this input")


def setup() -> None:
    """Two domains' EGD doors on the fuzz loop."""
    directory = Path(tempfile.mkdtemp(prefix="pvcore-fuzz-egd-"))
    doors = []
    for domain in ("a", "b"):
        door = EgdFrontDoor(EntropySource(f"dom-{domain}"), directory / f"{domain}.sock")
        loop_thread().run(door.start())
        doors.append(door)
    _state["doors"] = doors
    send_and_drain(doors[1].socket_path, b"\x02\x08")
    _state["baseline"] = Baseline()


def one_input(data: bytes) -> None:
    """Send one client stream to domain A, then read from domain B."""
    door_a, door_b = _state["doors"]
    reply = send_and_drain(door_a.socket_path, data)
    _check_reply(data, reply)
    other = send_and_drain(door_b.socket_path, b"\x02\x20")
    if len(other) != 32:
        raise InvariantError(f"domain B's door answered a 32-byte read with {len(other)} bytes after the input")
    for start in range(0, 25):
        if other[start:start + 8] in reply:
            raise InvariantError("an 8-byte run of domain B's entropy was also given to domain A")
    _state["baseline"].check()


def seeds() -> dict[str, bytes]:
    """QEMU rng-egd's requests (blocking reads of up to 64 bytes) and the other commands."""
    return {
        "qemu": b"\x02\x40" * 4,
        "all": b"\x00" + b"\x01\x10" + b"\x02\x20" + b"\x03" + struct.pack(">H", 64) + b"\x08" + b"x" * 8,
        "refused": b"\x02\x04\x04",
    }
