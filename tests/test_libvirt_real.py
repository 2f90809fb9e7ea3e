"""`pvcore deploy` and `pvcore daemon` against a real libvirtd (QEMU 7.2 driver, TCG, Debian's kernel).

The setup starts libvirtd as shared/notes/real-guests.md describes
(:func:`pvcore.testing.libvirtd.ensure_libvirtd`) and defines one domain:
``<domain type='qemu'>``, direct kernel boot of the guest harness's kernel and
initramfs, memfd shared memory, its serial console written to a file. The
guest reads its vhost-user disk (md5sum) and /dev/hwrng (virtio-rng on an EGD
backend), says it is waiting, then polls a sector of the disk with O_DIRECT
until the host writes a marker there, reads a block, then four writers in
parallel write numbered 4 KiB records with O_DIRECT (an acknowledgement on
the console after each) until the host writes a stop marker, while
/dev/hwrng is read twice a second in the background; it reads the records
back (md5) and powers off.

Two boots:

1. ``pvcore deploy`` a disk and an rng with no daemon running (deploy starts
   a one-domain server); ``virsh start``; the guest's results are checked;
   ``virsh destroy`` releases the backends and removes their sockets.
2. ``pvcore daemon --workers 2`` runs; libvirt alone starts the domain; the
   daemon follows libvirt in its own process and serves the devices from
   metadata in its two worker processes (``ctl list`` names each device's
   worker, a child of the daemon; the disk and the rng are in different
   ones). While the guest waits, the daemon is stopped (SIGTERM)
   and started again; then the marker is written and the guest's next disk
   reads go through the new daemon (QEMU reconnected). While the guest writes
   records, the daemon is restarted again as ``systemctl restart`` would
   (SIGTERM, then the same command): the writes go on, none fails, every
   acknowledged record is in the image. Then the worker serving the disk is
   killed with SIGKILL mid-write: the daemon starts it again on the socket it
   kept, QEMU reconnects and resubmits what was in flight, the writes go on
   and none fails, and the rng's worker is not touched. Then ``virsh save`` mid-write (every
   record acknowledged before it is in the image), ``virsh restore``: the
   guest goes on writing and reads back every record, before and after.
   The guest's rng reads go on after the restart (QEMU 7.2's rng-egd never
   sends again a request the old daemon had taken: kvm's EGD door answers it
   unasked at connect) and after the restore.

   Hotplug, in the same boot while the guest waits for the marker: ``pvcore
   deploy`` a second disk to the running domain (the host daemon serves it,
   deploy sees it served through the control socket, then libvirt's
   attach-device; machine ``pc``, so ACPI PCI hotplug); the guest, which reads
   the first block of /dev/vdb with O_DIRECT every 0.3 s and prints its md5
   when it changes, sees it appear; ``pvcore ctl swap-media`` gives the disk
   another file and the guest reads the new block; ``pvcore undeploy DOMAIN
   NAME`` detaches it and the guest sees /dev/vdb go, while vda stays.

Net is not part of this test: libvirt 9.0 cannot ask QEMU 7.2 for
``vectors=0`` on a vhost-user NIC, without which QEMU 7.2 under TCG
segfaults (see plugins/kvm/tests/test_real_guests.py); its XML is checked on
the test driver. These tests never skip: CI installs libvirt and QEMU.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import libvirt
import pytest

from pvcore.libvirt.metadata import read_specs
from pvcore.libvirt.runlock import domain_lock_path, is_held
from pvcore.testing.guest import build_initramfs, fetch_kernel, parse_results, result_line
from pvcore.testing.libvirtd import ensure_libvirtd

pytestmark = pytest.mark.guest

DISK_SIZE = 8 << 20
MARKER_OFFSET = 3 << 20
MARKER = b"PVCORE-MARKER-AFTER-RESTART"
AFTER_BLOCK = 200  # the 4 KiB block the guest reads after the restart
STOP_OFFSET = MARKER_OFFSET + 4096
STOP = b"PVCORE-STOP-WRITING"
RECORD = 4096
RECORDS_BASE = 1024
"""Writer w's record n is the 4 KiB block RECORDS_BASE + w * AREA + n (from 4 MiB on)."""
WRITERS = 4
"""Parallel writers, so that requests are in flight when the daemon stops."""
AREA = 250
MAX_RECORDS = AREA - 1
PHASE_RECORDS = 30
WORKERS = 2
"""Worker processes of the host daemon (``pvcore daemon --workers``)."""
RNG_WAIT = 30.0
"""How long the test waits for the guest's first rng read after the daemon restart or the restore."""
"""Records the guest must acknowledge after each step (daemon restart, restore) before the next."""

