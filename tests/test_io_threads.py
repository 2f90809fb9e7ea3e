"""``pvcore serve --io-threads N`` (or ``io-threads = N`` in a ``--config`` file) and the I/O pool's metrics.

End to end: a real ``pvcore serve`` with a block device behind its NBD front
door (lpar), driven by fio's nbd engine (libnbd) with random writes and a
flush every 4, while /metrics is read every 50 ms: the bound set reaches the
pool (in the daemon's own process, and in each worker of ``--workers 2``),
the threads climb to that bound and no further, busy threads and queued
turns rise under the load and fall back to zero after it, and the turn
counter counts. ``pvcore daemon --io-threads`` on libvirt's test driver shows
its bound, in its own process and in its workers. Bad values are refused
before anything starts.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from pvcore.testing.serve_process import ServeProcess

MIB = 1024 * 1024
POOL = "pvcore_io_pool_"
FAMILIES = ("threads", "busy_threads", "max_threads", "queued_turns", "turns_total", "stall_threads_total")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def pool_metrics(port: int) -> dict[str, float]:
    """The pool's samples on ``/metrics`` now, by family name without the prefix (the unlabelled series)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    values = {}
    for line in text.splitlines():
        if line.startswith(POOL):
            name, value = line.split()
            values[name.removeprefix(POOL)] = float(value)
    assert set(values) == set(FAMILIES), text
    return values


def image(path: Path) -> Path:
    path.write_bytes(os.urandom(16 * MIB))
    return path


def serve(tmp_path: Path, port: int, *args: str) -> ServeProcess:
    process = ServeProcess(
        [sys.executable, "-m", "pvcore.cli", "serve", "--hypervisor", "lpar", "--metrics", f"127.0.0.1:{port}", *args],
        tmp_path / "serve.log", env=dict(os.environ, PVCORE_RUN_DIR=str(tmp_path / "run")),
    )
    process.start()
    return process


