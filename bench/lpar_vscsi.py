"""A pseries partition's v-scsi disk served by pvcore (NBD) against QEMU's built-in file drive, in one guest.

    .venv/bin/python bench/lpar_vscsi.py [--rounds 9] [--count 1024] [--image-mb 64]

One ppc64 pseries guest under QEMU TCG (Debian's powerpc64le kernel, the
real-guest harness) gets four scsi-hd disks on one spapr-vscsi controller,
each a separate copy of the same random image:

* ``pvcore``: an NBD drive (``file=nbd+unix:///?socket=S,...,cache=none``)
  served by a ``pvcore serve --hypervisor lpar block:...`` subprocess, with
  the arguments ``pvcore serve --print-qemu-args`` prints;
* ``qemu-nbd``: the same NBD drive served by qemu-nbd (the C peer: what the
  NBD route costs whoever serves it);
* ``builtin``: QEMU's own ``file=IMG,format=raw,...,cache=none`` (host O_DIRECT);
* ``builtin-wb``: the same with ``cache=writeback`` (host page cache, which
  is what pvcore's block engine and qemu-nbd read through).

The guest finds each disk by a label in its last 4 KiB, checks that the
first MiB of each matches the image, then runs interleaved rounds: in each
round every disk (in a rotating order) gets one busybox
``dd if=/dev/sdX of=/dev/null bs=4096 count=N iflag=direct skip=K`` at the
same pseudo-random offset K, i.e. N synchronous 4 KiB reads at queue depth 1.
Each dd is timed in the guest with /proc/uptime (centiseconds; busybox's
date has no %N). The script prints, per disk, the medians of reads/s and of
microseconds per read (the dd's start-up cost included), and the ratio
pvcore / builtin of the median reads/s. After the guest, ``qemu-img bench``
(4 KiB reads at depth 1, on the host) times both NBD servers without a guest.

The whole guest runs under TCG, so the figures are dominated by emulation;
compare disks only within one run.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pvcore.testing.guest import Guest, build_initramfs, fetch_kernel

BLOCK = 4096
LABEL_PREFIX = "PVCORE-BENCH-LABEL="
CHECK_BYTES = 1 << 20
DISKS = ("pvcore", "qemu-nbd", "builtin", "builtin-wb")
HOST_BENCH_READS = 20_000
HOST_BENCH_ROUNDS = 3
VSCSI_MODULES = [
    "scsi_common", "crc64", "crc64-rocksoft", "crc64_rocksoft_generic", "crct10dif_common",
    "crct10dif_generic", "crc-t10dif", "t10-pi", "sd_mod", "scsi_transport_srp", "ibmvscsi",
]
_TIMING_RE = re.compile(r"PVCORE-BENCH round=(\d+) disk=([a-z-]+) cs=(\d+) rc=(\d+)")
_CHECK_RE = re.compile(r"PVCORE-BENCH-CHECK disk=([a-z-]+) dev=(sd[a-z]+) md5=([0-9a-f]{32})")

GUEST_SCRIPT = r"""
for path in /sys/block/sd*; do
    dev=${{path##*/}}
    label=$(dd if=/dev/$dev bs={block} skip={label_block} count=1 iflag=direct 2>/dev/null | head -n 1 | sed -n 's/^{label_prefix}//p')
    case "$label" in
        pvcore) pvcore=$dev ;;
        qemu-nbd) qemu_nbd=$dev ;;
        builtin) builtin=$dev ;;
        builtin-wb) builtin_wb=$dev ;;
    esac
done
device() {{
    case "$1" in pvcore) echo $pvcore ;; qemu-nbd) echo $qemu_nbd ;; builtin) echo $builtin ;; builtin-wb) echo $builtin_wb ;; esac
}}
for disk in {disks}; do
    dev=$(device $disk)
    [ -n "$dev" ] || {{ echo "PVCORE-BENCH-MISSING disk=$disk"; exit 1; }}
    echo "PVCORE-BENCH-CHECK disk=$disk dev=$dev md5=$(dd if=/dev/$dev bs={block} count={check_blocks} iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)"
    dd if=/dev/$dev of=/dev/null bs={block} count={count} iflag=direct 2>/dev/null