MARKER_POLLS = 1500
"""How often the guest polls for the marker (0.2 s apart) before it goes on without it."""
HOT_SIZE = 4 << 20

SCRIPT = r"""
{md5}
{rng_current}
{rng_bytes}
(seen=""; while [ ! -e /tmp/stop ]; do
  now=gone; [ -b /dev/vdb ] && now=$(dd if=/dev/vdb bs=4096 count=1 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
  [ "$now" != "$seen" ] && echo "VDB $now" && seen=$now
  sleep 0.3
done) &
echo PVCORE-WAITING
i=0
while [ $i -lt {marker_polls} ]; do
  dd if=/dev/vda bs=4096 skip={marker_block} count=1 iflag=direct 2>/dev/null | grep -q {marker} && break
  sleep 0.2; i=$((i + 1))
done
{marker_seen}
{after_restart}
dmesg > /tmp/dmesg.before
echo PVCORE-WRITING
(while [ ! -e /tmp/stop ]; do
  [ "$(dd if=/dev/hwrng bs=64 count=1 2>/dev/null | wc -c)" = 64 ] && echo RNG-OK
  sleep 0.5
done) &
writer() {{
  n=0
  while [ $n -lt {max_records} ]; do
    n=$((n + 1))
    printf 'W%d REC %08d\n' $1 $n | dd of=/dev/vda bs={record} seek=$(({records_base} + $1 * {area} + n)) count=1 \
      conv=sync,notrunc oflag=direct 2>/tmp/err$1 || {{ echo "WRITE-FAILED $1 $n: $(cat /tmp/err$1)"; return; }}
    echo "ACK $1 $n"
    sleep 0.05
    [ $((n % 4)) -eq 0 ] && dd if=/dev/vda bs=4096 skip={stop_block} count=1 iflag=direct 2>/dev/null | grep -q {stop} && return
  done
  echo "WRITER-RAN-OUT $1"
}}
pids=""
for w in {writers}; do writer $w & pids="$pids $!"; done
wait $pids
touch /tmp/stop
{records_md5}
{rng_after}
{dmesg_problems}
"""


def guest_script() -> str:
    return SCRIPT.format(
        md5=result_line("md5", "md5sum /dev/vda | cut -d' ' -f1"),
        rng_current=result_line("rng_current", "cat /sys/class/misc/hw_random/rng_current"),
        rng_bytes=result_line("rng_bytes", "dd if=/dev/hwrng bs=512 count=8 iflag=fullblock 2>/dev/null | wc -c"),
        marker_block=MARKER_OFFSET // 4096,
        marker_polls=MARKER_POLLS,
        marker=MARKER.decode(),
        marker_seen=result_line("marker_polls", "echo $i"),
        after_restart=result_line(
            "after_restart", f"dd if=/dev/vda bs=4096 skip={AFTER_BLOCK} count=1 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1"
        ),
        max_records=MAX_RECORDS,
        record=RECORD,
        records_base=RECORDS_BASE,
        area=AREA,
        writers=" ".join(str(w) for w in range(WRITERS)),
        stop_block=STOP_OFFSET // 4096,
        stop=STOP.decode(),
        records_md5=result_line(
            "records_md5",
            f"dd if=/dev/vda bs={RECORD} skip={RECORDS_BASE} count={WRITERS * AREA} iflag=direct 2>/dev/null "
            "| md5sum | cut -d' ' -f1",
        ),
        rng_after=result_line("rng_after", "timeout -s KILL 30 dd if=/dev/hwrng bs=64 count=1 2>/dev/null | wc -c"),
        dmesg_problems=result_line(
            "dmesg_problems",
            "dmesg | grep -v -x -F -f /tmp/dmesg.before | grep -i -e error -e abort -e reset -e timeout -e virtio",
        ),
    )


