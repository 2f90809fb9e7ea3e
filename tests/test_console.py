"""The console engine: stream, log, scrollback, attach socket, client, virtio-console over the loopback."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pvcore.devices.console import (
    DETACH_KEY,
    ConsoleAttachError,
    ConsoleAttachPoint,
    ConsoleStream,
    DetachReason,
    Scrollback,
    VirtioConsole,
    attach_console,
    connect_console,
    console_exchange,
    console_socket_path,
    create_console_device,
)
from pvcore.devices.console.virtio import PENDING_INPUT_LIMIT, VIRTIO_CONSOLE_F_EMERG_WRITE, VIRTIO_CONSOLE_F_SIZE
from pvcore.testing.loopback import Loopback
from pvcore.virtio import VIRTIO_ID_CONSOLE, DeviceError, bit

RECEIVEQ, TRANSMITQ = 0, 1
DROP_NOTE = re.compile(rb"\r\n\[pvcore: [0-9]+ bytes of console output dropped here: [^]]*\]\r\n")


class RecordingPeer:
    """A peer that keeps what it is sent."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.hung_up: str | None = None

    def deliver(self, data: bytes) -> None:
        self.received += data

    def hangup(self, reason: str) -> None:
        self.hung_up = reason


def wait_for(condition: Callable[[], Any], timeout: float = 3.0) -> None:
    """Poll ``condition`` until it is true."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(0.005)


# --- engine level ---------------------------------------------------------------------------


def test_scrollback_keeps_the_most_recent_bytes() -> None:
    scrollback = Scrollback(8)
    scrollback.append(b"abc")
    scrollback.append(b"defgh")
    assert scrollback.snapshot() == b"abcdefgh"
    scrollback.append(b"ij")
    assert scrollback.snapshot() == b"cdefghij"
    scrollback.append(b"0123456789xyz")
    assert scrollback.snapshot() == b"56789xyz"
    assert len(scrollback) == 8


def test_stream_output_goes_to_log_scrollback_and_peer(tmp_path: Path) -> None:
    log = tmp_path / "guest.log"
    stream = ConsoleStream("guest", log_path=log, scrollback=16)
    stream.output(b"early boot\r\n")
    peer = RecordingPeer()
    assert stream.attach(peer)
    assert bytes(peer.received) == b"early boot\r\n"
    stream.output(b"login: ")
    assert bytes(peer.received) == b"early boot\r\nlogin: "
    assert stream.scrollback.snapshot() == b"early boot\r\nlogin: "[-16:]
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
    stream.close()
    assert log.read_bytes() == b"early boot\r\nlogin: "
    assert peer.hung_up is not None


def test_stream_accepts_input_only_from_the_attached_peer() -> None:
    stream = ConsoleStream("guest")
    typed: list[bytes] = []
    stream.on_input = typed.append
    stranger, person = RecordingPeer(), RecordingPeer()
    assert not stream.input(stranger, b"nobody attached")
    assert stream.attach(person)
    assert not stream.attach(stranger)
    assert not stream.input(stranger, b"not me")
    assert stream.input(person, b"ls\r")
    stream.detach(stranger)
    assert stream.peer is person
    stream.detach(person)
    assert not stream.input(person, b"after detach")
    assert typed == [b"ls\r"]
    assert stream.input_refused == len(b"nobody attached") + len(b"not me") + len(b"after detach")


def test_log_that_cannot_be_opened_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(DeviceError, match="cannot open log file .*missing/guest.log"):
        ConsoleStream("guest", log_path=tmp_path / "missing" / "guest.log")


def test_factory_validates_options(tmp_path: Path) -> None:
    device = create_console_device({"log": str(tmp_path / "g.log"), "scrollback": "4K"}, name="g", run_dir=tmp_path)
    assert isinstance(device, VirtioConsole)
    assert device.device_id == VIRTIO_ID_CONSOLE
    assert device.stream.scrollback.limit == 4096
    assert device.attach_point is not None
    assert console_socket_path(tmp_path, "g") == tmp_path / "console-g.sock"
    assert device.attach_point.socket_path == str(tmp_path / "console-g.sock")
    device.stream.close()
    bad = [
        ({"speed": "9600"}, "g", "unknown option.*speed"),
        ({"scrollback": "lots"}, "g", "scrollback='lots' is not a size"),
        ({"scrollback": "0"}, "g", "must be between"),
        ({"scrollback": "64G"}, "g", "must be between 1 byte and 16M"),
        ({"scrollback": "64T"}, "t", "is not a size"),
        ({"log": str(tmp_path / "no" / "g.log")}, "g", "cannot open log file"),
        ({}, "../escape", "console name"),
        ({}, "", "console name"),
    ]
    for options, name, message in bad:
        with pytest.raises(DeviceError, match=message):
            create_console_device(options, name=name, run_dir=tmp_path)
    with pytest.raises(DeviceError, match="run directory .* does not exist"):
        create_console_device({}, name="g", run_dir=tmp_path / "nowhere")
    with pytest.raises(DeviceError, match="longer than"):
        create_console_device({}, name="g" * 120, run_dir=tmp_path)


def test_config_space_and_features() -> None:
    plain = VirtioConsole(ConsoleStream("a"))
    assert plain.features() == bit(VIRTIO_CONSOLE_F_EMERG_WRITE)
    assert struct.unpack("<HHII", plain.config()) == (0, 0, 1, 0)
    sized = VirtioConsole(ConsoleStream("b"), cols=132, rows=43)
    assert sized.features() & bit(VIRTIO_CONSOLE_F_SIZE)
    assert struct.unpack("<HHII", sized.config()) == (132, 43, 1, 0)


def test_emergency_write_is_console_output() -> None:
    device = VirtioConsole(ConsoleStream("a"))
    device.write_config(8, struct.pack("<I", ord("!")))
    device.write_config(10, b"\x00\x00")  # not the first byte of emerg_wr
    device.write_config(0, b"\x00" * 8 + b"?\x00\x00\x00")
    assert device.stream.scrollback.snapshot() == b"!?"


# --- through the loopback and the real Unix socket ----------------------------------------


class ConsoleRig:
    """A console device on a loopback, its attach socket listening, its log in ``tmp_path``."""

    def __init__(self, tmp_path: Path, **options: str) -> None:
        self.log = tmp_path / "guest.log"
        self.device = create_console_device({"log": str(self.log), **options}, name="guest", run_dir=tmp_path)
        assert self.device.attach_point is not None
        self.attach_point: ConsoleAttachPoint = self.device.attach_point
        self.socket_path = self.attach_point.socket_path
        self.lb = Loopback(self.device, name="console")
        self.lb.run_in_loop(self.attach_point.start)

    def guest_write(self, data: bytes) -> None:
        used = self.lb.request(TRANSMITQ, [data], [])
        assert used.written == 0

    def in_loop(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.lb.run_in_loop(fn, *args)

    def attached(self) -> bool:
        return bool(self.in_loop(lambda: self.device.stream.peer is not None))

    def close(self) -> None:
        """Close everything (again, harmlessly, if the test closed it already)."""
        if not self.lb.loop.is_closed():
            self.lb.run_in_loop(self.attach_point.close)
        self.lb.close()
        self.device.stream.close()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[ConsoleRig]:
    console = ConsoleRig(tmp_path)
    yield console
    console.close()


def test_output_reaches_the_log_while_nobody_is_attached(rig: ConsoleRig) -> None:
    rig.guest_write(b"Linux version 6.1\r\n")
    rig.guest_write(b"login: ")
    wait_for(lambda: rig.log.read_bytes() == b"Linux version 6.1\r\nlogin: ")
    assert not rig.attached()


def test_socket_is_private(rig: ConsoleRig) -> None:
    assert stat.S_IMODE(os.stat(rig.socket_path).st_mode) == 0o600


def test_scrollback_reaches_a_late_attacher(rig: ConsoleRig) -> None:
    rig.guest_write(b"boot messages\r\n")
    rig.guest_write(b"login: ")
    seen = console_exchange(rig.socket_path, duration=3, until=b"login: ")
    assert seen == b"boot messages\r\nlogin: "


def test_live_output_follows_the_scrollback(rig: ConsoleRig) -> None:
    rig.guest_write(b"old ")
    with connect_console(rig.socket_path) as person:
        wait_for(rig.attached)
        rig.guest_write(b"new")
        person.settimeout(3)
        received = b""
        while not received.endswith(b"new"):
            received += person.recv(100)
    assert received == b"old new"


def test_input_from_the_attached_person_reaches_the_guest(rig: ConsoleRig) -> None:
    head = rig.lb.submit(RECEIVEQ, [], [64])
    with connect_console(rig.socket_path) as person:
        person.sendall(b"root\r")
        (used,) = rig.lb.wait_used(RECEIVEQ, 1, timeout=3)
    assert (used.head, used.data) == (head, b"root\r")


def test_input_waits_for_receive_buffers_and_fills_several(rig: ConsoleRig) -> None:
    with connect_console(rig.socket_path) as person:
        person.sendall(b"0123456789")
        wait_for(lambda: rig.in_loop(lambda: rig.device.stream.bytes_in) == 10)
    rig.lb.submit(RECEIVEQ, [], [4])
    rig.lb.submit(RECEIVEQ, [], [4])
    rig.lb.submit(RECEIVEQ, [], [4])
    used = rig.lb.wait_used(RECEIVEQ, 3, timeout=3)
    assert [u.data for u in used] == [b"0123", b"4567", b"89"]


def test_no_input_reaches_the_guest_without_an_attached_person(rig: ConsoleRig) -> None:
    rig.lb.submit(RECEIVEQ, [], [64])
    stranger = object()
    assert not rig.in_loop(rig.device.stream.input, stranger, b"injected")
    with connect_console(rig.socket_path) as person:
        person.sendall(b"typed")
        (used,) = rig.lb.wait_used(RECEIVEQ, 1, timeout=3)
    assert used.data == b"typed"  # the first bytes the guest reads are the person's, nothing before them


def test_second_attacher_is_refused_and_its_bytes_are_ignored(rig: ConsoleRig) -> None:
    rig.lb.submit(RECEIVEQ, [], [64])
    with connect_console(rig.socket_path) as first:
        wait_for(rig.attached)
        with connect_console(rig.socket_path) as second:
            with contextlib.suppress(BrokenPipeError):  # the refusal may already have closed it
                second.sendall(b"evil")
            second.settimeout(3)
            refusal = b""
            while chunk := second.recv(1000):
                refusal += chunk
        assert b"console guest is already attached elsewhere" in refusal
        first.sendall(b"ok")
        (used,) = rig.lb.wait_used(RECEIVEQ, 1, timeout=3)
        assert used.data == b"ok"
    assert rig.attach_point.refused == 1


def test_detach_and_reattach(rig: ConsoleRig) -> None:
    rig.guest_write(b"hello ")
    assert console_exchange(rig.socket_path, duration=3, until=b"hello ") == b"hello "
    wait_for(lambda: not rig.attached())
    rig.guest_write(b"again")
    assert console_exchange(rig.socket_path, duration=3, until=b"again") == b"hello again"


def test_slow_client_does_not_block_the_guest(rig: ConsoleRig) -> None:
    chunk = bytes(range(256)) * 256  # 64 KiB
    rounds = 64  # 4 MiB, far more than socket buffers and the peer bound together
    with connect_console(rig.socket_path) as sleeper:
        sleeper.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        wait_for(rig.attached)
        for _ in range(rounds):  # each write completes although the person reads nothing
            rig.guest_write(chunk)
        peer = rig.in_loop(lambda: rig.device.stream.peer)
        dropped = rig.in_loop(lambda: peer.dropped)
        queued = rig.in_loop(lambda: peer.writer.transport.get_write_buffer_size())
    assert dropped > rounds * len(chunk) // 2
    assert queued <= peer.limit
    logfile = rig.device.stream.logfile
    rig.close()
    logged = DROP_NOTE.sub(b"", rig.log.read_bytes())
    assert len(logged) + logfile.bytes_dropped == rounds * len(chunk)  # the log is not the person's to lose


def test_reopen_log_after_the_file_was_moved(rig: ConsoleRig) -> None:
    rig.guest_write(b"one ")
    rotated = rig.log.with_name("guest.log.1")
    rig.log.rename(rotated)
    rig.guest_write(b"two ")
    rig.in_loop(rig.device.stream.reopen_log)
    rig.guest_write(b"three")
    wait_for(lambda: rig.log.exists() and rig.log.read_bytes() == b"three")
    assert rotated.read_bytes() == b"one two "


def test_held_receive_buffers_come_back_empty_when_the_queue_stops(rig: ConsoleRig) -> None:
    heads = {rig.lb.submit(RECEIVEQ, [], [16]) for _ in range(3)}
    rig.in_loop(rig.lb.session.stop_queue, RECEIVEQ)
    used = rig.lb.wait_used(RECEIVEQ, 3, timeout=3)
    assert {u.head for u in used} == heads
    assert all(u.written == 0 for u in used)


def test_input_beyond_the_pending_limit_is_dropped(rig: ConsoleRig) -> None:
    rig.in_loop(rig.device.input, b"x" * (PENDING_INPUT_LIMIT + 100))
    assert rig.in_loop(lambda: rig.device.input_dropped) == 100


def test_attach_console_detaches_on_ctrl_bracket(rig: ConsoleRig) -> None:
    rig.lb.submit(RECEIVEQ, [], [64])
    stdin_r, stdin_w = os.pipe()
    stdout_r, stdout_w = os.pipe()
    try:
        os.write(stdin_w, b"uptime\r" + DETACH_KEY + b"never sent")
        assert attach_console(rig.socket_path, stdin_r, stdout_w) is DetachReason.DETACHED
        (used,) = rig.lb.wait_used(RECEIVEQ, 1, timeout=3)
        assert used.data == b"uptime\r"
    finally:
        for fd in (stdin_r, stdin_w, stdout_r, stdout_w):
            os.close(fd)


def test_attach_console_shows_output_and_ends_on_hangup(rig: ConsoleRig) -> None:
    rig.guest_write(b"scrollback ")
    stdin_r, stdin_w = os.pipe()
    stdout_r, stdout_w = os.pipe()
    result: list[DetachReason] = []
    session = threading.Thread(target=lambda: result.append(attach_console(rig.socket_path, stdin_r, stdout_w)))
    session.start()
    try:
        wait_for(rig.attached)
        rig.guest_write(b"live")
        rig.in_loop(rig.attach_point.hangup)
        session.join(timeout=3)
        assert result == [DetachReason.HANGUP]
        os.set_blocking(stdout_r, False)
        shown = os.read(stdout_r, 65536)
        assert shown.startswith(b"scrollback live")
        assert b"disconnected by the daemon" in shown
    finally:
        session.join(timeout=3)
        for fd in (stdin_r, stdin_w, stdout_r, stdout_w):
            os.close(fd)


def test_attach_errors_say_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ConsoleAttachError, match="no such file; is the pvcore daemon running"):
        connect_console(tmp_path / "console-none.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(tmp_path / "console-stale.sock"))
    stale.close()
    with pytest.raises(ConsoleAttachError, match="nobody is listening"):
        connect_console(tmp_path / "console-stale.sock")


def test_stale_socket_is_replaced_and_a_live_one_is_not(rig: ConsoleRig, tmp_path: Path) -> None:
    rival = ConsoleAttachPoint(ConsoleStream("rival"), rig.socket_path)
    with pytest.raises(DeviceError, match="in use by another process"):
        rig.in_loop(rival.start)
    stale_path = tmp_path / "console-stale.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(stale_path))
    stale.close()
    fresh = ConsoleAttachPoint(ConsoleStream("fresh"), stale_path)
    rig.in_loop(fresh.start)
    try:
        rig.in_loop(fresh.stream.output, b"fresh console")
        assert console_exchange(stale_path, duration=3, until=b"console") == b"fresh console"
    finally:
        rig.in_loop(fresh.close)
    assert not stale_path.exists()
    (tmp_path / "plain-file").write_text("not a socket")
    squatter = ConsoleAttachPoint(ConsoleStream("squat"), tmp_path / "plain-file")
    with pytest.raises(DeviceError, match="is not a socket"):
        rig.in_loop(squatter.start)


def test_a_guest_that_never_stops_printing_cannot_fill_the_disk(tmp_path: Path) -> None:
    from pvcore.devices.console import create_console_device

    log_file = tmp_path / "chatty.log"
    device = create_console_device({"log": str(log_file), "log-max": "8K"}, name="chatty", run_dir=tmp_path)
    try:
        for _ in range(100):
            device.stream.output(b"x" * 1000 + b"\n")
    finally:
        device.stream.close()
    assert log_file.stat().st_size <= 8 * 1024
    assert (tmp_path / "chatty.log.1").stat().st_size <= 8 * 1024
    assert log_file.read_bytes().endswith(b"x" * 1000 + b"\n")
    with pytest.raises(DeviceError, match="at least 4K"):
        create_console_device({"log": str(log_file), "log-max": "100"}, name="tiny", run_dir=tmp_path)


def test_a_relative_log_path_is_taken_from_the_current_directory(tmp_path: Path, monkeypatch) -> None:
    """`console:socket=S,log=vm1.log` is the shape users script against."""
    from pvcore.devices.console import create_console_device

    monkeypatch.chdir(tmp_path)
    device = create_console_device({"log": "vm1.log"}, name="vm1-con", run_dir=tmp_path)
    try:
        device.stream.output(b"booted\n")
    finally:
        device.stream.close()
    assert (tmp_path / "vm1.log").read_bytes() == b"booted\n"
    assert device.stream.log_path == str(tmp_path / "vm1.log")
