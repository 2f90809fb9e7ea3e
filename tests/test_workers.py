"""``pvcore serve --workers N``: devices spread over worker processes behind one parent.

The end-to-end tests run a real ``pvcore serve`` with two vhost-user disks in
two workers and drive both with the Python vhost-user front end: a worker
killed with SIGKILL takes nothing from the other worker's guest, is started
again on the same socket (held by the parent meanwhile), and resumes the write
it had in flight; ``ctl`` and the metrics endpoint reach every worker; SIGTERM
stops them all and removes the sockets; SIGKILL of the parent leaves no worker.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from pvcore.contract import DeviceConfig
from pvcore.devices.block.virtio_blk import REQUEST_HEADER, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT
from pvcore.streams.unix import ListenerError
from pvcore.testing.serve_process import ServeProcess
from pvcore.testing.vhost_user_frontend import VhostUserFrontend
from pvcore.metrics import MergedCollector
from pvcore.workers import ListenerBroker, WorkerPool, partition

SECTOR = 512
DISK = 1 << 20


def config(device_class: str, name: str, **options: str) -> DeviceConfig:
    return DeviceConfig(device_class, name, options)


def names(shares: list[list[DeviceConfig]]) -> list[list[str]]:
    return [[c.name for c in share] for share in shares]


def test_partition_keeps_shared_state_together_and_balances_the_rest() -> None:
    configs = [
        config("net", "a-nic", switch="lan0"), config("block", "a-disk", group="g"), config("net", "b-nic", switch="lan0"),
        config("block", "b-disk", group="g"), config("rng", "a-rng", domain="a"), config("rng", "a-rng2", domain="a"),
        config("console", "c1"), config("console", "c2"), config("net", "c-nic"), config("net", "d-nic"),
    ]
    shares = partition(configs, 3)
    assert len(shares) == 3
    where = {c.name: i for i, share in enumerate(shares) for c in share}
    assert where["a-nic"] == where["b-nic"] and where["a-disk"] == where["b-disk"] and where["a-rng"] == where["a-rng2"]
    assert where["c-nic"] == where["d-nic"]  # both on the switch named "default"
    assert sorted(len(share) for share in shares) == [3, 3, 4]
    assert sorted(c.name for share in shares for c in share) == sorted(c.name for c in configs)


def test_partition_never_makes_more_shares_than_sets_nor_empty_ones() -> None:
    configs = [config("net", "a", switch="s"), config("net", "b", switch="s"), config("console", "c")]
    assert names(partition(configs, 8)) == [["a", "b"], ["c"]]
    assert names(partition(configs, 1)) == [["a", "b", "c"]]
    assert partition([], 4) == []
    with pytest.raises(ValueError):
        partition(configs, 0)


def test_a_device_added_later_joins_what_it_shares_else_the_serving_worker_with_fewest_devices() -> None:
    """WorkerPool.place, as ``pvcore daemon --workers N`` adds each domain's devices to N empty workers."""
    pool = WorkerPool(None, "kvm", [[], [], []], run_dir=Path("/nonexistent"))
    w0, w1, w2 = pool.workers
    for worker in pool.workers:
        worker.serving = True
    w0.configs = [config("block", "a"), config("console", "b")]
    w1.configs = [config("net", "n1", switch="lan0"), config("rng", "vm1-rng0", domain="vm1")]
    w2.configs = [config("block", "g1", group="g")]
    assert pool.place([config("net", "n2", switch="lan0")]) is w1
    assert pool.place([config("rng", "vm1-rng1", domain="vm1")]) is w1
    assert pool.place([config("block", "g2", group="g")]) is w2
    assert pool.place([config("block", "c")]) is w2  # one device: the fewest
    w2.serving = False  # its restart is pending: a new set goes to a serving worker, a bound one still to it
    assert pool.place([config("block", "c")]) is w0 and pool.place([config("block", "g3", group="g")]) is w2
    w0.configs.append(config("block", "c"))
    assert pool.place([config("net", "n3", switch="lan1")]) is w1


