"""`pvcore top`: rates computed from two control-socket answers of a daemon a real NBD client
used, and the --once table against a running daemon."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pvcore.control import request
from pvcore.top import percentile, rates, render

from test_control import Serve  # noqa: E402  (the same running daemon helper)

MIB = 1024 * 1024


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_top_rates_are_what_the_client_did_between_two_answers(tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(4 * MIB))
    sock = tmp_path / "vm1-disk.sock"
    served = Serve(tmp_path, "--metrics", f"127.0.0.1:{free_port()}", f"block:path={disk},socket={sock}")
    try:
        before = request(served.run_dir, {"command": "list"})["devices"]
        subprocess.run(
            ["qemu-io", "-f", "raw", "-c", "write -P 0x11 0 1M", "-c", "read 0 64k", "-c", "read 64k 64k",
             f"nbd+unix:///?socket={sock}"],
            check=True, timeout=120, capture_output=True,
        )
        after = request(served.run_dir, {"command": "list"})["devices"]
        done = served.ctl("list")
        table = subprocess.run(
            [sys.executable, "-m", "pvcore.cli", "top", "--once", "--interval", "0.2"],
            capture_output=True, text=True, timeout=120, env=served.env,
        )
    finally:
        assert served.stop() == 0
    counters = after[0]["counters"]
    requests = sum(counters[op] for op in ("reads", "writes", "flushes", "discards", "write_zeroes"))
    (row,) = rates(before, after, 2.0)
    assert row.name == "vm1-disk" and row.device_class == "block" and row.domain == "vm1"
    assert row.iops == requests / 2 and counters["reads"] == 2
    assert row.bytes_per_second == (MIB + 128 * 1024) / 2
    assert row.in_flight == 0 and row.interrupts_per_completion is None  # NBD: QEMU owns the ring
    assert row.p50 is not None and row.p99 is not None and row.p50 <= row.p99
    assert done.returncode == 0 and "bytes_written=1048576" in done.stdout
    assert table.returncode == 0, table.stderr
    header, line = table.stdout.splitlines()
    assert header.split() == ["DEVICE", "CLASS", "DOMAIN", "IOPS", "BW/s", "INFL", "IRQ/C", "P50", "P99", "WORKER"]
    assert line.split()[:6] == ["vm1-disk", "block", "vm1", "0", "0B", "0"] and line.split()[-1] == "-"


def test_percentiles_and_ring_ratio_from_counters() -> None:
    assert percentile((0.001, 0.01), (0, 0, 0), 0.5) is None
    assert percentile((0.001, 0.01), (98, 1, 1), 0.5) == 0.001
    assert percentile((0.001, 0.01), (98, 1, 1), 0.99) == 0.01
    assert percentile((0.001, 0.01), (0, 0, 5), 0.99) == float("inf")
    ring = {"name": "vm1-vda", "class": "block", "domain": "vm1"}
    before = [{**ring, "counters": {"reads": 10, "writes": 0, "flushes": 0, "discards": 0, "write_zeroes": 0,
                                    "bytes_read": 40960, "bytes_written": 0, "in_flight": 0,
                                    "interrupts": 5, "completions": 10}}]
    after = [{**ring, "counters": {**before[0]["counters"], "reads": 110, "bytes_read": 450560, "in_flight": 3,
                                   "interrupts": 30, "completions": 110}}]
    (row,) = rates(before, after, 1.0)
    assert (row.iops, row.bytes_per_second, row.in_flight, row.interrupts_per_completion) == (100, 409600, 3, 0.25)
    assert "0.25" in render([row]) and render([row]).splitlines()[1].split()[-1] == "-"
    (spread,) = rates(before, [{**after[0], "worker": "w0,w1"}], 1.0)
    assert spread.worker == "w0,w1" and render([spread]).splitlines()[1].split()[-1] == "w0,w1"
    with pytest.raises(ValueError):
        rates(before, after, 0)


def test_top_without_a_daemon_is_one_error(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pvcore.cli", "top", "--once"], capture_output=True, text=True, timeout=60,
        env=dict(os.environ, PVCORE_RUN_DIR=str(tmp_path)),
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"pvcore: error: no control socket at {tmp_path / 'control.sock'}: is `pvcore serve` running with --run-dir {tmp_path}?"
    ]
