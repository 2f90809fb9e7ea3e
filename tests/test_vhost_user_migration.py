"""vhost-user live migration with the Python front end: dirty-page logging and a second connection."""

from __future__ import annotations

import logging
import mmap
import os
import struct

import pytest

from pvcore.devices.block import create_block_device
from pvcore.devices.block.virtio_blk import REQUEST_HEADER, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN
from pvcore.devices.net.switch import Switch
from pvcore.devices.net.virtio_net import VirtioNet
from pvcore.devices.rng import create_rng_device
from pvcore.ring.dirtylog import LOG_PAGE_SIZE, DirtyLog
from pvcore.ring.fdmemory import sealed_memfd
from pvcore.ring.virtqueue import ring_sizes
from pvcore.testing.vhost_user_frontend import FrontendError, VhostUserFrontend
from pvcore.transports.vhost_user import OFFERED_PROTOCOL_FEATURES
from pvcore.transports.vhost_user.protocol import (
    F_LOG_ALL,
    VRING_F_LOG,
    LogDesc,
    ProtocolFeature,
    Request,
    VringAddr,
    encode_addr,
    encode_log,
)
from pvcore.virtio import bit
from tests.test_net import MAC_A, MAC_B, RecordingPort, frame
from tests.test_vhost_user import EchoDevice, primitives, serving, wait_until  # noqa: F401  (fixture)

RAM = 16 << 20
LOG_BYTES = RAM // LOG_PAGE_SIZE // 8


class Log:
    """The front end's side of a dirty log: a sealed memfd it reads and clears."""

    def __init__(self, size: int = LOG_BYTES, offset: int = 0) -> None:
        self.fd = sealed_memfd("dirty-log", size + offset)
        self.size, self.offset = size, offset
        self.map = mmap.mmap(self.fd, size + offset)

    def pages(self) -> set[int]:
        bits = int.from_bytes(self.map[self.offset : self.offset + self.size], "little")
        return {n for n in range(self.size * 8) if bits >> n & 1}

    def clear(self) -> None:
        self.map[self.offset : self.offset + self.size] = bytes(self.size)

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)


