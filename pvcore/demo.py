"""``pvcore demo``: a real guest whose disk, NIC, console and entropy pvcore serves.

:func:`run_guest_demo` (what ``make demo`` runs) starts ``pvcore serve
--hypervisor kvm`` as a subprocess and prints its command line, then boots two
Debian guests under QEMU TCG with the real-guest harness
(:mod:`pvcore.testing.guest`): ``vm1`` gets a vhost-user disk, NIC and rng and
a virtio console on a chardev socket, all served by that one daemon; ``vm2``
gets only a NIC on the same pvcore switch, for ``vm1`` to ping. The guests'
device arguments come from the kvm plugin's ``pvcore_qemu_args`` (what
``pvcore serve --print-qemu-args`` prints for the same devices, QEMU 7.2
workarounds included); the demo adds only the machine, memory, kernel and
initramfs. It prints
progress while the guests boot, then what ``vm1`` saw: the disk's md5sum
against the host file's, bytes read from ``/dev/hwrng`` with ``virtio_rng``
current, the ping over pvcore's switch and the console transcript as pvcore's
console log recorded it. Everything lives in one temporary directory; the
guests, the daemon and the directory are removed on every exit, Ctrl-C and
SIGTERM included.

:func:`run_loopback_demo` (``pvcore demo --loopback``) needs no QEMU: the
core's reference driver plays the guest, every request going through the real
ring and device engines over the in-process loopback transport.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import attrs

from pvcore.config import ConfigError, parse_devices
from pvcore.devices.block import create_block_device
from pvcore.devices.console import create_console_device
from pvcore.devices.net import create_net_device
from pvcore.devices.rng import create_rng_device
from pvcore.registry import Registry, default_registry
from pvcore.testing.guest import (
    READY_MARKER,
    Guest,
    GuestError,
    build_initramfs,
    cache_dir,
    fetch_kernel,
    parse_results,
    result_line,
)
from pvcore.testing.loopback import Loopback

QEMU = "qemu-system-x86_64"
DISK_SIZE = 8 << 20
RNG_BYTES = 4096
VM1_MAC, VM2_MAC = "52:54:00:00:00:01", "52:54:00:00:00:02"
VM1_IP, VM2_IP = "192.0.2.1", "192.0.2.2"
SWITCH = "demo0"
BOOT_TIMEOUT = 240.0
SERVE_TIMEOUT = 30.0

VM1_SCRIPT = r"""
say() {{ echo "vm1: $*" > /dev/hvc0; }}
say "hello from $(uname -sr) on $(uname -m); this line went through /dev/hvc0"
{step_disk}
md5=$(md5sum /dev/vda | cut -d' ' -f1)
{md5}
say "/dev/vda is $(cat /sys/block/vda/size) sectors, md5sum $md5"
{step_rng}
{rng_current}
dd if=/dev/hwrng of=/tmp/rng bs=512 count={rng_blocks} iflag=fullblock 2>/dev/null
{rng_bytes}
{rng_head}
say "read $(wc -c < /tmp/rng) bytes from /dev/hwrng ($(cat /sys/class/misc/hw_random/rng_current))"
{step_net}
ip link set eth0 up; ip addr add {vm1_ip}/24 dev eth0
for i in $(seq 60); do ping -c 1 -W 1 {vm2_ip} >/dev/null 2>&1 && break; done
ping -c 3 -W 2 {vm2_ip} > /tmp/ping 2>&1
{ping_received}
{ping_rtt}
say "ping {vm2_ip}: $(grep -o '[0-9]* packets received' /tmp/ping), $(grep round-trip /tmp/ping)"
say "goodbye"
"""

VM2_SCRIPT = f"""
ip link set eth0 up; ip addr add {VM2_IP}/24 dev eth0
sleep 600
"""


class DemoError(Exception):
    """The demo cannot run here; the message says what to do."""


def _vm1_script() -> str:
    return VM1_SCRIPT.format(
        step_disk=result_line("step", "echo disk"),
        md5=result_line("md5", "echo $md5"),
        step_rng=result_line("step", "echo rng"),
        rng_current=result_line("rng_current", "cat /sys/class/misc/hw_random/rng_current"),
        rng_blocks=RNG_BYTES // 512,
        rng_bytes=result_line("rng_bytes", "wc -c < /tmp/rng"),
        rng_head=result_line("rng_head", "od -An -tx1 -N16 /tmp/rng | tr -d ' '"),
        step_net=result_line("step", "echo net"),
        vm1_ip=VM1_IP,
        vm2_ip=VM2_IP,
        ping_received=result_line("ping_received", "grep -o '[0-9]* packets received' /tmp/ping | cut -d' ' -f1"),
        ping_rtt=result_line("ping_rtt", "grep round-trip /tmp/ping | cut -d= -f2"),
    )


@attrs.define
class Progress:
    """Prints timestamped progress lines, so a person sees what is happening."""

    started: float = attrs.field(factory=time.monotonic)

    def say(self, text: str) -> None:
        """Print ``text`` with the seconds since the demo started."""
        print(f"[{time.monotonic() - self.started:5.1f}s] {text}", flush=True)


@attrs.define
class ServeProcess:
    """A ``pvcore serve`` subprocess, its log file, and how to stop it."""

    args: list[str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self, devices: int) -> None:
        """Start the daemon; return once it serves ``devices`` devices, else raise :class:`DemoError`."""
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                self.args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + SERVE_TIMEOUT
        while f"serving {devices} device(s)" not in self.log_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = (self.log_text().strip().splitlines() or ["(no output)"])[-1]
                raise DemoError(f"pvcore serve did not come up: {tail}")
            time.sleep(0.05)

    def stop(self) -> int | None:
        """SIGTERM (in-flight requests finish, sockets go), SIGKILL after 10 s; the exit status."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return None if proc is None else proc.returncode
        proc.terminate()
        try:
            return proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait(10)

    def log_text(self) -> str:
        """Everything the daemon logged so far."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP into KeyboardInterrupt, so cleanup runs as on Ctrl-C."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = {signum: signal.signal(signum, interrupt) for signum in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _command_text(head: list[str], arguments: list[str]) -> str:
    """``head`` and one argument per continued line, as a person would type it."""
    return " \\\n      ".join(["    " + shlex.join(head), *arguments])


def _option_lines(arguments: list[str]) -> list[str]:
    """QEMU ``arguments`` grouped into lines, a new line at each -kernel, -object and -chardev."""
    lines: list[list[str]] = [[]]
    for argument in arguments:
        if argument in ("-kernel", "-object", "-chardev") and lines[-1]:
            lines.append([])
        lines[-1].append(argument)
    return [shlex.join(line) for line in lines]


def _check_host() -> None:
    if shutil.which(QEMU) is None:
        raise DemoError(f"{QEMU} not found: install it with `sudo apt-get install -y qemu-system-x86` (make demo does)")
    if shutil.which("timeout") is None:
        raise DemoError("timeout not found: install it with `sudo apt-get install -y coreutils`")


def demo_devices(work: Path, disk: Path, console_log: Path) -> list[str]:
    """The DEVICE strings of the demo's daemon: vm1's disk, NIC, rng and console, vm2's NIC; sockets in ``work``."""
    sockets = {name: work / f"{name}.sock" for name in ("vda", "net", "rng", "con", "vm2-net")}
    return [
        f"block:path={disk},socket={sockets['vda']},name=vm1-vda,domain=vm1",
        f"net:socket={sockets['net']},mac={VM1_MAC},switch={SWITCH},name=vm1-net,domain=vm1",
        f"rng:socket={sockets['rng']},rate=65536/1s,name=vm1-rng,domain=vm1",
        f"console:socket={sockets['con']},log={console_log},name=vm1-con,domain=vm1",
        f"net:socket={sockets['vm2-net']},mac={VM2_MAC},switch={SWITCH},name=vm2-net,domain=vm2",
    ]