def test_a_device_added_to_a_worker_that_is_down_is_served_when_it_starts_again() -> None:
    import asyncio

    from pvcore.control import ControlError

    pool = WorkerPool(None, "kvm", [[config("block", "g1", group="g")], []], run_dir=Path("/nonexistent"))
    w0, w1 = pool.workers
    w1.serving = True
    asyncio.run(pool.add([config("block", "g2", group="g")]))  # bound to w0, which is down: no request is sent
    assert [c.name for c in w0.configs] == ["g1", "g2"]
    with pytest.raises(ControlError, match="g1"):  # names stay unique across the workers
        asyncio.run(pool.add([config("block", "g1")]))
    assert [c.name for c in w0.configs] == ["g1", "g2"] and w1.configs == []

    async def while_starting() -> None:  # an add and a remove wait for a worker that is starting, then go on
        w0.starting = True
        w0._settled.clear()
        add = asyncio.create_task(pool.add([config("block", "g3", group="g")]))
        remove = asyncio.create_task(pool.remove(["g1"]))
        await asyncio.sleep(0.1)
        assert not add.done() and not remove.done() and [c.name for c in w0.configs] == ["g1", "g2"]
        w0.starting = False  # its start failed: it is down again
        w0._settled.set()
        await asyncio.gather(add, remove)

    asyncio.run(while_starting())
    assert [c.name for c in w0.configs] == ["g2", "g3"]


def test_the_broker_hands_back_the_socket_it_holds_and_makes_a_new_one_after_a_release(tmp_path: Path) -> None:
    broker = ListenerBroker()
    path = tmp_path / "d.sock"
    first = broker.socket_for(path, "disk", socket.SOCK_STREAM)
    assert broker.socket_for(path, "disk", socket.SOCK_STREAM) is first
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.connect(str(path))  # connectable while no worker accepts: it waits in the backlog
    probe.close()
    broker.release(path)  # its device was removed
    assert first.fileno() == -1 and not path.exists()
    second = broker.socket_for(path, "disk", socket.SOCK_STREAM)
    assert second is not first and path.exists()
    path.unlink()  # someone removed the file: a new socket takes the path
    third = broker.socket_for(path, "disk", socket.SOCK_STREAM)
    assert third is not second and second.fileno() == -1 and path.exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ListenerError, match="is not a socket"):
        broker.socket_for(tmp_path / "file", "disk", socket.SOCK_STREAM)
    broker.close()
    assert not path.exists() and third.fileno() == -1


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write(sector: int, fill: int) -> list[bytes]:
    return [REQUEST_HEADER.pack(VIRTIO_BLK_T_OUT, 0, sector), bytes([fill]) * SECTOR]


def read(frontend: VhostUserFrontend, sector: int) -> bytes:
    used = frontend.request(0, [REQUEST_HEADER.pack(VIRTIO_BLK_T_IN, 0, sector)], [SECTOR, 1])
    assert used.data[-1:] == bytes([VIRTIO_BLK_S_OK])
    return used.data[:SECTOR]


def ctl(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pvcore.cli", "ctl", "--run-dir", str(tmp_path / "run"), *args],
                          capture_output=True, text=True, timeout=60)


def listed(tmp_path: Path) -> dict[str, dict]:
    done = ctl(tmp_path, "list", "--json")
    assert done.returncode == 0, done.stderr
    return {device["name"]: device for device in json.loads(done.stdout)}


