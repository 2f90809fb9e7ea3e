"""A real guest's disk I/O: pvcore's vhost-user-blk against qemu-storage-daemon's, interleaved in one boot.

    .venv/bin/python bench/kvm_block.py [--rounds 7] [--ios 4096] [--poll-max-us N]

One Debian guest (QEMU 7.2, TCG, one vCPU) gets two vhost-user-blk disks with
the same 64 MiB of content in two files: one served by ``pvcore serve
--hypervisor kvm`` (a separate process), the other by ``qemu-storage-daemon``'s
vhost-user-blk export (the C peer). The guest tells them apart by the serial
pvcore reports (``--poll-max-us`` sets pvcore's ``poll-max-us=``: how long
its queues poll the ring before sleeping; the peer runs without an iothread,
so it does not poll). In every round it runs three workloads on each disk, the two
disks alternating (which goes first flips every round):

* ``read QD1``: 4 KiB O_DIRECT reads by one busybox ``dd`` at a time, each
  ``dd`` reading a run of 128 blocks from a random offset;
* ``read QD8``: the same with eight ``dd`` processes at once;
* ``write QD1``: 4 KiB O_DIRECT writes, as ``read QD1``.

Guest IOPS are timed by the guest (``/proc/uptime``, 10 ms). Around each
workload the guest prints a marker; on it the host reads utime+stime of the
active backend from ``/proc/PID/stat`` (all its threads, live or exited), so
backend CPU per I/O = CPU delta / I/Os. Interrupts per completion are counted
by the guest: the delta of its ``/proc/interrupts`` lines for the disk's
request-queue MSI-X vector, divided by the I/Os (every 4 KiB O_DIRECT request
is one completion). pvcore's own count of the interrupts it signalled comes
from its disconnect log line, for the whole run.

It prints per workload the medians over the rounds and the ratios
pvcore / peer, then the issue's targets (IOPS >= peer at every depth, CPU per
I/O <= 3x peer, <= 0.5 interrupts per completion at depth 8) as met or missed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from proc_cpu import cpu_seconds

from pvcore.testing.guest import Guest, build_initramfs, fetch_kernel, plugin_qemu_args

IMAGE_MIB = 64
CHUNK = 128
WORKLOADS = ("read1", "read8", "write1")
LABELS = {"read1": "read 4K QD1", "read8": "read 4K QD8", "write1": "write 4K QD1"}
SIDES = ("pvcore", "peer")
LINE = re.compile(r"BENCH-(BEGIN|END) (\d+) (pvcore|peer) (\w+)(?: ([\d.]+) ([\d.]+) (\d+))?")

GUEST_SCRIPT = r"""
for d in vda vdb; do
  if [ "$(cat /sys/block/$d/serial 2>/dev/null)" = pvcore ]; then PVCORE=$d; else PEER=$d; fi
done
echo "PVCORE-RESULT disks=pvcore:$PVCORE peer:$PEER"
SPAN=$(( {blocks} - {chunk} ))
head -c $(( {chunk} * 4096 )) /dev/urandom > /tmp/src
vector() {{ echo "$(basename $(readlink /sys/block/$1/device))-req"; }}
irqs() {{ awk -v name="$1" 'NR == 1 {{ cpus = NF }} index($0, name) {{ for (i = 2; i <= cpus + 1; i++) s += $i }} END {{ print s + 0 }}' /proc/interrupts; }}
reader() {{ i=0; while [ $i -lt $2 ]; do dd if=/dev/$1 of=/dev/null bs=4096 count={chunk} skip=$((RANDOM % SPAN)) iflag=direct 2>/dev/null; i=$((i + {chunk})); done; }}
writer() {{ i=0; while [ $i -lt $2 ]; do dd if=/tmp/src of=/dev/$1 bs=4096 count={chunk} seek=$((RANDOM % SPAN)) oflag=direct conv=notrunc 2>/dev/null; i=$((i + {chunk})); done; }}
run() {{
  echo "BENCH-BEGIN $1 $2 $4"
  sleep 0.2
  v=$(vector $3); i0=$(irqs $v); t0=$(cut -d' ' -f1 /proc/uptime)
  case $4 in
    read1) reader $3 {ios} ;;
    read8) for j in 1 2 3 4 5 6 7 8; do reader $3 $(( {ios} / 8 )) & done; wait ;;
    write1) writer $3 {ios} ;;
  esac
  t1=$(cut -d' ' -f1 /proc/uptime); i1=$(irqs $v)
  echo "BENCH-END $1 $2 $4 $t0 $t1 $((i1 - i0))"
}}
r=1
while [ $r -le {rounds} ]; do
  for w in read1 read8 write1; do
    if [ $((r % 2)) = 1 ]; then run $r pvcore $PVCORE $w; run $r peer $PEER $w
    else run $r peer $PEER $w; run $r pvcore $PVCORE $w; fi
  done
  r=$((r + 1))
