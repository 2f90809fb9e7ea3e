"""Live migration on one host under write load: pvcore's vhost-user-blk against qemu-storage-daemon's.

    .venv/bin/python bench/vhost_user_migration.py [--runs 3] [--memory 512] [--peers pvcore,qsd]
                                                   [--no-reader] [--bandwidth 1024]

Per run, for each disk back end in turn (the order flips every run), a Debian
guest (QEMU 7.2, TCG, one vCPU, ``--memory`` MiB of shared memfd RAM) boots
from a fresh 80 MiB image served by the back end and writes to it without
pause: busybox ``dd`` with 4 KiB O_DIRECT writes, 64 per ``dd``, one console
line per ``dd``. Unless ``--no-reader``, a second loop reads 64 MiB of random
data with 1 MiB O_DIRECT reads (one ``dd``: 64 reads into one buffer that only
the back end writes) and checks its md5 (so the back end writes
guest pages all the time, as in plugins/kvm/tests/test_qemu_migration.py).
A destination QEMU with the same arguments plus ``-incoming`` is started, and
QMP ``migrate`` moves the guest to it (``max-bandwidth`` = ``--bandwidth``
MiB/s, QEMU's other migration parameters at their defaults). The guest must
go on writing on the destination without a kernel oops, then it is stopped.
With ``--compare-ram`` the destination starts paused (``-S``) and its RAM is
compared with the stopped source's before it runs
(:mod:`pvcore.testing.guest.migration`): pages that differ are reported, as
back-end data (a dirty-log mark the back end missed) or other (the guest's
CPU or QEMU wrote them: QEMU's own dirty tracking).

Back ends (``--peers``):

* ``pvcore``: ``pvcore serve --hypervisor kvm`` (a separate process); the
  source and the destination connect to the same socket.
* ``qsd``: ``qemu-storage-daemon`` with two vhost-user-blk exports of one
  node (it serves one connection per export): the source uses the first, the
  destination the second. qsd marks QEMU's dirty log itself (libvhost-user).
* ``qemu``: QEMU's own ``virtio-blk-pci`` on the file (no vhost-user, no
  back-end log: QEMU's DMA marks its own bitmap). Not a peer for the ratios;
  it tells a QEMU TCG migration failure from a back end's.

Reported per back end, as medians over the runs: QEMU's ``total-time`` and
``downtime`` (query-migrate), the guest's write IOPS in the 8 s before the
migration and while it ran (timed by the host at each console line), and the
ratio during/before (what the migration, logging included, costs the guest);
then the ratios pvcore / qsd. Runs whose guest oopsed or stopped are counted
and shown, never folded into the medians.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from pvcore.testing.guest import Guest, build_initramfs, fetch_kernel, plugin_qemu_args
from pvcore.testing.guest.errors import GuestError
from pvcore.testing.guest.migration import compare_ram, pieces
from pvcore.testing.guest.qmp import Qmp
from kvm_block import BenchError, _stop, wait_for_socket

CHUNK = 64
"""4 KiB writes per busybox dd (one console line each)."""
WRITE_MIB, READ_MIB = 16, 64
BEFORE = 8.0
"""Seconds of writing measured before the migration starts."""
AFTER_LINES = 10
"""Console lines the destination must print after the switch-over (the guest really runs there)."""
OOPS = re.compile(r"Oops|BUG:|Kernel panic|general protection fault|Call Trace", re.M)

GUEST_SCRIPT = r"""
{reader}
i=0
while :; do
  dd if=/dev/zero of=/dev/vda bs=4096 seek=$(( (i % {slots}) * {chunk} )) count={chunk} oflag=direct 2>/dev/null \
    && echo "W $i"
  i=$((i + 1))
done
"""

READER = r"""(while :; do
  s=$(dd if=/dev/vda bs=1M skip={skip} count={count} iflag=direct 2>/dev/null | md5sum | cut -c1-32)
  if [ "$s" = "{md5}" ]; then echo R-OK; else echo "R-BAD $s"; fi
done) &"""


class Lines(threading.Thread):
    """Follows a guest's console and stamps each ``W n`` line with the host time it arrived."""

    def __init__(self, guest: Guest) -> None:
        super().__init__(daemon=True)
        self.guest = guest
        self.stamps: list[float] = []
        self.done = False

    def run(self) -> None:
        """Poll the console every 20 ms until :attr:`done`."""
        seen = 0
        while not self.done:
            lines = self.guest.output.split("\n")[:-1]
            now = time.monotonic()
            self.stamps += [now for line in lines[seen:] if line.startswith("W ")]
            seen = len(lines)
            time.sleep(0.02)

    def between(self, start: float, end: float) -> int:
        """Lines that arrived in ``[start, end)``."""
        return sum(start <= t < end for t in self.stamps)


