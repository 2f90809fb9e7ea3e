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


def test_a_front_door_the_plugin_refuses_fails_serve_with_one_line(tmp_path: Path) -> None:
    env = dict(os.environ, PVCORE_RUN_DIR=str(tmp_path / "run"))
    done = subprocess.run(
        [sys.executable, "-m", "pvcore.cli", "serve", "--hypervisor", "kvm",
         f"rng:socket={tmp_path}/egd.sock,protocol=egd,socket-mode=client"],
        capture_output=True, text=True, timeout=60, env=env,
    )
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("pvcore: error:") and "socket-mode=client" in last
    assert "Traceback" not in done.stderr


def test_the_command_line_of_the_contract_serves_all_four_classes(tmp_path: Path) -> None:
    """The DEVICE strings users script against, relative paths included (issue example shape)."""
    (tmp_path / "disk.img").write_bytes(bytes(1 << 20))
    run = tmp_path / "run"
    env = dict(os.environ, PVCORE_RUN_DIR=str(run))
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pvcore.cli", "serve", "--hypervisor", "kvm",
             f"block:path=disk.img,socket={run}/vm1-vda.sock",
             f"net:socket={run}/vm1-net.sock,mac=52:54:00:00:00:01,switch=lan0",
             f"rng:socket={run}/vm1-rng.sock,rate=4096/1s",
             f"console:socket={run}/vm1-con.sock,log=vm1.log"],
            cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, env=env,
        )
        try:
            wait_for(lambda: "serving 4 device(s)" in log.read_text() or proc.poll() is not None, what="serve")
            assert proc.poll() is None, log.read_text()
            names = sorted(p.name for p in run.iterdir() if p.suffix == ".sock")
            assert names == [
                "console-vm1-con.sock", "control.sock", "vm1-con.sock", "vm1-net.sock", "vm1-rng.sock", "vm1-vda.sock"
            ]
            assert (tmp_path / "vm1.log").exists()
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(20) == 0
    assert sorted(p.name for p in run.iterdir() if p.suffix == ".sock") == []