def guest_arguments(registry: Registry, devices: Sequence[str]) -> dict[str, list[str]]:
    """Per guest, the QEMU arguments the kvm plugin's ``pvcore_qemu_args`` gives for ``devices``.

    ``devices`` are ``pvcore serve --hypervisor kvm`` DEVICE strings; a
    :class:`DemoError` says what is wrong when they cannot be parsed or
    attached, or no kvm plugin is installed.
    """
    try:
        configs = parse_devices(devices, registry.device_classes(), registry.plugin_options("kvm"))
        return dict(registry.qemu_args("kvm", configs))
    except (ConfigError, LookupError, ValueError) as exc:
        raise DemoError(f"cannot attach the demo's devices: {exc}") from None


def _follow(guest: Guest, timeout: float, on_line: Callable[[str], None]) -> None:
    """Call ``on_line`` for each console line of ``guest`` until QEMU exits; raise on timeout."""
    deadline = time.monotonic() + timeout
    seen = 0
    while True:
        running = guest.running
        lines = guest.output.split("\n")
        complete = lines if not running else lines[:-1]
        for line in complete[seen:]:
            on_line(line)
        seen = max(seen, len(complete))
        if not running:
            return
        if time.monotonic() > deadline:
            raise DemoError(f"guest {guest.name} did not finish within {timeout:.0f} s; its last line: {lines[-2:]}")
        time.sleep(0.1)


