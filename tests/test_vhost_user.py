"""The vhost-user front door against the Python frontend: data path, ring control, reconnects, hostile messages."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import logging
import os
import socket
import stat
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pvcore.devices.block import create_block_device
from pvcore.devices.block.virtio_blk import (
    REQUEST_HEADER,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
)
from pvcore.primitives import HypervisorPrimitives
from pvcore.ring.fdmemory import sealed_memfd
from pvcore.ring.inflight import queue_region_size
from pvcore.ring.session import RunningQueue
from pvcore.ring.virtqueue import DescriptorChain
from pvcore.testing.vhost_user_frontend import FrontendError, VhostUserFrontend
from pvcore.transports.vhost_user import OFFERED_PROTOCOL_FEATURES, VhostUserConnection, VhostUserFrontDoor
from pvcore.transports.vhost_user.protocol import (
    F_PROTOCOL_FEATURES,
    HEADER,
    VERSION,
    VRING_NOFD,
    InflightDesc,
    MemoryTable,
    ProtocolFeature,
    RegionDesc,
    Request,
    VringAddr,
    VringState,
    encode_addr,
    encode_inflight,
    encode_memory,
    encode_state,
    encode_u64,
)
from pvcore.virtio import VirtioDevice

CONFIG = b"pvcore echo config"


class EchoDevice(VirtioDevice):
    """Answers every chain with its readable bytes reversed."""

    device_id = 0x7F

    def __init__(self, queues: int = 2) -> None:
        self.queues = queues
        self.resets = 0
        self.handled = 0
        self.config_writes: list[tuple[int, bytes]] = []

    def num_queues(self) -> int:
        return self.queues

    def config(self) -> bytes:
        return CONFIG

    def write_config(self, offset: int, data: bytes) -> None:
        self.config_writes.append((offset, data))

    def handle(self, queue: RunningQueue, chain: DescriptorChain) -> None:
        self.handled += 1
        queue.complete(chain, queue.write(chain, queue.read(chain)[::-1]))

    def reset(self) -> None:
        self.resets += 1


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


def open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


@pytest.fixture
def primitives() -> HypervisorPrimitives:
    """No hypervisor: the core's defaults map the memfd memory and adopt the eventfds, as for any VMM."""
    return HypervisorPrimitives()


@contextlib.contextmanager
def serving(loop_thread, primitives, device: VirtioDevice, path: Path, **kwargs) -> Iterator[VhostUserFrontDoor]:
    door = VhostUserFrontDoor(device, path, primitives=primitives, name=path.stem, **kwargs)
    loop_thread.run(door.start())
    try:
        yield door
    finally:
        loop_thread.run(door.stop())


def idle(door: VhostUserFrontDoor) -> bool:
    return door.connection is None


def test_echo_round_trip_and_config(loop_thread, primitives, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="pvcore.vhost_user")
    device = EchoDevice(queues=2)
    with serving(loop_thread, primitives, device, tmp_path / "echo.sock") as door:
        with VhostUserFrontend.connect(tmp_path / "echo.sock") as frontend:
            assert frontend.get_features() & (1 << F_PROTOCOL_FEATURES)
            frontend.start(queue_size=64)
            assert frontend.protocol_features == OFFERED_PROTOCOL_FEATURES & frontend.protocol_features
            assert frontend.get_queue_num() == 2
            for index in (0, 1):
                used = frontend.request(index, [b"hello ", b"vhost"], [32])
                assert used.data == b"tsohv olleh" and used.written == 11
            used = frontend.request(0, [b"indirect"], [4, 4], indirect=True)
            assert used.data == b"tceridni"
            assert frontend.get_config(0, len(CONFIG)) == CONFIG
            assert frontend.get_config(6, 40) == CONFIG[6:].ljust(40, b"\0")
            frontend.call(Request.SET_CONFIG, struct.pack("=III", 2, 3, 0) + b"abc")
            assert device.config_writes == [(2, b"abc")]
            session = door.connection.session
            assert sorted(session.running) == [0, 1]
        wait_until(lambda: idle(door))
    assert device.handled == 3 and device.resets == 1
    assert "vhost-user echo: frontend connected (connection 1)" in caplog.text
    assert "frontend closed the connection; queue 0: 2 completions, 2 interrupts; queue 1: 1 completions" in caplog.text