done
round=0
for skip in {skips}; do
    round=$((round + 1))
    order="{disks}"
    shift_by=$((round % {disk_count}))
    while [ $shift_by -gt 0 ]; do order="${{order#* }} ${{order%% *}}"; shift_by=$((shift_by - 1)); done
    for disk in $order; do
        dev=$(device $disk)
        read up rest < /proc/uptime; start=${{up%.*}}${{up#*.}}
        dd if=/dev/$dev of=/dev/null bs={block} count={count} skip=$skip iflag=direct 2>/dev/null
        rc=$?
        read up rest < /proc/uptime; end=${{up%.*}}${{up#*.}}
        echo "PVCORE-BENCH round=$round disk=$disk cs=$((end - start)) rc=$rc"
    done
done
"""


def make_images(directory: Path, image_bytes: int) -> dict[str, Path]:
    """One copy of the same random image per disk; the last block of each holds its label."""
    data = bytearray(os.urandom(image_bytes))
    images = {}
    for disk in DISKS:
        label = f"{LABEL_PREFIX}{disk}\n".encode()
        data[-BLOCK:] = label.ljust(BLOCK, b"\0")
        images[disk] = directory / f"{disk}.img"
        images[disk].write_bytes(data)
    return images


def pvcore_command(*args: str) -> list[str]:
    """The ``pvcore`` command line with ``args``, run by this interpreter."""
    return [sys.executable, "-m", "pvcore.cli", *args]


def start_server(command: list[str], socket_path: Path, log: Path) -> subprocess.Popen[bytes]:
    """Start an NBD server (``command``) and wait until its socket exists."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while not socket_path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"{command[0]} did not come up:\n{log.read_text(errors='replace')}")
        time.sleep(0.05)
    return proc


def stop_servers(servers: list[tuple[subprocess.Popen[bytes], Path]]) -> None:
    """SIGTERM every server; then fail with the log of one that did not exit cleanly."""
    for proc, _ in servers:
        proc.send_signal(signal.SIGTERM)
    for proc, _ in servers:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for proc, log in servers:
        if proc.returncode not in (0, -signal.SIGTERM):
            raise SystemExit(f"{proc.args[0]} exited with {proc.returncode}:\n{log.read_text(errors='replace')}")


def host_read_micros(socket_path: Path) -> float:
    """Microseconds per 4 KiB read at depth 1 that ``qemu-img bench`` measures against an NBD socket."""
    done = subprocess.run(
        ["qemu-img", "bench", "-f", "raw", "-t", "none", "-d", "1", "-s", str(BLOCK), "-S", str(BLOCK),
         "-c", str(HOST_BENCH_READS), f"nbd+unix:///?socket={socket_path}"],
        capture_output=True, text=True, timeout=120,
    )
    found = re.search(r"Run completed in ([0-9.]+) seconds", done.stdout)
    if done.returncode != 0 or found is None:
        raise SystemExit(f"qemu-img bench failed: {done.stdout}{done.stderr}")
    return float(found.group(1)) * 1e6 / HOST_BENCH_READS


def print_qemu_args(device: str) -> list[str]:
    """What ``pvcore serve --print-qemu-args`` prints for ``device`` (one partition), as a list."""
    done = subprocess.run(pvcore_command("serve", "--hypervisor", "lpar", "--print-qemu-args", device),
                          capture_output=True, text=True, check=True)
    lines = [line for line in done.stdout.splitlines() if not line.startswith("#")]
    if len(lines) != 1:
        raise SystemExit(f"expected one partition's QEMU arguments, got:\n{done.stdout}")
    return shlex.split(lines[0])


def summarize(timings: dict[str, list[int]], count: int) -> list[tuple[str, float, float, float, float]]:
    """Per disk: median reads/s, median microseconds per read, slowest and fastest round's reads/s."""
    rows = []
    for disk in DISKS:
        rates = [count * 100 / max(cs, 1) for cs in timings[disk]]
        rows.append((disk, statistics.median(rates), statistics.median(cs * 10_000 / count for cs in timings[disk]),
                     min(rates), max(rates)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9, help="timed rounds (each disk once per round)")
    parser.add_argument("--count", type=int, default=1024, help="4 KiB reads per dd")
    parser.add_argument("--image-mb", type=int, default=64, help="size of each disk image")
    parser.add_argument("--seed", type=int, default=1, help="seed of the read offsets")
    args = parser.parse_args()
    image_bytes = args.image_mb << 20
    blocks = image_bytes // BLOCK
    if args.count < 1 or args.rounds < 1 or args.count + 1 >= blocks:
        parser.error("need rounds >= 1 and 1 <= count < image blocks - 1")
    for tool, package in (("qemu-nbd", "qemu-utils"), ("qemu-img", "qemu-utils")):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found: apt-get install -y {package}")
    offsets = random.Random(args.seed)
    skips = [offsets.randrange(0, blocks - args.count - 1) for _ in range(args.rounds)]

    kernel = fetch_kernel("ppc64")
    # /var/tmp, not /tmp: cache=none opens the built-in drive's file with O_DIRECT, which tmpfs may refuse.
    with tempfile.TemporaryDirectory(prefix="pvcore-bench-lpar-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        images = make_images(work, image_bytes)
        expected_md5 = hashlib.md5(images["pvcore"].read_bytes()[:CHECK_BYTES]).hexdigest()
        script = GUEST_SCRIPT.format(
            block=BLOCK, label_block=blocks - 1, label_prefix=LABEL_PREFIX, disks=" ".join(DISKS),
            disk_count=len(DISKS), check_blocks=CHECK_BYTES // BLOCK, count=args.count,
            skips=" ".join(map(str, skips)),
        )
        initramfs = build_initramfs(kernel, script, VSCSI_MODULES, work)
        pvcore_socket, qemu_nbd_socket = work / "p1-disk.sock", work / "qemu-nbd.sock"
        device = f"block:path={images['pvcore']},socket={pvcore_socket},name=p1-disk"
        qemu_args = print_qemu_args(device)
        controller = next(arg.split("id=", 1)[1] for arg in qemu_args if arg.startswith("spapr-vscsi,"))
        drives = (
            ("qemu-nbd", f"nbd+unix:///?socket={qemu_nbd_socket}", "none"),
            ("builtin", str(images["builtin"]), "none"),
            ("builtin-wb", str(images["builtin-wb"]), "writeback"),
        )
        for index, (disk, source, cache) in enumerate(drives, start=1):
            qemu_args += ["-drive", f"file={source},format=raw,if=none,id=b{index},cache={cache}",
                          "-device", f"scsi-hd,drive=b{index},bus={controller}.0,scsi-id={index}"]
        for image in images.values():  # the same warm host page cache for every disk
            image.read_bytes()
        servers = [
            (start_server(pvcore_command("--log-level", "warning", "serve", "--hypervisor", "lpar",
                                         "--run-dir", str(work / "run"), device),
                          pvcore_socket, work / "pvcore.log"), work / "pvcore.log"),
            (start_server(["qemu-nbd", "--persistent", "--shared=2", "--format=raw", "--cache=writeback",
                           f"--socket={qemu_nbd_socket}", str(images["qemu-nbd"])],
                          qemu_nbd_socket, work / "qemu-nbd.log"), work / "qemu-nbd.log"),
        ]
        guest = Guest(kernel, initramfs, [*qemu_args, "-serial", "stdio"], name="bench-lpar-vscsi",
                      max_runtime=60 + len(DISKS) * args.rounds * args.count * 0.01)
        host_micros: dict[str, list[float]] = {"pvcore": [], "qemu-nbd": []}
        try:
            with guest:
                result = guest.wait(guest.max_runtime - 5)
            if result.returncode == 0:
                for _ in range(HOST_BENCH_ROUNDS):
                    host_micros["pvcore"].append(host_read_micros(pvcore_socket))
                    host_micros["qemu-nbd"].append(host_read_micros(qemu_nbd_socket))
        finally:
            stop_servers(servers)
        if result.returncode != 0:
            raise SystemExit(f"guest rc={result.returncode}\n{result.output[-3000:]}")

    checks = {disk: (dev, md5) for disk, dev, md5 in _CHECK_RE.findall(result.output)}
    for disk in DISKS:
        if checks.get(disk, ("", ""))[1] != expected_md5:
            raise SystemExit(f"{disk}: the guest's first MiB does not match the image: {checks.get(disk)}")
    timings: dict[str, list[int]] = {disk: [] for disk in DISKS}
    for _, disk, cs, rc in _TIMING_RE.findall(result.output):
        if rc != "0":
            raise SystemExit(f"{disk}: a timed dd failed (rc={rc})")
        timings[disk].append(int(cs))
    if any(len(found) != args.rounds for found in timings.values()):
        raise SystemExit(f"missing timings: { {disk: len(found) for disk, found in timings.items()} }")

    rows = summarize(timings, args.count)
    print(f"pseries guest (QEMU TCG), one spapr-vscsi controller, {args.image_mb} MiB images; "
          f"{args.rounds} rounds x {args.count} 4 KiB O_DIRECT reads per disk at depth 1; "
          f"guest boot to poweroff {result.elapsed:.1f} s")
    print("| disk | guest device | median reads/s | median us/read | slowest-fastest round, reads/s |")
    print("|---|---|---:|---:|---:|")
    for disk, rate, micros, slowest, fastest in rows:
        print(f"| {disk} | {checks[disk][0]} | {rate:.0f} | {micros:.0f} | {slowest:.0f}-{fastest:.0f} |")
    by_disk = {row[0]: row[1] for row in rows}
    print(f"ratio pvcore / builtin (median reads/s): {by_disk['pvcore'] / by_disk['builtin']:.2f}; "
          f"pvcore / qemu-nbd: {by_disk['pvcore'] / by_disk['qemu-nbd']:.2f}; "
          f"pvcore / builtin-wb: {by_disk['pvcore'] / by_disk['builtin-wb']:.2f}")
    print(f"host side, qemu-img bench, {HOST_BENCH_READS} 4 KiB reads at depth 1, median of {HOST_BENCH_ROUNDS}: "
          + ", ".join(f"{server} {statistics.median(micros):.0f} us/read" for server, micros in host_micros.items()))


if __name__ == "__main__":
    main()
