"""An NBD export that polls its idle connections' sockets (``poll-max-us=``): the window opens for a client
that sends its next request soon, catches it, closes when the client goes quiet, and costs nothing idle."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from test_io_threads import free_port
from test_nbd import RawClient, client, image, open_clients, run, serve  # noqa: F401
from test_workers import wait_for

from pvcore.ring.poll import POLL_START_NS, PollWindow
from pvcore.testing.serve_process import ServeProcess

WINDOW_NS = 200_000_000
"""A window far longer than any gap between a raw client's reply and its next request, even on a loaded host."""


@pytest.fixture
def connect():
    yield from open_clients(RawClient)


def test_an_expired_window_leaves_the_verdict_to_when_the_request_came() -> None:
    window = PollWindow(32_000)
    window.woke(10_000)
    assert window.window_ns == POLL_START_NS
    window.started()
    window.expired(POLL_START_NS)  # nothing within 4 us: counted, the window kept
    assert window.window_ns == POLL_START_NS and window.poll_ns == POLL_START_NS
    window.woke(20_000)  # but the request came within poll-max: a longer window would have caught it
    assert window.window_ns == 2 * POLL_START_NS
    window.started()
    window.expired(2 * POLL_START_NS)
    window.woke(5_000_000)  # the client went quiet: no window
    assert window.window_ns == 0
    assert (window.polls, window.caught) == (2, 0)


def _window(door):
    (window,) = door._polling
    return window


def test_a_prompt_client_is_caught_by_the_window_and_a_quiet_one_ends_it(serve, image, connect):
    content = image.read_bytes()
    door, uri = serve(image, poll_max_ns=WINDOW_NS)
    raw = connect(uri)
    raw.go()
    for index in range(200):
        offset = (index * 8192) % (len(content) - 4096)
        assert raw.read(offset, 4096) == content[offset : offset + 4096]
    counts = door.poll_counts()
    assert counts["polls"] >= 150, counts
    assert counts["polls_caught"] >= 0.9 * counts["polls"], counts  # once grown, a 200 ms window catches each request
    window = _window(door)
    assert window.window_ns == WINDOW_NS

    before = time.process_time()  # the window lasts at most 200 ms: then the loop sleeps again
    time.sleep(1.5)
    idle_cpu = time.process_time() - before
    assert idle_cpu < 0.3, f"an idle polling connection used {idle_cpu:.3f} s of CPU in 1.5 s"
    polls = door.poll_counts()["polls"]
    time.sleep(0.5)
    assert door.poll_counts()["polls"] == polls, "a window opened with nothing to wait for"

    assert raw.read(0, 4096) == content[:4096]  # after a wait longer than poll-max: no more windows
    wait_for(lambda: window.window_ns == 0, "the window to close")
    assert door.poll_counts()["polls"] == polls

    raw.close()
    wait_for(lambda: not door._polling, "the connection to end")  # the connection's counts outlive it
    assert door.poll_counts()["polls_caught"] == counts["polls_caught"]


def test_writes_and_requests_in_flight_open_no_window_until_the_connection_is_idle(serve, image, connect):
    door, uri = serve(image, poll_max_ns=WINDOW_NS)
    raw = connect(uri)
    raw.go()
    payload = os.urandom(65536)
    for handle in range(32):  # 32 writes sent at once: the connection is idle only after the last reply
        raw.send_request(1, handle, handle * 65536, 65536, payload=payload)
    replies = {raw.reply()[1] for _ in range(32)}
    assert replies == set(range(32))
    assert raw.read(0, 65536) == payload
    counts = door.poll_counts()
    assert counts["polls"] <= 34, counts
    assert image.read_bytes()[31 * 65536 : 32 * 65536] == payload

    for _ in range(40):  # grow the window
        raw.read(0, 4096)
    assert _window(door).window_ns == WINDOW_NS
    polls = door.poll_counts()["polls"]
    raw.send_request(3, 99, 0, 0)  # FLUSH: finished on an I/O thread, after which the connection is idle
    assert raw.reply()[:2] == (0, 99)
    wait_for(lambda: door.poll_counts()["polls"] == polls + 1, "a window")  # the window opens when the flush completes


def test_an_export_that_does_not_poll_has_no_window(serve, image, connect):
    door, uri = serve(image)
    raw = connect(uri)
    raw.go()
    assert raw.read(0, 512)
    assert door.poll_counts() == {}
    assert not door._polling
    with pytest.raises(ValueError, match="poll_max_ns"):
        serve(image, poll_max_ns=-1)


def test_poll_max_us_on_a_served_export_reaches_ctl_list_and_the_metrics(image, tmp_path):
    env = dict(os.environ, PVCORE_RUN_DIR=str(tmp_path / "run"))
    bad = subprocess.run(
        [sys.executable, "-m", "pvcore.cli", "serve", "--hypervisor", "lpar",
         f"block:name=bad,path={image},socket={tmp_path / 'bad.sock'},poll-max-us=soon"],
        capture_output=True, text=True, timeout=60, env=env,
    )
    assert bad.returncode != 0 and "poll-max-us" in bad.stderr and "microseconds" in bad.stderr, bad.stderr
    sock = tmp_path / "disk.sock"
    port = free_port()
    daemon = ServeProcess(
        [sys.executable, "-m", "pvcore.cli", "serve", "--hypervisor", "lpar", "--metrics", f"127.0.0.1:{port}",
         f"block:name=disk,path={image},socket={sock},poll-max-us=200000"],
        tmp_path / "serve.log", env=env,
    )
    daemon.start()
    try:
        reads = [arg for index in range(100) for arg in ("-c", f"read {index * 4096} 4k")]
        client("qemu-io", "-f", "raw", *reads, f"nbd+unix:///?socket={sock}")
        listed = subprocess.run([sys.executable, "-m", "pvcore.cli", "ctl", "list", "--json"],
                                capture_output=True, text=True, timeout=60, env=env, check=True)
        (device,) = json.loads(listed.stdout)
        counters = device["counters"]
        assert counters["polls"] >= 50 and counters["polls_caught"] >= 40 and counters["poll_ns"] > 0, counters
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
            text = response.read().decode()
        caught = [line for line in text.splitlines() if line.startswith("pvcore_nbd_polls_caught_total{")]
        assert caught and 'device="disk"' in caught[0], text[-3000:]
        assert float(caught[0].rsplit(" ", 1)[1]) >= counters["polls_caught"]
    finally:
        daemon.terminate()


def test_a_reply_drained_slowly_opens_one_window_not_one_per_send(serve, image, connect):
    """Replies leaving the socket bit by bit do not make a request more likely: after a window passes
    empty, none opens again until the client sends something."""
    door, uri = serve(image, poll_max_ns=WINDOW_NS)
    raw = connect(uri)
    raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    raw.go()
    for _ in range(40):
        raw.read(0, 4096)
    assert _window(door).window_ns == WINDOW_NS
    polls = door.poll_counts()["polls"]
    length = 1 << 20
    raw.send_request(0, 5, 0, length)  # READ of 1 MiB: more than the socket holds
    received = 0
    while received < 16 + length:
        received += len(raw.sock.recv(65536))
        time.sleep(0.1)  # 1.6 s in all: eight windows' worth, and many sends by the server
    assert door.poll_counts()["polls"] - polls <= 2, door.poll_counts()
