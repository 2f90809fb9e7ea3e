"""Adaptive polling of the available ring (pvcore.ring.poll): the window, the lost wake-up, kicks saved, CPU bounded."""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from pvcore.ring.poll import DEFAULT_POLL_MAX_NS, POLL_START_NS, PollWindow, parse_poll_max_us
from pvcore.ring.session import RunningQueue, SessionError, VirtioSession
from pvcore.ring.virtqueue import DescriptorChain
from pvcore.testing.loopback import Loopback
from pvcore.testing.vhost_user_frontend import VhostUserFrontend
from pvcore.transports.vhost_user import VhostUserFrontDoor
from pvcore.primitives import HypervisorPrimitives
from pvcore.device_counters import ring_counts
from pvcore.devices.block.virtio_blk import REQUEST_HEADER, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN
from pvcore.testing.serve_process import ServeProcess
from pvcore.virtio import VirtioDevice

LONG_WINDOW_NS = 1_000_000_000
"""A poll-max long enough that a busy test machine's scheduling never decides a test (windows still adapt)."""


class EchoDevice(VirtioDevice):
    """Writes every chain's readable bytes back into its writable buffers."""

    device_id = 0xFFFE

    def num_queues(self) -> int:
        return 1

    def handle(self, queue: RunningQueue, chain: DescriptorChain) -> None:
        queue.complete(chain, queue.write(chain, queue.read(chain)))


class ChainingDevice(EchoDevice):
    """Plays a fast driver too: after answering a request it posts the next, ``count`` in all.

    The next request is posted from the loop's next iteration (while the queue's window is open), and kicked only if
    the driver side sees kicks wanted, as a real driver decides.
    """

    def __init__(self, loopback: Loopback | None, count: int) -> None:
        self.loopback = loopback
        self.count = count
        self.posted = 0
        self.kicks_wanted = 0
        self.done = threading.Event()

    def handle(self, queue: RunningQueue, chain: DescriptorChain) -> None:
        super().handle(queue, chain)
        queue.session.loop.call_soon(self.post_next)

    def post_next(self) -> None:
        if self.posted >= self.count:
            self.done.set()
            return
        assert self.loopback is not None
        self.posted += 1
        driver = self.loopback.queues[0]
        driver.add([b"next"], [4])
        if driver.kick_needed():
            self.kicks_wanted += 1
            self.loopback.kick(0)


def _queue(lb: Loopback) -> RunningQueue:
    return lb.session.running[0]


