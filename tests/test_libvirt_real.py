"""`pvcore deploy` and `pvcore daemon` against a real libvirtd (QEMU 7.2 driver, TCG, Debian's kernel).

The setup starts libvirtd as shared/notes/real-guests.md describes
(:func:`pvcore.testing.libvirtd.ensure_libvirtd`) and defines one domain:
``<domain type='qemu'>``, direct kernel boot of the guest harness's kernel and
initramfs, memfd shared memory, its serial console written to a file. The
guest reads its vhost-user disk (md5sum) and /dev/hwrng (virtio-rng on an EGD
backend), says it is waiting, then polls a sector of the disk with O_DIRECT
until the host writes a marker there, reads a block and powers off.

Two boots:

1. ``pvcore deploy`` a disk and an rng with no daemon running (deploy starts
   a one-domain server); ``virsh start``; the guest's results are checked;
   ``virsh destroy`` releases the backends and removes their sockets.
2. ``pvcore daemon`` runs; libvirt alone starts the domain; the daemon serves
   it from metadata. While the guest waits, the daemon is stopped (SIGTERM)
   and started again; then the marker is written and the guest's next disk
   reads go through the new daemon (QEMU reconnected).

Net is not part of this test: libvirt 9.0 cannot ask QEMU 7.2 for
``vectors=0`` on a vhost-user NIC, without which QEMU 7.2 under TCG
segfaults (see plugins/kvm/tests/test_real_guests.py); its XML is checked on
the test driver. These tests never skip: CI installs libvirt and QEMU.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import libvirt
import pytest

from pvcore.libvirt.runlock import domain_lock_path, is_held
from pvcore.testing.guest import build_initramfs, fetch_kernel, parse_results, result_line
from pvcore.testing.libvirtd import ensure_libvirtd

pytestmark = pytest.mark.guest

DISK_SIZE = 4 << 20
MARKER_OFFSET = 3 << 20
MARKER = b"PVCORE-MARKER-AFTER-RESTART"
AFTER_BLOCK = 200  # the 4 KiB block the guest reads after the restart

SCRIPT = r"""
{md5}
{rng_current}
{rng_bytes}
echo PVCORE-WAITING
i=0
while [ $i -lt 300 ]; do
  dd if=/dev/vda bs=4096 skip={marker_block} count=1 iflag=direct 2>/dev/null | grep -q {marker} && break
  sleep 0.2; i=$((i + 1))
done
{marker_seen}
{after_restart}
"""


def guest_script() -> str:
    return SCRIPT.format(
        md5=result_line("md5", "md5sum /dev/vda | cut -d' ' -f1"),
        rng_current=result_line("rng_current", "cat /sys/class/misc/hw_random/rng_current"),
        rng_bytes=result_line("rng_bytes", "dd if=/dev/hwrng bs=512 count=8 iflag=fullblock 2>/dev/null | wc -c"),
        marker_block=MARKER_OFFSET // 4096,
        marker=MARKER.decode(),
        marker_seen=result_line("marker_polls", "echo $i"),
        after_restart=result_line(
            "after_restart", f"dd if=/dev/vda bs=4096 skip={AFTER_BLOCK} count=1 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1"
        ),
    )


def domain_xml(name: str, kernel: Path, initrd: Path, log: Path) -> str:
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>512</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel}</kernel><initrd>{initrd}</initrd><cmdline>console=ttyS0 quiet panic=-1</cmdline></os>
  <features><acpi/></features>
  <memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>
  <on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot><on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <serial type='file'><source path='{log}'/><target port='0'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>"""


def pvcore(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pvcore.cli", *args], capture_output=True, text=True, timeout=120, env=env
    )


def wait_for_text(path: Path, text: str, timeout: float, domain) -> str:
    deadline = time.monotonic() + timeout
    while True:
        output = path.read_text(errors="replace") if path.exists() else ""
        if text in output:
            return output
        if not domain.isActive() or time.monotonic() > deadline:
            raise AssertionError(f"{text!r} never reached {path} (domain active: {domain.isActive()}):\n{output[-3000:]}")
        time.sleep(0.2)


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout:.0f} s")
        time.sleep(0.05)