def wait_for(predicate, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    return status != "Z"


@pytest.fixture
def two_workers(tmp_path: Path):
    for disk in ("d0", "d1"):
        (tmp_path / f"{disk}.img").write_bytes(bytes(DISK))
    port = free_port()
    daemon = ServeProcess(
        [sys.executable, "-m", "pvcore.cli", "serve", "--hypervisor", "kvm", "--workers", "2", "--run-dir",
         str(tmp_path / "run"), "--metrics", f"127.0.0.1:{port}",
         *(f"block:name={d},path={tmp_path / f'{d}.img'},socket={tmp_path / f'{d}.sock'}" for d in ("d0", "d1"))],
        tmp_path / "serve.log",
    )
    daemon.start()
    yield daemon, port
    daemon.terminate()


def test_a_killed_worker_takes_nothing_from_the_other_and_comes_back_on_the_same_socket(tmp_path, two_workers) -> None:
    daemon, port = two_workers
    devices = listed(tmp_path)
    assert {devices["d0"]["worker"], devices["d1"]["worker"]} == {"w0", "w1"}
    victim, survivor = devices["d0"]["worker_pid"], devices["d1"]["worker_pid"]
    assert victim != survivor and victim != daemon.proc.pid

    zero = VhostUserFrontend.connect(tmp_path / "d0.sock", timeout=30.0)
    zero.start(num_queues=1, queue_size=64, inflight=True)
    one = VhostUserFrontend.connect(tmp_path / "d1.sock", timeout=30.0)
    one.start(num_queues=1, queue_size=64, inflight=True)
    for sector in range(8):
        assert zero.request(0, write(sector, 0x10 + sector), [1]).data == bytes([VIRTIO_BLK_S_OK])
        assert one.request(0, write(sector, 0x20 + sector), [1]).data == bytes([VIRTIO_BLK_S_OK])

    os.kill(victim, signal.SIGKILL)
    for sector in range(8, 64):  # the other worker's guest goes on, on the same connection, at once
        assert one.request(0, write(sector, 0x20 + sector % 32), [1]).data == bytes([VIRTIO_BLK_S_OK])
    wait_for(lambda: "worker w0 serves again (1 restart(s))" in daemon.text(), "w0's restart")
    assert "worker w0 (d0) ended with signal 9" in daemon.text()
    assert (tmp_path / "d0.sock").exists()

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(tmp_path / "d0.sock"))
    zero.reconnect(sock)
    assert [read(zero, sector) for sector in range(8)] == [bytes([0x10 + s]) * SECTOR for s in range(8)]
    assert zero.request(0, write(9, 0x33), [1]).data == bytes([VIRTIO_BLK_S_OK])
    assert read(one, 40) == bytes([0x20 + 8]) * SECTOR

    devices = listed(tmp_path)
    assert devices["d0"]["worker_restarts"] == 1 and devices["d0"]["worker_pid"] != victim
    assert devices["d1"]["worker_restarts"] == 0 and devices["d1"]["worker_pid"] == survivor
    assert devices["d1"]["counters"]["writes"] == 64

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
    assert text.count("# TYPE pvcore_requests_total counter") == 1
    assert 'pvcore_requests_total{class="block",device="d0"' in text and 'device="d1"' in text
    zero.close()
    one.close()

    workers = [devices["d0"]["worker_pid"], survivor]
    assert daemon.stop(signal.SIGTERM) == 0
    assert not any(alive(pid) for pid in workers)
    assert not (tmp_path / "d0.sock").exists() and not (tmp_path / "d1.sock").exists()
    image = (tmp_path / "d1.img").read_bytes()
    assert image[63 * SECTOR:64 * SECTOR] == bytes([0x20 + 63 % 32]) * SECTOR


def test_ctl_reaches_the_worker_of_each_device_and_a_killed_parent_leaves_no_worker(tmp_path, two_workers) -> None:
    daemon, _port = two_workers
    (tmp_path / "d2.img").write_bytes(bytes(DISK))
    added = ctl(tmp_path, "add", f"block:name=d2,path={tmp_path / 'd2.img'},socket={tmp_path / 'd2.sock'},group=g,iops=1000")
    assert added.returncode == 0, added.stderr
    limits = ctl(tmp_path, "set-limits", "d2", "iops=500")
    assert limits.returncode == 0 and "iops=500" in limits.stdout, limits.stderr
    devices = listed(tmp_path)
    assert devices["d2"]["limits"] == "iops=500" and devices["d2"]["worker"] in ("w0", "w1")
    refused = ctl(tmp_path, "set-limits", "nosuch", "iops=5")
    assert refused.returncode != 0 and "no device named 'nosuch'" in refused.stderr

    frontend = VhostUserFrontend.connect(tmp_path / "d2.sock", timeout=30.0)
    frontend.start(num_queues=1, queue_size=64)
    assert frontend.request(0, write(3, 0x77), [1]).data == bytes([VIRTIO_BLK_S_OK])
    frontend.close()
    removed = ctl(tmp_path, "remove", "d2")
    assert removed.returncode == 0, removed.stderr
    assert not (tmp_path / "d2.sock").exists() and sorted(listed(tmp_path)) == ["d0", "d1"]
    assert (tmp_path / "d2.img").read_bytes()[3 * SECTOR:4 * SECTOR] == b"\x77" * SECTOR

    workers = [device["worker_pid"] for device in listed(tmp_path).values()]
    assert daemon.stop(signal.SIGKILL) == -signal.SIGKILL
    wait_for(lambda: not any(alive(pid) for pid in workers), "the workers to die with their parent", timeout=10)


