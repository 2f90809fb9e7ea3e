"""`pvcore serve` as operators run it: sockets, signals, logs, TOML config.

The kvm plugin's console front door is a QEMU chardev socket, so a plain
Unix-socket client plays QEMU here; no guest is booted.
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest


def wait_for(predicate, timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class Serve:
    def __init__(self, tmp: Path, *args: str) -> None:
        self.log = tmp / "serve.log"
        env = dict(os.environ, PVCORE_RUN_DIR=str(tmp / "run"))
        self.out = open(self.log, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pvcore.cli", "serve", *args], stdout=self.out, stderr=subprocess.STDOUT, env=env
        )
        wait_for(lambda: "serving " in self.text() or self.proc.poll() is not None, what="pvcore serve to start")
        assert self.proc.poll() is None, self.text()

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(20)
        self.out.close()
        return code


@pytest.fixture
def served(tmp_path: Path):
    started: list[Serve] = []

    def start(*args: str) -> Serve:
        serve = Serve(tmp_path, *args)
        started.append(serve)
        return serve

    yield start
    for serve in started:
        if serve.proc.poll() is None:
            serve.proc.kill()
            serve.proc.wait()


def test_console_log_sighup_reopen_socket_mode_and_sigterm_cleanup(tmp_path: Path, served) -> None:
    con, vda = tmp_path / "vm1-con.sock", tmp_path / "vm1-vda.sock"
    log = tmp_path / "vm1.log"
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    serve = served(
        "--hypervisor", "kvm", f"console:socket={con},log={log}", f"block:path={disk},socket={vda}"
    )
    for path in (con, vda):
        assert stat.S_ISSOCK(path.stat().st_mode)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    qemu = socket.socket(socket.AF_UNIX)
    qemu.connect(str(con))
    qemu.sendall(b"first boot line\n")
    wait_for(lambda: log.exists() and b"first boot line" in log.read_bytes(), what="console output in the log")
    rotated = tmp_path / "vm1.log.1"
    log.rename(rotated)
    serve.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "log files reopened" in serve.text(), what="SIGHUP handling")
    qemu.sendall(b"after rotation\n")
    wait_for(lambda: log.exists() and b"after rotation" in log.read_bytes(), what="output in the reopened log")
    assert b"after rotation" not in rotated.read_bytes()
    qemu.close()
    assert serve.stop() == 0
    assert not con.exists() and not vda.exists()
    text = serve.text()
    assert "device vm1-con (console) up" in text and "device vm1-vda (block) up" in text
    assert "device vm1-con (console) down" in text and "device vm1-vda (block) down" in text
    assert "Traceback" not in text


def test_toml_config_names_the_same_devices(tmp_path: Path, served) -> None:
    sock = tmp_path / "cfg-rng.sock"
    config = tmp_path / "pvcore.toml"
    config.write_text(f'hypervisor = "kvm"\n\n[[device]]\nclass = "rng"\nsocket = "{sock}"\nrate = "1024/1s"\n')
    serve = served("--config", str(config))
    assert sock.exists()
    assert "device cfg-rng (rng) up" in serve.text()
    assert serve.stop() == 0
    assert not sock.exists()


def test_a_device_that_cannot_start_fails_serve_with_one_line(tmp_path: Path) -> None:
    env = dict(os.environ, PVCORE_RUN_DIR=str(tmp_path / "run"))
    done = subprocess.run(
        [sys.executable, "-m", "pvcore.cli", "serve", "--hypervisor", "kvm",
         f"rng:socket={tmp_path}/ok.sock", f"block:path={tmp_path}/missing.img,socket={tmp_path}/b.sock"],
        capture_output=True, text=True, timeout=60, env=env,
    )
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("pvcore: error:") and "missing.img" in last and "no such file" in last
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "ok.sock").exists()