def acks(output: str) -> list[tuple[int, int]]:
    """The (writer, record number) pairs the guest acknowledged, in console order."""
    return [(int(w), int(n)) for w, n in re.findall(r"^ACK (\d) (\d+)\s*$", output, re.M)]


def records_in(image: bytes, records) -> list[tuple[int, int]]:
    """Those of ``records`` (writer, number) that are not in ``image`` (empty when all are)."""
    missing = []
    for writer, number in records:
        at = (RECORDS_BASE + writer * AREA + number) * RECORD
        if image[at : at + 16] != b"W%d REC %08d\n" % (writer, number):
            missing.append((writer, number))
    return missing


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
    <serial type='file'><source path='{log}' append='on'/><target port='0'/></serial>
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


def write_at(path: Path, offset: int, data: bytes) -> None:
    """Write ``data`` into the image file at ``offset`` from the host, as the guest's disk sees it."""
    with open(path, "r+b") as image:
        image.seek(offset)
        image.write(data)


def wait_for_acks(log: Path, count: int, timeout: float, domain) -> float:
    """Wait until the guest has acknowledged ``count`` records; return when the last one was seen."""
    deadline = time.monotonic() + timeout
    while True:
        output = log.read_text(errors="replace")
        if "WRITE-FAILED" in output or "WRITER-RAN-OUT" in output:
            raise AssertionError(f"a writer of the guest failed or ran out of records:\n{output[-3000:]}")
        if len(acks(output)) >= count:
            return time.monotonic()
        if not domain.isActive() or time.monotonic() > deadline:
            raise AssertionError(f"the guest acknowledged {len(acks(output))} of {count} records (domain active: "
                                 f"{domain.isActive()}):\n{output[-3000:]}")
        time.sleep(0.05)


def qemu_log_tail(name: str) -> str:
    """The end of libvirt's log of the domain's QEMU (where QEMU says why a save or restore failed)."""
    path = Path(f"/var/log/libvirt/qemu/{name}.log")
    return path.read_text(errors="replace")[-3000:] if path.exists() else f"(no {path})"


def seconds_to_rng_read(log: Path, offset: int, since: float, timeout: float) -> float | None:
    """Seconds from ``since`` until the console shows an rng read (RNG-OK) past ``offset``; None if none in ``timeout``."""
    deadline = time.monotonic() + timeout
    while "RNG-OK" not in log.read_text(errors="replace")[offset:]:
        if time.monotonic() > deadline:
            return None
        time.sleep(0.1)
    return time.monotonic() - since


def listed(run_dir: Path) -> dict[str, dict]:
    """``pvcore ctl list --json`` of the daemon serving ``run_dir``, by device name."""
    done = pvcore("ctl", "--run-dir", str(run_dir), "list", "--json")
    assert done.returncode == 0, done.stderr
    return {device["name"]: device for device in json.loads(done.stdout)}


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def kill_the_disks_worker(name: str, domain, host_daemon, run_dir: Path, log: Path) -> dict[str, object]:
    """While the guest writes: SIGKILL the worker serving the disk, wait for it to serve again and for the
    guest to acknowledge :data:`PHASE_RECORDS` more records. Returns the listings before and after and the times."""
    facts: dict[str, object] = {}
    before = listed(run_dir)
    facts["listed_before_kill"] = before
    acked = len(acks(log.read_text(errors="replace")))
    victim = before[f"{name}-block0"]["worker_pid"]
    restarts = host_daemon.log.read_text().count("serves again (")
    killed = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: host_daemon.log.read_text().count("serves again (") > restarts, 60, "the killed worker did not serve again")
    facts["worker_back_seconds"] = time.monotonic() - killed
    facts["kill_to_next_ack_seconds"] = wait_for_acks(log, acked + 1, 120, domain) - killed
    wait_for_acks(log, acked + PHASE_RECORDS, 180, domain)
    facts["listed_after_kill"] = listed(run_dir)
    return facts


