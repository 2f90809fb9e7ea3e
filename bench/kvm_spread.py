"""A two-queue disk of a real two-vCPU guest: queues spread over two workers, in one process, and the C peer.

    .venv/bin/python bench/kvm_spread.py [--rounds 5] [--ios 4096]

One Debian guest (QEMU 7.2, TCG, two vCPUs) gets three vhost-user-blk disks
with ``num-queues=2`` and the same 64 MiB of content in three files:

* ``spread``: ``pvcore serve --hypervisor kvm --workers 2
  block:...,queues=2,spread=on``: queue 0 in one worker process, queue 1 in
  the other;
* ``one``: ``pvcore serve --hypervisor kvm --workers 1 block:...,queues=2``:
  both queues in one process;
* ``peer``: ``qemu-storage-daemon``'s vhost-user-blk export with
  ``num-queues=2`` (the C peer; no iothread).

The guest tells them apart by their serials. In every round it runs, on each
disk in turn (the order rotates every round), 4 KiB O_DIRECT random reads by
busybox ``dd``: ``QD2`` is one ``dd`` pinned to each vCPU (``taskset``), so
each CPU's requests go to its own queue; ``QD8`` is four per vCPU. Guest IOPS
are timed by the guest (``/proc/uptime``); backend CPU per I/O is the
utime+stime delta of the backend's whole process tree (the parent and its
workers) around each workload. It prints the medians and the ratios to the
peer. The guest's two vCPUs take both of this machine's cores under TCG, so
the backends compete with them for CPU: read the figures as what two
processes give a two-queue disk on a loaded host, not as a scaling limit.
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
from pathlib import Path

from kvm_block import CHUNK, BenchError, _stop, can_run, collect, wait_for_socket
from proc_cpu import tree_cpu_seconds

from pvcore.testing.guest import Guest, build_initramfs, fetch_kernel, plugin_qemu_args

IMAGE_MIB = 64
SIDES = ("spread", "one", "peer")
WORKLOADS = ("read2", "read8")
LABELS = {"read2": "read 4K QD2", "read8": "read 4K QD8"}
LINE = re.compile(r"BENCH-(BEGIN|END) (\d+) (spread|one|peer) (\w+)(?: ([\d.]+) ([\d.]+) (\d+))?")

GUEST_SCRIPT = r"""
for d in vda vdb vdc; do
  case "$(cat /sys/block/$d/serial 2>/dev/null)" in
    spread) DISK_spread=$d ;;
    one) DISK_one=$d ;;
    *) DISK_peer=$d ;;
  esac
done
echo "PVCORE-RESULT disks=spread:$DISK_spread one:$DISK_one peer:$DISK_peer queues:$(ls /sys/block/vda/mq | wc -l)"
SPAN=$(( {blocks} - {chunk} ))
reader() {{ i=0; while [ $i -lt $2 ]; do taskset $3 dd if=/dev/$1 of=/dev/null bs=4096 count={chunk} skip=$((RANDOM % SPAN)) iflag=direct 2>/dev/null; i=$((i + {chunk})); done; }}
run() {{
  disk=$(eval echo \$DISK_$2)
  echo "BENCH-BEGIN $1 $2 $3"
  sleep 0.2
  t0=$(cut -d' ' -f1 /proc/uptime)
  case $3 in
    read2) for cpu in 1 2; do reader $disk $(( {ios} / 2 )) $cpu & done; wait ;;
    read8) for cpu in 1 2 1 2 1 2 1 2; do reader $disk $(( {ios} / 8 )) $cpu & done; wait ;;
  esac
  t1=$(cut -d' ' -f1 /proc/uptime)
  echo "BENCH-END $1 $2 $3 $t0 $t1 0"
}}
r=1
while [ $r -le {rounds} ]; do
  case $((r % 3)) in
    1) order="spread one peer" ;;
    2) order="one peer spread" ;;
    0) order="peer spread one" ;;
  esac
  for w in read2 read8; do
    for side in $order; do run $r $side $w; done
  done
  r=$((r + 1))