def disk_args(peer: str, image: Path, sockets: tuple[Path, Path], destination: bool) -> list[str]:
    """The QEMU arguments of the guest's disk on ``peer`` (the destination's differ only for qsd)."""
    if peer == "qemu":
        return ["-drive", f"file={image},format=raw,if=none,id=d0,cache=none", "-device", "virtio-blk-pci,drive=d0"]
    socket = sockets[1] if peer == "qsd" and destination else sockets[0]
    (args,) = plugin_qemu_args("kvm", [f"block:path={image},socket={socket},name=vda"]).values()
    return args


def start_backend(peer: str, image: Path, sockets: tuple[Path, Path], work: Path, stack: contextlib.ExitStack) -> None:
    """Start ``peer``'s back end for ``image`` and wait for its socket(s)."""
    if peer == "qemu":
        return
    if peer == "pvcore":
        command = [sys.executable, "-m", "pvcore.cli", "serve", "--hypervisor", "kvm", "--run-dir", str(work / "run"),
                   f"block:path={image},socket={sockets[0]},name=vda"]
    else:
        command = ["qemu-storage-daemon", "--blockdev", f"driver=file,node-name=f0,filename={image}"]
        for number, socket in enumerate(sockets):
            command += ["--export", f"type=vhost-user-blk,id=e{number},node-name=f0,addr.type=unix,"
                                    f"addr.path={socket},writable=on"]
    log = stack.enter_context(open(work / f"{peer}.log", "wb"))
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    stack.callback(_stop, proc)
    for socket in sockets[: 1 if peer == "pvcore" else 2]:
        wait_for_socket(socket, proc, peer)


