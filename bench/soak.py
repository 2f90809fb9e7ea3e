"""A soak: 16 devices of every class on kvm and lpar front doors under mixed load, with misbehaving clients.

    .venv/bin/python bench/soak.py [--seconds 600] [--interval 10] [--json FILE] [--guest]

One ``pvcore serve --hypervisor kvm`` subprocess serves, through kvm's
vhost-user doors, 3 disks, 2 NICs and 3 rngs, one rng over EGD and one
console chardev; and through lpar's doors (``hypervisor=lpar``) 2 disks
over NBD, 2 NICs over netdev stream, one console chardev and one rng FIFO.
Well-behaved clients keep every device busy: the Python vhost-user front end
writes and reads back disk blocks (verifying them), sends frames and takes
entropy; a raw NBD client writes and reads back blocks; netdev-stream
clients send frames to each other and count what arrives; EGD and FIFO
readers take entropy; chardev clients write console output. Misbehaving
clients connect to every socket, send garbage or half a message and vanish.
With ``--guest`` a real Linux guest (QEMU TCG, the kvm plugin's QEMU
arguments) has one more kvm disk of the same daemon and, for the whole soak,
writes 64 KiB of fresh data with O_DIRECT, reads it back and compares
checksums, while the misbehaving clients knock on its disk's socket too.

Every interval it prints operations and bytes per client kind, the daemon's
RSS, open fds and threads; at the end a summary (RSS at start, middle and
end). It fails (exit 1) if the daemon dies, a well-behaved client sees an
error or wrong data, the daemon logs a traceback, or fds or RSS grow in the
second half.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pvcore.devices.block.virtio_blk import REQUEST_HEADER, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT  # noqa: E402
from pvcore.devices.net.virtio_net import NET_HDR  # noqa: E402
from pvcore.testing.guest import Guest, build_initramfs, fetch_kernel, plugin_qemu_args, result_line  # noqa: E402
from pvcore.testing.vhost_user_frontend import VhostUserFrontend  # noqa: E402

DISK_SIZE = 8 << 20
BLOCK = 4096
RSS_GROWTH_LIMIT = 0.10
"""RSS may grow at most this fraction from the middle to the end (flat is the goal)."""
FD_GROWTH_LIMIT = 4


class Tally:
    """Operations, bytes and errors per client kind, shared by the client threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ops: dict[str, int] = defaultdict(int)
        self.bytes: dict[str, int] = defaultdict(int)
        self.errors: list[str] = []

    def add(self, kind: str, nbytes: int) -> None:
        """Count one operation of ``nbytes``."""
        with self.lock:
            self.ops[kind] += 1
            self.bytes[kind] += nbytes

    def error(self, kind: str, exc: BaseException) -> None:
        """Record a well-behaved client's failure."""
        with self.lock:
            self.errors.append(f"{kind}: {exc!r}")

    def snapshot(self) -> tuple[dict[str, int], dict[str, int]]:
        """Copies of the counters."""
        with self.lock:
            return dict(self.ops), dict(self.bytes)


def mac(n: int) -> str:
    return f"52:54:00:50:00:{n:02x}"


GUEST_DISK_MB = 16
GUEST_SCRIPT = """
end=$(( $(date +%s) + {seconds} ))
rounds=0
bad=0
while [ $(date +%s) -lt $end ]; do
  block=$(( rounds % {blocks} ))
  dd if=/dev/urandom of=/tmp/data bs=64k count=1 2>/dev/null
  want=$(md5sum < /tmp/data)
  dd if=/tmp/data of=/dev/vda bs=64k seek=$block count=1 oflag=direct conv=notrunc 2>/dev/null || bad=$((bad + 1))
  got=$(dd if=/dev/vda bs=64k skip=$block count=1 iflag=direct 2>/dev/null | md5sum)
  [ "$got" = "$want" ] || bad=$((bad + 1))
  rounds=$((rounds + 1))
done
{rounds_line}
{bad_line}
{dmesg_line}
"""