def _wait(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


def test_the_window_grows_on_what_polling_catches_and_shrinks_when_it_catches_nothing() -> None:
    window = PollWindow(32_000)
    assert window.window_ns == 0
    window.woke(40_000)  # slept longer than poll-max: polling would not have caught it
    assert window.window_ns == 0
    window.woke(10_000)  # polling up to 32 us would have caught it
    assert window.window_ns == POLL_START_NS
    window.started()
    window.hit(1_000)
    assert window.window_ns == 2 * POLL_START_NS
    for _ in range(5):
        window.started()
        window.hit(1_000)
    assert window.window_ns == 32_000  # never past poll-max
    window.started()
    window.missed(32_000)
    assert window.window_ns == 16_000
    window.missed(16_000)
    window.missed(8_000)
    assert window.window_ns == POLL_START_NS
    window.missed(4_000)
    assert window.window_ns == 0
    assert (window.polls, window.caught, window.poll_ns) == (7, 6, 6_000 + 60_000)
    window.woke(10_000)
    window.woke(1_000_000)  # then idle: back to 0
    assert window.window_ns == 0


def test_poll_max_us_option() -> None:
    assert parse_poll_max_us("32") == DEFAULT_POLL_MAX_NS
    assert parse_poll_max_us("0") == 0
    for bad in ("-1", "x", "2000000"):
        with pytest.raises(ValueError, match="0 \\(no polling\\)"):
            parse_poll_max_us(bad)


@pytest.mark.parametrize("event_idx", [True, False])
def test_a_fast_driver_is_polled_without_kicks_and_the_window_grows(event_idx: bool) -> None:
    device = ChainingDevice(None, count=12)
    with Loopback(device, queue_size=32, event_idx=event_idx, poll_max_ns=LONG_WINDOW_NS) as lb:
        device.loopback = lb
        lb.submit(0, [b"first"], [5])  # the queue slept less than poll-max since it started: its window opens
        assert device.done.wait(30)
        used = lb.wait_used(0, 13, timeout=30)
        assert [u.data for u in used] == [b"first"] + [b"next"] * 12
        queue = _queue(lb)
        assert queue.poll is not None
        assert device.kicks_wanted == 0  # kicks stayed disabled while the queue polled
        assert queue.kicks == 1
        assert queue.poll.caught == 12
        assert queue.poll.window_ns >= POLL_START_NS * 2**12 // 2  # grown on every catch (maybe halved once since)
        stats = lb.run_in_loop(lb.session.stats)
        assert stats["polls_caught"] == 12 and stats["polls"] >= 13 and stats["poll_ns"] > 0


def test_a_request_posted_as_the_window_ends_is_still_served() -> None:
    """The lost wake-up: posted after the window's last look, before kicks are re-enabled: no kick comes."""
    posted = threading.Event()
    with Loopback(EchoDevice(), queue_size=32, poll_max_ns=LONG_WINDOW_NS) as lb:
        queue = _queue(lb)
        original = queue.sleep
        kick_wanted: list[bool] = []

        def post_then_sleep() -> None:
            if not posted.is_set():
                driver = lb.queues[0]
                driver.add([b"late"], [4])
                kick_wanted.append(driver.kick_needed())
                posted.set()
            original()

        queue.sleep = post_then_sleep
        lb.submit(0, [b"early"], [5])
        assert posted.wait(30)
        assert kick_wanted == [False]  # the driver saw kicks disabled: only the re-check can find this request
        used = lb.wait_used(0, 2, timeout=10)
        assert sorted(u.data for u in used) == [b"early", b"late"]
        assert queue.kicks == 1


def test_an_idle_queue_stops_polling_and_takes_no_cpu() -> None:
    device = ChainingDevice(None, count=6)
    max_ns = 50_000_000
    with Loopback(device, queue_size=32, poll_max_ns=max_ns) as lb:
        device.loopback = lb
        lb.submit(0, [b"first"], [5])
        assert device.done.wait(30)
        lb.wait_used(0, 7, timeout=30)
        queue = _queue(lb)
        assert queue.poll is not None and queue.poll.caught == 6
        _wait(lambda: queue._poll_handle is None)  # the last window passed with nothing: halved, asleep
        before = time.process_time()
        time.sleep(2)
        idle_cpu = time.process_time() - before
        assert idle_cpu < 0.1, f"an idle polling queue used {idle_cpu:.3f} s of CPU in 2 s"
        polls = queue.poll.polls
        lb.request(0, [b"after a long sleep"], [32])  # slept longer than poll-max: no window for this pass
        lb.run_in_loop(lambda: None)
        assert queue.poll.window_ns == 0
        assert queue.poll.polls == polls


def test_poll_max_zero_is_off() -> None:
    with Loopback(EchoDevice(), queue_size=32) as lb:
        for i in range(5):
            lb.request(0, [bytes([i])], [1])
        assert _queue(lb).poll is None
        assert _queue(lb).kicks == 5
        stats = lb.run_in_loop(lb.session.stats)
        assert (stats["polls"], stats["polls_caught"], stats["poll_ns"]) == (0, 0, 0)


def test_a_negative_poll_max_is_refused(loop_thread) -> None:
    with pytest.raises(SessionError, match="poll_max_ns must be >= 0"):
        loop_thread.call(lambda: VirtioSession(EchoDevice(), name="x", poll_max_ns=-1))


def test_vhost_user_lost_wakeup_and_counters(loop_thread, tmp_path: Path) -> None:
    """Through the vhost-user door and the Python front end: a late request is served, the counters show the window."""
    path = tmp_path / "poll.sock"
    door = VhostUserFrontDoor(EchoDevice(), path, primitives=HypervisorPrimitives(), name="poll",
                              poll_max_ns=LONG_WINDOW_NS)
    loop_thread.run(door.start())
    try:
        with VhostUserFrontend.connect(path) as frontend:
            frontend.start(queue_size=32)
            _wait(lambda: door.connection is not None and 0 in door.connection.session.running)
            assert door.connection is not None
            queue = door.connection.session.running[0]
            original = queue.sleep
            posted = threading.Event()

            def post_then_sleep() -> None:
                if not posted.is_set():
                    frontend.submit(0, [b"late"], [4])  # kicks are still disabled: no kick is sent
                    posted.set()
                original()

            loop_thread.call(setattr, queue, "sleep", post_then_sleep)
            frontend.submit(0, [b"early"], [5])
            assert posted.wait(30)
            used = frontend.wait_used(0, 2, timeout=10)
            assert sorted(u.data for u in used) == [b"early", b"late"]
            counts = loop_thread.call(ring_counts, door)
            assert counts["completions"] == 2
            assert counts["polls"] >= 1 and counts["poll_ns"] > 0 and "polls_caught" in counts
            assert queue.kicks == 1
    finally:
        loop_thread.run(door.stop())


def _cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` and of its descendants, live ones by their own counters, reaped ones by cutime/cstime."""
    total = 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    total += sum(int(value) for value in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            total += _cpu_seconds(int(child))
    return total


def test_an_idle_polling_daemon_takes_no_cpu_and_logs_what_polling_did(tmp_path: Path) -> None:
    """``pvcore serve`` with a long poll-max: busy while asked, ~0 CPU when the guest goes quiet, counts in its log."""
    (tmp_path / "disk.img").write_bytes(os.urandom(1 << 20))
    daemon = ServeProcess(
        [sys.executable, "-m", "pvcore.cli", "serve", "--hypervisor", "kvm",
         f"block:name=disk,path={tmp_path / 'disk.img'},socket={tmp_path / 'disk.sock'},poll-max-us=100000"],
        tmp_path / "serve.log", env=dict(os.environ, PVCORE_RUN_DIR=str(tmp_path / "run")),
    )
    daemon.start()
    try:
        frontend = VhostUserFrontend.connect(tmp_path / "disk.sock", timeout=20.0)
        try:
            frontend.start(num_queues=1, queue_size=64)
            for sector in range(0, 400, 8):
                used = frontend.request(0, [REQUEST_HEADER.pack(VIRTIO_BLK_T_IN, 0, sector)], [4096, 1])
                assert used.data[-1] == VIRTIO_BLK_S_OK
            time.sleep(1)  # longer than any window (100 ms at most)
            assert daemon.proc is not None
            before = _cpu_seconds(daemon.proc.pid)
            time.sleep(3)
            idle = _cpu_seconds(daemon.proc.pid) - before
            assert idle < 0.15, f"the idle daemon used {idle:.2f} s of CPU in 3 s"
        finally:
            frontend.close()
        deadline = time.monotonic() + 20
        while "frontend disconnected" not in daemon.text():
            assert time.monotonic() < deadline, daemon.text()[-3000:]
            time.sleep(0.05)
        line = re.search(r"polling \(max 100000 us\): (\d+) windows, (\d+) caught a request, (\d+) us", daemon.text())
        assert line is not None, daemon.text()[-3000:]
        assert int(line.group(1)) > 0 and int(line.group(3)) > 0
    finally:
        daemon.stop(signal.SIGTERM)
