"""The netdev stream front door (QEMU ``-netdev stream``): length-prefixed frames from a hostile QEMU.

The door's port (MAC A) and a capturing port (MAC B) share a real
:class:`~pvcore.devices.net.switch.Switch`. Each input is the whole byte
stream a client sends. Checked: every frame B receives carries source MAC A
(no frame delivered from a forged source), is one the client sent, and is at
most the longest frame; the door takes a second connection afterwards; no
fd, task or thread leaks.
"""

from __future__ import annotations

import struct
import tempfile
from pathlib import Path

from fuzz.harness import Baseline, InvariantError, loop_thread, send_and_drain
from pvcore.devices.net.switch import MAX_FRAME_LEN, Port, Switch
from pvcore.streams.netdev_stream import NetdevStreamFrontDoor

MAC_A = bytes.fromhex("525400000a0a")
MAC_B = bytes.fromhex("525400000b0b")
_state: dict[str, object] = {}


class CapturePort(Port):
    """A station that keeps every frame the switch gives it."""

    def __init__(self) -> None:
        super().__init__("capture", MAC_B)
        self.frames: list[bytes] = []

    def deliver(self, frame: bytes) -> bool:
        """Keep the frame."""
        self.frames.append(bytes(frame))
        return True


def _frames(data: bytes) -> list[bytes]:
    frames, at = [], 0
    while at + 4 <= len(data):
        (length,) = struct.unpack_from(">I", data, at)
        frames.append(data[at + 4 : at + 4 + length])
        at += 4 + length
    return frames


def setup() -> None:
    """A switch with the door's port and the capture port, on the fuzz loop."""
    switch = Switch("fuzz")
    capture = CapturePort()
    door = NetdevStreamFrontDoor(switch, Path(tempfile.mkdtemp(prefix="pvcore-fuzz-net-")) / "n.sock", MAC_A)

    async def start() -> None:
        switch.attach(capture)
        await door.start()

    loop_thread().run(start())
    _state.update(door=door, capture=capture)
    send_and_drain(door.socket_path, b"")
    _state["baseline"] = Baseline()


def one_input(data: bytes) -> None:
    """Play QEMU for one stream, then check what reached the other station."""
    door, capture = _state["door"], _state["capture"]
    capture.frames.clear()
    send_and_drain(door.socket_path, data)
    sent = _frames(data)
    for frame in loop_thread().call(list, capture.frames):
        if frame[6:12] != MAC_A:
            raise InvariantError(f"frame with source {frame[6:12].hex()} delivered from port {MAC_A.hex()}")
        if len(frame) > MAX_FRAME_LEN or frame not in sent:
            raise InvariantError(f"delivered a {len(frame)}-byte frame the client did not send")
    send_and_drain(door.socket_path, b"")
    _state["baseline"].check()


def _frame(dst: bytes, src: bytes, payload: bytes) -> bytes:
    frame = dst + src + b"\x08\x00" + payload
    return struct.pack(">I", len(frame)) + frame


def seeds() -> dict[str, bytes]:
    """QEMU netdev stream traffic: ARP broadcast, unicast to B, a forged source, a bad length."""
    arp = bytes.fromhex("0001080006040001") + MAC_A + bytes(4) + bytes(6) + bytes(4)
    return {
        "traffic": _frame(b"\xff" * 6, MAC_A, arp) + _frame(MAC_B, MAC_A, b"ping" * 20),
        "forged": _frame(MAC_B, MAC_B, b"spoof") + _frame(MAC_B, bytes.fromhex("020000000001"), b"x"),
        "bad-length": struct.pack(">I", 0) + struct.pack(">I", 1 << 20),
    }