def test_merged_metrics_have_each_family_once_and_sum_a_series_two_workers_both_have() -> None:
    def family(name: str, samples: list) -> dict:
        return {"name": name, "documentation": "d", "type": "counter", "unit": "", "samples": samples}

    worker0 = [family("pvcore_switch_frames", [["pvcore_switch_frames_total", {"switch": "lan0"}, 3.0]])]
    worker1 = [family("pvcore_switch_frames", [["pvcore_switch_frames_total", {"switch": "lan0"}, 4.0],
                                               ["pvcore_switch_frames_total", {"switch": "lan1"}, 1.0]])]
    (merged,) = MergedCollector(lambda: [("w0", worker0), ("w1", worker1)]).collect()
    assert {(s.labels["switch"], s.value) for s in merged.samples} == {("lan0", 7.0), ("lan1", 1.0)}


def test_a_summed_counter_never_goes_down_when_a_worker_restarts_or_misses_a_scrape() -> None:
    def turns(value: float) -> list[dict]:
        return [{"name": "pvcore_io_pool_turns", "documentation": "d", "type": "counter", "unit": "",
                 "samples": [["pvcore_io_pool_turns_total", {}, value]]}]

    answers = [[("w0", turns(5000)), ("w1", turns(1000))],
               [("w1", turns(1010))],  # w0 missed this scrape: its last 5000 still counts
               [("w0", turns(13)), ("w1", turns(1020))],  # w0 started again from zero: 5000 + 13
               [("w0", turns(20)), ("w1", turns(1030))]]
    collector = MergedCollector(lambda: answers.pop(0))
    seen = [next(iter(collector.collect())).samples[0].value for _ in range(4)]
    assert seen == [6000, 6010, 6033, 6050]


def inode(path: Path) -> int:
    return path.stat().st_ino


def test_a_worker_that_cannot_start_a_device_serves_the_rest_and_the_sockets_outlive_any_worker(tmp_path) -> None:
    """One worker serves 300 rng devices of one domain (answers far over 64 KiB), the other the disks.
    d2's image goes and the disks' worker is killed: it serves d0 and d1 again, lists d2 as not served,
    and ``ctl remove d2`` removes it. A worker stopped with SIGTERM by someone else is started again;
    no socket changes its inode."""
    for disk in ("d0", "d1", "d2"):
        (tmp_path / f"{disk}.img").write_bytes(bytes(DISK))
    rngs = [f"rng:name=r{i},socket={tmp_path / f'r{i}.sock'},domain=d1" for i in range(300)]
    daemon = ServeProcess(
        [sys.executable, "-m", "pvcore.cli", "serve", "--hypervisor", "kvm", "--workers", "2", "--run-dir",
         str(tmp_path / "run"), "--metrics", f"127.0.0.1:{(port := free_port())}",
         *(f"block:name={d},path={tmp_path / f'{d}.img'},socket={tmp_path / f'{d}.sock'},group={g},iops=100000"
           for d, g in (("d0", "a"), ("d1", "b"), ("d2", "a"))), *rngs[:1],
         *rngs[1:]],
        tmp_path / "serve.log",
    )
    daemon.start()
    try:
        devices = listed(tmp_path)
        assert len(devices) == 303
        disks, rng = devices["d0"]["worker"], devices["r7"]["worker"]
        assert devices["d2"]["worker"] == disks != rng == devices["r299"]["worker"]
        sockets = {d: inode(tmp_path / f"{d}.sock") for d in ("d0", "d1", "d2", "r299")}
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
        assert len(json.dumps(devices)) > 64 * 1024 and len(text) > 64 * 1024
        assert text.count("# TYPE pvcore_requests_total counter") == 1 and 'device="r299"' in text

        (tmp_path / "d2.img").unlink()
        os.kill(devices["d0"]["worker_pid"], signal.SIGKILL)
        wait_for(lambda: f"worker {disks} serves again (1 restart(s))" in daemon.text(), "the disks' worker's restart")
        assert "device d2 (block) not served" in daemon.text()
        after = listed(tmp_path)
        assert after["d2"]["state"] == "not served" and "no such file" in after["d2"]["error"]
        assert "state" not in after["d0"] and after["d0"]["worker_restarts"] == 1
        frontend = VhostUserFrontend.connect(tmp_path / "d0.sock", timeout=30.0)
        frontend.start(num_queues=1, queue_size=64)
        assert frontend.request(0, write(1, 0x41), [1]).data == bytes([VIRTIO_BLK_S_OK])
        frontend.close()
        (tmp_path / "d2-new.img").write_bytes(bytes(DISK))
        swapped = ctl(tmp_path, "swap-media", "d2", str(tmp_path / "d2-new.img"))
        assert swapped.returncode == 0, swapped.stderr
        assert "state" not in listed(tmp_path)["d2"]  # served again, at once, from the new file
        removed = ctl(tmp_path, "remove", "d2")
        assert removed.returncode == 0, removed.stderr
        assert "d2" not in listed(tmp_path) and not (tmp_path / "d2.sock").exists()

        os.kill(devices["r7"]["worker_pid"], signal.SIGTERM)  # not the parent's doing: started again
        wait_for(lambda: f"worker {rng} serves again (1 restart(s))" in daemon.text(), "the rng worker's restart")
        assert {d: inode(tmp_path / f"{d}.sock") for d in ("d0", "d1", "r299")} == {
            d: sockets[d] for d in ("d0", "d1", "r299")}
        assert len(listed(tmp_path)) == 302
    finally:
        daemon.terminate()


