"""pvcore.streams.chardev: a console reached as QEMU's chardev socket (the kvm plugin's console door)."""

from __future__ import annotations

import os
import socket
import stat
import time
from collections.abc import Callable

import pytest

from pvcore.devices.console.stream import ConsoleStream
from pvcore.streams.chardev import ChardevFrontDoor
from pvcore.testing.guest import Guest, build_initramfs, fetch_kernel, plugin_qemu_args, result_line


class Person:
    """An attached console user that records what it is shown."""

    def __init__(self) -> None:
        self.shown = bytearray()

    def deliver(self, data: bytes) -> None:
        self.shown += data

    def hangup(self, reason: str) -> None:
        self.shown += reason.encode()


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


def qemu_side(path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.connect(os.fspath(path))
    return sock


def test_bytes_flow_both_ways_and_qemu_may_reconnect(loop_thread, tmp_path):
    stream = ConsoleStream("con0")
    person = Person()
    path = tmp_path / "con0.sock"
    door = ChardevFrontDoor(stream, path)
    loop_thread.run(door.start())
    try:
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
        assert loop_thread.call(stream.attach, person)
        for round_ in range(2):
            qemu = qemu_side(path)
            wait_until(lambda: door.connected)
            said = b"guest says %d\n" % round_
            qemu.sendall(said)
            wait_until(lambda said=said: said in stream.scrollback.snapshot())
            assert said in person.shown
            assert loop_thread.call(stream.input, person, b"typed\n")
            assert qemu.recv(100) == b"typed\n"
            qemu.close()
            wait_until(lambda: not door.connected)
        assert door.connections == 2
        loop_thread.call(stream.input, person, b"nobody listens")
        assert door.input_dropped == len(b"nobody listens")
    finally:
        loop_thread.run(door.stop())
    assert not path.exists()
    assert stream.on_input is None


def test_second_connection_is_refused(loop_thread, tmp_path, caplog):
    stream = ConsoleStream("con1")
    path = tmp_path / "con1.sock"
    door = ChardevFrontDoor(stream, path)
    loop_thread.run(door.start())
    try:
        first = qemu_side(path)
        wait_until(lambda: door.connected)
        second = qemu_side(path)
        assert second.recv(10) == b""
        assert "refused a second chardev connection" in caplog.text
        first.sendall(b"first still works")
        wait_until(lambda: stream.scrollback.snapshot() == b"first still works")
        first.close()
        second.close()
    finally:
        loop_thread.run(door.stop())


def test_input_for_a_qemu_that_does_not_read_is_dropped(loop_thread, tmp_path):
    stream = ConsoleStream("con2")
    path = tmp_path / "con2.sock"
    door = ChardevFrontDoor(stream, path, input_buffer=4096)
    loop_thread.run(door.start())
    try:
        qemu = qemu_side(path)
        wait_until(lambda: door.connected)
        for _ in range(256):
            loop_thread.call(stream.on_input, bytes(4096))
        assert door.input_dropped > 0
        qemu.close()
    finally:
        loop_thread.run(door.stop())


@pytest.mark.guest
def test_real_guest_console_through_qemu_chardev(loop_thread, tmp_path):
    stream = ConsoleStream("vm-console")
    person = Person()
    path = tmp_path / "hvc.sock"
    door = ChardevFrontDoor(stream, path)
    loop_thread.run(door.start())
    assert loop_thread.call(stream.attach, person)
    kernel = fetch_kernel("x86_64")
    script = "\n".join(
        [
            # virtio-serial adds the port when QEMU's PORT_ADD message arrives, after insmod returned
            "i=0; while [ ! -c /dev/hvc0 ] && [ $i -lt 300 ]; do usleep 100000; i=$((i + 1)); done",
            "exec 3<>/dev/hvc0",  # keep the port open: a closed console drops input
            "stty raw -echo <&3",
            # QEMU drops what the guest writes while its chardev socket is not connected
            # (a reconnecting chardev connects in the background): say it until answered.
            "(while true; do echo PVCORE-CONSOLE-OUT >&3; sleep 1; done) & writer=$!",
            result_line("typed", "head -c 6 <&3"),
            "kill $writer",
        ]
    )
    initramfs = build_initramfs(kernel, script, ["virtio_console"], tmp_path)
    (qemu_args,) = plugin_qemu_args("kvm", [f"console:socket={path},name=vm-console"]).values()
    try:
        with Guest(kernel, initramfs, qemu_args, name="kvm-chardev", max_runtime=180) as guest:
            try:
                wait_until(lambda: b"PVCORE-CONSOLE-OUT" in stream.scrollback.snapshot(), timeout=120)
            except AssertionError:
                raise AssertionError(
                    f"no console output through the chardev (QEMU connected: {door.connected}); "
                    f"guest serial tail:\n{guest.output[-3000:]}\nQEMU stderr:\n{guest.stderr[-2000:]}"
                ) from None
            assert loop_thread.call(stream.input, person, b"hello\n")
            result = guest.wait(170)
    finally:
        loop_thread.run(door.stop())
    assert b"PVCORE-CONSOLE-OUT" in person.shown
    assert result.results.get("typed") == "hello", result.output[-2000:]
    assert result.returncode == 0