def restart_save_restore_under_writes(virsh, name, domain, host_daemon, disk, log, work, sockets) -> dict[str, object]:
    """While the guest writes numbered records: restart the daemon (SIGTERM, start), kill the disk's worker,
    then virsh save and restore.

    Each step waits for :data:`PHASE_RECORDS` acknowledgements after the one before, so records are
    written across them. Returns what the tests check: the acknowledgements at each step, the records
    missing from the image at the save, when the guest's rng read again, and the times taken.
    """
    facts: dict[str, object] = {}
    wait_for_acks(log, PHASE_RECORDS, 180, domain)
    text = log.read_text(errors="replace")
    facts["acks_before_restart"] = len(acks(text))
    restarted = time.monotonic()
    assert host_daemon.stop() == 0
    host_daemon.start()
    facts["restart_seconds"] = time.monotonic() - restarted
    facts["restart_to_next_ack_seconds"] = wait_for_acks(log, facts["acks_before_restart"] + 1, 120, domain) - restarted
    wait_for_acks(log, facts["acks_before_restart"] + PHASE_RECORDS, 180, domain)
    facts["rng_back_seconds"] = seconds_to_rng_read(log, len(text), restarted, RNG_WAIT)
    facts.update(kill_the_disks_worker(name, domain, host_daemon, sockets[0].parent, log))

    saved_file = work / "domain.save"
    released = host_daemon.log.read_text().count("it stopped (fresh backends follow")
    started = time.monotonic()
    saved = subprocess.run([*virsh, "save", name, str(saved_file)], capture_output=True, text=True, timeout=300)
    facts["save_seconds"] = time.monotonic() - started
    assert saved.returncode == 0, f"virsh save failed: {saved.stderr}\nQEMU's log:\n{qemu_log_tail(name)}"
    at_save = log.read_text(errors="replace")
    facts["acks_at_save"] = acks(at_save)
    facts["missing_at_save"] = records_in(disk.read_bytes(), facts["acks_at_save"])
    facts["save_file_mib"] = saved_file.stat().st_size / (1 << 20)
    wait_until(lambda: host_daemon.log.read_text().count("it stopped (fresh backends follow") > released, 30,
               "the daemon did not release the saved domain's backends")
    wait_until(lambda: all(s.is_socket() for s in sockets), 30, "the daemon did not serve fresh backends")
    started = time.monotonic()
    restored = subprocess.run([*virsh, "restore", str(saved_file)], capture_output=True, text=True, timeout=300)
    facts["restore_seconds"] = time.monotonic() - started
    assert restored.returncode == 0, f"virsh restore failed: {restored.stderr}\nQEMU's log:\n{qemu_log_tail(name)}"
    saved_file.unlink()
    wait_for_acks(log, len(facts["acks_at_save"]) + PHASE_RECORDS, 180, domain)
    facts["rng_after_restore_seconds"] = seconds_to_rng_read(log, len(at_save), started, RNG_WAIT)
    return facts


def vdb_states(log: Path, offset: int) -> list[str]:
    """What the guest said of /dev/vdb after ``offset`` of its console: ``gone`` or the md5 of its first block."""
    return re.findall(r"^VDB (\S+)\s*$", log.read_text(errors="replace")[offset:], re.M)


def wait_for_vdb(log: Path, offset: int, state: str, timeout: float, domain) -> float:
    """Wait until the guest reports /dev/vdb in ``state`` after ``offset``; the seconds it took."""
    started = time.monotonic()
    while state not in vdb_states(log, offset):
        if not domain.isActive() or time.monotonic() - started > timeout:
            raise AssertionError(f"the guest never reported /dev/vdb {state} (it said {vdb_states(log, offset)}):\n"
                                 f"{log.read_text(errors='replace')[offset:][-3000:]}")
        time.sleep(0.2)
    return time.monotonic() - started


