"""An NBD export spread over the workers (``spread=on``): every worker serves it, the parent hands out
its connections in turn.

End to end with a real ``pvcore serve --workers 2 --hypervisor lpar`` and raw
NBD clients: four connections land two on each worker; a write through one
worker, flushed through the other, is on disk and read back through any
(``NBD_FLAG_CAN_MULTI_CONN`` holds across processes); a killed worker takes
only its own connections, new ones go to the other meanwhile and alternate
again once it is back; ``ctl`` lists the export once with its counters added
up, swaps its medium in both workers, refuses limits for it and removes it.
"""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pvcore.contract import DeviceConfig
from pvcore.streams import nbd
from pvcore.testing.serve_process import ServeProcess
from pvcore.workers import partition
from test_nbd import RawClient
from test_workers import alive, ctl, listed, wait_for

SIZE = 1 << 20


def test_a_spread_device_is_in_every_share_and_makes_as_many_shares_as_workers() -> None:
    spread = DeviceConfig("block", "s", {"spread": "on"})
    alone = partition([spread], 3)
    assert [[c.name for c in share] for share in alone] == [["s"], ["s"], ["s"]]
    mixed = partition([DeviceConfig("console", "c"), spread], 2)
    assert sorted([c.name for c in share] for share in mixed) == [["c", "s"], ["s"]]
    assert partition([spread], 1) == [[spread]]


def two_workers_serve(tmp_path: Path, hypervisor: str, device: str) -> list[str]:
    """The command line of ``pvcore serve --workers 2`` serving ``device`` with its run directory in ``tmp_path``."""
    return [sys.executable, "-m", "pvcore.cli", "serve", "--hypervisor", hypervisor, "--workers", "2", "--run-dir",
            str(tmp_path / "run"), device]


def connected_by_worker(daemon: ServeProcess) -> dict[str, int]:
    """How many clients each worker has logged as connected so far."""
    counts: dict[str, int] = {}
    for worker in re.findall(r"pvcore\[(w\d)\] pvcore\.nbd: nbd disk: client \d+ \([^)]*\) connected", daemon.text()):
        counts[worker] = counts.get(worker, 0) + 1
    return counts


def open_clients(path: Path, count: int) -> list[RawClient]:
    clients = []
    for _ in range(count):
        client = RawClient(str(path))
        client.go()
        clients.append(client)
    return clients


def workers_of(parent: int) -> list[int]:
    """The worker processes among ``parent``'s children (from /proc: no ps needed)."""
    children = [int(pid) for task in Path(f"/proc/{parent}/task").iterdir()
                for pid in (task / "children").read_text().split()]
    return sorted(pid for pid in children
                  if b"pvcore.worker" in Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" "))


def closed(client: RawClient) -> bool:
    """Whether the server closed ``client``'s connection (it has nothing else to say unasked)."""
    if not select.select([client.sock], [], [], 2.0)[0]:
        return False
    try:
        return client.sock.recv(1) == b""
    except ConnectionResetError:
        return True


@pytest.fixture
def spread_daemon(tmp_path: Path):
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(SIZE))
    device = f"block:name=disk,path={image},socket={tmp_path / 'disk.sock'},spread=on"
    daemon = ServeProcess(two_workers_serve(tmp_path, "lpar", device), tmp_path / "serve.log")
    daemon.start()
    yield daemon, image, tmp_path / "disk.sock"
    daemon.terminate()


def test_connections_alternate_over_the_workers_and_see_one_disk(tmp_path, spread_daemon) -> None:
    daemon, image, sock = spread_daemon
    clients = open_clients(sock, 4)
    wait_for(lambda: sum(connected_by_worker(daemon).values()) == 4, "four connections to be served")
    assert connected_by_worker(daemon) == {"w0": 2, "w1": 2}

    payload = os.urandom(8192)
    first, second = clients[0], clients[1]  # handed out in turn: on different workers
    first.send_request(nbd.NBD_CMD_WRITE, 1, 4096, len(payload), payload=payload)
    assert first.reply() == (0, 1, b"")
    second.send_request(nbd.NBD_CMD_FLUSH, 2, 0, 0)
    assert second.reply() == (0, 2, b"")
    assert image.read_bytes()[4096 : 4096 + len(payload)] == payload
    for client in clients:
        assert client.read(4096, len(payload)) == payload

    device = listed(tmp_path)["disk"]
    assert device["worker"] == "w0,w1"
    assert device["counters"]["writes"] == 1 and device["counters"]["reads"] == 4 and device["counters"]["flushes"] == 1

    refused = ctl(tmp_path, "set-limits", "disk", "iops=100")
    assert refused.returncode != 0 and "spread over the workers" in refused.stderr

    other = tmp_path / "other.img"
    other.write_bytes(b"\x5a" * SIZE)
    swapped = ctl(tmp_path, "swap-media", "disk", str(other))
    assert swapped.returncode == 0, swapped.stderr
    for client in open_clients(sock, 2):  # one new connection on each worker: both serve the new medium
        assert client.read(0, 512) == b"\x5a" * 512
        client.close()
    for client in clients:
        client.close()

    removed = ctl(tmp_path, "remove", "disk")
    assert removed.returncode == 0, removed.stderr
    assert not sock.exists() and listed(tmp_path) == {}


