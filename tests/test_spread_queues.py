"""A vhost-user disk's queues spread over the workers (``spread=on,queues=2`` under ``--workers 2``): a real
``pvcore serve`` and the Python vhost-user front end. Queue 0 is served by the worker the connection was
handed to, queue 1 by the other; one disk, one dirty log, notifiers followed, and a worker's death ends
only that connection, which the front end opens again."""

from __future__ import annotations

import hashlib
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pvcore.devices.block.virtio_blk import REQUEST_HEADER, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT
from pvcore.testing.guest import Guest, build_initramfs, fetch_kernel, result_line
from pvcore.testing.guest.attach import plugin_qemu_args
from pvcore.testing.serve_process import ServeProcess
from pvcore.testing.vhost_user_frontend import FrontendError, VhostUserFrontend
from pvcore.transports.vhost_user.protocol import Request, encode_u64
from tests.test_vhost_user_migration import RAM, Log, pages_of, used_ring_pages
from tests.test_guest_harness import GUEST_LIMIT
from tests.test_spread import two_workers_serve
from tests.test_workers import listed, wait_for

SECTOR = 512
DISK = 1 << 20


def write(frontend: VhostUserFrontend, queue: int, sector: int, data: bytes) -> None:
    used = frontend.request(queue, [REQUEST_HEADER.pack(VIRTIO_BLK_T_OUT, 0, sector), data], [1])
    assert used.data == bytes([VIRTIO_BLK_S_OK])


def read(frontend: VhostUserFrontend, queue: int, sector: int, length: int = SECTOR) -> bytes:
    used = frontend.request(queue, [REQUEST_HEADER.pack(VIRTIO_BLK_T_IN, 0, sector)], [length, 1])
    assert used.data[-1:] == bytes([VIRTIO_BLK_S_OK])
    return used.data[:-1]


def worker_pids(parent: int) -> dict[str, int]:
    """The workers of ``parent`` by name (their process names are ``pvcore-wN``)."""
    children = [int(pid) for task in Path(f"/proc/{parent}/task").iterdir()
                for pid in (task / "children").read_text().split()]
    names = {}
    for pid in children:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
        if comm.startswith("pvcore-w"):
            names[comm.removeprefix("pvcore-")] = pid
    return names


def roles(daemon: ServeProcess, start: int = 0) -> tuple[str, str]:
    """(leader, host) of the latest connection since log offset ``start``: who took it, who serves queue 1."""
    text = daemon.text()[start:]
    (leader, host), *_ = reversed(re.findall(r"pvcore\[(w\d)\] pvcore\.vhost_user: vhost-user d: queue 1 served by worker (w\d)", text))
    assert re.search(rf"pvcore\[{host}\] pvcore\.vhost_user: vhost-user d \(queues of another worker's connection\): "
                     r"queue 1 started here", text), text[-3000:]
    return leader, host


@pytest.fixture
def spread_disk(tmp_path: Path):
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(DISK))
    daemon = ServeProcess(
        two_workers_serve(tmp_path, "kvm", f"block:name=d,path={image},socket={tmp_path / 'd.sock'},queues=2,spread=on"),
        tmp_path / "serve.log",
    )
    daemon.start()
    yield daemon, image, tmp_path / "d.sock"
    daemon.terminate()


def test_two_queues_on_two_workers_one_disk_one_log_and_a_call_fd_switched(tmp_path, spread_disk) -> None:
    daemon, image, sock = spread_disk
    log = Log()
    with VhostUserFrontend.connect(sock, ram_size=RAM, timeout=30.0) as frontend:
        frontend.start(num_queues=2, queue_size=32, inflight=True)
        leader, host = roles(daemon)
        assert leader != host
        for queue in (0, 1):
            for n in range(4):
                write(frontend, queue, 64 * queue + n, bytes([16 * queue + n + 1]) * SECTOR)
        for queue in (0, 1):  # each queue reads what the other worker wrote
            for n in range(4):
                assert read(frontend, 1 - queue, 64 * queue + n) == bytes([16 * queue + n + 1]) * SECTOR
        content = image.read_bytes()
        assert content[64 * SECTOR : 65 * SECTOR] == bytes([17]) * SECTOR and content[:SECTOR] == bytes([1]) * SECTOR

        (device,) = listed(tmp_path).values()  # listed once: both workers' rings counted
        assert device["worker"] in ("w0,w1", "w1,w0") and device["counters"]["completions"] == 16, device

        frontend.start_logging(log.fd, log.size)  # a migration starts: SET_LOG_BASE, LOG_ALL, VRING_F_LOG on running rings
        log.clear()
        head = frontend.submit(1, [REQUEST_HEADER.pack(VIRTIO_BLK_T_IN, 0, 64)], [2 * 4096, 1])
        writable = list(frontend.queues[1]._posted[head].writable)
        used = frontend.wait_used(1, 1)[0]
        assert used.data[:SECTOR] == bytes([17]) * SECTOR
        assert log.pages() == set().union(*(pages_of(a, n) for a, n in writable)) | used_ring_pages(frontend, 1)

        new_call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)  # the front end moves queue 1's interrupt
        frontend.call(Request.SET_VRING_CALL, encode_u64(1), [new_call])
        os.close(frontend.calls[1])
        frontend.calls[1] = new_call
        frontend.submit(1, [REQUEST_HEADER.pack(VIRTIO_BLK_T_IN, 0, 0)], [SECTOR, 1])
        assert select.select([new_call], [], [], 20)[0], "no interrupt on queue 1's new call fd"
        assert frontend.wait_used(1, 1)[0].data[:SECTOR] == bytes([1]) * SECTOR

        assert frontend.get_vring_base(1) == 4 + 4 + 1 + 1  # stopped on its worker: where it stopped
        assert frontend.get_vring_base(0) == 4 + 4
    log.close()
    text = daemon.text()
    assert re.search(rf"pvcore\[{host}\] .*queue 1 stopped here at 10", text), text[-3000:]
    wait_for(lambda: "queues hosted here ended" in daemon.text(), "the host to end its queues")