def test_rings_start_disabled_until_enabled(loop_thread, primitives, tmp_path):
    device = EchoDevice(queues=1)
    with serving(loop_thread, primitives, device, tmp_path / "e.sock") as door:
        with VhostUserFrontend.connect(tmp_path / "e.sock") as frontend:
            offered = frontend.get_features()
            frontend.call(Request.SET_FEATURES, encode_u64(offered))
            frontend.features = offered
            frontend.set_mem_table()
            frontend.setup_queue(0, 16)
            frontend.submit(0, [b"ab"], [2])
            with pytest.raises(FrontendError, match="before the timeout"):
                frontend.wait_used(0, 1, timeout=0.3)
            assert door.connection.session.running == {}
            frontend.enable_queue(0)
            assert frontend.wait_used(0, 1)[0].data == b"ba"


def test_without_protocol_features_rings_are_enabled(loop_thread, primitives, tmp_path):
    with serving(loop_thread, primitives, EchoDevice(queues=1), tmp_path / "e.sock"):
        with VhostUserFrontend.connect(tmp_path / "e.sock") as frontend:
            offered = frontend.get_features() & ~(1 << F_PROTOCOL_FEATURES)
            frontend.features = offered
            frontend.call(Request.SET_FEATURES, encode_u64(offered))
            frontend.set_mem_table()
            frontend.setup_queue(0, 8)
            assert frontend.request(0, [b"xyz"], [3]).data == b"zyx"


def test_get_vring_base_stops_and_resumes(loop_thread, primitives, tmp_path):
    device = EchoDevice(queues=1)
    with serving(loop_thread, primitives, device, tmp_path / "b.sock") as door:
        with VhostUserFrontend.connect(tmp_path / "b.sock") as frontend:
            frontend.start(queue_size=16)
            for n in range(5):
                frontend.request(0, [bytes([n])], [1])
            assert frontend.get_vring_base(0) == 5
            assert 0 not in door.connection.session.running
            frontend.submit(0, [b"late"], [4])
            with pytest.raises(FrontendError):
                frontend.wait_used(0, 1, timeout=0.3)
            assert device.handled == 5
            frontend.setup_queue(0, 16, base=5)
            frontend.enable_queue(0)
            assert frontend.request(0, [b"again"], [5]).data == b"niaga"
            assert frontend.get_vring_base(0) == 6


def test_reset_owner_and_reset_device(loop_thread, primitives, tmp_path):
    device = EchoDevice(queues=1)
    with serving(loop_thread, primitives, device, tmp_path / "r.sock") as door:
        with VhostUserFrontend.connect(tmp_path / "r.sock") as frontend:
            frontend.start(queue_size=8)
            frontend.request(0, [b"1"], [1])
            frontend.call(Request.RESET_OWNER)
            assert door.connection.session.running == {}
            frontend.call(Request.RESET_DEVICE)
            assert device.resets == 1
            frontend.start(queue_size=8)
            assert frontend.request(0, [b"12"], [2]).data == b"21"


def test_reconnect_gets_a_fresh_session(loop_thread, primitives, tmp_path):
    device = EchoDevice(queues=1)
    path = tmp_path / "re.sock"
    with serving(loop_thread, primitives, device, path) as door:
        for round_ in range(3):
            with VhostUserFrontend.connect(path) as frontend:
                frontend.start(queue_size=8)
                assert frontend.request(0, [b"ok%d" % round_], [3]).data == b"%dko" % round_
            wait_until(lambda: idle(door))
        assert door.connections == 3
    assert device.resets == 3


def test_third_concurrent_frontend_is_refused(loop_thread, primitives, tmp_path, caplog):
    """Two front ends at once (a migration's source and destination); a third is refused."""
    path = tmp_path / "one.sock"
    with serving(loop_thread, primitives, EchoDevice(queues=1), path):
        with VhostUserFrontend.connect(path) as first, VhostUserFrontend.connect(path) as second:
            first.start(queue_size=8)
            second.start(queue_size=8)
            with caplog.at_level(logging.WARNING, logger="pvcore.vhost_user"):
                with VhostUserFrontend.connect(path, timeout=2.0) as third:
                    with pytest.raises((FrontendError, ConnectionError)):
                        third.get_features()
            assert "refused a frontend" in caplog.text
            assert first.request(0, [b"still"], [5]).data == b"llits"
            assert second.request(0, [b"too"], [3]).data == b"oot"


