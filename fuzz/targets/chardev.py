"""The chardev front door (QEMU ``-chardev socket``): a console's guest output from a hostile QEMU.

Each input is the byte stream a client sends. Checked: the console's
scrollback ends with the input's last bytes (up to its limit, nothing lost
or reordered), stays within its limit, the door takes the next connection,
and no fd, task or thread leaks.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from fuzz.harness import Baseline, InvariantError, loop_thread, send_and_drain
from pvcore.devices.console.stream import ConsoleStream
from pvcore.streams.chardev import ChardevFrontDoor

SCROLLBACK = 4096
_state: dict[str, object] = {}


def setup() -> None:
    """One console stream with a log file, served on the fuzz loop."""
    directory = Path(tempfile.mkdtemp(prefix="pvcore-fuzz-chardev-"))
    stream = ConsoleStream("fuzz", log_path=directory / "console.log", scrollback=SCROLLBACK)
    door = ChardevFrontDoor(stream, directory / "c.sock")
    loop_thread().run(door.start())
    _state.update(stream=stream, door=door)
    send_and_drain(door.socket_path, b"warm-up\n")
    _state["baseline"] = Baseline()


def one_input(data: bytes) -> None:
    """Send one output stream, then check the scrollback."""
    stream, door = _state["stream"], _state["door"]
    send_and_drain(door.socket_path, data)
    held = loop_thread().call(stream.scrollback.snapshot)
    if len(held) > SCROLLBACK:
        raise InvariantError(f"scrollback holds {len(held)} bytes, its limit is {SCROLLBACK}")
    tail = data[-min(len(data), len(held)):] if data else b""
    if data and not held.endswith(tail):
        raise InvariantError("the scrollback does not end with the guest's last output bytes")
    _state["baseline"].check()


def seeds() -> dict[str, bytes]:
    """A Linux guest's boot console output, with escape sequences and a NUL."""
    return {
        "boot": b"[    0.000000] Linux version 6.1.0 (gcc 12)\r\n\x1b[0;32mOK\x1b[0m Started\r\nlogin: ",
        "binary": bytes(range(256)) * 4,
    }