def guest_device(run: Path) -> str:
    """The soak guest's disk: one more kvm vhost-user disk of the same daemon."""
    image = run / "guest-disk.img"
    with open(image, "wb") as disk:
        disk.truncate(GUEST_DISK_MB << 20)
    return f"block:socket={run}/guest-blk.sock,path={image},name=soakguest-blk,domain=soakguest"


def start_guest(run: Path, spec: str, seconds: int) -> Guest:
    """Boot the soak guest: it writes, reads back and checks 64 KiB blocks for ``seconds``, then powers off."""
    (qemu_args,) = plugin_qemu_args("kvm", [spec]).values()
    kernel = fetch_kernel("x86_64")
    script = GUEST_SCRIPT.format(
        seconds=seconds, blocks=GUEST_DISK_MB * 16, rounds_line=result_line("rounds", "echo $rounds"),
        bad_line=result_line("bad", "echo $bad"),
        dmesg_line=result_line(
            "dmesg_problems", "dmesg | grep -i -e 'i/o error' -e blk_update -e 'not a head' -e 'needs reset' -e broken"
        ),
    )
    initramfs = build_initramfs(kernel, script, ["virtio_pci", "virtio_blk"], run, name="soak-guest.cpio.gz")
    return Guest(kernel, initramfs, qemu_args, memory_mb=256, name="soak-guest", max_runtime=seconds + 600).start()


def devices(run: Path) -> tuple[list[str], dict[str, list]]:
    """The device specs and, per client kind, what its clients connect to."""
    specs, plan = [], defaultdict(list)
    for n in range(3):
        image = run / f"kvm-disk{n}.img"
        image.write_bytes(bytes(DISK_SIZE))
        specs.append(f"block:socket={run}/kvm-blk{n}.sock,path={image},name=k{n}-blk")
        plan["vhost-blk"].append(run / f"kvm-blk{n}.sock")
    for n in range(2):
        specs.append(f"net:socket={run}/kvm-net{n}.sock,mac={mac(n)},switch=soak,name=k{n}-net")
        plan["vhost-net"].append((run / f"kvm-net{n}.sock", mac(n)))
    for n in range(3):
        specs.append(f"rng:socket={run}/kvm-rng{n}.sock,name=k{n}-rng")
        plan["vhost-rng"].append(run / f"kvm-rng{n}.sock")
    specs.append(f"rng:socket={run}/egd.sock,protocol=egd,name=k3-rng")
    plan["egd"].append(run / "egd.sock")
    specs.append(f"console:socket={run}/kvm-con.sock,name=k4-con")
    plan["chardev"].append(run / "kvm-con.sock")
    for n in range(2):
        image = run / f"lpar-disk{n}.img"
        image.write_bytes(bytes(DISK_SIZE))
        specs.append(f"block:socket={run}/lpar-nbd{n}.sock,path={image},hypervisor=lpar,name=p{n}-blk")
        plan["nbd"].append(run / f"lpar-nbd{n}.sock")
        specs.append(f"net:socket={run}/lpar-net{n}.sock,mac={mac(10 + n)},switch=soak,hypervisor=lpar,name=p{n}-net")
        plan["stream"].append((run / f"lpar-net{n}.sock", mac(10 + n)))
    specs.append(f"console:socket={run}/lpar-con.sock,hypervisor=lpar,name=p3-con")
    plan["chardev"].append(run / "lpar-con.sock")
    specs.append(f"rng:socket={run}/lpar-rng.fifo,hypervisor=lpar,name=p4-rng")
    plan["fifo"].append(run / "lpar-rng.fifo")
    return specs, plan


