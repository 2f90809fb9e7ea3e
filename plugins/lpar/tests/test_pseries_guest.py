"""A real ppc64 pseries partition under QEMU TCG whose vty, rng, v-scsi disk and CD-ROM and l-lan pvcore serves.

One guest boot checks everything: the daemon (hypervisor ``lpar``) runs on an
asyncio loop in a background thread; QEMU is started with exactly the
arguments the lpar plugin's ``pvcore_qemu_args`` gives, plus ``-serial
stdio`` for the harness's own console. That console vty comes first in the
device tree, so it is the guest's hvc0 and the one pvcore serves is hvc1.

The CD-ROM is the scsi class's one disc (an ISO genisoimage builds here)
over NBD, QEMU's scsi-cd on a second spapr-vscsi being the drive.

The l-lan pings an in-process station (:class:`EchoStation`) plugged into the
same pvcore switch; the cross-guest ping (an x86_64 virtio-net guest and this
partition on one switch) belongs to a combined kvm + lpar test.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from pathlib import Path

import pytest
from lpar_testing import dump_pseries_dtb

from pvcore.testing.loopthread import LoopThread

from pvcore.config import parse_devices
from pvcore.daemon import Daemon
from pvcore.devices.console import console_exchange, console_socket_path
from pvcore.devices.net import Port, get_switch, parse_mac
from pvcore.registry import Registry
from pvcore.testing.guest import Guest, build_initramfs, fetch_kernel, plugin_qemu_args, result_line
from pvcore_lpar.devicetree import device_slots, read_dtb

GUEST_MAC = "52:54:00:7a:00:02"
GUEST_IP = "192.168.77.2"
STATION_MAC = "52:54:00:7a:00:01"
STATION_IP = "192.168.77.1"
INPUT_MARKER = "PVCORE-LPAR-WAITING-FOR-INPUT"
HOST_INPUT = "typed-through-pvcore-attach"
PATTERN_OFFSET = 10 * 4096
DISC_FILES = {"hello.txt": b"hello from a pvcore disc\n", "random.bin": os.urandom(200_000)}

MODULES = [
    # v-scsi disk: sd_mod's crc chain in the order the notes found working, then the SRP client.
    "scsi_common", "crc64", "crc64-rocksoft", "crc64_rocksoft_generic", "crct10dif_common",
    "crct10dif_generic", "crc-t10dif", "t10-pi", "sd_mod", "scsi_transport_srp", "ibmvscsi",
    "ibmveth", "pseries-rng",
    "sr_mod", "isofs",  # the v-scsi CD-ROM (sr_mod brings cdrom)
]

GUEST_SCRIPT = "\n".join([
    "echo 'pvcore-lpar: hello from hvc1' > /dev/hvc1",
    "exec 3<>/dev/hvc1",
    "stty -F /dev/hvc1 -echo",
    f"echo {INPUT_MARKER}",
    "read -t 120 line <&3",
    'echo "PVCORE-RESULT console_input=$line"',
    result_line("vdevices", "ls /proc/device-tree/vdevice"),
    result_line("rng_current", "cat /sys/class/misc/hw_random/rng_current"),
    result_line("rng_bytes", "dd if=/dev/hwrng bs=512 count=8 2>/dev/null | wc -c"),
    result_line("disk_md5", "md5sum /dev/sda | cut -d' ' -f1"),
    "yes pvcore-lpar-write | head -c 4096 > /tmp/pattern",
    result_line("disk_write", f"dd if=/tmp/pattern of=/dev/sda bs=4096 seek={PATTERN_OFFSET // 4096} conv=fsync 2>&1 | tail -1"),
    "for i in $(seq 1 60); do [ -b /dev/sr0 ] && break; sleep 0.5; done",
    result_line("cd_ro", "cat /sys/block/sr0/ro"),
    result_line("cd_inquiry", "cat /sys/block/sr0/device/vendor /sys/block/sr0/device/model"),
    "mkdir -p /mnt && mount -t iso9660 -o ro /dev/sr0 /mnt",
    result_line("cd_md5", " ; ".join(f"md5sum /mnt/{name} | cut -d' ' -f1" for name in DISC_FILES)),
    result_line("cd_write", "dd if=/dev/zero of=/dev/sr0 bs=2048 count=1 2>/dev/null && echo written || echo refused"),
    result_line("eth0_driver", "basename $(readlink /sys/class/net/eth0/device/driver)"),
    result_line("eth0_mac", "cat /sys/class/net/eth0/address"),
    f"ip link set eth0 up && ip addr add {GUEST_IP}/24 dev eth0",
    result_line("ping", f"ping -c 3 -W 5 {STATION_IP} >/dev/null 2>&1 && echo ok || echo failed"),
])


def _checksum(data: bytes | bytearray) -> int:
    if len(data) % 2:
        data = bytes(data) + b"\0"
    total = sum(int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


class EchoStation(Port):
    """A station on a pvcore switch that answers ARP for its address and ICMP echo requests."""

    def __init__(self, name: str, mac: str, ip: str, loop_thread: LoopThread) -> None:
        super().__init__(name, parse_mac(mac))
        self.ip = bytes(int(part) for part in ip.split("."))
        self.loop = loop_thread.loop
        self.echo_replies = 0

    def deliver(self, frame: bytes) -> bool:
        """Answer what asks for this station (after the switch has finished forwarding)."""
        reply = self._answer(bytes(frame))
        if reply is not None:
            self.loop.call_soon(self.send, reply.ljust(60, b"\0"))
        return True

    def _answer(self, frame: bytes) -> bytes | None:
        assert self.mac is not None
        source, ethertype, payload = frame[6:12], frame[12:14], frame[14:]
        if ethertype == b"\x08\x06" and len(payload) >= 28 and payload[6:8] == b"\x00\x01" and payload[24:28] == self.ip:
            arp = bytes.fromhex("0001080006040002") + self.mac + self.ip + payload[8:18]
            return source + self.mac + ethertype + arp
        if ethertype != b"\x08\x00" or len(payload) < 20:
            return None
        header_len = (payload[0] & 0x0F) * 4
        total = int.from_bytes(payload[2:4], "big")
        if payload[9] != 1 or payload[16:20] != self.ip or total > len(payload) or payload[header_len] != 8:
            return None
        icmp = bytearray(payload[header_len:total])
        icmp[0], icmp[2:4] = 0, b"\0\0"
        icmp[2:4] = _checksum(icmp).to_bytes(2, "big")
        header = bytearray(payload[:header_len])
        header[12:16], header[16:20] = payload[16:20], payload[12:16]
        header[8], header[10:12] = 64, b"\0\0"
        header[10:12] = _checksum(header).to_bytes(2, "big")
        self.echo_replies += 1
        return source + self.mac + ethertype + bytes(header) + bytes(icmp)


def _make_iso(directory: Path) -> Path:
    """An ISO of :data:`DISC_FILES`, built with genisoimage (Rock Ridge and Joliet names)."""
    tree, iso = directory / "disc", directory / "disc.iso"
    tree.mkdir()
    for name, data in DISC_FILES.items():
        (tree / name).write_bytes(data)
    subprocess.run(["genisoimage", "-quiet", "-r", "-J", "-V", "PVCORE", "-o", str(iso), str(tree)], check=True, timeout=120)
    return iso


@pytest.mark.guest
def test_pseries_partition_served_by_pvcore(registry: Registry, loop_thread: LoopThread, tmp_path: Path) -> None:
    started = time.monotonic()
    kernel = fetch_kernel("ppc64")
    initramfs = build_initramfs(kernel, GUEST_SCRIPT, MODULES, tmp_path)
    run = tmp_path / "run"
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(16 << 20))
    host_md5 = hashlib.md5(image.read_bytes()).hexdigest()
    disc = _make_iso(tmp_path)
    switch_name = f"lpar-guest-{os.getpid()}"
    configs = parse_devices(
        [
            f"console:socket={run}/p1-vty.sock,log={run}/p1-console.log",
            f"rng:socket={run}/p1-rng.fifo",
            f"net:socket={run}/p1-net.sock,mac={GUEST_MAC},switch={switch_name}",
            f"block:path={image},socket={run}/p1-disk.sock",
            f"scsi:media={disc},socket={run}/p1-cd.sock,name=p1-cd",
        ],
        registry.device_classes(),
    )
    (qemu_args,) = plugin_qemu_args("lpar", configs, registry).values()
    assert qemu_args[0] == "-nodefaults"
    daemon = Daemon(registry, "lpar", configs, run_dir=run)
    loop_thread.run(daemon.start())
    # What QEMU builds from these arguments (it opens every backend, so pvcore serves first) is what the probe finds.
    dtb = dump_pseries_dtb(tmp_path / "partition.dtb", *qemu_args)
    assert sorted(slot.device_class for slot in device_slots(read_dtb(dtb))) == ["block", "block", "console", "net", "rng"]
    station = EchoStation("echo-station", STATION_MAC, STATION_IP, loop_thread)
    loop_thread.call(get_switch(switch_name).attach, station)
    served = {instance.config.device_class: (instance, door) for instance, door in daemon.served}
    try:
        guest = Guest(kernel, initramfs, [*qemu_args, "-serial", "stdio"], name="pseries-lpar", max_runtime=240)
        with guest:
            guest.wait_for(INPUT_MARKER, 180)
            console_exchange(console_socket_path(run, "p1-vty"), f"{HOST_INPUT}\n".encode(), duration=0.5)
            result = guest.wait(180)
        rng_source, rng_door = served["rng"][0].engine, served["rng"][1]
        delivered = loop_thread.call(lambda: rng_source.bytes_delivered)
        fifo_written, fifo_capacity = loop_thread.call(lambda: (rng_door.bytes_written, rng_door.capacity))
    finally:
        loop_thread.call(get_switch(switch_name).detach, station)
        loop_thread.run(daemon.stop(), timeout=30)
    elapsed = time.monotonic() - started
    print(f"pseries guest: boot to poweroff {result.elapsed:.1f}s, whole test {elapsed:.1f}s")
    result.check()
    results = result.results

    # Console: guest output in pvcore's log, input through pvcore's attach point reached the guest.
    assert b"pvcore-lpar: hello from hvc1" in (run / "p1-console.log").read_bytes()
    assert results["console_input"] == HOST_INPUT

    # The guest's own device tree holds the nodes the probe reported for QEMU's blob.
    assert {"vty@71000000", "vty@71000002", "l-lan@71000003", "v-scsi@71000004", "v-scsi@71000005"} <= set(
        results["vdevices"].split())

    # rng: pseries-rng read through QEMU's rng-random from pvcore's FIFO. The pipe holds at most one
    # buffer, so everything written beyond that was read by QEMU for the guest's H_RANDOM calls.
    assert results["rng_current"] == "pseries_rng"
    assert int(results["rng_bytes"]) == 4096
    assert fifo_written - fifo_capacity >= 4096, (fifo_written, fifo_capacity)
    assert delivered >= fifo_written

    # v-scsi disk over NBD: the guest read the image, and its fsync'ed write is in the file.
    assert results["disk_md5"] == host_md5
    with open(image, "rb") as disk:
        disk.seek(PATTERN_OFFSET)
        assert disk.read(4096) == (b"pvcore-lpar-write\n" * 300)[:4096]

    # v-scsi CD-ROM: QEMU's scsi-cd read pvcore's disc over NBD; the guest mounted it and read known files.
    # The drive answering the guest's commands is QEMU's (its INQUIRY), not the scsi class's CD-ROM unit.
    assert results["cd_ro"] == "1"
    assert results["cd_inquiry"].split() == ["QEMU", "QEMU", "CD-ROM"]
    assert results["cd_md5"].split() == [hashlib.md5(data).hexdigest() for data in DISC_FILES.values()]
    assert results["cd_write"] == "refused"

    # l-lan (ibmveth) on the pvcore switch reaches the in-process station.
    assert results["eth0_driver"] == "ibmveth"
    assert results["eth0_mac"] == GUEST_MAC
    assert results["ping"] == "ok"
    assert station.echo_replies >= 3