def _step_printer(progress: Progress) -> Callable[[str], None]:
    steps = {
        READY_MARKER: "vm1: kernel booted, virtio drivers loaded",
        "PVCORE-RESULT step=disk": "vm1: reading the whole of /dev/vda (vhost-user-blk, served by pvcore)",
        "PVCORE-RESULT step=rng": "vm1: reading /dev/hwrng (vhost-user-rng, served by pvcore)",
        "PVCORE-RESULT step=net": f"vm1: pinging vm2 ({VM2_IP}) over pvcore's switch {SWITCH}",
    }

    def on_line(line: str) -> None:
        for marker, text in steps.items():
            if marker in line:
                progress.say(text)

    return on_line


def _report(results: dict[str, str], host_md5: str, disk: Path, console_log: Path) -> list[tuple[str, bool, str]]:
    """The demo's findings: (what, passed, detail) per device."""
    md5 = results.get("md5", "(none)")
    received = results.get("ping_received", "0")
    rng_current = results.get("rng_current", "(none)")
    rng_bytes = results.get("rng_bytes", "0")
    transcript = console_log.read_text(errors="replace") if console_log.exists() else ""
    return [
        ("disk", md5 == host_md5, f"/dev/vda md5sum {md5}; host file {disk.name} md5 {host_md5}"),
        (
            "entropy",
            rng_bytes == str(RNG_BYTES) and rng_current.startswith("virtio_rng"),
            f"{rng_bytes} bytes from /dev/hwrng, rng_current = {rng_current}, first bytes {results.get('rng_head', '')}",
        ),
        (
            "network",
            received.isdigit() and int(received) > 0,
            f"ping vm2 {VM2_IP} over pvcore switch {SWITCH}: {received}/3 replies, rtt min/avg/max {results.get('ping_rtt', '-')}",
        ),
        ("console", "vm1: goodbye" in transcript, f"pvcore's log of vm1's /dev/hvc0 ({console_log.name}):"),
    ]