class HostDaemonProcess:
    """`pvcore daemon --connect URI` as a subprocess, with its log."""

    def __init__(self, uri: str, run_dir: Path, log: Path) -> None:
        self.command = [sys.executable, "-m", "pvcore.cli", "daemon", "--connect", uri, "--run-dir", str(run_dir)]
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        before = self.log.read_text().count("following ") if self.log.exists() else 0
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT)
        wait_until(
            lambda: self.proc.poll() is not None or self.log.read_text().count("following ") > before,
            30, "pvcore daemon did not come up",
        )
        assert self.proc.poll() is None, self.log.read_text()

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def kill_domain_server(run_dir: Path, domain_uuid: str) -> None:
    """End the one-domain server deploy started, if a failed test left it running."""
    lock = run_dir / f"domain-{domain_uuid}.lock"
    pid = lock.read_text().strip() if lock.exists() else ""
    if pid.isdigit():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return
        if b"pvcore.cli\0daemon" in cmdline and domain_uuid.encode() in cmdline:
            os.kill(int(pid), signal.SIGKILL)


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory):
    uri = ensure_libvirtd()
    work = tmp_path_factory.mktemp("libvirt-real")
    run_dir = work / "run"
    disk = work / "disk.img"
    disk.write_bytes(os.urandom(DISK_SIZE))
    kernel = fetch_kernel("x86_64")
    initrd = build_initramfs(kernel, guest_script(), ["virtio_blk", "virtio_rng"], work)
    log = work / "serial.log"
    name = f"pvcore-{uuid.uuid4().hex[:8]}"
    conn = libvirt.open(uri)
    domain = conn.defineXML(domain_xml(name, kernel.kernel, initrd, log))
    host_daemon = HostDaemonProcess(uri, run_dir, work / "daemon.log")
    facts: dict[str, object] = {"disk_md5": hashlib.md5(disk.read_bytes()).hexdigest(), "name": name}
    virsh = ["virsh", "-q", "-c", uri]
    try:
        started = time.monotonic()
        deployed = pvcore("deploy", "--connect", uri, "--run-dir", str(run_dir), name, f"block:path={disk}", "rng:rate=65536/1s")
        assert deployed.returncode == 0, deployed.stderr
        facts["deploy_out"] = deployed.stdout
        sockets = [run_dir / f"{name}-block0.sock", run_dir / f"{name}-rng0.sock"]
        facts["sockets_after_deploy"] = [s.is_socket() for s in sockets]
        subprocess.run([*virsh, "start", name], check=True, capture_output=True, timeout=60)
        facts["boot1"] = parse_results(wait_for_text(log, "PVCORE-WAITING", 120, domain))
        subprocess.run([*virsh, "destroy", name], check=True, capture_output=True, timeout=60)
        wait_until(lambda: not any(s.exists() for s in sockets), 15, "sockets were not removed after virsh destroy")
        domain_lock = domain_lock_path(run_dir, domain.UUIDString())
        wait_until(lambda: not is_held(domain_lock), 15, "the one-domain server did not exit")
        facts["boot1_seconds"] = time.monotonic() - started

        started = time.monotonic()
        host_daemon.start()
        facts["sockets_with_daemon"] = [s.is_socket() for s in sockets]
        domain.create()
        wait_for_text(log, "PVCORE-WAITING", 120, domain)
        assert host_daemon.stop() == 0
        facts["sockets_while_daemon_down"] = [s.exists() for s in sockets]
        host_daemon.start()
        with open(disk, "r+b") as image:
            image.seek(MARKER_OFFSET)
            image.write(MARKER)
        output = wait_for_text(log, "PVCORE-GUEST-DONE", 120, domain)
        facts["boot2"] = parse_results(output)
        wait_until(lambda: not domain.isActive(), 30, "the guest did not power off")
        probe = pvcore("probe", "--connect", uri, "--run-dir", str(run_dir))
        facts["probe_out"] = probe.stdout + probe.stderr
        facts["boot2_seconds"] = time.monotonic() - started
        undeployed = pvcore("undeploy", "--connect", uri, name)
        assert undeployed.returncode == 0, undeployed.stderr
        facts["undeploy_out"] = undeployed.stdout
        facts["sockets_after_undeploy"] = [s.exists() for s in sockets]
        facts["daemon_rc"] = host_daemon.stop()
    finally:
        host_daemon.kill()
        if domain.isActive():
            domain.destroy()
        kill_domain_server(run_dir, domain.UUIDString())
        domain.undefine()
        conn.close()
    facts["disk"] = disk.read_bytes()
    facts["daemon_log"] = host_daemon.log.read_text(errors="replace")
    return facts


def test_deploy_starts_backends_and_records_the_devices(real) -> None:
    out = real["deploy_out"]
    name = real["name"]
    assert out.startswith(f"domain {name} (shut off; plugin kvm): deploying 2 device(s)\n")
    assert f"  block {name}-block0: <disk vhostuser> vda, socket " in out
    assert f"  rng {name}-rng0: <rng virtio>, socket " in out
    assert "  served by: a one-domain server (pid " in out
    assert real["sockets_after_deploy"] == [True, True]


def test_guest_reads_the_deployed_disk_and_rng(real) -> None:
    results = real["boot1"]
    assert results["md5"] == real["disk_md5"]
    assert results["rng_current"].startswith("virtio_rng")
    assert results["rng_bytes"] == "4096"


def test_daemon_serves_from_metadata_and_survives_its_restart(real) -> None:
    assert real["sockets_with_daemon"] == [True, True]
    assert real["sockets_while_daemon_down"] == [False, False]
    results = real["boot2"]
    assert results["md5"] == real["disk_md5"]
    assert results["rng_bytes"] == "4096"
    assert int(results["marker_polls"]) < 300
    block = real["disk"][AFTER_BLOCK * 4096 : (AFTER_BLOCK + 1) * 4096]
    assert results["after_restart"] == hashlib.md5(block).hexdigest()
    assert real["daemon_log"].count("following qemu:///system through plugin kvm: 2 device(s) of 1 domain(s)") == 2


def test_probe_and_undeploy(real) -> None:
    name = real["name"]
    assert f"domain {name}: shut off, shared memory: yes" in real["probe_out"]
    assert f"    block {name}-block0 socket " in real["probe_out"]
    assert real["undeploy_out"].splitlines()[-1] == "  backends: released, sockets removed"
    assert real["sockets_after_undeploy"] == [False, False]
    assert real["daemon_rc"] == 0