def hotplug_swap_and_unplug(uri: str, run_dir: Path, name: str, domain, log: Path, work: Path) -> dict[str, object]:
    """While the guest runs: deploy a second disk live, swap its file through the control socket, undeploy it.

    Returns the command outputs, what the control socket listed, the guest's /dev/vdb reports and the times.
    """
    facts: dict[str, object] = {}
    images = [work / "hot1.img", work / "hot2.img"]
    for image in images:
        image.write_bytes(os.urandom(HOT_SIZE))
    facts["hot_md5"] = [hashlib.md5(image.read_bytes()[:4096]).hexdigest() for image in images]
    facts["hot_images"] = [str(image) for image in images]
    offset = len(log.read_text(errors="replace"))
    started = time.monotonic()
    deployed = pvcore("deploy", "--connect", uri, "--run-dir", str(run_dir), name, f"block:path={images[0]},name={name}-hot")
    facts["hot_deploy_seconds"] = time.monotonic() - started
    assert deployed.returncode == 0, deployed.stderr
    facts["hot_deploy_out"] = deployed.stdout
    facts["hot_in_seconds"] = wait_for_vdb(log, offset, facts["hot_md5"][0], 120, domain)
    listed = pvcore("ctl", "--run-dir", str(run_dir), "list", "--json")
    assert listed.returncode == 0, listed.stderr
    facts["hot_listed"] = {d["name"]: d for d in json.loads(listed.stdout)}
    swapped = pvcore("ctl", "--run-dir", str(run_dir), "swap-media", f"{name}-hot", str(images[1]))
    assert swapped.returncode == 0, swapped.stderr
    facts["hot_swap_out"] = swapped.stdout
    facts["hot_swap_seconds"] = wait_for_vdb(log, offset, facts["hot_md5"][1], 60, domain)
    facts["hot_live_specs"] = read_specs(domain, libvirt.VIR_DOMAIN_AFFECT_LIVE, libvirt)
    started = time.monotonic()
    undeployed = pvcore("undeploy", "--connect", uri, name, f"{name}-hot")
    facts["hot_undeploy_seconds"] = time.monotonic() - started
    assert undeployed.returncode == 0, undeployed.stderr
    facts["hot_undeploy_out"] = undeployed.stdout
    facts["hot_gone_seconds"] = wait_for_vdb(log, offset, "gone", 60, domain)
    facts["hot_states"] = vdb_states(log, offset)
    facts["hot_socket_after"] = (run_dir / f"{name}-hot.sock").exists()
    facts["hot_live_specs_after"] = read_specs(domain, libvirt.VIR_DOMAIN_AFFECT_LIVE, libvirt)
    return facts