def run_guest_demo() -> int:
    """Boot two guests served by one ``pvcore serve`` and print what the first saw; 0 if all of it checks out."""
    _check_host()
    progress = Progress()
    cached = any((cache_dir() / "extracted" / "x86_64").glob("linux-image-*"))
    progress.say(
        f"guest kernel: Debian's x86_64 linux-image and busybox-static, cached in {cache_dir()}"
        + ("" if cached else " (first run: downloading about 70 MB with apt-get)")
    )
    try:
        kernel = fetch_kernel("x86_64")
    except GuestError as exc:
        raise DemoError(str(exc)) from None
    with contextlib.ExitStack() as cleanup, _sigterm_interrupts():
        work = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="pvcore-demo-")))
        disk, console_log = work / "disk.img", work / "console.log"
        disk.write_bytes(os.urandom(DISK_SIZE))
        host_md5 = hashlib.md5(disk.read_bytes()).hexdigest()
        devices = demo_devices(work, disk, console_log)
        serve_args = ["serve", "--hypervisor", "kvm", "--run-dir", str(work / "run"), *devices]
        arguments = guest_arguments(default_registry(), devices)
        progress.say(f"work directory {work}; disk.img is {DISK_SIZE >> 20} MiB of random bytes, md5 {host_md5}")
        progress.say("starting the daemon that serves both guests:")
        print(_command_text(["pvcore", *serve_args[: -len(devices)]], [shlex.quote(d) for d in devices]), flush=True)
        served = ServeProcess([sys.executable, "-m", "pvcore.cli", *serve_args], work / "pvcore.log")
        cleanup.callback(served.stop)
        served.start(len(devices))
        progress.say(f"pvcore serve is up (pid {served.proc.pid if served.proc else '?'}): {len(devices)} devices listening")
        init_vm1 = build_initramfs(kernel, _vm1_script(), ["virtio_blk", "virtio_net", "virtio_console", "virtio_rng"],
                                   work, name="vm1-initramfs.cpio.gz")
        init_vm2 = build_initramfs(kernel, VM2_SCRIPT, ["virtio_net"], work, name="vm2-initramfs.cpio.gz")
        vm2 = cleanup.enter_context(Guest(kernel, init_vm2, arguments["vm2"], name="vm2",
                                          memory_mb=256, max_runtime=BOOT_TIMEOUT + 60))
        vm1 = Guest(kernel, init_vm1, arguments["vm1"], name="vm1", max_runtime=BOOT_TIMEOUT + 60)
        progress.say(f"booting vm2 (NIC on {SWITCH}) and vm1 (disk, NIC, rng, console) under QEMU TCG, about 10-20 s:")
        print(_command_text(vm1.command()[4:5], _option_lines(vm1.command()[5:])), flush=True)
        cleanup.enter_context(vm1)
        _follow(vm1, BOOT_TIMEOUT, _step_printer(progress))
        result = vm1.wait(10)
        progress.say(f"vm1 powered off after {result.elapsed:.1f} s; stopping vm2 and pvcore serve")
        vm2.kill()
        status = served.stop()
        results = parse_results(result.output)
        if not results:
            raise DemoError(f"vm1 printed no results; its console ended with: {result.output.strip().splitlines()[-3:]}")
        findings = _report(results, host_md5, disk, console_log)
        print("\nWhat vm1 saw (every device served by pvcore):")
        for what, passed, detail in findings:
            print(f"  {what:8} {'ok  ' if passed else 'FAIL'} {detail}")
        for line in console_log.read_text(errors="replace").splitlines() if console_log.exists() else []:
            print(f"           | {line}")
        print("pvcore's log, one line per connection:")
        for line in served.log_text().splitlines():
            if "connected" in line:
                print(f"  {line.split(': ', 1)[-1]}")
        print(f"pvcore serve exited with status {status} after SIGTERM; work directory removed")
        return 0 if all(passed for _, passed, _ in findings) else 1


def run_demo(loopback: bool = False) -> int:
    """``pvcore demo``: the real-guest demo, or with ``loopback`` the in-process one; errors as one line."""
    if loopback:
        return run_loopback_demo()
    try:
        return run_guest_demo()
    except DemoError as exc:
        print(f"pvcore demo: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pvcore demo: interrupted; guests, daemon and work directory cleaned up", file=sys.stderr)
        return 130


VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_FLUSH = 0, 1, 4
NET_HEADER = bytes(12)
SECTOR = 512


def _blk_header(kind: int, sector: int = 0) -> bytes:
    return struct.pack("<IIQ", kind, 0, sector)


def _frame(dst: bytes, src: bytes, payload: bytes) -> bytes:
    return dst + src + b"\x88\xb5" + payload