def test_a_remove_or_add_racing_a_worker_death_is_kept_for_its_restart(tmp_path: Path) -> None:
    """A device removed (or added) just as its worker dies is not served again, nor lost, when it restarts."""
    import asyncio

    from pvcore.registry import default_registry

    async def scenario() -> None:
        pool = WorkerPool(default_registry(), "kvm", [[], []], run_dir=tmp_path / "run")
        await pool.start()
        try:
            rng = config("rng", "vm1-rng0", socket=str(tmp_path / "r.sock"), domain="vm1")
            await pool.add([rng])
            owner = pool._owner("vm1-rng0")
            os.kill(owner.proc.pid, signal.SIGKILL)
            await pool.remove(["vm1-rng0"])  # the domain stops in the same moment
            assert all(not worker.configs for worker in pool.workers) and not (tmp_path / "r.sock").exists()
            for _ in range(200):
                await asyncio.sleep(0.05)
                if owner.serving:
                    break
            assert owner.serving and owner.configs == [] and not (tmp_path / "r.sock").exists()

            os.kill(owner.proc.pid, signal.SIGKILL)
            await pool.add([rng])  # placed on the worker with the fewest devices: maybe the dying one
            for _ in range(200):
                await asyncio.sleep(0.05)
                if all(worker.serving for worker in pool.workers) and (tmp_path / "r.sock").exists():
                    break
            assert [c.name for worker in pool.workers for c in worker.configs] == ["vm1-rng0"]
            assert (tmp_path / "r.sock").exists()
            devices = await pool.describe_devices()
            assert [(d["name"], d.get("state", "served")) for d in devices] == [("vm1-rng0", "served")]
        finally:
            await pool.stop()

    asyncio.run(scenario())


def test_two_adds_of_one_name_at_once_serve_one_device() -> None:
    """A second ``ctl add`` arriving while a worker still starts the first is refused, not served twice."""
    import asyncio

    from pvcore.contract import DeviceConfig
    from pvcore.control import ControlError
    from pvcore.workers import WorkerPool

    pool = WorkerPool(None, "lpar", [[DeviceConfig("rng", "r0", {})], [DeviceConfig("rng", "r1", {})]],
                      run_dir=Path("/nonexistent"))
    twin = DeviceConfig("rng", "twin", {"socket": "/nonexistent/twin.fifo"})

    async def slow_ok(body):
        await asyncio.sleep(0.2)  # the worker takes a while to start the device
        return {"ok": True}

    async def scenario() -> list[object]:
        for worker in pool.workers:
            worker.serving = True
            worker.ask = slow_ok
        return await asyncio.gather(pool.add([twin]), pool.add([twin]), return_exceptions=True)

    results = asyncio.run(scenario())
    assert results.count(None) == 1 and "two devices are named 'twin'" in str(
        next(r for r in results if isinstance(r, ControlError))), results
    assert sum(config.name == "twin" for worker in pool.workers for config in worker.configs) == 1
