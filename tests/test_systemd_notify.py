"""systemd readiness: `pvcore serve` tells $NOTIFY_SOCKET READY=1, RELOADING=1 (SIGHUP) and
STOPPING=1, as systemd's Type=notify expects; the socket here is a datagram socket the test
reads, as systemd would."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pvcore import systemd_notify

TIMEOUT = 60.0


def fields(datagram: bytes) -> dict[str, str]:
    return dict(line.split("=", 1) for line in datagram.decode().splitlines())


@pytest.fixture
def notify_socket(tmp_path: Path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(TIMEOUT)
    yield sock
    sock.close()


def test_serve_tells_systemd_ready_reloading_and_stopping(tmp_path: Path, notify_socket: socket.socket) -> None:
    (tmp_path / "disk.img").write_bytes(bytes(1 << 20))
    env = dict(os.environ, NOTIFY_SOCKET=str(tmp_path / "notify"), PVCORE_RUN_DIR=str(tmp_path / "run"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "pvcore.cli", "serve", "--hypervisor", "lpar",
         f"block:path={tmp_path / 'disk.img'},socket={tmp_path / 'vm1-disk.sock'}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        first = fields(notify_socket.recv(4096))
        assert first == {"READY": "1", "STATUS": "serving 1 device(s)"}
        assert (tmp_path / "vm1-disk.sock").exists()  # ready means the device is reachable
        proc.send_signal(signal.SIGHUP)
        reload = fields(notify_socket.recv(4096))
        assert reload["RELOADING"] == "1" and int(reload["MONOTONIC_USEC"]) > 0
        assert fields(notify_socket.recv(4096)) == {"READY": "1", "STATUS": "serving 1 device(s)"}
        proc.send_signal(signal.SIGTERM)
        assert fields(notify_socket.recv(4096))["STOPPING"] == "1"
        assert proc.wait(TIMEOUT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_abstract_notify_socket_and_no_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"pvcore-test-notify-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(TIMEOUT)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert systemd_notify.stopping()
        assert fields(sock.recv(4096))["STOPPING"] == "1"
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not systemd_notify.ready("serving")
    monkeypatch.setenv("NOTIFY_SOCKET", "relative/path")
    assert not systemd_notify.ready("serving")


def test_the_contrib_unit_waits_for_readiness() -> None:
    import configparser

    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read(Path(__file__).parent.parent / "contrib" / "pvcore-daemon.service")
    assert unit["Service"]["Type"] == "notify" and unit["Service"]["NotifyAccess"] == "main"
    assert unit["Service"]["ExecReload"] == "/bin/kill -HUP $MAINPID"