done
"""


class BenchError(Exception):
    """The benchmark cannot run here; the message says why."""


def wait_for_socket(path: Path, proc: subprocess.Popen[bytes], what: str) -> None:
    """Wait until ``proc`` has created the socket ``path``."""
    deadline = time.monotonic() + 30
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise BenchError(f"{what} did not create {path} (exit status {proc.poll()})")
        time.sleep(0.05)


def collect(guest: Guest, pids: dict[str, int], timeout: float, *, cpu: Callable[[int], float] = cpu_seconds,
            line_pattern: re.Pattern[str] = LINE, labels: dict[str, str] = LABELS) -> list[dict[str, object]]:
    """Follow the guest's markers, sampling backend CPU (``cpu(pid)``) at each; one record per finished workload.

    ``line_pattern`` matches the markers (BEGIN/END, round, side, workload; then t0, t1 and interrupts on END).
    """
    records: list[dict[str, object]] = []
    started: dict[tuple[str, str, str], float] = {}
    seen = 0
    deadline = time.monotonic() + timeout
    while True:
        running = guest.running
        lines = guest.output.split("\n")
        complete = lines if not running else lines[:-1]
        for line in complete[seen:]:
            match = line_pattern.search(line)
            if match is None:
                continue
            kind, round_, side, workload = match.group(1, 2, 3, 4)
            key = (round_, side, workload)
            if kind == "BEGIN":
                started[key] = cpu(pids[side])
                continue
            t0, t1, irqs = float(match.group(5)), float(match.group(6)), int(match.group(7))
            records.append({
                "round": int(round_), "side": side, "workload": workload, "seconds": t1 - t0,
                "cpu": cpu(pids[side]) - started.pop(key), "interrupts": irqs,
            })
            print(f"  round {round_} {side:6} {labels[workload]:12} {t1 - t0:6.2f} s", flush=True)
        seen = max(seen, len(complete))
        if not running:
            return records
        if time.monotonic() > deadline:
            raise BenchError(f"the guest did not finish within {timeout:.0f} s:\n{guest.output[-2000:]}")
        time.sleep(0.02)


def summarise(records: list[dict[str, object]], ios: int) -> dict[tuple[str, str], tuple[float, float, float]]:
    """Medians of (IOPS, CPU µs per I/O, interrupts per completion) by (side, workload)."""
    table = {}
    for side in SIDES:
        for workload in WORKLOADS:
            rows = [r for r in records if r["side"] == side and r["workload"] == workload]
            if not rows:
                raise BenchError(f"no finished rounds for {side} {workload}")
            table[side, workload] = (
                statistics.median(ios / float(r["seconds"]) for r in rows),
                statistics.median(float(r["cpu"]) / ios * 1e6 for r in rows),
                statistics.median(int(r["interrupts"]) / ios for r in rows),
            )
    return table


def report(table: dict[tuple[str, str], tuple[float, float, float]], rounds: int, ios: int) -> None:
    """Print the medians, the ratios and the targets."""
    print(f"\n4 KiB O_DIRECT, {IMAGE_MIB} MiB image, {ios} I/Os per workload per round, medians of {rounds} rounds")
    print(f"{'workload':13} {'pvcore IOPS':>11} {'peer IOPS':>9} {'ratio':>6} {'pvcore CPU us/IO':>16} "
          f"{'peer CPU us/IO':>14} {'ratio':>6} {'pvcore irq/compl':>16} {'peer irq/compl':>14}")
    for workload in WORKLOADS:
        iops, cpu, irq = table["pvcore", workload]
        peer_iops, peer_cpu, peer_irq = table["peer", workload]
        print(f"{LABELS[workload]:13} {iops:>11.0f} {peer_iops:>9.0f} {iops / peer_iops:>6.2f} {cpu:>16.1f} "
              f"{peer_cpu:>14.1f} {cpu / max(peer_cpu, 1e-9):>6.2f} {irq:>16.2f} {peer_irq:>14.2f}")
    print("\ntargets:")
    for workload in WORKLOADS:
        iops, cpu, _ = table["pvcore", workload]
        peer_iops, peer_cpu, _ = table["peer", workload]
        print(f"  {LABELS[workload]:13} IOPS >= peer: {'met' if iops >= peer_iops else 'MISSED'} "
              f"({iops / peer_iops:.2f}x); CPU/IO <= 3x peer: {'met' if cpu <= 3 * peer_cpu else 'MISSED'} "
              f"({cpu / max(peer_cpu, 1e-9):.2f}x)")
    irq = table["pvcore", "read8"][2]
    print(f"  read 4K QD8   interrupts per completion <= 0.5: {'met' if irq <= 0.5 else 'MISSED'} ({irq:.2f})")


def can_run(parser: argparse.ArgumentParser, args: argparse.Namespace, bench: str) -> bool:
    """Refuse bad ``--rounds``/``--ios`` (exits); False, with the package to install, if QEMU or
    qemu-storage-daemon is missing."""
    if args.ios % (CHUNK * 8) or args.ios <= 0 or args.rounds <= 0:
        parser.error(f"--ios must be a positive multiple of {CHUNK * 8} and --rounds positive")
    for tool, package in (("qemu-system-x86_64", "qemu-system-x86"), ("qemu-storage-daemon", "qemu-system-common")):
        if shutil.which(tool) is None:
            print(f"{bench}: {tool} not found: sudo apt-get install -y {package}", file=sys.stderr)
            return False
    return True


def main() -> int:
    """Run the benchmark; 0 when it ran (targets missed or not), 2 when it could not run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="rounds (each: 3 workloads on each disk)")
    parser.add_argument("--ios", type=int, default=4096, help=f"4 KiB I/Os per workload per round (multiple of {CHUNK * 8})")
    parser.add_argument("--poll-max-us", type=int, default=None,
                        help="pvcore's poll-max-us= (0: no polling; default: pvcore's own default)")
    args = parser.parse_args()
    if not can_run(parser, args, "kvm_block"):
        return 2
    try:
        table = run(args.rounds, args.ios, args.poll_max_us)
    except BenchError as exc:
        print(f"kvm_block: {exc}", file=sys.stderr)
        return 2
    report(table, args.rounds, args.ios)
    return 0


