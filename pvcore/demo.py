"""``pvcore demo``: show the four device engines serving a guest.

With ``--loopback`` (and until a hypervisor plugin can boot a real guest
here) the "guest" is the core's reference driver: every request goes through
the real ring engine and device engines over the in-process loopback
transport, and the demo prints what the driver saw.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import struct
import tempfile
import threading
from pathlib import Path

from pvcore.devices.block import create_block_device
from pvcore.devices.console import create_console_device
from pvcore.devices.net import create_net_device
from pvcore.devices.rng import create_rng_device
from pvcore.testing.loopback import Loopback

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