class HostDaemonProcess:
    """`pvcore daemon --connect URI` as a subprocess, with its log."""

    def __init__(self, uri: str, run_dir: Path, log: Path, workers: int = WORKERS) -> None:
        self.command = [sys.executable, "-m", "pvcore.cli", "daemon", "--connect", uri, "--run-dir", str(run_dir),
                        "--workers", str(workers)]
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        before = self.log.read_text().count("following ") if self.log.exists() else 0
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT)
        wait_until(
            lambda: self.proc.poll() is not None or self.log.read_text().count("following ") > before,
            60, "pvcore daemon did not come up",
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
        facts["block_socket"] = str(sockets[0])
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
        log.write_text("")  # the serial log is appended to (so that it survives the restore): boot 1's lines go
        domain.create()
        wait_for_text(log, "PVCORE-WAITING", 120, domain)
        facts["listed_running"] = {  # this domain's: the host may hold others (a run killed before its clean-up)
            device: entry for device, entry in listed(run_dir).items() if entry.get("domain") == name
        }
        facts["daemon_pid"] = host_daemon.proc.pid
        facts["worker_parents"] = {
            device: parent_of(entry["worker_pid"]) for device, entry in facts["listed_running"].items()
        }
        assert host_daemon.stop() == 0
        facts["sockets_while_daemon_down"] = [s.exists() for s in sockets]
        host_daemon.start()
        facts.update(hotplug_swap_and_unplug(uri, run_dir, name, domain, log, work))
        write_at(disk, MARKER_OFFSET, MARKER)
        wait_for_text(log, "PVCORE-WRITING", 120, domain)
        facts.update(restart_save_restore_under_writes(virsh, name, domain, host_daemon, disk, log, work, sockets))
        write_at(disk, STOP_OFFSET, STOP)
        output = wait_for_text(log, "PVCORE-GUEST-DONE", 240, domain)
        facts["boot2"] = parse_results(output)
        facts["acks"] = acks(output)
        facts["boot2_output"] = output
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
    # deploy saw them served through the one-domain server's control socket
    assert f"  {name}-block0: served, vhost-user server socket " in out
    assert f"  {name}-rng0: served, " in out
    assert real["sockets_after_deploy"] == [True, True]


def test_guest_reads_the_deployed_disk_and_rng(real) -> None:
    results = real["boot1"]
    assert results["md5"] == real["disk_md5"]
    assert results["rng_current"].startswith("virtio_rng")
    assert results["rng_bytes"] == "4096"


def test_daemon_serves_from_metadata_and_survives_its_restart(real) -> None:
    assert real["sockets_with_daemon"] == [True, True]
    # in the daemon's worker processes: its children, the disk in one and the rng in the other
    name, running = real["name"], real["listed_running"]
    assert set(running) == {f"{name}-block0", f"{name}-rng0"}
    assert {device["worker"] for device in running.values()} == {"w0", "w1"}
    assert set(real["worker_parents"].values()) == {real["daemon_pid"]}
    assert all(device["state"] == "served" and device["domain"] == name for device in running.values())
    assert running[f"{name}-block0"]["counters"]["reads"] > 0  # the guest's md5sum, read in the worker
    assert real["sockets_while_daemon_down"] == [False, False]
    results = real["boot2"]
    assert results["md5"] == real["disk_md5"]
    assert results["rng_bytes"] == "4096"
    assert int(results["marker_polls"]) < MARKER_POLLS
    block = real["disk"][AFTER_BLOCK * 4096 : (AFTER_BLOCK + 1) * 4096]
    assert results["after_restart"] == hashlib.md5(block).hexdigest()


def test_probe_and_undeploy(real) -> None:
    name = real["name"]
    assert f"domain {name}: shut off, shared memory: yes" in real["probe_out"]
    assert f"    block {name}-block0 socket " in real["probe_out"]
    assert real["undeploy_out"].splitlines()[-1] == "  backends: released, sockets removed"
    assert real["sockets_after_undeploy"] == [False, False]
    assert real["daemon_rc"] == 0


def test_daemon_restart_under_writes_loses_no_record(real) -> None:
    """SIGTERM and a new daemon while the guest writes with O_DIRECT: writes go on, no error, nothing lost."""
    print(f"daemon restart under writes: down and up again in {real['restart_seconds']:.1f} s, the guest's next "
          f"acknowledgement {real['restart_to_next_ack_seconds']:.1f} s after the SIGTERM")
    for writer in range(WRITERS):
        numbers = [n for w, n in real["acks"] if w == writer]
        assert numbers == list(range(1, len(numbers) + 1)), f"writer {writer} skipped a record"
    assert "WRITE-FAILED" not in real["boot2_output"] and "I/O error" not in real["boot2_output"]
    assert len(real["acks"]) >= real["acks_before_restart"] + PHASE_RECORDS
    assert records_in(real["disk"], real["acks"]) == []
    assert real["boot2"]["dmesg_problems"] == ""
    log = real["daemon_log"]
    assert log.count("following qemu:///system through plugin kvm: 2 device(s) of 1 domain(s)") == 3
    # QEMU came back to each new daemon by itself: one connection per daemon, one to the disk's worker started
    # again after its SIGKILL, one more after the restore
    assert log.count(f"frontend connected (connection 1) on {real['block_socket']}") == 5, log[-3000:]


def test_a_killed_worker_of_the_daemon_serves_the_disk_again_and_the_guest_writes_on(real) -> None:
    """SIGKILL of the worker serving the disk while the guest writes with O_DIRECT: the daemon starts it again
    on the socket it kept, QEMU reconnects, the guest's writes go on with none failed and none lost (checked
    with every acknowledged record above), and the rng's worker was not touched."""
    name = real["name"]
    before, after = real["listed_before_kill"], real["listed_after_kill"]
    print(f"worker SIGKILL: serving again {real['worker_back_seconds']:.1f} s later, the guest's next "
          f"acknowledgement {real['kill_to_next_ack_seconds']:.1f} s after the kill")
    disk, rng = f"{name}-block0", f"{name}-rng0"
    assert after[disk]["worker"] == before[disk]["worker"] and after[disk]["worker_pid"] != before[disk]["worker_pid"]
    assert after[disk]["worker_restarts"] == before[disk]["worker_restarts"] + 1 and after[disk]["state"] == "served"
    assert after[rng]["worker_pid"] == before[rng]["worker_pid"] and after[rng]["worker_restarts"] == 0
    assert after[disk]["counters"]["writes"] > 0  # the guest's writes since, in the new worker
    log = real["daemon_log"]
    assert f"worker {before[disk]['worker']} ({disk}) ended with signal 9" in log


def test_save_and_restore_keep_the_disk(real) -> None:
    """virsh save mid-write, then virsh restore: the guest goes on writing and reads everything back."""
    print(f"virsh save {real['save_seconds']:.1f} s ({real['save_file_mib']:.0f} MiB), "
          f"virsh restore {real['restore_seconds']:.1f} s; {len(real['acks_at_save'])} records before the save, "
          f"{len(real['acks'])} in all")
    assert real["missing_at_save"] == []
    assert len(real["acks"]) >= len(real["acks_at_save"]) + PHASE_RECORDS
    start = RECORDS_BASE * RECORD
    region = real["disk"][start : start + WRITERS * AREA * RECORD]
    assert real["boot2"]["records_md5"] == hashlib.md5(region).hexdigest()


def test_rng_reads_again_after_the_daemon_restart_and_the_restore(real) -> None:
    """The guest's rng reads go on after the restart and after the restore.

    QEMU 7.2's rng-egd never sends again a request the old daemon had taken, and Linux's virtio-rng
    always keeps one waiting: without the bytes kvm's EGD door sends unasked at connect, the guest's
    reads wait until something else makes QEMU ask again (seen: none within 30 s).
    """
    assert real["rng_back_seconds"] is not None, f"no rng read within {RNG_WAIT:.0f} s of the restart"
    assert real["rng_after_restore_seconds"] is not None, f"no rng read within {RNG_WAIT:.0f} s of the restore"
    print(f"rng: first read {real['rng_back_seconds']:.1f} s after the SIGTERM, "
          f"{real['rng_after_restore_seconds']:.1f} s after virsh restore began")
    assert real["boot2"]["rng_after"] == "64"


def test_a_disk_deployed_to_the_running_guest_appears_takes_new_media_and_goes(real) -> None:
    """pvcore deploy on the running domain: the host daemon serves the disk, libvirt attaches it, the guest
    reads /dev/vdb; swap-media gives it another file the guest then reads; undeploy NAME detaches it and
    /dev/vdb goes, while the rest of the domain's devices stay."""
    name = real["name"]
    print(f"hotplug: deploy {real['hot_deploy_seconds']:.1f} s, the guest read /dev/vdb "
          f"{real['hot_in_seconds']:.1f} s after it returned; the guest read the swapped medium "
          f"{real['hot_swap_seconds']:.1f} s after pvcore ctl swap-media returned; undeploy "
          f"{real['hot_undeploy_seconds']:.1f} s, /dev/vdb gone {real['hot_gone_seconds']:.1f} s after it returned; "
          f"the guest's /dev/vdb reports: {real['hot_states']}")
    out = real["hot_deploy_out"]
    assert out.startswith(f"domain {name} (running; plugin kvm): deploying 1 device(s)\n"), out
    assert f"  block {name}-hot: <disk vhostuser> vdb, socket " in out
    assert "  served by: the host daemon (pid " in out
    assert f"  {name}-hot: served, " in out
    assert "  live: attached" in out
    listed = real["hot_listed"][f"{name}-hot"]
    assert (listed["class"], listed["domain"], listed["state"]) == ("block", name, "served")
    assert listed["worker"] in ("w0", "w1") and listed["worker_pid"] != real["daemon_pid"]
    hot1, hot2 = real["hot_md5"]
    # the first block of each file, in turn, and no failed read between (a read failing while the disk is
    # unplugged prints the md5 of nothing: tolerated only just before "gone")
    states = real["hot_states"]
    assert states[:2] == [hot1, hot2] and states[-1] == "gone", states
    assert set(states[2:-1]) <= {hashlib.md5(b"").hexdigest()}, states
    old, new = real["hot_images"]
    assert real["hot_swap_out"].strip() == f"{name}-hot: now {new} (was {old})"
    hot_spec = [s for s in real["hot_live_specs"] if f"name={name}-hot," in s]
    assert len(hot_spec) == 1 and hot_spec[0].startswith(f"block:path={new},")  # the record follows the medium
    assert real["hot_undeploy_out"].splitlines()[:2] == [f"domain {name}: undeploying 1 device(s)", "  live: detached"]
    assert real["hot_socket_after"] is False
    assert [s.split(",name=")[1].split(",")[0] for s in real["hot_live_specs_after"]] == [f"{name}-block0", f"{name}-rng0"]