def pages_of(addr: int, length: int) -> set[int]:
    return set(range(addr // LOG_PAGE_SIZE, (addr + length - 1) // LOG_PAGE_SIZE + 1))


def used_ring_pages(frontend: VhostUserFrontend, index: int = 0) -> set[int]:
    queue = frontend.queues[index]
    return pages_of(queue.used_addr, ring_sizes(queue.size)[2])


def test_logging_is_offered():
    assert OFFERED_PROTOCOL_FEATURES & bit(ProtocolFeature.LOG_SHMFD)


def test_dirty_log_marks_exactly_what_the_block_engine_wrote(loop_thread, primitives, tmp_path):
    image = tmp_path / "disk.img"
    content = os.urandom(1 << 20)
    image.write_bytes(content)
    backend, device = create_block_device({"path": str(image)}, name="disk0")
    log = Log()
    try:
        with serving(loop_thread, primitives, device, tmp_path / "blk.sock"):
            with VhostUserFrontend.connect(tmp_path / "blk.sock", ram_size=RAM) as frontend:
                frontend.start(queue_size=16)
                assert frontend.get_features() & bit(F_LOG_ALL)
                # logging off: nothing is marked
                frontend.set_log_base(log.fd, log.size)
                frontend.request(0, [REQUEST_HEADER.pack(VIRTIO_BLK_T_IN, 0, 0)], [4096, 1])
                assert log.pages() == set()
                frontend.set_logging(True)
                log.clear()
                # a read spanning three pages: data, status byte, used element and index
                head = frontend.submit(0, [REQUEST_HEADER.pack(VIRTIO_BLK_T_IN, 0, 8)], [3 * 4096 + 512, 1])
                writable = list(frontend.queues[0]._posted[head].writable)
                used = frontend.wait_used(0, 1)[0]
                assert used.data[-1] == VIRTIO_BLK_S_OK and used.data[:-1] == content[4096 : 4096 + 3 * 4096 + 512]
                expected = set().union(*(pages_of(a, n) for a, n in writable)) | used_ring_pages(frontend)
                assert log.pages() == expected
                readable_pages = pages_of(frontend.queues[0].desc_addr, 16 * 16)
                assert not readable_pages & log.pages() - used_ring_pages(frontend)
                # GET_VRING_BASE (the switch-over) answers where the ring stopped, everything marked before
                log.clear()
                heads = [frontend.submit(0, [REQUEST_HEADER.pack(VIRTIO_BLK_T_IN, 0, 8 * n)], [4096, 1])
                         for n in range(4)]
                posted = [list(frontend.queues[0]._posted[h].writable) for h in heads]
                frontend.wait_used(0, 4)
                assert frontend.get_vring_base(0) == 6
                expected = set().union(*(pages_of(a, n) for w in posted for a, n in w)) | used_ring_pages(frontend)
                assert log.pages() == expected
    finally:
        log.close()
        backend.close()


def test_dirty_log_marks_generic_queue_writes_and_stops_when_off(loop_thread, primitives, tmp_path):
    log = Log()
    try:
        with serving(loop_thread, primitives, EchoDevice(queues=2), tmp_path / "echo.sock"):
            with VhostUserFrontend.connect(tmp_path / "echo.sock", ram_size=RAM) as frontend:
                frontend.start(queue_size=8)
                frontend.start_logging(log.fd, log.size)
                head = frontend.submit(1, [b"x" * 5000], [8192])
                writable = frontend.queues[1]._posted[head].writable
                assert frontend.wait_used(1, 1)[0].written == 5000
                (addr, _), = writable
                assert log.pages() == pages_of(addr, 5000) | used_ring_pages(frontend, 1)
                assert not pages_of(addr + 5000, 8192 - 5000) - pages_of(addr, 5000) & log.pages()
                frontend.set_logging(False)
                log.clear()
                frontend.request(0, [b"quiet"], [5])
                assert log.pages() == set()
    finally:
        log.close()


def test_dirty_log_marks_rng_entropy(loop_thread, primitives, tmp_path):
    log = Log()
    try:
        with serving(loop_thread, primitives, create_rng_device({}, name="rng0"), tmp_path / "rng.sock"):
            with VhostUserFrontend.connect(tmp_path / "rng.sock", ram_size=RAM) as frontend:
                frontend.start(queue_size=8)
                frontend.start_logging(log.fd, log.size)
                head = frontend.submit(0, [], [6000])
                (addr, length), = frontend.queues[0]._posted[head].writable
                used = frontend.wait_used(0, 1)[0]
                assert used.written == 6000
                assert log.pages() == pages_of(addr, 6000) | used_ring_pages(frontend)
    finally:
        log.close()


@pytest.mark.parametrize("case", ["log too small", "log past its file", "ring log outside memory",
                                  "log while rings run too small", "unsealed log"])
def test_hostile_log_fails_only_that_connection(case, loop_thread, primitives, tmp_path, caplog):
    path = tmp_path / "h.sock"
    device = EchoDevice(queues=1)
    log = Log()
    with serving(loop_thread, primitives, device, path) as door:
        with VhostUserFrontend.connect(path, ram_size=RAM) as good:
            good.start(queue_size=8)
            with VhostUserFrontend.connect(path, ram_size=RAM, timeout=3.0) as bad:
                bad.start(queue_size=8)
                with caplog.at_level(logging.WARNING, logger="pvcore.vhost_user"):
                    with pytest.raises((FrontendError, OSError)):
                        if case == "log too small":
                            bad.set_log_base(log.fd, LOG_BYTES // 2)
                        elif case == "log past its file":
                            bad.send(Request.SET_LOG_BASE, encode_log(LogDesc(LOG_BYTES, 4096)), [log.fd])
                            bad.receive()
                        elif case == "ring log outside memory":
                            bad.set_log_base(log.fd, log.size)
                            queue = bad.queues[0]
                            bad.call(Request.SET_VRING_ADDR, encode_addr(VringAddr(
                                0, VRING_F_LOG, bad.user_addr(queue.desc_addr), bad.user_addr(queue.used_addr),
                                bad.user_addr(queue.avail_addr), RAM + 4096)))
                        elif case == "log while rings run too small":
                            bad.start_logging(log.fd, log.size)
                            assert bad.request(0, [b"ab"], [2]).data == b"ba"
                            bad.set_log_base(log.fd, 8)
                        else:
                            fd = os.memfd_create("unsealed")
                            os.ftruncate(fd, LOG_BYTES)
                            try:
                                bad.set_log_base(fd, LOG_BYTES)
                            finally:
                                os.close(fd)
                        bad.get_features()
                    wait_until(lambda: door.connections == 2 and len(door.live) == 1)
                warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
                assert len(warnings) == 1 and "protocol error" in warnings[0].getMessage(), warnings
            assert good.request(0, [b"still"], [5]).data == b"llits"
    log.close()
    assert device.resets == 1


def test_a_second_connection_beside_the_first_and_a_third_refused(loop_thread, primitives, tmp_path, caplog):
    path = tmp_path / "two.sock"
    device = EchoDevice(queues=1)
    with serving(loop_thread, primitives, device, path) as door:
        first = VhostUserFrontend.connect(path)
        first.start(queue_size=8)
        assert first.request(0, [b"one"], [3]).data == b"eno"
        with VhostUserFrontend.connect(path) as second:
            second.start(queue_size=8)
            assert second.request(0, [b"two"], [3]).data == b"owt"
            with caplog.at_level(logging.WARNING, logger="pvcore.vhost_user"):
                with VhostUserFrontend.connect(path, timeout=2.0) as third:
                    with pytest.raises((FrontendError, ConnectionError)):
                        third.get_features()
            assert "refused a frontend" in caplog.text and "the limit is 2" in caplog.text
            assert first.request(0, [b"still"], [5]).data == b"llits"
            # the source stops its ring for the switch-over and goes away: the destination keeps running
            assert first.get_vring_base(0) == 2
            first.close()
            wait_until(lambda: len(door.live) == 1)
            assert device.resets == 0
            assert second.request(0, [b"after"], [5]).data == b"retfa"
        wait_until(lambda: not door.live)
    assert device.resets == 1


def test_garbage_second_connection_never_disturbs_the_first(loop_thread, primitives, tmp_path, caplog):
    path = tmp_path / "g.sock"
    device = EchoDevice(queues=1)
    with serving(loop_thread, primitives, device, path) as door:
        with VhostUserFrontend.connect(path) as first:
            first.start(queue_size=8)
            with caplog.at_level(logging.WARNING, logger="pvcore.vhost_user"):
                with VhostUserFrontend.connect(path, timeout=2.0) as garbage:
                    garbage.sock.sendall(struct.pack("=III", 999, 1, 0) + os.urandom(64))
                    wait_until(lambda: door.connections == 2 and len(door.live) == 1)
            warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
            assert len(warnings) == 1 and "unknown request 999" in warnings[0].getMessage()
            assert device.resets == 0
            assert first.request(0, [b"fine"], [4]).data == b"enif"


def test_dirty_log_bounds():
    fd = sealed_memfd("log", 4096)
    try:
        log = DirtyLog(fd, 16, 0)
        log.mark(0, 1)
        log.mark(127 * 4096, 4096)
        with pytest.raises(Exception, match="past the dirty log"):
            log.mark(128 * 4096, 1)
        log.mark(4096 * 3 + 100, 4096 * 20)
        view = mmap.mmap(fd, 4096)
        bits = int.from_bytes(view[:16], "little")
        assert {n for n in range(128) if bits >> n & 1} == {0, 127} | set(range(3, 24))
        view.close()
        log.close()
        with pytest.raises(Exception, match="past the dirty log"):
            log.mark(0, 1)
    finally:
        os.close(fd)


def test_net_frames_go_to_the_connection_whose_receive_queue_runs(loop_thread, primitives, tmp_path):
    switch = Switch("mig")
    device = VirtioNet(name="nic", mac=MAC_A, switch=switch)
    peer = RecordingPort("peer", MAC_B)
    switch.attach(peer)
    log = Log()

    def inject(payload: bytes) -> None:
        loop_thread.call(peer.send, frame(MAC_A, MAC_B, payload))

    path = tmp_path / "net.sock"
    try:
        with serving(loop_thread, primitives, device, path) as door:
            source = VhostUserFrontend.connect(path, ram_size=RAM)
            source.start(queue_size=8)
            source.start_logging(log.fd, log.size)
            head = source.submit(0, [], [2048])
            (addr, _), = source.queues[0]._posted[head].writable
            source.submit(0, [], [2048])
            inject(b"to the source")
            got = source.wait_used(0, 1)[0]
            assert got.data.endswith(b"to the source")
            assert log.pages() == pages_of(addr, got.written) | used_ring_pages(source)
            # the destination connects beside it; its receive queue takes over when it starts
            with VhostUserFrontend.connect(path, ram_size=RAM) as destination:
                destination.start(queue_size=8)
                destination.submit(0, [], [2048])
                handed_back = source.wait_used(0, 1)[0]
                assert handed_back.written == 0
                inject(b"to the destination")
                assert destination.wait_used(0, 1)[0].data.endswith(b"to the destination")
                assert source.get_vring_base(0) == 2
                source.close()
                wait_until(lambda: len(door.live) == 1)
                destination.submit(0, [], [2048])
                inject(b"after the source left")
                assert destination.wait_used(0, 1)[0].data.endswith(b"after the source left")
    finally:
        log.close()
        device.close()