done
"""


def run(rounds: int, ios: int) -> list[dict[str, object]]:
    """Start the three backends and the guest, collect every round, stop everything."""
    kernel = fetch_kernel("x86_64")
    with contextlib.ExitStack() as cleanup, tempfile.TemporaryDirectory(prefix="pvcore-bench-") as tmp:
        work = Path(tmp)
        images = {side: work / f"{side}.img" for side in SIDES}
        images["spread"].write_bytes(os.urandom(IMAGE_MIB << 20))
        for side in ("one", "peer"):
            shutil.copyfile(images["spread"], images[side])
        sockets = {side: work / f"{side}.sock" for side in SIDES}
        devices = {side: f"block:path={images[side]},socket={sockets[side]},serial={side},name=bench-{side},queues=2"
                   for side in SIDES}
        commands = {
            "spread": [sys.executable, "-m", "pvcore.cli", "serve", "--hypervisor", "kvm", "--workers", "2",
                       "--run-dir", str(work / "run-spread"), devices["spread"] + ",spread=on"],
            "one": [sys.executable, "-m", "pvcore.cli", "serve", "--hypervisor", "kvm", "--workers", "1",
                    "--run-dir", str(work / "run-one"), devices["one"]],
            "peer": ["qemu-storage-daemon", "--blockdev", f"driver=file,node-name=f0,filename={images['peer']}",
                     "--export", f"type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={sockets['peer']},"
                     "writable=on,num-queues=2"],
        }
        procs = {}
        log_path = work / "backends.log"
        with open(log_path, "wb") as log:
            for side, command in commands.items():
                print(f"{side:6}: " + shlex.join(command).replace(sys.executable + " -m pvcore.cli", "pvcore"))
                procs[side] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
                cleanup.callback(_stop, procs[side])
        for side in SIDES:
            wait_for_socket(sockets[side], procs[side], side)
        time.sleep(1)  # the spread daemon's workers take their hand-over after the socket exists
        script = GUEST_SCRIPT.format(blocks=(IMAGE_MIB << 20) // 4096, chunk=CHUNK, ios=ios, rounds=rounds)
        initrd = build_initramfs(kernel, script, ["virtio_blk"], work)
        qemu_args = plugin_qemu_args("kvm", list(devices.values()))["bench"]
        timeout = 120 + rounds * ios * 6 * 0.003
        guest = cleanup.enter_context(Guest(kernel, initrd, qemu_args, smp=2, name="bench", max_runtime=timeout + 30))
        print(f"guest booting (TCG, 2 vCPUs); {rounds} rounds of {ios} I/Os per workload per disk", flush=True)
        records = collect(guest, {side: proc.pid for side, proc in procs.items()}, timeout, cpu=tree_cpu_seconds,
                          line_pattern=LINE, labels=LABELS)
        disks = re.search(r"PVCORE-RESULT disks=(.*)", guest.output)
        print(f"guest disks: {disks.group(1).strip() if disks else '?'}")
        served = re.findall(r"pvcore\[(w\d)\] pvcore\.vhost_user: vhost-user bench-spread: queue 1 served by worker (w\d)",
                            log_path.read_text(errors="replace"))
        print(f"spread: queue 1 served by another worker than queue 0: {served[-1] if served else 'NOT SEEN'}")
        return records


def main() -> int:
    """Run the benchmark; 0 when it ran, 2 when it could not run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds (each: 2 workloads on each disk)")
    parser.add_argument("--ios", type=int, default=4096, help=f"4 KiB I/Os per workload per round (multiple of {CHUNK * 8})")
    args = parser.parse_args()
    if not can_run(parser, args, "kvm_spread"):
        return 2
    try:
        records = run(args.rounds, args.ios)
    except BenchError as exc:
        print(f"kvm_spread: {exc}", file=sys.stderr)
        return 2
    print(f"\n4 KiB O_DIRECT random reads, {IMAGE_MIB} MiB image, {args.ios} I/Os per workload per round, "
          f"medians of {args.rounds} rounds")
    print(f"{'workload':12} {'side':7} {'IOPS':>7} {'/peer':>6} {'CPU us/IO':>9} {'/peer':>6}")
    for workload in WORKLOADS:
        medians = {}
        for side in SIDES:
            rows = [r for r in records if r["side"] == side and r["workload"] == workload]
            if not rows:
                print(f"kvm_spread: no finished rounds for {side} {workload}", file=sys.stderr)
                return 2
            medians[side] = (statistics.median(args.ios / float(r["seconds"]) for r in rows),
                             statistics.median(float(r["cpu"]) / args.ios * 1e6 for r in rows))
        for side in SIDES:
            iops, cpu = medians[side]
            print(f"{LABELS[workload]:12} {side:7} {iops:>7.0f} {iops / medians['peer'][0]:>6.2f} {cpu:>9.1f} "
                  f"{cpu / max(medians['peer'][1], 1e-9):>6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