def one_run(peer: str, kernel, memory: int, reader: bool, bandwidth: int, work: Path, *,
            compare: bool = False) -> dict[str, object]:
    """Boot, migrate under load, check the destination; the run's figures and outcome."""
    image = work / f"{peer}.img"
    region = os.urandom(READ_MIB << 20)
    image.write_bytes(bytes(WRITE_MIB << 20) + region)
    read = READER.format(skip=WRITE_MIB, count=READ_MIB, md5=hashlib.md5(region).hexdigest()) if reader else ""
    script = GUEST_SCRIPT.format(reader=read, chunk=CHUNK, slots=(WRITE_MIB << 20) // 4096 // CHUNK)
    initrd = build_initramfs(kernel, script, ["virtio_pci", "virtio_blk"], work, name="migrate-bench.cpio.gz")
    sockets = (work / f"{peer}-0.sock", work / f"{peer}-1.sock")
    src_qmp, dst_qmp, channel = work / "src.qmp", work / "dst.qmp", work / "mig.sock"
    result: dict[str, object] = {"peer": peer, "outcome": "ok"}
    with contextlib.ExitStack() as stack:
        start_backend(peer, image, sockets, work, stack)
        source = stack.enter_context(Guest(
            kernel, initrd, [*disk_args(peer, image, sockets, False), "-qmp", f"unix:{src_qmp},server=on,wait=off"],
            memory_mb=memory, name=f"{peer}-source", max_runtime=600))
        source.wait_for("W 20", 240)
        destination = stack.enter_context(Guest(
            kernel, initrd, [*disk_args(peer, image, sockets, True), "-qmp", f"unix:{dst_qmp},server=on,wait=off",
                             "-incoming", f"unix:{channel}", *(["-S"] if compare else [])],
            memory_mb=memory, name=f"{peer}-destination", max_runtime=600))
        dqmp = Qmp.connect(str(dst_qmp))
        lines = Lines(source)
        lines.start()
        time.sleep(BEFORE)
        sqmp = Qmp.connect(str(src_qmp))
        sqmp.command("migrate-set-parameters", **{"max-bandwidth": bandwidth << 20})
        started = time.monotonic()
        sqmp.command("migrate", uri=f"unix:{channel}")
        while (info := sqmp.command("query-migrate")).get("status") not in ("completed", "failed", "cancelled"):
            if time.monotonic() - started > 300:
                raise BenchError(f"{peer}: migration still {info.get('status')} after 300 s")
            time.sleep(0.05)
        ended = time.monotonic()
        lines.done = True
        if info["status"] != "completed":
            raise BenchError(f"{peer}: migration {info['status']}: {info.get('error-desc', '')}")
        result.update(total=info["total-time"], downtime=info["downtime"],
                      before=lines.between(started - BEFORE, started) * CHUNK / BEFORE,
                      during=lines.between(started, ended) * CHUNK / (ended - started))
        if compare:
            result["lost pages"] = str(compare_ram(sqmp, dqmp, memory << 20, work, pieces(region)) or "none")
            dqmp.command("cont")
        sqmp.command("quit")
        sqmp.close()
        last = max((int(n) for n in re.findall(r"^W (\d+)", source.output, re.M)), default=-1)
        try:
            destination.wait_for(f"W {last + AFTER_LINES}", 120)
        except Exception as exc:  # the guest stopped on the destination: say how
            result["outcome"] = "guest oops" if OOPS.search(destination.output) else f"stopped ({exc.__class__.__name__})"
        if OOPS.search(destination.output) or OOPS.search(source.output):
            result["outcome"] = "guest oops"
        if "R-BAD" in destination.output or "R-BAD" in source.output:
            result["outcome"] = "stale read"
        if result["outcome"] != "ok":
            saved = Path(tempfile.gettempdir()) / f"pvcore-migrate-{peer}-{int(time.time())}.log"
            with contextlib.suppress(Exception):
                result["destination status"] = dqmp.command("query-status")["status"]
            saved.write_text(f"--- source\n{source.output}\n--- destination\n{destination.output}\n"
                             f"--- destination's stderr\n{destination.stderr}")
            result["log"] = str(saved)
        with contextlib.suppress(Exception):
            dqmp.command("quit")
        dqmp.close()
    if peer == "pvcore":
        marked = re.findall(r"unmapped after (\d+) marked writes", (work / "pvcore.log").read_text(errors="replace"))
        result["marked writes"] = "+".join(marked) or "none logged"
    return result


def main() -> int:
    """Run the benchmark; 0 when it ran, 2 when it could not."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--memory", type=int, default=512, help="guest RAM, MiB")
    parser.add_argument("--peers", default="pvcore,qsd", help="comma-separated: pvcore, qsd, qemu")
    parser.add_argument("--no-reader", dest="reader", action="store_false", help="no concurrent 1 MiB reads")
    parser.add_argument("--bandwidth", type=int, default=1024, help="migration max-bandwidth, MiB/s")
    parser.add_argument("--compare-ram", action="store_true",
                        help="start the destination paused and compare its RAM with the source's, page by page")
    args = parser.parse_args()
    peers = args.peers.split(",")
    if set(peers) - {"pvcore", "qsd", "qemu"}:
        parser.error("--peers takes pvcore, qsd and qemu")
    for tool, package in (("qemu-system-x86_64", "qemu-system-x86"), ("qemu-storage-daemon", "qemu-system-common")):
        if shutil.which(tool) is None:
            print(f"vhost_user_migration: {tool} not found: apt-get install -y {package}", file=sys.stderr)
            return 2
    kernel = fetch_kernel("x86_64")
    results: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="pvcore-migrate-") as tmp:
        for run in range(args.runs):
            for peer in (peers if run % 2 == 0 else peers[::-1]):
                work = Path(tmp) / f"{run}-{peer}"
                work.mkdir()
                try:
                    result = one_run(peer, kernel, args.memory, args.reader, args.bandwidth, work,
                                     compare=args.compare_ram)
                except (BenchError, GuestError) as exc:
                    result = {"peer": peer, "outcome": f"failed: {exc}"}
                results.append(result)
                print(" ".join(f"{k}={v:.0f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()),
                      flush=True)
                shutil.rmtree(work, ignore_errors=True)
    report(results, peers, args)
    return 0


def report(results: list[dict[str, object]], peers: list[str], args: argparse.Namespace) -> None:
    """Medians per back end over the runs that ended well, and the pvcore / qsd ratios."""
    print(f"\n{args.memory} MiB guest, max-bandwidth {args.bandwidth} MiB/s, reader {'on' if args.reader else 'off'}; "
          f"medians of the good runs")
    print(f"{'back end':>8} {'good':>6} {'total ms':>9} {'downtime ms':>11} {'IOPS before':>11} {'IOPS during':>11} "
          f"{'during/before':>13}")
    medians: dict[str, dict[str, float]] = {}
    for peer in peers:
        good = [r for r in results if r["peer"] == peer and r["outcome"] == "ok"]
        count = f"{len(good)}/{sum(r['peer'] == peer for r in results)}"
        if not good:
            print(f"{peer:>8} {count:>6}")
            continue
        m = {key: statistics.median(float(r[key]) for r in good) for key in ("total", "downtime", "before", "during")}
        m["ratio"] = statistics.median(float(r["during"]) / float(r["before"]) for r in good)
        medians[peer] = m
        print(f"{peer:>8} {count:>6} {m['total']:>9.0f} {m['downtime']:>11.0f} {m['before']:>11.0f} "
              f"{m['during']:>11.0f} {m['ratio']:>13.2f}")
    if "pvcore" in medians and "qsd" in medians:
        ours, theirs = medians["pvcore"], medians["qsd"]
        print("pvcore / qsd: " + ", ".join(f"{key} {ours[key] / theirs[key]:.2f}"
                                           for key in ("total", "downtime", "before", "during", "ratio")))


if __name__ == "__main__":
    sys.exit(main())
