"""The control socket of `pvcore serve` and `pvcore ctl`: list with counters of what a real NBD
client did, add and remove devices live, change an rng's rate, refuse bad requests and other
users, changing nothing."""

from __future__ import annotations

import json
import os
import pwd
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from pvcore.control import control_socket_path, request

MIB = 1024 * 1024


class Serve:
    """A `pvcore serve --hypervisor lpar` in its own run directory."""

    def __init__(self, tmp: Path, *devices: str) -> None:
        self.run_dir = tmp / "run"
        self.log = tmp / "serve.log"
        self.env = dict(os.environ, PVCORE_RUN_DIR=str(self.run_dir))
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pvcore.cli", "serve", "--hypervisor", "lpar", *devices],
                stdout=out, stderr=subprocess.STDOUT, env=self.env,
            )
        self._wait_for_control_socket()

    def _wait_for_control_socket(self) -> None:
        import time

        deadline = time.monotonic() + 60
        while " device(s); default hypervisor " not in self.log.read_text():
            assert self.proc.poll() is None and time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.1)

    def ctl(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "pvcore.cli", "ctl", *args], capture_output=True, text=True, timeout=120, env=self.env
        )

    def devices(self) -> dict[str, dict]:
        done = self.ctl("list", "--json")
        assert done.returncode == 0, done.stderr
        return {device["name"]: device for device in json.loads(done.stdout)}

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)


@pytest.fixture
def serve(tmp_path: Path):
    started: list[Serve] = []

    def start(*devices: str) -> Serve:
        started.append(Serve(tmp_path, *devices))
        return started[-1]

    yield start
    for served in started:
        if served.proc.poll() is None:
            served.proc.kill()
            served.proc.wait()


def test_list_add_remove_and_rate_through_pvcore_ctl(tmp_path: Path, serve) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(4 * MIB))
    sock = tmp_path / "vm1-disk.sock"
    served = serve(f"block:path={disk},socket={sock}")
    mode = os.stat(control_socket_path(served.run_dir)).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600

    source = tmp_path / "source.img"
    source.write_bytes(os.urandom(MIB))
    subprocess.run(["nbdcopy", str(source), f"nbd+unix:///?socket={sock}"], check=True, timeout=120)
    listed = served.devices()
    assert list(listed) == ["vm1-disk"]
    assert listed["vm1-disk"]["class"] == "block" and listed["vm1-disk"]["hypervisor"] == "lpar"
    counters = listed["vm1-disk"]["counters"]
    assert counters["bytes_written"] == MIB and counters["bytes_read"] == 0 and counters["in_flight"] == 0

    second = tmp_path / "vm2-disk.sock"
    other = tmp_path / "other.img"
    other.write_bytes(b"\x5a" * MIB)
    done = served.ctl("add", f"block:path={other},socket={second}")
    assert done.returncode == 0 and done.stdout.strip() == "added vm2-disk", done.stderr
    copy = tmp_path / "copy.img"
    subprocess.run(["nbdcopy", f"nbd+unix:///?socket={second}", str(copy)], check=True, timeout=120)
    assert copy.read_bytes() == other.read_bytes()
    assert served.devices()["vm2-disk"]["counters"]["bytes_read"] == MIB

    fifo = tmp_path / "vm2-rng.fifo"
    assert served.ctl("add", f"rng:socket={fifo},rate=4096/1s").returncode == 0
    done = served.ctl("set-rate", "vm2-rng", "1024/100ms")
    assert done.returncode == 0 and done.stdout.strip() == "vm2-rng: rate 1024/100ms", done.stderr

    done = served.ctl("remove", "vm1-disk")
    assert done.returncode == 0, done.stderr
    assert not sock.exists() and list(served.devices()) == ["vm2-disk", "vm2-rng"]
    assert served.stop() == 0
    assert disk.read_bytes()[:MIB] == source.read_bytes()


def test_bad_requests_get_one_error_and_change_nothing(tmp_path: Path, serve) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(MIB))
    served = serve(f"block:path={disk},socket={tmp_path / 'vm1-disk.sock'}")
    before = served.devices()
    for args, error in [
        (("remove", "nope"), "pvcore: error: no device named 'nope'; devices: vm1-disk"),
        (("add", f"block:path={tmp_path / 'missing.img'},socket={tmp_path / 'vm2.sock'}"), "missing.img"),
        (("add", f"block:path={disk},socket={tmp_path / 'vm1-disk.sock'}"), "two devices"),
        (("add", "block:colour=blue"), "has no option 'colour'"),
        (("add", f"block:path={disk},socket={tmp_path / 'nodir' / 'vm2.sock'}"), "nodir does not exist"),
        (("set-rate", "vm1-disk", "10/1s"), "no rng device named 'vm1-disk'"),
    ]:
        done = served.ctl(*args)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and error in lines[0], (args, done.stderr)
    assert not (tmp_path / "vm2.sock").exists()
    for raw, error in [
        (b"not json\n", "request is not JSON"),
        (b"[1, 2]\n", "must be a JSON object"),
        (b'{"command": 5}\n', "unknown command 5"),
        (b'{"command": "remove", "device": 7}\n', "'device' must be a non-empty string"),
        (b"x" * (70 * 1024) + b"\n", "request longer than"),
    ]:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(60)
            sock.connect(str(control_socket_path(served.run_dir)))
            sock.sendall(raw)
            answer = json.loads(sock.makefile("rb").readline())
        assert answer["ok"] is False and error in answer["error"], (raw[:40], answer)
    after = served.devices()
    assert after.keys() == before.keys() and served.proc.poll() is None


def test_another_user_is_refused_even_through_an_open_socket(tmp_path: Path, serve) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to connect as another user (CI runs as root)")
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(MIB))
    served = serve(f"block:path={disk},socket={tmp_path / 'vm1-disk.sock'}")
    path = control_socket_path(served.run_dir)
    os.chmod(served.run_dir, 0o755)
    os.chmod(path, 0o666)  # only the uid check stands between this user and the daemon now
    nobody = pwd.getpwnam("nobody")
    client = (
        "import json, socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]);"
        " print(s.makefile('rb').readline().decode())"  # refused on connect, before any request is read
    )
    # The run directory's parents are root's own: the client reaches it through a directory fd it inherits.
    directory = os.open(served.run_dir, os.O_PATH | os.O_DIRECTORY)
    try:
        done = subprocess.run(
            ["/usr/bin/python3", "-c", client, f"/proc/self/fd/{directory}/{path.name}"], capture_output=True, text=True,
            timeout=60, user=nobody.pw_uid, group=nobody.pw_gid, extra_groups=[], pass_fds=[directory], cwd="/",
        )
    finally:
        os.close(directory)
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer == {"ok": False, "error": f"uid {nobody.pw_uid} may not control this daemon"}
    assert list(served.devices()) == ["vm1-disk"]
    assert request(served.run_dir, {"command": "list"})["ok"]