def test_server_socket_file(loop_thread, primitives, tmp_path):
    path = tmp_path / "mode.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(os.fspath(path))
    stale.close()
    with serving(loop_thread, primitives, EchoDevice(queues=1), path) as door:
        info = os.lstat(path)
        assert stat.S_ISSOCK(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600
        assert door.description == f"vhost-user server socket {path}"
    assert not path.exists()


def test_client_mode_connects_and_reconnects(loop_thread, primitives, tmp_path):
    path = tmp_path / "qemu.sock"
    device = EchoDevice(queues=1)
    with serving(loop_thread, primitives, device, path, client=True, retry_interval=0.05) as door:
        time.sleep(0.1)  # the door is retrying: nobody listens yet
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(os.fspath(path))
        listener.listen(1)
        try:
            for round_ in range(2):
                with VhostUserFrontend.accept(listener) as frontend:
                    frontend.start(queue_size=8)
                    assert frontend.request(0, [b"client"], [6]).data == b"tneilc"
                wait_until(lambda expected=round_ + 1: device.resets == expected)
        finally:
            listener.close()
        assert door.connections >= 2


def test_accept_failure_is_logged_and_retried(loop_thread, primitives, tmp_path, monkeypatch, caplog):
    path = tmp_path / "emfile.sock"
    failures = [OSError(errno.EMFILE, "Too many open files")]
    accept = loop_thread.loop.sock_accept

    async def failing_once(sock: socket.socket):
        if failures:
            raise failures.pop()
        return await accept(sock)

    monkeypatch.setattr(loop_thread.loop, "sock_accept", failing_once)
    with caplog.at_level(logging.WARNING, logger="pvcore.vhost_user"):
        with serving(loop_thread, primitives, EchoDevice(queues=1), path, retry_interval=0.05):
            with VhostUserFrontend.connect(path, timeout=2.0) as frontend:
                frontend.start(queue_size=8)
                assert frontend.request(0, [b"again"], [5]).data == b"niaga"
    assert not failures and "Too many open files" in caplog.text
    assert not path.exists()


def test_stop_after_a_failed_accept_task_still_removes_the_socket(loop_thread, primitives, tmp_path, monkeypatch,
                                                                   caplog):
    path = tmp_path / "broken.sock"

    async def broken(sock: socket.socket):
        raise RuntimeError("accept bug")

    monkeypatch.setattr(loop_thread.loop, "sock_accept", broken)
    door = VhostUserFrontDoor(EchoDevice(queues=1), path, primitives=primitives, name="broken")
    loop_thread.run(door.start())
    wait_until(lambda: door._task.done())
    with caplog.at_level(logging.ERROR, logger="pvcore.vhost_user"):
        loop_thread.run(door.stop())
    assert "accept bug" in caplog.text
    assert not path.exists()


def test_client_mode_retries_after_any_connect_error(loop_thread, primitives, tmp_path, caplog):
    parent = tmp_path / "later"
    parent.write_bytes(b"")  # a file where the socket's directory should be: ENOTDIR, not ENOENT
    path = parent / "qemu.sock"
    with caplog.at_level(logging.INFO, logger="pvcore.vhost_user"):
        with serving(loop_thread, primitives, EchoDevice(queues=1), path, client=True, retry_interval=0.05):
            wait_until(lambda: "Not a directory" in caplog.text)
            parent.unlink()
            parent.mkdir()
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(os.fspath(path))
            listener.listen(1)
            try:
                with VhostUserFrontend.accept(listener) as frontend:
                    frontend.start(queue_size=8)
                    assert frontend.request(0, [b"late"], [4]).data == b"etal"
            finally:
                listener.close()
    assert caplog.text.count("Not a directory") == 1


def test_client_mode_backs_off_when_the_frontend_hangs_up_at_once(loop_thread, primitives, tmp_path):
    """Each wait between attempts is at least twice the one before (0.05, 0.1, 0.2, 0.4 s...).

    Only lower bounds are checked, so a slow machine cannot fail it; a door that
    did not back off would come back after the first interval every time.
    """
    path = tmp_path / "slam.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(os.fspath(path))
    listener.listen(8)
    listener.settimeout(30.0)
    attempts: list[float] = []
    try:
        with serving(loop_thread, primitives, EchoDevice(queues=1), path, client=True, retry_interval=0.05):
            while len(attempts) < 5:
                sock, _ = listener.accept()
                attempts.append(time.monotonic())
                sock.close()
    finally:
        listener.close()
    gaps = [later - earlier for earlier, later in zip(attempts, attempts[1:])]
    for number, gap in enumerate(gaps):
        assert gap >= 0.9 * 0.05 * 2**number, f"attempt gaps {gaps} do not double"


def _end_session_failing_once(monkeypatch, *, hold: float = 0.0) -> list[str]:
    """Make the first connection's clean-up raise (after ``hold`` seconds); returns the failures raised."""
    raised: list[str] = []
    end_session = VhostUserConnection._end_session

    async def failing(self):
        await end_session(self)
        if not raised:
            await asyncio.sleep(hold)
            raised.append(self.name)
            raise RuntimeError("clean-up bug")

    monkeypatch.setattr(VhostUserConnection, "_end_session", failing)
    return raised


def test_a_failed_connection_never_stops_the_listener(loop_thread, primitives, tmp_path, monkeypatch, caplog):
    path = tmp_path / "listener.sock"
    raised = _end_session_failing_once(monkeypatch, hold=0.5)
    with caplog.at_level(logging.ERROR, logger="pvcore.vhost_user"):
        with serving(loop_thread, primitives, EchoDevice(queues=1), path) as door:
            with VhostUserFrontend.connect(path) as first:
                first.start(queue_size=8)
            # The next frontend arrives while the first one's clean-up is still running, then fails.
            with VhostUserFrontend.connect(path, timeout=10.0) as second:
                second.start(queue_size=8)
                assert second.request(0, [b"second"], [6]).data == b"dnoces"
            wait_until(lambda: idle(door))
            with VhostUserFrontend.connect(path, timeout=10.0) as third:
                third.start(queue_size=8)
                assert third.request(0, [b"third"], [5]).data == b"driht"
    assert raised and "clean-up bug" in caplog.text


def test_client_mode_reconnects_after_a_failed_connection(loop_thread, primitives, tmp_path, monkeypatch):
    path = tmp_path / "qemu.sock"
    raised = _end_session_failing_once(monkeypatch)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(os.fspath(path))
    listener.listen(1)
    try:
        with serving(loop_thread, primitives, EchoDevice(queues=1), path, client=True, retry_interval=0.05):
            for round_ in range(2):
                with VhostUserFrontend.accept(listener, timeout=30.0) as frontend:
                    frontend.start(queue_size=8)
                    assert frontend.request(0, [b"client"], [6]).data == b"tneilc"
    finally:
        listener.close()
    assert raised


def test_block_engine_read_write_flush(loop_thread, primitives, tmp_path):
    image = tmp_path / "disk.img"
    content = os.urandom(1 << 20)
    image.write_bytes(content)
    backend, device = create_block_device({"path": str(image)}, name="disk0")
    try:
        with serving(loop_thread, primitives, device, tmp_path / "blk.sock"):
            with VhostUserFrontend.connect(tmp_path / "blk.sock") as frontend:
                frontend.start(queue_size=128)
                config = frontend.get_config(0, 60)
                assert struct.unpack_from("<Q", config)[0] == len(content) // 512
                read = frontend.request(0, [REQUEST_HEADER.pack(VIRTIO_BLK_T_IN, 0, 16)], [8192, 1])
                assert read.written == 8193 and read.data[-1] == VIRTIO_BLK_S_OK
                assert read.data[:8192] == content[16 * 512 : 16 * 512 + 8192]
                fresh = os.urandom(4096)
                write = frontend.request(0, [REQUEST_HEADER.pack(VIRTIO_BLK_T_OUT, 0, 40), fresh], [1])
                assert write.data == bytes([VIRTIO_BLK_S_OK])
                flush = frontend.request(0, [REQUEST_HEADER.pack(VIRTIO_BLK_T_FLUSH, 0, 0)], [1])
                assert flush.data == bytes([VIRTIO_BLK_S_OK])
                back = frontend.request(0, [REQUEST_HEADER.pack(VIRTIO_BLK_T_IN, 0, 40)], [4096, 1])
                assert back.data[:4096] == fresh
                heads = [
                    frontend.submit(0, [REQUEST_HEADER.pack(VIRTIO_BLK_T_IN, 0, 8 * n)], [4096, 1])
                    for n in range(32)
                ]
                used = frontend.wait_used(0, len(heads))
                assert sorted(u.head for u in used) == sorted(heads)
                assert all(u.data[-1] == VIRTIO_BLK_S_OK for u in used)
                assert frontend.get_vring_base(0) == 36
    finally:
        backend.close()
    on_disk = image.read_bytes()
    assert on_disk[40 * 512 : 40 * 512 + 4096] == fresh
    assert hashlib.md5(on_disk[: 40 * 512]).digest() == hashlib.md5(content[: 40 * 512]).digest()


# --- hostile frontends -------------------------------------------------------


def _eventfd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC)