def load(sock: Path, seconds: float) -> subprocess.Popen[bytes]:
    """fio over NBD: 64 KiB random writes 8 deep, a flush after every 4 (the flushes hold I/O threads)."""
    assert shutil.which("fio"), "fio is not installed: run scripts/ensure-debian-packages"
    return subprocess.Popen(
        ["fio", "--name=pool", "--ioengine=nbd", f"--uri=nbd+unix:///?socket={sock}", "--rw=randwrite", "--bs=64k",
         "--iodepth=8", "--size=16M", "--fsync=4", "--time_based", f"--runtime={seconds:g}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )


def sample_during(port: int, fio: subprocess.Popen[bytes]) -> list[dict[str, float]]:
    """Read the pool's metrics every 50 ms until fio ends; fio must succeed."""
    seen = []
    while fio.poll() is None:
        seen.append(pool_metrics(port))
        time.sleep(0.05)
    output = fio.stdout.read().decode() if fio.stdout else ""
    assert fio.returncode == 0, output
    return seen


def settle(port: int, timeout: float = 30.0) -> dict[str, float]:
    """The metrics once no thread is busy and no turn waits (the load is over)."""
    deadline = time.monotonic() + timeout
    while True:
        values = pool_metrics(port)
        if values["busy_threads"] == 0 and values["queued_turns"] == 0:
            return values
        assert time.monotonic() < deadline, f"the pool stayed busy after the load: {values}"
        time.sleep(0.1)


def test_the_bound_from_the_config_file_reaches_the_pool_and_the_metrics_follow_the_load(tmp_path: Path) -> None:
    sock = tmp_path / "vm1-disk.sock"
    config = tmp_path / "pvcore.toml"
    config.write_text("io-threads = 2\nworkers = 1\n")
    port = free_port()
    daemon = serve(tmp_path, port, "--config", str(config), f"block:path={image(tmp_path / 'disk.img')},socket={sock}")
    try:
        before = pool_metrics(port)
        assert before["max_threads"] == 2 and before["busy_threads"] == 0 and before["queued_turns"] == 0
        seen = sample_during(port, load(sock, 3))
        after = settle(port)
    finally:
        daemon.terminate()
    assert daemon.proc is not None and daemon.proc.returncode == 0, daemon.text()[-3000:]
    stalls = after["stall_threads_total"]
    assert max(s["threads"] for s in seen) == 2, seen  # the device alone asks for 4 (workers=4): the bound holds
    assert all(s["threads"] <= 2 + s["stall_threads_total"] for s in seen), seen
    assert all(s["busy_threads"] <= s["threads"] for s in seen), seen
    assert max(s["busy_threads"] for s in seen) >= 1, seen
    assert after["turns_total"] > before["turns_total"] + 100
    assert [s["turns_total"] for s in seen] == sorted(s["turns_total"] for s in seen)
    assert stalls == 0 or "no I/O thread took a request" in daemon.text()


def test_each_worker_takes_the_bound_from_its_spec(tmp_path: Path) -> None:
    socks = [tmp_path / "vm1-a.sock", tmp_path / "vm1-b.sock"]
    port = free_port()
    devices = [f"block:path={image(tmp_path / f'{s.stem}.img')},socket={s}" for s in socks]
    daemon = serve(tmp_path, port, "--workers", "2", "--io-threads", "3", *devices)
    try:
        assert "in 2 worker processes" in daemon.text()
        assert pool_metrics(port)["max_threads"] == 2 * 3  # summed over the two workers
        seen = sample_during(port, load(socks[0], 3))  # one device: one worker's pool
        after = settle(port)
    finally:
        daemon.terminate()
    assert daemon.proc is not None and daemon.proc.returncode == 0, daemon.text()[-3000:]
    assert max(s["threads"] for s in seen) == 3, seen  # per worker, not the parent's share of the CPUs
    assert all(s["threads"] <= 3 + s["stall_threads_total"] for s in seen), seen
    assert max(s["busy_threads"] for s in seen) >= 1 and after["turns_total"] > 100


@pytest.mark.parametrize("workers", [1, 2])
def test_pvcore_daemon_takes_the_bound_in_its_process_and_its_workers(tmp_path: Path, workers: int) -> None:
    """``pvcore daemon`` on libvirt's test driver (no domain, so no device): the bound is on /metrics, from the
    daemon's own pool with ``--workers 1``, summed over the (empty) workers' pools with ``--workers 2``."""
    pytest.importorskip("libvirt", reason="pvcore daemon needs libvirt-python: pip install -e .[libvirt]")
    port = free_port()
    log = tmp_path / "daemon.log"
    with open(log, "wb") as out:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "pvcore.cli", "daemon", "--connect", "test:///default", "--hypervisor", "kvm",
             "--run-dir", str(tmp_path / "run"), "--workers", str(workers), "--io-threads", "3",
             "--metrics", f"127.0.0.1:{port}"],
            stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while "following test:///default" not in log.read_text():
            assert daemon.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        assert pool_metrics(port)["max_threads"] == 3 * workers
    finally:
        daemon.terminate()
        daemon.wait(30)
    assert daemon.returncode == 0, log.read_text()


@pytest.mark.parametrize("value", ["0", "-1", "x", "2.5", "1025", "\u00b2"])
@pytest.mark.parametrize("command", ["serve", "daemon"])
def test_a_bad_io_threads_value_is_refused(command: str, value: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pvcore.cli", command, f"--io-threads={value}", *(["block:path=x"] if command == "serve" else [])],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2
    assert f"io-threads={value!r}: expected a whole number from 1 to 1024" in done.stderr, done.stderr


@pytest.mark.parametrize(
    ("setting", "error"),
    [
        ("io-threads = 0", "io-threads='0': expected a whole number from 1 to 1024"),
        ("io-threads = 1.5", "io-threads='1.5': expected a whole number from 1 to 1024"),
        ("io-threads = true", "io-threads='True': expected a whole number from 1 to 1024"),
        ("io_threads = 4", "the setting is spelled io-threads, as the option --io-threads"),
    ],
)
def test_a_bad_io_threads_setting_is_refused(tmp_path: Path, setting: str, error: str) -> None:
    config = tmp_path / "pvcore.toml"
    config.write_text(setting + "\n")
    sock = tmp_path / "d.sock"
    (tmp_path / "d.img").write_bytes(bytes(MIB))
    done = subprocess.run(
        [sys.executable, "-m", "pvcore.cli", "serve", "--hypervisor", "lpar", "--config", str(config),
         f"block:path={tmp_path / 'd.img'},socket={sock}"],
        capture_output=True, text=True, timeout=60, env=dict(os.environ, PVCORE_RUN_DIR=str(tmp_path / "run")),
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"pvcore: error: config {config}: {error}"]
    assert not sock.exists()