def _demo_block(loop: asyncio.AbstractEventLoop, work: Path) -> list[str]:
    image = work / "disk.img"
    image.write_bytes(os.urandom(1 << 20))
    backend, device = create_block_device({"path": str(image)}, name="demo-vda")
    lines = []
    try:
        with Loopback(device, loop=loop, name="demo-vda") as guest:
            whole = guest.request(0, [_blk_header(VIRTIO_BLK_T_IN)], [1 << 20, 1])
            seen = hashlib.md5(whole.data[:-1]).hexdigest()
            lines.append(f"block: read 1 MiB, md5 {seen} (host file {hashlib.md5(image.read_bytes()).hexdigest()})")
            pattern = b"pvcore!\n" * (SECTOR // 8)
            status = guest.request(0, [_blk_header(VIRTIO_BLK_T_OUT, 8), pattern], [1]).data
            flushed = guest.request(0, [_blk_header(VIRTIO_BLK_T_FLUSH)], [1]).data
            on_disk = image.read_bytes()[8 * SECTOR : 9 * SECTOR] == pattern
            lines.append(f"block: wrote sector 8 (status {status[0]}), flush (status {flushed[0]}), in host file: {on_disk}")
    finally:
        backend.close()
    return lines


def _demo_net(loop: asyncio.AbstractEventLoop) -> list[str]:
    mac_a, mac_b = bytes.fromhex("525400000001"), bytes.fromhex("525400000002")
    a = create_net_device({"mac": mac_a.hex(":"), "switch": "demo"}, name="demo-a")
    b = create_net_device({"mac": mac_b.hex(":"), "switch": "demo"}, name="demo-b")
    lines = []
    try:
        with Loopback(a, loop=loop, name="demo-a") as guest_a, Loopback(b, loop=loop, name="demo-b") as guest_b:
            guest_b.submit(0, [], [2048])
            guest_b.submit(0, [], [2048])
            guest_a.request(1, [NET_HEADER + _frame(mac_b, mac_a, b"hello from guest a")], [])
            got = guest_b.wait_used(0, 1)[0].data[12:]
            lines.append(f"net: guest b received {got[14:]!r} from {got[6:12].hex(':')}")
            guest_a.request(1, [NET_HEADER + _frame(mac_b, bytes.fromhex("5254000000ee"), b"forged")], [])
            dropped = a.port.counters.dropped_spoof
            lines.append(f"net: a frame with a forged source MAC was dropped by the switch ({dropped} dropped)")
    finally:
        a.close()
        b.close()
    return lines


def _demo_console(loop: asyncio.AbstractEventLoop, work: Path) -> list[str]:
    log = work / "console.log"
    device = create_console_device({"log": str(log)}, name="demo-con", run_dir=work)
    with Loopback(device, loop=loop, name="demo-con") as guest:
        guest.request(1, [b"Linux version 6.1 (demo)\nbusybox login: "], [])
    device.stream.close()
    return [f"console: the guest printed, and the log holds: {log.read_text()!r}"]


def _demo_rng(loop: asyncio.AbstractEventLoop) -> list[str]:
    device = create_rng_device({"rate": "1024/100ms"}, name="demo-rng")
    with Loopback(device, loop=loop, name="demo-rng") as guest:
        first = guest.request(0, [], [64]).data
        second = guest.request(0, [], [64]).data
    device.source.close()
    return [f"rng: two 64-byte reads, distinct: {first != second}; first bytes {first[:8].hex()}..."]


def run_loopback_demo() -> int:
    """Drive all four engines through the reference driver and print what it saw."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="demo-loop", daemon=True)
    thread.start()
    try:
        with tempfile.TemporaryDirectory(prefix="pvcore-demo-") as tmp:
            work = Path(tmp)
            print("pvcore demo (loopback): the reference driver plays the guest, over the real ring engine")
            for line in _demo_block(loop, work) + _demo_net(loop) + _demo_console(loop, work) + _demo_rng(loop):
                print("  " + line)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()
    return 0
