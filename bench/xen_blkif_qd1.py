"""A real Xen domU's 4 KiB O_DIRECT reads at queue depth 1: pvcore's blkif against the kernel's blkback.

    .venv/bin/python bench/xen_blkif_qd1.py [--requests 200] [--work DIR]

One boot of the real Xen harness (:mod:`pvcore_xen.testing.real_xen`:
Debian's Xen 4.17 under QEMU TCG, PV dom0 and domU). Both disks are the same
kind of 64 MiB image on dom0's tmpfs: xvda is served by pvcore (``attach=on``,
the checkout's pvcore in dom0), xvdb by Linux's blkback (an xl ``disk=`` on a
loop device of a copy of the image). In the guest, ``dd iflag=direct bs=4096``
reads ``--requests`` blocks of each disk sequentially, one request at a time,
three times (blkback's disk first), then ``dd iflag=direct bs=1M`` reads
32 MiB of it (sequential throughput); the guest's /proc/uptime (10 ms steps)
times each run. Prints the median requests per second for both, the ratio,
and the sequential MiB/s. Under TCG on a shared machine the absolute figures
say little; the ratio is the point, and it varies from run to run.

With ``--strace`` the guest then reads 100 more blocks of xvda while
``strace -T`` follows pvcore in dom0, and the bench prints the median time
each of pvcore's ``ioctl`` and ``preadv2`` calls spent in the kernel (the
grant copy, the event-channel notify, the read) against the time a request
takes: what removing the grant copy (persistent grants) could save.
"""

from __future__ import annotations

import argparse
import re
import statistics
import tempfile
from pathlib import Path

from pvcore_xen.testing.real_xen import Check, boot

GUEST_READ = r"""
i=0; while [ ! -b /dev/{disk} ] && [ $i -lt 300 ]; do sleep 0.2; i=$((i+1)); done
dd if=/dev/{disk} of=/dev/null bs=4096 count=16 iflag=direct 2>/dev/null
for round in 1 2 3; do
  start=$(cut -d' ' -f1 /proc/uptime)
  dd if=/dev/{disk} of=/dev/null bs=4096 count={requests} skip=$((round * {requests})) iflag=direct 2>/dev/null
  now=$(cut -d' ' -f1 /proc/uptime)
  echo "{disk} requests {requests} seconds $(echo "$now $start" | awk '{{print $1 - $2}}')"
done
start=$(cut -d' ' -f1 /proc/uptime)
dd if=/dev/{disk} of=/dev/null bs=1M count=32 iflag=direct 2>/dev/null
now=$(cut -d' ' -f1 /proc/uptime)
echo "{disk} sequential MiB 32 seconds $(echo "$now $start" | awk '{{print $1 - $2}}')"
"""


TRACED_READS = r"""
echo STRACE-NOW
sleep 40
start=$(cut -d' ' -f1 /proc/uptime)
dd if=/dev/xvda of=/dev/null bs=4096 count=100 skip=4000 iflag=direct 2>/dev/null
now=$(cut -d' ' -f1 /proc/uptime)
echo "traced requests 100 seconds $(echo "$now $start" | awk '{print $1 - $2}')"
echo STRACE-DONE
"""

TRACE_PVCORE = r"""
L=/var/log/xen/console/guest-domU.log
i=0; while ! grep -aq STRACE-NOW $L 2>/dev/null && [ $i -lt 3000 ]; do sleep 0.2; i=$((i+1)); done
$CHROOT strace -f -T -ttt -e trace=ioctl,preadv2,preadv,pread64 -o $SCRATCH/strace.log -p $(cat $SCRATCH/pvcore.pid) &
ST=$!
i=0; while ! grep -aq STRACE-DONE $L 2>/dev/null && [ $i -lt 3000 ]; do sleep 0.2; i=$((i+1)); done
kill $ST; sleep 2
cp $SCRATCH/strace.log $OUT/strace.log
"""


def syscall_times(trace: str) -> dict[str, list[float]]:
    """Seconds in the kernel per call, by system call (ioctls by request name), from ``strace -T`` output."""
    times: dict[str, list[float]] = {}
    for name, arguments, seconds in re.findall(r"^\d+\s+[\d.]+ (\w+)\((.*)\) += .*<([\d.]+)>$", trace, re.M):
        key = f"ioctl {arguments.split(',')[1].strip()}" if name == "ioctl" else name
        times.setdefault(key, []).append(float(seconds))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200, help="reads per timed run (default 200)")
    parser.add_argument("--work", type=Path, help="work directory (default: a new temporary one)")
    parser.add_argument("--strace", action="store_true", help="then time pvcore's system calls in dom0 (see above)")
    args = parser.parse_args()
    check = Check(
        name="qd1",
        serve=("block:name=disk0,path=$SCRATCH/pvcore.img,domain=$DOMID/51712,attach=on",),
        xl_config=("disk = ['phy:/dev/loop0,xvdb,w']",),
        dom0_before=r"""
dd if=/dev/urandom of=$SCRATCH/pvcore.img bs=1M count=64 2>/dev/null
cp $SCRATCH/pvcore.img $SCRATCH/blkback.img
losetup /dev/loop0 $SCRATCH/blkback.img
""",
        domu="\n".join(GUEST_READ.format(disk=disk, requests=args.requests) for disk in ("xvdb", "xvda"))
        + (TRACED_READS if args.strace else ""),
        dom0_during=TRACE_PVCORE if args.strace else "",
    )
    work = args.work or Path(tempfile.mkdtemp(prefix="xen-qd1-"))
    run = boot([check], work, timeout=600.0, guest_timeout=300.0)
    output = run.domu.get("qd1")
    runs: dict[str, list[float]] = {}
    for disk, requests, seconds in re.findall(r"(xvd[ab]) requests (\d+) seconds ([\d.]+)", output.output if output else ""):
        runs.setdefault(disk, []).append(int(requests) / max(float(seconds), 0.01))
    rates = {disk: statistics.median(values) for disk, values in runs.items()}
    if len(rates) != 2:
        raise SystemExit(f"the guest did not report both disks (work directory {work})\n{run.describe()}")
    print(f"pvcore blkif (xvda): {rates['xvda']:.1f} reads/s at QD1, 4 KiB, O_DIRECT (runs: {runs['xvda']})")
    print(f"Linux blkback (xvdb): {rates['xvdb']:.1f} reads/s (runs: {runs['xvdb']})")
    print(f"ratio pvcore/blkback: {rates['xvda'] / rates['xvdb']:.2f}")
    sequential = {disk: int(mib) / max(float(seconds), 0.01)
                  for disk, mib, seconds in re.findall(r"(xvd[ab]) sequential MiB (\d+) seconds ([\d.]+)", output.output if output else "")}
    if len(sequential) == 2:
        print(f"sequential 1 MiB O_DIRECT reads: pvcore {sequential['xvda']:.1f} MiB/s, blkback {sequential['xvdb']:.1f} MiB/s"
              f" (ratio {sequential['xvda'] / sequential['xvdb']:.2f})")
    trace = work / "out" / "strace.log"
    if args.strace and trace.exists():
        print(f"pvcore's system calls in dom0 under strace ({work / 'out' / 'strace.log'}), time in the kernel:")
        for call, seconds in sorted(syscall_times(trace.read_text(errors="replace")).items()):
            print(f"  {call}: {len(seconds)} calls, median {statistics.median(seconds) * 1e3:.3f} ms")
        print(f"  against {1e3 / rates['xvda']:.1f} ms per request untraced")
    elif args.strace:
        print(f"no strace log ({trace}): was strace installed on the host?")


if __name__ == "__main__":
    main()
