"""Real QEMU guests served by `pvcore serve --hypervisor kvm` (QEMU 7.2, TCG, Debian's kernel).

Two guests are booted once for the whole module and checked from inside:

* guest A: a vhost-user-blk disk with two queues (md5sum, an O_DIRECT write
  that must be in the host file after poweroff), a read-only vhost-user-blk
  disk, a vhost-user NIC, a rate-limited vhost-user-rng, and a virtio console
  on a chardev socket (text to /dev/hvc0 lands in the log; a line sent with
  `pvcore console` reaches the guest);
* guest B: a vhost-user NIC on the same pvcore switch, so the guests ping.

Midway the pvcore daemon is killed with SIGKILL and started again with the
same command line; QEMU reconnects (`reconnect=1`) and guest A's next disk
read must work. These tests never skip: CI installs QEMU.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pvcore.testing.guest import Guest, build_initramfs, fetch_kernel, plugin_qemu_args, result_line

pytestmark = pytest.mark.guest

MAC_A = "52:54:00:00:0a:01"
MAC_B = "52:54:00:00:0b:01"
MAC_FORGED = "52:54:00:00:0a:99"
DISK_SIZE = 8 << 20
PATTERN_SECTOR = 4096  # byte offset 2 MiB
RNG_RATE = "16384/1s"

SCRIPT_A = r"""
{md5}
{mq}
taskset 1 dd if=/dev/vda of=/dev/null bs=4096 count=64 iflag=direct 2>/dev/null
taskset 2 dd if=/dev/vda of=/dev/null bs=4096 count=64 skip=64 iflag=direct 2>/dev/null
{mq_io}
echo PVCORE-PATTERN-PATTERN-PATTERN > /tmp/p; dd if=/dev/zero bs=4066 count=1 >> /tmp/p 2>/dev/null
dd if=/tmp/p of=/dev/vda bs=4096 seek=512 count=1 oflag=direct conv=fsync 2>/dev/null && sync
{dd_status}
dd if=/dev/zero of=/dev/vdb bs=4096 count=1 oflag=direct 2>/dev/null
{ro_write}
{rng_current}
start=$(date +%s); dd if=/dev/hwrng of=/tmp/rng bs=4096 count=16 iflag=fullblock 2>/dev/null; end=$(date +%s)
{rng_bytes}
{rng_seconds}
echo PVCORE-CONSOLE-HELLO > /dev/hvc0
read -t 60 line < /dev/hvc0
{console_in}
ip link set eth0 up; ip addr add 192.0.2.1/24 dev eth0
ok=0; for i in 1 2 3 4 5 6 7 8 9 10; do ping -c 1 -W 2 192.0.2.2 >/dev/null 2>&1 && ok=1 && break; done
{ping}
ip link set eth0 down; ip link set eth0 address {forged}; ip link set eth0 up
ip neigh flush all 2>/dev/null
ping -c 3 -W 2 192.0.2.2 >/dev/null 2>&1 && forged=reached || forged=blocked
{forged_result}
echo PVCORE-WAITING-FOR-RESTART
read -t 120 line < /dev/hvc0
{after_restart}
"""

SCRIPT_B = r"""
ip link set eth0 up; ip addr add 192.0.2.2/24 dev eth0
echo PVCORE-B-UP
sleep 300
"""


def _script_a() -> str:
    return SCRIPT_A.format(
        md5=result_line("md5", "md5sum /dev/vda | cut -d' ' -f1"),
        mq=result_line("mq_queues", "ls /sys/block/vda/mq | wc -l"),
        mq_io=result_line(
            "mq_io",
            "v=$(basename $(readlink /sys/block/vda/device)); "
            "for q in 0 1; do grep \"$v-req.$q\\$\" /proc/interrupts | awk '{print $2 + $3}'; done",
        ),
        dd_status=result_line("pattern_write", "echo done"),
        ro_write=result_line("ro_write_rc", "echo $?"),
        rng_current=result_line("rng_current", "cat /sys/class/misc/hw_random/rng_current"),
        rng_bytes=result_line("rng_bytes", "wc -c < /tmp/rng"),
        rng_seconds=result_line("rng_seconds", "echo $((end - start))"),
        console_in=result_line("console_in", "echo $line"),
        ping=result_line("ping", "echo $ok"),
        forged=MAC_FORGED,
        forged_result=result_line("forged", "echo $forged"),
        after_restart=result_line(
            "after_restart", "dd if=/dev/vda bs=4096 skip=100 count=1 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1"
        ),
    )


class Served:
    """A `pvcore serve` subprocess and its log."""

    def __init__(self, args: list[str], log: Path, run_dir: Path) -> None:
        self.args, self.log, self.run_dir = args, log, run_dir
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start pvcore serve and wait until it says it serves every device."""
        env = dict(os.environ, PVCORE_RUN_DIR=str(self.run_dir))
        before = self.log.read_text().count("serving ") if self.log.exists() else 0
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 30
        while self.log.read_text().count("serving ") == before:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"pvcore serve did not come up:\n{self.log.read_text()}")
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(30)


