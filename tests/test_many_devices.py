"""A real ``pvcore serve`` with 200 disks: a bounded number of threads, idle and under load, and no CPU while idle."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

from pvcore.devices.block.iopool import default_max_threads

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from many_devices import disk_specs, drive, figures  # noqa: E402

DISKS = 200


def test_two_hundred_disks_in_one_process_have_bounded_threads_and_idle_at_no_cpu(tmp_path: Path) -> None:
    devices, disks = disk_specs(tmp_path, DISKS)
    log = tmp_path / "daemon.log"
    with open(log, "wb") as out:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "pvcore.cli", "serve", "--hypervisor", "kvm", "--workers", "1",
             "--run-dir", str(tmp_path), *devices],
            stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
        )
    try:
        deadline = time.monotonic() + 60
        while f"serving {DISKS} device(s)" not in log.read_text(errors="replace"):
            assert daemon.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
            time.sleep(0.05)
        time.sleep(1)
        before = figures(daemon.pid)
        time.sleep(3)
        idle = figures(daemon.pid)
        # One thread per disk before the pool (4 each: 801); the I/O threads of an idle daemon are none.
        assert idle["threads"] <= 4, idle
        assert idle["cpu_s"] - before["cpu_s"] <= 0.03, f"{idle['cpu_s'] - before['cpu_s']:.2f} s of CPU in 3 s idle"

        stop = threading.Event()
        ops: list[int] = []
        errors: list[str] = []
        clients = [threading.Thread(target=drive, args=(path, stop, ops, errors)) for path in disks[:6]]
        for client in clients:
            client.start()
        most = 0
        started = time.monotonic()
        while time.monotonic() - started < 2:
            most = max(most, figures(daemon.pid)["threads"])
            time.sleep(0.02)
        stop.set()
        for client in clients:
            client.join(60)
        assert not errors and ops
        assert most > idle["threads"], "the load started no I/O thread"
        # The bound, and the pool's watcher (it runs while requests wait for a thread).
        assert most <= idle["threads"] + default_max_threads() + 1, f"{most} threads under load"
    finally:
        daemon.terminate()
        daemon.wait(60)
    assert "Traceback" not in log.read_text(errors="replace")