def test_a_killed_worker_takes_only_its_connections_and_shares_again_when_back(tmp_path, spread_daemon) -> None:
    daemon, image, sock = spread_daemon
    content = image.read_bytes()
    clients = open_clients(sock, 2)
    wait_for(lambda: connected_by_worker(daemon) == {"w0": 1, "w1": 1}, "one connection on each worker")
    worker_pids = workers_of(daemon.proc.pid)
    assert len(worker_pids) == 2
    victim = worker_pids[0]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: not alive(victim), "the killed worker to go")

    survivors = [client for client in clients if not closed(client)]
    assert len(survivors) == 1  # the other worker's connection goes on
    assert survivors[0].read(0, 4096) == content[:4096]

    wait_for(lambda: "serves again" in daemon.text(), "the killed worker to be started again")
    before = connected_by_worker(daemon)
    more = open_clients(sock, 4)
    wait_for(lambda: sum(connected_by_worker(daemon).values()) == sum(before.values()) + 4, "four more connections")
    after = connected_by_worker(daemon)
    assert {worker: after[worker] - before.get(worker, 0) for worker in after} == {"w0": 2, "w1": 2}
    for client in more:
        assert client.read(8192, 512) == content[8192:8704]
        client.close()
    for client in clients:
        client.close()


@pytest.mark.parametrize(
    ("hypervisor", "extra", "message"),
    [
        ("lpar", ",iops=100", "spread=on takes no I/O limits or group"),
        ("kvm", ",iops=100", "spread=on takes no I/O limits or group"),
    ],
)
def test_a_spread_device_with_limits_is_refused(tmp_path, hypervisor, extra, message) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(SIZE))
    started = time.monotonic()
    done = subprocess.run(
        two_workers_serve(tmp_path, hypervisor, f"block:name=disk,path={image},socket={tmp_path / 'disk.sock'},spread=on{extra}"),
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode != 0 and message in done.stderr, done.stderr[-3000:]
    assert time.monotonic() - started < 100 and not (tmp_path / "disk.sock").exists()


def test_a_spread_device_is_listed_once_with_its_counters_and_histogram_added_up() -> None:
    from pvcore.workers import _merge_spread

    def entry(worker: str, reads: int, counts: list[int]) -> dict:
        return {"name": "disk", "worker": worker, "counters": {"reads": reads, "in_flight": 1,
                                                               "service_time": {"bounds": [0.001], "counts": counts}}}

    other = {"name": "nic", "worker": "w1", "counters": {"rx_frames": 3}}
    merged = _merge_spread([entry("w0", 5, [1, 2]), other, entry("w1", 7, [3, 4])], {"disk"})
    assert [device["name"] for device in merged] == ["disk", "nic"]
    disk = merged[0]
    assert disk["worker"] == "w0,w1" and disk["counters"]["reads"] == 12 and disk["counters"]["in_flight"] == 2
    assert disk["counters"]["service_time"] == {"bounds": [0.001], "counts": [4, 6]}

    restarting = {"name": "disk", "worker": "w0", "state": "restarting", "counters": {}}
    (disk,) = _merge_spread([restarting, {**entry("w1", 100, [5, 5]), "state": "served"}], {"disk"})
    assert disk["state"] == "served" and disk["worker"] == "w0,w1" and disk["counters"]["reads"] == 100


def test_a_swap_one_worker_refuses_after_another_did_restarts_that_worker_with_the_new_file() -> None:
    """One export must never be two files: a worker that cannot follow is started again as it should be."""
    import asyncio

    from pvcore.workers import WorkerPool

    spread = DeviceConfig("block", "disk", {"path": "/old.img", "socket": "/nonexistent/disk.sock", "spread": "on"})
    pool = WorkerPool(None, "lpar", [[spread], [spread]], run_dir=Path("/nonexistent"))
    lost = []

    async def ask(worker, body):
        if worker.name == "w1":
            return {"ok": False, "error": "cannot open /new.img"}
        return {"ok": True, "old": "/old.img"}

    async def scenario() -> str:
        for worker in pool.workers:
            worker.serving = True
            worker.ask = lambda body, worker=worker: ask(worker, body)

        async def lose(worker) -> None:
            lost.append(worker.name)

        pool._lost = lose
        return await pool.swap_media("disk", "/new.img")

    assert asyncio.run(scenario()) == "/old.img"
    assert lost == ["w1"] and [w.configs[0].get("path") for w in pool.workers] == ["/new.img", "/new.img"]


def test_a_stopped_worker_is_passed_over_for_new_connections(tmp_path, spread_daemon) -> None:
    daemon, image, sock = spread_daemon
    stopped = workers_of(daemon.proc.pid)[0]
    os.kill(stopped, signal.SIGSTOP)
    try:
        clients = [RawClient(str(sock)) for _ in range(2)]  # one for each worker, in turn
        time.sleep(1.0)  # the stopped worker has left its connection unread for longer than the parent allows
        clients += [RawClient(str(sock)) for _ in range(6)]
        greeted = [bool(select.select([client.sock], [], [], 3.0)[0]) for client in clients]
        assert greeted.count(False) == 1, greeted  # the one handed to it before it was seen not to read
    finally:
        os.kill(stopped, signal.SIGCONT)
    for client in clients:  # the one it held is served once it runs again
        client.greeting()
        client.close()


def test_the_parent_rests_the_backlog_when_accept_lacks_descriptors(tmp_path) -> None:
    """EMFILE leaves the connection in the backlog and the parent idle for a second, not spinning on it."""
    import asyncio
    import errno
    import socket

    from pvcore.spread import ACCEPT_RETRY_SECONDS, SpreadExports

    class Starved(socket.socket):
        calls = 0

        def accept(self):
            Starved.calls += 1
            raise OSError(errno.EMFILE, "Too many open files")

    path = tmp_path / "disk.sock"
    listening = Starved(socket.AF_UNIX, socket.SOCK_STREAM)
    listening.bind(str(path))
    listening.listen(4)
    listening.setblocking(False)
    worker = type("FakeWorker", (), {"name": "w0", "hand_channel": None})()

    async def scenario() -> tuple[int, int]:
        exports = SpreadExports(lambda p, what: listening)
        exports.declare(path)
        exports.take(path, "disk", worker)
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(str(path))
        await asyncio.sleep(ACCEPT_RETRY_SECONDS / 2)
        first = Starved.calls
        await asyncio.sleep(ACCEPT_RETRY_SECONDS)
        exports.close()
        client.close()
        return first, Starved.calls

    first, later = asyncio.run(scenario())
    listening.close()
    assert first == 1 and later == 2


def test_a_swap_is_all_or_restarts_every_worker_that_may_differ() -> None:
    """A worker that does not answer is restarted with the new file; a refusal before any swap changes nothing."""
    import asyncio

    from pvcore.control import ControlError
    from pvcore.workers import WorkerDown, WorkerPool

    def pool_with(answers: dict[str, object], serving: dict[str, bool]):
        spread = DeviceConfig("block", "disk", {"path": "/old.img", "socket": "/nonexistent/d.sock", "spread": "on"})
        pool = WorkerPool(None, "lpar", [[spread], [spread]], run_dir=Path("/nonexistent"))
        lost: list[str] = []

        async def ask(worker, body):
            answer = answers[worker.name]
            if isinstance(answer, Exception):
                raise answer
            return answer

        async def lose(worker) -> None:
            lost.append(worker.name)

        for worker in pool.workers:
            worker.serving = serving[worker.name]
            worker.ask = lambda body, worker=worker: ask(worker, body)
        pool._lost = lose
        return pool, lost

    timed_out = WorkerDown("worker w0 did not answer: timed out")
    pool, lost = pool_with({"w0": timed_out, "w1": {"ok": True, "old": "/old.img"}}, {"w0": True, "w1": True})
    assert asyncio.run(pool.swap_media("disk", "/new.img")) == "/old.img"
    assert lost == ["w0"] and [w.configs[0].get("path") for w in pool.workers] == ["/new.img", "/new.img"]

    refused = {"ok": False, "error": "cannot open /missing.img"}
    pool, lost = pool_with({"w0": {"ok": True, "old": "/old.img"}, "w1": refused}, {"w0": False, "w1": True})
    with pytest.raises(ControlError, match="missing"):  # w0 is down and did nothing: w1's refusal is the answer
        asyncio.run(pool.swap_media("disk", "/missing.img"))
    assert lost == [] and [w.configs[0].get("path") for w in pool.workers] == ["/old.img", "/old.img"]