def _send_closing(frontend: VhostUserFrontend, request: int, payload: bytes = b"", fds: list[int] | None = None,
                  flags: int = VERSION) -> None:
    fds = fds or []
    try:
        frontend.send(request, payload, fds, flags=flags)
    finally:
        for fd in fds:
            os.close(fd)


def _pipe_read_end() -> int:
    read_end, write_end = os.pipe()
    os.close(write_end)
    return read_end


def _memfd(size: int) -> int:
    return sealed_memfd("hostile", size)


def _unsealed_memfd(size: int) -> int:
    fd = os.memfd_create("shrinkable", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def _region(frontend: VhostUserFrontend, size: int | None = None, guest: int = 0) -> RegionDesc:
    return RegionDesc(guest, size or frontend.ram.size, frontend.ram.user_addr, 0)


HOSTILE = {
    "wrong size": (lambda f: _send_closing(f, Request.SET_VRING_NUM, b"\0" * 4), "payload of 4 bytes"),
    "missing fd": (lambda f: _send_closing(f, Request.SET_VRING_KICK, encode_u64(0)), "came with 0 fds, needs exactly 1"),
    "extra fd": (lambda f: _send_closing(f, Request.SET_OWNER, b"", [_eventfd()]), "came with 1 fds, needs exactly 0"),
    "two call fds": (
        lambda f: _send_closing(f, Request.SET_VRING_CALL, encode_u64(0), [_eventfd(), _eventfd()]),
        "came with 2 fds, needs exactly 1",
    ),
    "too many fds": (
        lambda f: _send_closing(
            f, Request.SET_MEM_TABLE, encode_memory(MemoryTable((_region(f),))), [_eventfd() for _ in range(9)]
        ),
        "more than 8 fds",
    ),
    "queue index out of range": (
        lambda f: _send_closing(f, Request.SET_VRING_NUM, encode_state(VringState(7, 64))),
        "queue index 7 out of range",
    ),
    "notifier index out of range": (
        lambda f: _send_closing(f, Request.SET_VRING_CALL, encode_u64(5), [_eventfd()]),
        "queue index 5 out of range",
    ),
    "ring outside memory table": (
        lambda f: _send_closing(f, Request.SET_VRING_ADDR, encode_addr(VringAddr(0, 0, 0x1000, 0x2000, 0x3000))),
        "ring address not in the memory table",
    ),
    "unknown request": (lambda f: _send_closing(f, 99), "unknown request 99"),
    "unsupported request": (lambda f: _send_closing(f, Request.POSTCOPY_ADVISE), "not supported"),
    "huge size": (lambda f: f.sock.sendall(HEADER.pack(Request.SET_OWNER, VERSION, 1 << 30)), "exceeds"),
    "bad version": (lambda f: _send_closing(f, Request.SET_OWNER, flags=0x2), "version 2"),
    "kick is not an eventfd": (
        lambda f: _send_closing(f, Request.SET_VRING_KICK, encode_u64(0), [_pipe_read_end()]), "not an eventfd"
    ),
    "kick polling": (lambda f: _send_closing(f, Request.SET_VRING_KICK, encode_u64(VRING_NOFD)), "polling"),
    "region past end of file": (
        lambda f: _send_closing(
            f, Request.SET_MEM_TABLE, encode_memory(MemoryTable((_region(f, size=1 << 20),))), [_memfd(4096)]
        ),
        "past the end",
    ),
    "unsealed guest memory": (
        lambda f: _send_closing(
            f, Request.SET_MEM_TABLE, encode_memory(MemoryTable((_region(f, size=4096),))), [_unsealed_memfd(4096)]
        ),
        "not sealed against shrinking",
    ),
    "overlapping regions": (
        lambda f: _send_closing(
            f,
            Request.SET_MEM_TABLE,
            encode_memory(MemoryTable((RegionDesc(0, 8192, 0x10000, 0), RegionDesc(4096, 8192, 0x40000, 0)))),
            [_memfd(8192), _memfd(8192)],
        ),
        "overlap",
    ),
    "ten regions": (
        lambda f: _send_closing(f, Request.SET_MEM_TABLE, struct.pack("=II", 10, 0) + bytes(320)),
        "10 regions",
    ),
    "protocol feature never offered": (
        lambda f: _send_closing(f, Request.SET_PROTOCOL_FEATURES, encode_u64(1 << ProtocolFeature.BACKEND_REQ)), "never offered"
    ),
    "virtio feature never offered": (
        lambda f: _send_closing(f, Request.SET_FEATURES, encode_u64(1 << 40)), "never offered"
    ),
    "queue size not a power of two": (
        lambda f: _send_closing(f, Request.SET_VRING_NUM, encode_state(VringState(0, 100))), "power of two"
    ),
    "enable value": (lambda f: _send_closing(f, Request.SET_VRING_ENABLE, encode_state(VringState(0, 5))), "not 0 or 1"),
    "truncated header": (lambda f: f.sock.sendall(b"\x03\0\0"), "inside a message header"),
    "inflight for more queues than the device": (
        lambda f: _send_closing(f, Request.GET_INFLIGHT_FD, encode_inflight(InflightDesc(0, 0, 4, 8))),
        "inflight region for 4 queues, the device has 1",
    ),
    "inflight description size": (
        lambda f: _send_closing(f, Request.GET_INFLIGHT_FD, encode_u64(1)), "inflight description of 8 bytes"
    ),
    "inflight region unsealed": (
        lambda f: _send_closing(f, Request.SET_INFLIGHT_FD, encode_inflight(InflightDesc(queue_region_size(8), 0, 1, 8)),
                                [_unsealed_memfd(4096)]),
        "not sealed",
    ),
    "inflight region too small": (
        lambda f: _send_closing(f, Request.SET_INFLIGHT_FD, encode_inflight(InflightDesc(64, 0, 1, 128)),
                                [_memfd(4096)]),
        "cannot hold",
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_message_closes_only_that_connection(case, loop_thread, primitives, tmp_path, caplog):
    send_hostile, reason = HOSTILE[case]
    victim_path, bystander_path = tmp_path / "victim.sock", tmp_path / "bystander.sock"
    with serving(loop_thread, primitives, EchoDevice(queues=1), victim_path) as door, \
            serving(loop_thread, primitives, EchoDevice(queues=1), bystander_path):
        with VhostUserFrontend.connect(bystander_path) as bystander:
            bystander.start(queue_size=8)
            before = open_fds()
            with caplog.at_level(logging.INFO, logger="pvcore.vhost_user"):
                with VhostUserFrontend.connect(victim_path) as hostile:
                    hostile.start(queue_size=8)
                    send_hostile(hostile)
                    if case == "truncated header":
                        hostile.sock.shutdown(socket.SHUT_WR)
                    with pytest.raises((FrontendError, ConnectionError)):
                        hostile.receive()
                wait_until(lambda: idle(door))
            closing = [r for r in caplog.records if "frontend disconnected" in r.getMessage()]
            assert len(closing) == 1 and reason in closing[0].getMessage(), caplog.text
            assert closing[0].levelno == logging.WARNING
            assert open_fds() == before
            with VhostUserFrontend.connect(victim_path) as again:
                again.start(queue_size=8)
                assert again.request(0, [b"fine"], [4]).data == b"enif"
            assert bystander.request(0, [b"unharmed"], [8]).data == b"demrahnu"


def test_nack_before_closing_when_reply_ack_negotiated(loop_thread, primitives, tmp_path):
    with serving(loop_thread, primitives, EchoDevice(queues=1), tmp_path / "n.sock"):
        with VhostUserFrontend.connect(tmp_path / "n.sock") as frontend:
            frontend.start(queue_size=8)
            with pytest.raises(FrontendError, match="refused"):
                frontend.call(Request.SET_VRING_NUM, encode_state(VringState(0, 3)))
            with pytest.raises((FrontendError, ConnectionError)):
                frontend.receive()


def test_broken_ring_signals_the_error_eventfd(loop_thread, primitives, tmp_path):
    with serving(loop_thread, primitives, EchoDevice(queues=1), tmp_path / "err.sock") as door:
        with VhostUserFrontend.connect(tmp_path / "err.sock") as frontend:
            frontend.start(queue_size=8)
            queue = frontend.queues[0]
            queue.post_head(200)
            os.eventfd_write(frontend.kicks[0], 1)
            wait_until(lambda: frontend.error_signalled(0))
            assert "head index 200" in door.connection.session.broken