def run(rounds: int, ios: int, poll_max_us: int | None = None) -> dict[tuple[str, str], tuple[float, float, float]]:
    """Start both backends and the guest, collect every round, stop everything; the summary table."""
    kernel = fetch_kernel("x86_64")
    with contextlib.ExitStack() as cleanup, tempfile.TemporaryDirectory(prefix="pvcore-bench-") as tmp:
        work = Path(tmp)
        ours, peers = work / "pvcore.img", work / "peer.img"
        ours.write_bytes(os.urandom(IMAGE_MIB << 20))
        shutil.copyfile(ours, peers)
        sockets = {"pvcore": work / "pvcore.sock", "peer": work / "peer.sock"}
        device = f"block:path={ours},socket={sockets['pvcore']},serial=pvcore,name=bench-vda"
        if poll_max_us is not None:
            device += f",poll-max-us={poll_max_us}"
        serve = ["serve", "--hypervisor", "kvm", "--run-dir", str(work / "run"), device]
        storage_daemon = [
            "qemu-storage-daemon", "--blockdev", f"driver=file,node-name=f0,filename={peers}",
            "--export", f"type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={sockets['peer']},writable=on",
        ]
        print("pvcore: " + shlex.join(["pvcore", *serve]))
        print("peer:   " + shlex.join(storage_daemon), flush=True)
        pvcore_log = work / "pvcore.log"
        with open(pvcore_log, "wb") as log:
            pvcore = subprocess.Popen([sys.executable, "-m", "pvcore.cli", *serve], stdout=log, stderr=subprocess.STDOUT)
            peer = subprocess.Popen(storage_daemon, stdout=log, stderr=subprocess.STDOUT)
        for proc in (pvcore, peer):
            cleanup.callback(_stop, proc)
        wait_for_socket(sockets["pvcore"], pvcore, "pvcore serve")
        wait_for_socket(sockets["peer"], peer, "qemu-storage-daemon")
        script = GUEST_SCRIPT.format(blocks=(IMAGE_MIB << 20) // 4096, chunk=CHUNK, ios=ios, rounds=rounds)
        initrd = build_initramfs(kernel, script, ["virtio_blk"], work)
        # The peer's disk is the same QEMU device as pvcore's (the kvm plugin's arguments) on the peer's socket.
        peer_device = f"block:path={peers},socket={sockets['peer']},name=bench-peer"
        qemu_args = plugin_qemu_args("kvm", [device, peer_device])["bench"]
        timeout = 120 + rounds * ios * 6 * 0.002
        guest = cleanup.enter_context(Guest(kernel, initrd, qemu_args, name="bench", max_runtime=timeout + 30))
        print(f"guest booting (TCG, 1 vCPU); {rounds} rounds of {ios} I/Os per workload per disk", flush=True)
        records = collect(guest, {"pvcore": pvcore.pid, "peer": peer.pid}, timeout)
        disks = re.search(r"PVCORE-RESULT disks=(.*)", guest.output)
        print(f"guest disks: {disks.group(1).strip() if disks else '?'}")
        _stop(pvcore)
        totals = [line.split("): ", 1)[1] for line in pvcore_log.read_text().splitlines() if "frontend disconnected" in line]
        print(f"pvcore's own count over the whole run: {'; '.join(totals) or '(no disconnect line)'}")
        return summarise(records, ios)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


if __name__ == "__main__":
    sys.exit(main())
