"""A frontend that shrinks its guest RAM under a running ring must not kill the daemon.

Touching a mapped page past the end of a file raises SIGBUS, which would end
``pvcore serve`` and every guest it serves. The daemon therefore maps only
memory sealed against shrinking. Run in a real ``pvcore serve`` process, so
that a SIGBUS would show as the daemon's death, not as a test crash.

The refusal is the core's (the vhost-user transport and its default memory
primitive); ``--hypervisor kvm`` only because ``pvcore serve`` needs a
hypervisor whose front door is vhost-user, and kvm is the in-tree one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pvcore.devices.block.virtio_blk import REQUEST_HEADER, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN
from pvcore.ring.virtqueue import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from pvcore.testing.vhost_user_frontend import FrontendError, VhostUserFrontend


def wait_for(predicate, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def daemon(tmp_path: Path):
    """``pvcore serve`` with two disks: the victim's and a bystander's."""
    for name in ("victim", "bystander"):
        (tmp_path / f"{name}.img").write_bytes(bytes([len(name)]) * (1 << 20))
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pvcore.cli", "serve", "--hypervisor", "kvm",
             f"block:name=victim,path={tmp_path / 'victim.img'},socket={tmp_path / 'victim.sock'}",
             f"block:name=bystander,path={tmp_path / 'bystander.img'},socket={tmp_path / 'bystander.sock'}"],
            stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ, PVCORE_RUN_DIR=str(tmp_path / "run")),
        )
    try:
        wait_for(lambda: b"serving " in log.read_bytes() or proc.poll() is not None, "pvcore serve to start")
        assert proc.poll() is None, log.read_text()
        yield proc, log
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def read_sector(frontend: VhostUserFrontend) -> bytes:
    used = frontend.request(0, [REQUEST_HEADER.pack(VIRTIO_BLK_T_IN, 0, 0)], [512, 1])
    assert used.data[-1] == VIRTIO_BLK_S_OK
    return used.data[:512]


def test_shrinking_guest_ram_under_a_running_ring_costs_only_that_frontend(daemon, tmp_path):
    proc, log = daemon
    with VhostUserFrontend.connect(tmp_path / "victim.sock", sealed_ram=False, timeout=10.0) as victim:
        try:
            victim.start(queue_size=64)
        except (FrontendError, OSError):
            pass  # refused at SET_MEM_TABLE: the daemon never mapped memory it could lose
        else:
            # The rings, the header and the data buffer sit in the low half; the
            # status byte the daemon writes lies in the half the frontend cuts off.
            ram, queue = victim.ram, victim.queues[0]
            header, data = ram.alloc(16), ram.alloc(512)
            ram.memory.write(header, REQUEST_HEADER.pack(VIRTIO_BLK_T_IN, 0, 0))
            lost = ram.guest_addr + ram.size * 3 // 4
            assert data + 512 <= ram.size // 2
            os.ftruncate(ram.fd, ram.size // 2)
            queue.write_descriptor(0, header, 16, VIRTQ_DESC_F_NEXT, 1)
            queue.write_descriptor(1, data, 512, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 2)
            queue.write_descriptor(2, lost, 1, VIRTQ_DESC_F_WRITE, 0)
            queue.post_head(0)
            os.eventfd_write(victim.kicks[0], 1)
            wait_for(lambda: proc.poll() is not None or ram.memory.read_u16(queue.used_addr + 2), "the request", 10.0)
    wait_for(lambda: proc.poll() is not None or b"not sealed against shrinking" in log.read_bytes(), "the refusal")
    assert proc.poll() is None, f"pvcore serve died (exit {proc.returncode}):\n{log.read_text()}"
    with VhostUserFrontend.connect(tmp_path / "bystander.sock", timeout=10.0) as bystander:
        bystander.start(queue_size=64)
        assert read_sector(bystander) == bytes([len("bystander")]) * 512
        with pytest.raises(PermissionError):
            os.ftruncate(bystander.ram.fd, 0)
        assert read_sector(bystander) == bytes([len("bystander")]) * 512
    with VhostUserFrontend.connect(tmp_path / "victim.sock", timeout=10.0) as victim:
        victim.start(queue_size=64)
        assert read_sector(victim) == bytes([len("victim")]) * 512
    assert proc.poll() is None