@pytest.fixture(scope="module")
def guests(tmp_path_factory: pytest.TempPathFactory):
    work = tmp_path_factory.mktemp("kvm-guests")
    run_dir = work / "run"
    disk, readonly_disk = work / "disk.img", work / "ro.img"
    disk.write_bytes(os.urandom(DISK_SIZE))
    readonly_disk.write_bytes(os.urandom(1 << 20))
    ro_before = readonly_disk.read_bytes()
    disk_md5 = hashlib.md5(disk.read_bytes()).hexdigest()
    sockets = {name: work / f"vm-{name}.sock" for name in ("vda", "vdb", "net", "rng", "con", "bnet")}
    console_log = work / "console.log"
    devices = [
        f"block:path={disk},socket={sockets['vda']},queues=2,name=vma-vda",
        f"block:path={readonly_disk},socket={sockets['vdb']},readonly=on,name=vma-vdb",
        f"net:socket={sockets['net']},mac={MAC_A},switch=lan0,name=vma-net",
        f"rng:socket={sockets['rng']},rate={RNG_RATE},name=vma-rng",
        f"console:socket={sockets['con']},log={console_log},name=vma-con",
        f"net:socket={sockets['bnet']},mac={MAC_B},switch=lan0,name=vmb-net",
    ]
    serve_args = [sys.executable, "-m", "pvcore.cli", "serve", "--hypervisor", "kvm", *devices]
    # Per guest (vma, vmb: the names' domains), what `pvcore serve --print-qemu-args` prints for these devices.
    qemu_args = plugin_qemu_args("kvm", devices)
    served = Served(serve_args, work / "pvcore.log", run_dir)
    served.start()

    kernel = fetch_kernel("x86_64")
    modules = ["virtio_blk", "virtio_net", "virtio_console", "virtio_rng"]
    init_a = build_initramfs(kernel, _script_a(), modules, work / "a")
    init_b = build_initramfs(kernel, SCRIPT_B, ["virtio_net"], work / "b")
    guest_b = Guest(kernel, init_b, qemu_args["vmb"], name="guest-b")
    guest_a = Guest(kernel, init_a, qemu_args["vma"], name="guest-a", smp=2)
    facts: dict[str, object] = {"disk_md5": disk_md5}
    try:
        guest_b.start()
        guest_a.start()
        guest_b.wait_for("PVCORE-B-UP", 120)
        _wait_for_file_text(console_log, "PVCORE-CONSOLE-HELLO", 180, guest_a)
        facts["console_send"] = _console_send(run_dir, "vma-con", "hello-from-the-host\n")
        guest_a.wait_for("PVCORE-WAITING-FOR-RESTART", 180)
        assert served.stop(signal.SIGKILL) == -signal.SIGKILL
        served.start()
        time.sleep(2)  # let QEMU's reconnect timer (1 s) fire for every chardev
        _console_send(run_dir, "vma-con", "restarted\n")
        facts["result_a"] = guest_a.wait(180)
        facts["exit_code"] = served.stop(signal.SIGTERM)
        facts["sockets_left"] = [str(s) for s in sockets.values() if s.exists()]
    finally:
        guest_a.kill()
        guest_b.kill()
        if served.proc is not None and served.proc.poll() is None:
            served.proc.kill()
    facts.update(
        disk=disk.read_bytes(), ro_unchanged=readonly_disk.read_bytes() == ro_before,
        console_log=console_log.read_text(errors="replace"), pvcore_log=served.log.read_text(errors="replace"),
    )
    return facts


def _wait_for_file_text(path: Path, text: str, timeout: float, guest: Guest) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        time.sleep(0.2)
    raise AssertionError(f"{text!r} never reached {path}; guest output:\n{guest.output[-3000:]}")


def _console_send(run_dir: Path, name: str, text: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "pvcore.cli", "console", name, "--run-dir", str(run_dir), "--send", text, "--read-for", "1"],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_block_reads_whole_disk_and_two_queues(guests) -> None:
    results = guests["result_a"].results
    assert results["md5"] == guests["disk_md5"]
    assert results["mq_queues"] == "2"
    # interrupts of each virtqueue's MSI vector in the guest, with a reader pinned to each
    # vCPU (blk-mq maps vCPU n to queue n): both queues completed requests
    interrupts = [int(n) for n in results["mq_io"].split()]
    assert len(interrupts) == 2 and min(interrupts) > 0, results["mq_io"]


def test_block_direct_write_reaches_host_file_after_poweroff(guests) -> None:
    assert guests["result_a"].results["pattern_write"] == "done"
    block = guests["disk"][PATTERN_SECTOR * 512 : PATTERN_SECTOR * 512 + 4096]
    assert block.startswith(b"PVCORE-PATTERN-PATTERN-PATTERN\n")


def test_readonly_disk_refuses_writes(guests) -> None:
    assert guests["result_a"].results["ro_write_rc"] != "0"
    assert guests["ro_unchanged"]


def test_rng_current_bytes_and_rate_limit(guests) -> None:
    results = guests["result_a"].results
    assert results["rng_current"].startswith("virtio_rng")
    assert results["rng_bytes"] == str(64 * 1024)
    # 64 KiB at 16 KiB per second: the first window is free, three more must pass
    assert int(results["rng_seconds"]) >= 2


def test_console_log_and_input(guests) -> None:
    assert "PVCORE-CONSOLE-HELLO" in guests["console_log"]
    assert guests["result_a"].results["console_in"] == "hello-from-the-host"


def test_guests_ping_over_the_switch_and_forged_mac_gets_nothing(guests) -> None:
    results = guests["result_a"].results
    assert results["ping"] == "1"
    assert results["forged"] == "blocked"
    assert re.search(r"port vma-net sent from 52:54:00:00:0a:99, not its own MAC 52:54:00:00:0a:01", guests["pvcore_log"])


def test_daemon_restart_lets_qemu_reconnect(guests) -> None:
    disk = guests["disk"]
    assert guests["result_a"].results["after_restart"] == hashlib.md5(disk[100 * 4096 : 101 * 4096]).hexdigest()
    assert guests["pvcore_log"].count("serving 6 device(s)") == 2


def test_sigterm_removes_sockets(guests) -> None:
    assert guests["exit_code"] == 0
    assert guests["sockets_left"] == []