def test_a_dead_host_ends_the_connection_which_comes_back_spread_again(tmp_path, spread_disk) -> None:
    daemon, image, sock = spread_disk
    with VhostUserFrontend.connect(sock, ram_size=RAM, timeout=30.0) as frontend:
        frontend.start(num_queues=2, queue_size=32, inflight=True)
        leader, host = roles(daemon)
        write(frontend, 1, 8, b"\x5a" * SECTOR)
        os.kill(worker_pids(daemon.proc.pid)[host], signal.SIGKILL)
        wait_for(lambda: "the worker hosting queues went away" in daemon.text(), "the leader to see its host go")
        with pytest.raises((FrontendError, OSError)):  # the leader ended the connection
            for _ in range(3):
                frontend.get_queue_num()
        wait_for(lambda: set(worker_pids(daemon.proc.pid)) == {"w0", "w1"}
                 and all(entry.get("state", "served") == "served" for entry in listed(tmp_path).values())
                 and daemon.text().count("serving the connections and queues handed") >= 3,
                 "the killed worker to serve again")
        mark = len(daemon.text())
        again = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        again.connect(os.fspath(sock))
        frontend.reconnect(again)  # QEMU's reconnect: same RAM and rings, bases at the used indexes
        assert read(frontend, 0, 8) == b"\x5a" * SECTOR
        write(frontend, 1, 9, b"\xa5" * SECTOR)
        assert read(frontend, 0, 9) == b"\xa5" * SECTOR
        assert len(set(roles(daemon, mark))) == 2
    assert image.read_bytes()[8 * SECTOR : 10 * SECTOR] == b"\x5a" * SECTOR + b"\xa5" * SECTOR


@pytest.mark.parametrize("bad", [0, 1])
def test_a_ring_broken_on_either_worker_stops_the_whole_device(spread_disk, bad) -> None:
    """As without spreading: a bad head on one queue signals every queue's error fd and stops them all."""
    daemon, image, sock = spread_disk
    with VhostUserFrontend.connect(sock, ram_size=RAM, timeout=30.0) as frontend:
        frontend.start(num_queues=2, queue_size=32)
        write(frontend, 1 - bad, 1, b"\x11" * SECTOR)
        frontend.queues[bad].post_head(200)  # past the descriptor table
        os.eventfd_write(frontend.kicks[bad], 1)
        wait_for(lambda: frontend.error_signalled(0) and frontend.error_signalled(1), "both error fds")
        wait_for(lambda: daemon.text().count("device needs reset") >= 2, "both workers to stop their queues")
        frontend.submit(1 - bad, [REQUEST_HEADER.pack(VIRTIO_BLK_T_OUT, 0, 2), b"\x22" * SECTOR], [1])
        with pytest.raises(FrontendError, match="0 of 1 chains used"):
            frontend.wait_used(1 - bad, 1, timeout=3)
    assert image.read_bytes()[SECTOR : 3 * SECTOR] == b"\x11" * SECTOR + bytes(SECTOR)
    assert "device needs reset" in daemon.text()


def test_a_reset_right_after_a_broken_ring_serves_both_queues_again(spread_disk) -> None:
    """RESET_DEVICE sent at once after a ring broke on the hosting worker (the host's notice then reaches the
    leader during the reset): the reset device serves on both workers, round after round."""
    daemon, image, sock = spread_disk
    for round_ in range(6):
        with VhostUserFrontend.connect(sock, ram_size=RAM, timeout=30.0) as frontend:
            frontend.start(num_queues=2, queue_size=32)
            write(frontend, 1, 2, b"\x22" * SECTOR)
            frontend.queues[1].post_head(200)
            os.eventfd_write(frontend.kicks[1], 1)
            frontend.call(Request.RESET_DEVICE)
            frontend.start(num_queues=2, queue_size=32)
            write(frontend, 0, 3, bytes([round_ + 1]) * SECTOR)
            write(frontend, 1, 4, bytes([round_ + 1]) * SECTOR)
    assert image.read_bytes()[3 * SECTOR : 5 * SECTOR] == bytes([6]) * (2 * SECTOR)