def vhost_blk(path: Path, tally: Tally, stop: threading.Event) -> None:
    """Write a block, read it back, verify, across the disk."""
    with VhostUserFrontend.connect(path, ram_size=4 << 20, timeout=30) as frontend:
        frontend.start(queue_size=64)
        rng = random.Random(str(path))
        while not stop.is_set():
            sector = rng.randrange(DISK_SIZE // BLOCK) * (BLOCK // 512)
            data = rng.randbytes(BLOCK)
            write = frontend.request(0, [REQUEST_HEADER.pack(VIRTIO_BLK_T_OUT, 0, sector), data], [1])
            read = frontend.request(0, [REQUEST_HEADER.pack(VIRTIO_BLK_T_IN, 0, sector)], [BLOCK, 1])
            if write.data != b"\0" or read.data != data + b"\0":
                raise AssertionError(f"{path.name}: sector {sector} did not read back what was written")
            tally.add("vhost-blk", 2 * BLOCK)


def vhost_net(target: tuple[Path, str], tally: Tally, stop: threading.Event) -> None:
    """Send broadcast frames from the NIC's own MAC."""
    path, own = target
    src = bytes.fromhex(own.replace(":", ""))
    with VhostUserFrontend.connect(path, ram_size=4 << 20, timeout=30) as frontend:
        frontend.start(queue_size=64)
        frame = b"\xff" * 6 + src + b"\x88\xb5" + bytes(500)
        while not stop.is_set():
            frontend.request(1, [NET_HDR.pack(0, 0, 0, 0, 0, 0, 1), frame], [])
            tally.add("vhost-net", len(frame))


def vhost_rng(path: Path, tally: Tally, stop: threading.Event) -> None:
    """Take 256 bytes of entropy at a time."""
    with VhostUserFrontend.connect(path, ram_size=1 << 20, timeout=30) as frontend:
        frontend.start(queue_size=16)
        while not stop.is_set():
            used = frontend.request(0, [], [256])
            tally.add("vhost-rng", used.written)


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("the daemon closed the connection")
        data += chunk
    return bytes(data)


def nbd(path: Path, tally: Tally, stop: threading.Event) -> None:
    """A raw NBD client: EXPORT_NAME, then write a block and read it back, verified."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(30)
        sock.connect(str(path))
        _recv_exact(sock, 18)
        sock.sendall(struct.pack(">I", 3) + struct.pack(">QII", 0x49484156454F5054, 1, 0))
        _recv_exact(sock, 10)
        rng = random.Random(str(path))
        handle = 0
        while not stop.is_set():
            offset = rng.randrange(DISK_SIZE // BLOCK) * BLOCK
            data = rng.randbytes(BLOCK)
            handle += 1
            sock.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 1, handle, offset, BLOCK) + data)
            magic, error, got = struct.unpack(">IIQ", _recv_exact(sock, 16))
            if error or got != handle:
                raise AssertionError(f"{path.name}: write error {error}")
            sock.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 0, handle, offset, BLOCK))
            magic, error, got = struct.unpack(">IIQ", _recv_exact(sock, 16))
            if error or _recv_exact(sock, BLOCK) != data:
                raise AssertionError(f"{path.name}: read back error {error} or wrong data")
            tally.add("nbd", 2 * BLOCK)


def stream(pair: list[tuple[Path, str]], tally: Tally, stop: threading.Event) -> None:
    """Two netdev-stream peers: the first sends frames to the second, which counts them."""
    (path_a, mac_a), (path_b, mac_b) = pair
    a, b = socket.socket(socket.AF_UNIX), socket.socket(socket.AF_UNIX)
    with a, b:
        a.connect(str(path_a))
        b.connect(str(path_b))
        b.settimeout(0.2)
        frame = bytes.fromhex(mac_b.replace(":", "")) + bytes.fromhex(mac_a.replace(":", "")) + b"\x88\xb5" + bytes(1000)
        while not stop.is_set():
            for _ in range(16):
                a.sendall(struct.pack(">I", len(frame)) + frame)
            try:
                while True:
                    got = b.recv(65536)
                    if not got:
                        raise ConnectionError("the daemon closed the stream")
                    tally.add("stream", len(got))
            except TimeoutError:
                pass


def egd(path: Path, tally: Tally, stop: threading.Event) -> None:
    """Blocking reads of 64 bytes, as QEMU's rng-egd sends."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(30)
        sock.connect(str(path))
        while not stop.is_set():
            sock.sendall(b"\x02\x40")
            tally.add("egd", len(_recv_exact(sock, 64)))


def fifo(path: Path, tally: Tally, stop: threading.Event) -> None:
    """Read the rng FIFO as QEMU's rng-random does."""
    with open(path, "rb", buffering=0) as reader:
        while not stop.is_set():
            data = reader.read(256)
            if not data:
                raise ConnectionError("the rng FIFO ended")
            tally.add("fifo", len(data))


def chardev(path: Path, tally: Tally, stop: threading.Event) -> None:
    """Console output lines, as a guest's kernel writes them."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(30)
        sock.connect(str(path))
        line = b"[soak] the quick brown fox jumps over the lazy dog 0123456789\r\n"
        while not stop.is_set():
            sock.sendall(line * 16)
            tally.add("chardev", len(line) * 16)
            time.sleep(0.01)


def misbehave(paths: list[Path], tally: Tally, stop: threading.Event) -> None:
    """Connect to any socket, send garbage or half a message, vanish; over and over."""
    rng = random.Random(1)
    while not stop.is_set():
        path = rng.choice(paths)
        try:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(1)
                sock.connect(str(path))
                sock.sendall(rng.choice([rng.randbytes(rng.randrange(1, 200)), b"\x01\x00\x00\x00\x01", b"\x00" * 3]))
                if rng.random() < 0.5:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        tally.add("misbehaving", 1)
        time.sleep(0.02)


def daemon_figures(pid: int) -> dict[str, int]:
    """The daemon's RSS (KiB), open fds and threads."""
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines())
    return {
        "rss_kib": int(fields["VmRSS"].split()[0]),
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "threads": int(fields["Threads"]),
    }


