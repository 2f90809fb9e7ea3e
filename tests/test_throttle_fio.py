"""I/O limits end to end: fio (its nbd engine, libnbd) against `pvcore serve` block devices over NBD.

iops=500 gives fio at queue depth 16 500 IOPS +- 5 %; two devices of one group driven at once get
half each; a bps limit and a burst hold; `pvcore ctl set-limits` changes a running device's rate;
bad limits are refused with one error and change nothing (a daemon whose group members disagree
does not start). fio comes from scripts/ensure-debian-packages.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from pvcore.testing.serve_process import ServeProcess

MIB = 1024 * 1024


@pytest.fixture(autouse=True)
def need_fio() -> None:
    assert shutil.which("fio"), "fio is not installed: run scripts/ensure-debian-packages (Debian package fio)"


class Daemon:
    """A `pvcore serve --hypervisor lpar` serving block devices over NBD, one image and socket each."""

    def __init__(self, tmp: Path, *devices: str, metrics: int | None = None) -> None:
        self.tmp = tmp
        self.env = dict(os.environ, PVCORE_RUN_DIR=str(tmp / "run"))
        specs = []
        for spec in devices:
            name = spec.split(",", 1)[0]
            image = tmp / f"{name}.img"
            image.write_bytes(bytes(16 * MIB))
            specs.append(f"block:name={name},path={image},socket={self.socket(name)}{spec[len(name):]}")
        extra = ["--metrics", f"127.0.0.1:{metrics}"] if metrics else []
        command = [sys.executable, "-m", "pvcore.cli", "serve", "--hypervisor", "lpar", *extra, *specs]
        self.process = ServeProcess(command, tmp / "serve.log", env=self.env)
        self.process.start()

    def socket(self, name: str) -> Path:
        return self.tmp / f"{name}.sock"

    def ctl(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "pvcore.cli", "ctl", *args], capture_output=True, text=True, timeout=120, env=self.env
        )

    def listed(self) -> dict[str, dict]:
        done = self.ctl("list", "--json")
        assert done.returncode == 0, done.stderr
        return {device["name"]: device for device in json.loads(done.stdout)}

    def fio(self, *jobs: str | tuple[str, ...], runtime: int, ramp: int = 0, bs: str = "4k", depth: int = 16) -> list[dict]:
        """Run fio's nbd engine, randread, one job per device (a tuple adds job options); each job's JSON."""
        args = [
            "fio", "--output-format=json", "--ioengine=nbd", "--rw=randread", f"--bs={bs}", f"--iodepth={depth}",
            "--time_based", f"--runtime={runtime}", f"--ramp_time={ramp}",
        ]
        for job in jobs:
            name, *options = (job,) if isinstance(job, str) else job
            args += [f"--name={name}", f"--uri=nbd+unix:///?socket={self.socket(name)}", *options]
        done = subprocess.run(args, capture_output=True, text=True, timeout=runtime + ramp + 60)
        assert done.returncode == 0, done.stdout + done.stderr
        report = json.loads(done.stdout[done.stdout.index("{"):])
        for job in report["jobs"]:
            assert job["error"] == 0, job
        return report["jobs"]


@pytest.fixture
def daemon(tmp_path: Path):
    started: list[Daemon] = []

    def start(*devices: str, metrics: int | None = None) -> Daemon:
        started.append(Daemon(tmp_path, *devices, metrics=metrics))
        return started[-1]

    yield start
    for served in started:
        served.process.terminate()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_iops_limit_holds_fio_at_it_and_set_limits_changes_it_live(daemon) -> None:
    port = free_port()
    served = daemon("a,iops=500", metrics=port)
    (job,) = served.fio("a", runtime=5, ramp=1)
    assert job["read"]["iops"] == pytest.approx(500, rel=0.05), job["read"]["iops"]

    done = served.ctl("set-limits", "a", "iops=250")
    assert done.returncode == 0 and done.stdout.strip() == "a: limits iops=250", done.stdout + done.stderr
    (job,) = served.fio("a", runtime=4, ramp=1)
    assert job["read"]["iops"] == pytest.approx(250, rel=0.05), job["read"]["iops"]

    for bad, error in (
        ("iops=0", "iops=0: must be more than 0"),
        ("iops=-5", "iops=-5: expected a positive whole number"),
        ("iops=500,speed=3", "unknown limit speed"),
        ("group=other", "unknown limit group"),
        ("iops-burst=2000", "iops-burst=2000 needs iops="),
    ):
        done = served.ctl("set-limits", "a", bad)
        assert done.returncode != 0 and error in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert "Traceback" not in done.stderr
    listed = served.listed()["a"]
    assert (listed["limits"], listed["group"]) == ("iops=250", None)
    assert listed["counters"]["throttled_seconds"] > 5

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as answer:
        text = answer.read().decode()
    (line,) = [line for line in text.splitlines() if line.startswith("pvcore_throttled_seconds_total{")]
    assert 'device="a"' in line and 'class="block"' in line and 'hypervisor="lpar"' in line
    assert float(line.rsplit(" ", 1)[1]) > 5

    assert served.ctl("set-limits", "a", "off").stdout.strip() == "a: limits off"
    (job,) = served.fio("a", runtime=2)
    assert job["read"]["iops"] > 750  # unlimited: whatever this machine does, well above the last limits


def test_two_devices_of_one_group_share_it_fairly(daemon, tmp_path: Path) -> None:
    served = daemon("g1,iops=500,group=pair", "g2,group=pair")
    listed = served.listed()
    assert [(listed[n]["limits"], listed[n]["group"]) for n in ("g1", "g2")] == [("iops=500", "pair")] * 2
    first, second = served.fio("g1", "g2", runtime=5, ramp=1)
    together = first["read"]["iops"] + second["read"]["iops"]
    assert together == pytest.approx(500, rel=0.05), (first["read"]["iops"], second["read"]["iops"])
    assert first["read"]["iops"] == pytest.approx(250, rel=0.1) and second["read"]["iops"] == pytest.approx(250, rel=0.1)

    image = tmp_path / "g3.img"
    image.write_bytes(bytes(MIB))
    done = served.ctl("add", f"block:name=g3,path={image},socket={served.socket('g3')},iops=400,group=pair")
    assert done.returncode != 0 and "group=pair: limits iops=400 differ from the group's iops=500" in done.stderr
    assert sorted(served.listed()) == ["g1", "g2"] and not served.socket("g3").exists()


def test_a_daemon_whose_group_members_disagree_does_not_start(tmp_path: Path) -> None:
    for name in ("x", "y"):
        (tmp_path / f"{name}.img").write_bytes(bytes(MIB))
    done = subprocess.run(
        [sys.executable, "-m", "pvcore.cli", "serve", "--hypervisor", "lpar",
         f"block:name=x,path={tmp_path / 'x.img'},socket={tmp_path / 'x.sock'},iops=500,group=g",
         f"block:name=y,path={tmp_path / 'y.img'},socket={tmp_path / 'y.sock'},bps=1M,group=g"],
        capture_output=True, text=True, timeout=120, env=dict(os.environ, PVCORE_RUN_DIR=str(tmp_path / "run")),
    )
    assert done.returncode != 0
    assert "block y: group=g: limits bps=1000000 differ from the group's iops=500 (devices x)" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "x.sock").exists()


def test_bps_limit_and_burst(daemon) -> None:
    served = daemon("bw,bps=4M", "burst,iops=200,iops-burst=1000,burst-length=2")
    bandwidth, burst = served.fio(("bw", "--bs=64k", "--ramp_time=1"), "burst", runtime=4)
    assert bandwidth["read"]["bw_bytes"] == pytest.approx(4_000_000, rel=0.05), bandwidth["read"]["bw_bytes"]
    # from idle: 1000/s until the bucket holds (1000 - 200) * 2 = 1600 more than drained, then 200/s:
    # 1600 + 200 * 4 = 2400 requests in 4 s (no burst: 821; no limit: far more)
    assert burst["read"]["total_ios"] == pytest.approx(2400, rel=0.07), burst["read"]["total_ios"]