def test_a_one_queue_disk_needs_no_other_worker_and_refuses_a_media_swap(tmp_path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(DISK))
    sock = tmp_path / "d.sock"
    daemon = ServeProcess(
        two_workers_serve(tmp_path, "kvm", f"block:name=d,path={image},socket={sock},spread=on"), tmp_path / "serve.log",
    )
    daemon.start()
    try:
        with VhostUserFrontend.connect(sock, ram_size=RAM, timeout=30.0) as frontend:
            frontend.start(num_queues=1, queue_size=32)
            write(frontend, 0, 3, b"\x33" * SECTOR)
            (leader,) = re.findall(r"pvcore\[(w\d)\] pvcore\.vhost_user: vhost-user d: frontend connected", daemon.text())
            other = next(name for name in worker_pids(daemon.proc.pid) if name != leader)
            os.kill(worker_pids(daemon.proc.pid)[other], signal.SIGKILL)  # serves none of its queues
            wait_for(lambda: f"worker {other} (d) ended with signal 9" in daemon.text(), "the parent to see it")
            write(frontend, 0, 4, b"\x44" * SECTOR)
            assert read(frontend, 0, 3) == b"\x33" * SECTOR
            swap = subprocess.run([sys.executable, "-m", "pvcore.cli", "ctl", "--run-dir", str(tmp_path / "run"),
                                   "swap-media", "d", str(image)], capture_output=True, text=True, timeout=60)
            assert swap.returncode != 0 and "queues are spread over the workers" in swap.stderr, swap.stderr
    finally:
        daemon.terminate()
    assert "went away" not in daemon.text()


@pytest.mark.parametrize(("extra", "message"), [
    (",socket-mode=client", "spread=on needs the daemon to listen"),
    ("", "spread=on needs socket=PATH"),
])
def test_spread_queues_need_a_listening_socket(tmp_path, extra, message) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(DISK))
    socket_option = f",socket={tmp_path / 'd.sock'}" if extra else ""
    started = time.monotonic()
    done = subprocess.run(
        two_workers_serve(tmp_path, "kvm", f"block:name=d,path={image},queues=2,spread=on{socket_option}{extra}"),
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode != 0 and message in done.stderr, done.stderr[-3000:]
    assert time.monotonic() - started < 100


GUEST_SCRIPT = "\n".join([
    result_line("mq", "ls /sys/block/vda/mq"),
    result_line("md5_cpu0", "taskset 1 dd if=/dev/vda bs=64k iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1"),
    result_line("md5_cpu1", "taskset 2 dd if=/dev/vda bs=64k iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1"),
    "taskset 1 dd if=/dev/vda of=/dev/vda bs=64k count=8 seek=32 iflag=direct oflag=direct conv=fsync 2>/dev/null",
    "taskset 2 dd if=/dev/vda of=/dev/vda bs=64k count=8 skip=8 seek=48 iflag=direct oflag=direct conv=fsync 2>/dev/null",
    result_line("written", "echo done"),
])


@pytest.mark.guest
def test_a_real_two_cpu_guest_drives_both_queues_on_two_workers(tmp_path) -> None:
    """A Debian kernel with 2 vCPUs: each CPU's requests go to its own queue, each queue to its own worker."""
    kernel = fetch_kernel("x86_64")
    image = tmp_path / "disk.img"
    content = os.urandom(4 << 20)
    image.write_bytes(content)
    device = f"block:name=d,path={image},socket={tmp_path / 'd.sock'},queues=2,spread=on"
    daemon = ServeProcess(
        two_workers_serve(tmp_path, "kvm", device), tmp_path / "serve.log",
    )
    daemon.start()
    try:
        (arguments,) = plugin_qemu_args("kvm", [device]).values()
        initrd = build_initramfs(kernel, GUEST_SCRIPT, ["virtio_blk"], tmp_path)
        with Guest(kernel, initrd, arguments, smp=2, name="spread", max_runtime=GUEST_LIMIT + 30) as guest:
            result = guest.wait(GUEST_LIMIT)
        result.check()
    finally:
        daemon.terminate()
    found = result.results
    assert found["mq"] == "0 1", result.output[-2000:]
    digest = hashlib.md5(content).hexdigest()
    assert found["md5_cpu0"] == found["md5_cpu1"] == digest and found["written"] == "done"
    after = image.read_bytes()
    assert after[2 << 20 : (2 << 20) + (512 << 10)] == content[: 512 << 10]
    assert after[3 << 20 : (3 << 20) + (512 << 10)] == content[512 << 10 : 1 << 20]
    text = daemon.text()
    leader, host = roles(daemon)
    stopped = [int(n) for n in re.findall(rf"pvcore\[{host}\] .*queue 1 stopped here at (\d+)", text)]
    assert stopped and max(stopped) > 8, text[-3000:]  # the second CPU's reads and writes went to the other worker