def run_client(kind: str, function, target, tally: Tally, stop: threading.Event) -> None:
    """Run one client until stop; its failure is counted, never fatal to the others."""
    try:
        function(target, tally, stop)
    except Exception as exc:
        if not stop.is_set():
            tally.error(kind, exc)


def main(argv: list[str] | None = None) -> int:
    """Run the soak; print the figures; exit 1 on a failure."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=600)
    parser.add_argument("--interval", type=float, default=10.0)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--guest", action="store_true", help="a real guest writes and checks its own disk throughout")
    parser.add_argument("--spare", action="append", default=[], metavar="PREFIX",
                        help="misbehaving clients leave sockets whose name starts with PREFIX alone")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pvcore-soak-") as scratch:
        run = Path(scratch)
        specs, plan = devices(run)
        if args.guest:
            specs.append(guest_device(run))
        log = run / "daemon.log"
        with open(log, "wb") as out:
            daemon = subprocess.Popen(
                [sys.executable, "-m", "pvcore.cli", "serve", "--hypervisor", "kvm", "--run-dir", str(run), *specs],
                stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
            )
        try:
            return _soak(args, run, specs, plan, log, daemon)
        finally:
            daemon.terminate()
            try:
                daemon.wait(30)
            except subprocess.TimeoutExpired:
                daemon.kill()


def _soak(args, run: Path, specs: list[str], plan, log: Path, daemon: subprocess.Popen) -> int:
    deadline = time.monotonic() + 60
    while f"serving {len(specs)} device(s)" not in log.read_text(errors="replace"):
        if daemon.poll() is not None or time.monotonic() > deadline:
            print(log.read_text(errors="replace"), file=sys.stderr)
            raise SystemExit("pvcore serve did not come up")
        time.sleep(0.1)
    tally, stop = Tally(), threading.Event()
    clients = [(kind, fn, target) for kind, fn in (
        ("vhost-blk", vhost_blk), ("vhost-net", vhost_net), ("vhost-rng", vhost_rng), ("nbd", nbd), ("egd", egd),
        ("fifo", fifo), ("chardev", chardev)) for target in plan[kind]]
    clients.append(("stream", stream, plan["stream"]))
    sockets = sorted(path for path in run.glob("*.sock") if not path.name.startswith(tuple(args.spare)))
    clients += [("misbehaving", misbehave, sockets)] * 2
    threads = [threading.Thread(target=run_client, args=(kind, fn, target, tally, stop), daemon=True)
               for kind, fn, target in clients]
    guest = start_guest(run, specs[-1], args.seconds) if args.guest else None
    start_figures = daemon_figures(daemon.pid)
    started = time.monotonic()
    for thread in threads:
        thread.start()
    samples = []
    previous_ops, previous_bytes = tally.snapshot()
    kinds = ["vhost-blk", "vhost-net", "vhost-rng", "nbd", "stream", "egd", "fifo", "chardev", "misbehaving"]
    print(f"{'t(s)':>6} {'rss MiB':>8} {'fds':>5} {'thr':>4}  " + " ".join(f"{k + ' MB/s':>14}" for k in kinds[:-1])
          + "  misbehaving/s  errors", flush=True)
    while time.monotonic() - started < args.seconds and daemon.poll() is None:
        time.sleep(min(args.interval, max(0.0, args.seconds - (time.monotonic() - started))))
        ops, nbytes = tally.snapshot()
        figures = daemon_figures(daemon.pid) if daemon.poll() is None else {"rss_kib": 0, "fds": 0, "threads": 0}
        elapsed = time.monotonic() - started
        rates = {k: (nbytes.get(k, 0) - previous_bytes.get(k, 0)) / args.interval / 1e6 for k in kinds[:-1]}
        misbehaving = (ops.get("misbehaving", 0) - previous_ops.get("misbehaving", 0)) / args.interval
        samples.append({"t": round(elapsed, 1), **figures, "mb_per_s": {k: round(v, 3) for k, v in rates.items()},
                        "misbehaving_per_s": round(misbehaving, 1), "errors": len(tally.errors)})
        print(f"{elapsed:6.0f} {figures['rss_kib'] / 1024:8.1f} {figures['fds']:5} {figures['threads']:4}  "
              + " ".join(f"{rates[k]:14.3f}" for k in kinds[:-1]) + f"  {misbehaving:13.1f}  {len(tally.errors)}",
              flush=True)
        previous_ops, previous_bytes = ops, nbytes
    stop.set()
    for thread in threads:
        thread.join(10)
    guest_results = None
    if guest is not None:
        try:
            result = guest.wait(300)
            guest_results = {"returncode": result.returncode, **result.results}
        finally:
            guest.kill()
    alive = daemon.poll() is None
    text = log.read_text(errors="replace")
    tracebacks = text.count("Traceback")
    middle = samples[len(samples) // 2] if samples else start_figures
    end = samples[-1] if samples else start_figures
    summary = {
        "seconds": args.seconds, "devices": len(specs), "clients": len(clients),
        "rss_kib": {"start": start_figures["rss_kib"], "middle": middle["rss_kib"], "end": end["rss_kib"]},
        "fds": {"start": start_figures["fds"], "middle": middle["fds"], "end": end["fds"]},
        "threads": {"start": start_figures["threads"], "end": end["threads"]},
        "totals_mb": {k: round(v / 1e6, 1) for k, v in tally.snapshot()[1].items()},
        "client_errors": tally.errors, "daemon_tracebacks": tracebacks, "daemon_alive": alive, "guest": guest_results,
        "samples": samples,
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "samples"}, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    failures = []
    if not alive:
        failures.append("the daemon died")
    if tally.errors:
        failures.append(f"{len(tally.errors)} client error(s): {tally.errors[:5]}")
    if tracebacks:
        failures.append(f"the daemon logged {tracebacks} traceback(s)")
    if guest_results is not None and (
        guest_results["returncode"] != 0 or guest_results.get("bad") != "0" or not int(guest_results.get("rounds") or 0)
        or guest_results.get("dmesg_problems")
    ):
        failures.append(f"the guest: {guest_results}")
    if alive and end["rss_kib"] > middle["rss_kib"] * (1 + RSS_GROWTH_LIMIT):
        failures.append(f"RSS grew from {middle['rss_kib']} KiB to {end['rss_kib']} KiB in the second half")
    if alive and end["fds"] > middle["fds"] + FD_GROWTH_LIMIT:
        failures.append(f"fds grew from {middle['fds']} to {end['fds']} in the second half")
    for failure in failures:
        print(f"SOAK FAILURE: {failure}", file=sys.stderr)
    if tracebacks:
        print(text[text.index("Traceback") - 200:][:3000], file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
