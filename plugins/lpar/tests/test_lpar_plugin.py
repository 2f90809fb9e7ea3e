"""The lpar plugin's hooks: registration, detection, front doors through a real daemon, QEMU arguments."""

from __future__ import annotations

import os
import socket
import stat
import struct
import time
from pathlib import Path

import pytest
from pvcore.testing.loopthread import LoopThread

from pvcore.config import ConfigError, parse_devices
from pvcore.contract import DeviceConfig, HostContext
from pvcore.daemon import Daemon, DaemonError
from pvcore.registry import Registry
from pvcore.streams.chardev import ChardevFrontDoor
from pvcore.streams.fifo import RngFifoFrontDoor
from pvcore.streams.nbd import NbdFrontDoor
from pvcore.testing.conformance.guests import GuestError, NbdBlockGuest
from pvcore.streams.netdev_stream import NetdevStreamFrontDoor
from pvcore_lpar import plugin
from pvcore_lpar.qemu import qemu_arguments
from pvcore_scsi.media import send


def test_registers_as_the_lpar_hypervisor(registry: Registry) -> None:
    record = registry.hypervisors()["lpar"]
    assert record.info is not None
    assert record.info.primitives == {"detect", "probe", "stream"}
    assert record.info.device_classes == {"console", "net", "block", "rng", "scsi"}


class FakeDomain:
    def __init__(self, machine: str) -> None:
        self.machine = machine

    def XMLDesc(self, flags: int) -> str:  # noqa: N802 - libvirt's name
        return f"<domain type='qemu'><os><type arch='ppc64le' machine='{self.machine}'>hvm</type></os></domain>"


class FakeLibvirt:
    def __init__(self, machines: list[str], capability_machines: list[str], fail: bool = False) -> None:
        self.machines = machines
        self.capability_machines = capability_machines
        self.fail = fail

    def listAllDomains(self, flags: int) -> list[FakeDomain]:  # noqa: N802 - libvirt's name
        if self.fail:
            raise RuntimeError("libvirt: connection is closed")
        return [FakeDomain(machine) for machine in self.machines]

    def getCapabilities(self) -> str:  # noqa: N802 - libvirt's name
        machines = "".join(f"<machine>{name}</machine>" for name in self.capability_machines)
        return f"<capabilities><guest><arch name='ppc64'>{machines}</arch></guest></capabilities>"


@pytest.mark.parametrize(
    ("libvirt", "confidence"),
    [
        (None, None),
        (FakeLibvirt(["pc-q35-7.2"], ["pc-q35-7.2"]), None),
        (FakeLibvirt(["pc-q35-7.2", "pseries-7.2"], []), 80),
        (FakeLibvirt([], ["pseries-7.2", "powernv9"]), 40),
        (FakeLibvirt(["pseries"], ["pseries"], fail=True), None),
    ],
)
def test_detect_through_libvirt(tmp_path: Path, libvirt: FakeLibvirt | None, confidence: int | None) -> None:
    detection = plugin.pvcore_detect(host=HostContext(root=tmp_path, libvirt=libvirt, environ={}))
    assert (detection.confidence if detection else None) == confidence


def test_no_device_tree_means_no_slots(tmp_path: Path) -> None:
    assert plugin.pvcore_probe(host=HostContext(root=tmp_path, environ={})) == []


def configs(registry: Registry, run: Path, image: Path, switch: str) -> list[DeviceConfig]:
    return parse_devices(
        [
            f"console:socket={run}/p1-vty.sock,log={run}/p1-console.log",
            f"rng:socket={run}/p1-rng.fifo,rate=65536/1s",
            f"net:socket={run}/p1-net.sock,mac=52:54:00:00:00:21,switch={switch}",
            f"block:path={image},socket={run}/p1-disk.sock",
        ],
        registry.device_classes(),
    )


def test_daemon_serves_each_class_through_its_stream_door(
    registry: Registry, loop_thread: LoopThread, tmp_path: Path
) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(range(256)) * 64)
    daemon = Daemon(registry, "lpar", configs(registry, tmp_path, image, "lpar-unit"), run_dir=tmp_path / "run")
    loop_thread.run(daemon.start())
    try:
        doors = {instance.config.device_class: door for instance, door in daemon.served}
        assert isinstance(doors["console"], ChardevFrontDoor)
        assert isinstance(doors["rng"], RngFifoFrontDoor)
        assert isinstance(doors["net"], NetdevStreamFrontDoor)
        assert isinstance(doors["block"], NbdFrontDoor)
        assert stat.S_ISFIFO((tmp_path / "p1-rng.fifo").stat().st_mode)
        for name in ("p1-vty.sock", "p1-net.sock", "p1-disk.sock"):
            assert stat.S_ISSOCK((tmp_path / name).stat().st_mode)
        assert doors["net"].port.switch is not None and doors["net"].port.switch.name == "lpar-unit"

        # What QEMU's spapr-vty would send arrives in the console log.
        with socket.socket(socket.AF_UNIX) as vty:
            vty.connect(str(tmp_path / "p1-vty.sock"))
            vty.sendall(b"hello from a partition\n")
            deadline = time.monotonic() + 5
            log = tmp_path / "p1-console.log"
            while b"hello from a partition" not in (log.read_bytes() if log.exists() else b""):
                assert time.monotonic() < deadline, "console output never reached the log"
                time.sleep(0.02)

        # The netdev stream door is a port with the configured MAC: a frame from that MAC is accepted.
        with socket.socket(socket.AF_UNIX) as nic:
            nic.connect(str(tmp_path / "p1-net.sock"))
            frame = bytes.fromhex("ffffffffffff525400000021") + b"\x08\x06" + bytes(46)
            nic.sendall(struct.pack(">I", len(frame)) + frame)
            deadline = time.monotonic() + 5
            while doors["net"].port.counters.rx_frames == 0:
                assert time.monotonic() < deadline, "the frame never reached the switch"
                time.sleep(0.02)
            assert doors["net"].port.counters.dropped_spoof == 0
    finally:
        loop_thread.run(daemon.stop())
    assert not (tmp_path / "p1-rng.fifo").exists()
    assert not (tmp_path / "p1-net.sock").exists()


def test_front_door_refusals(registry: Registry, loop_thread: LoopThread, tmp_path: Path) -> None:
    (config,) = parse_devices([f"console:log={tmp_path}/c.log"], registry.device_classes())
    daemon = Daemon(registry, "lpar", [config], run_dir=tmp_path)
    with pytest.raises(DaemonError, match="console console0: socket= is required"):
        loop_thread.run(daemon.start())
    assert daemon.served == []


def test_socket_is_required_at_parse_time_with_what_it_names(registry: Registry) -> None:
    options = registry.plugin_options("lpar")
    (config,) = parse_devices(["rng:socket=/run/p1-rng.fifo"], registry.device_classes(), options)
    assert config.get("socket") == "/run/p1-rng.fifo"
    with pytest.raises(ConfigError, match=r"rng needs socket= \(the FIFO QEMU's -object rng-random,filename=... reads"):
        parse_devices(["rng:rate=1024/1s"], registry.device_classes(), options)


def test_other_hypervisors_get_no_door(registry: Registry) -> None:
    with pytest.raises(LookupError, match="no plugin serves hypervisor 'kvm'"):
        registry.call("kvm", "pvcore_front_door", device=None, context=None)


def test_qemu_arguments_for_a_partition(registry: Registry, tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(4096))
    run = Path("/run/pvcore")
    args = qemu_arguments(configs(registry, run, image, "lan0"))
    assert args == {
        "p1": [
            "-nodefaults",
            "-chardev", "socket,id=vty0,path=/run/pvcore/p1-vty.sock,reconnect=1",
            "-device", "spapr-vty,chardev=vty0",
            "-object", "rng-random,id=rng0,filename=/run/pvcore/p1-rng.fifo",
            "-device", "spapr-rng,rng=rng0",
            "-netdev", "stream,id=n0,server=off,addr.type=unix,addr.path=/run/pvcore/p1-net.sock",
            "-device", "spapr-vlan,netdev=n0,mac=52:54:00:00:00:21",
            "-drive", "file=nbd+unix:///?socket=/run/pvcore/p1-disk.sock,file.reconnect-delay=20,format=raw,if=none,id=d0,cache=none",
            "-device", "spapr-vscsi,id=vs0",
            "-device", "scsi-hd,drive=d0,bus=vs0.0",
        ]
    }


def test_a_scsi_disc_is_a_read_only_nbd_export_the_host_cannot_change(
    registry: Registry, loop_thread: LoopThread, tmp_path: Path
) -> None:
    disc = tmp_path / "disc.iso"
    disc.write_bytes(os.urandom(8 * 2048))
    (config,) = parse_devices([f"scsi:media={disc},socket={tmp_path}/cd.sock,name=p1-cd"], registry.device_classes())
    daemon = Daemon(registry, "lpar", [config], run_dir=tmp_path / "run")
    loop_thread.run(daemon.start())
    try:
        ((_, door),) = daemon.served
        assert isinstance(door, NbdFrontDoor) and door.readonly
        guest = NbdBlockGuest(tmp_path / "cd.sock")
        try:
            assert guest.size == disc.stat().st_size
            assert guest.read(3, 5) == disc.read_bytes()[3 * 512:8 * 512]
            with pytest.raises(GuestError, match="error 1,"):  # NBD EPERM: the disc is read-only
                guest.write(0, bytes(512))
        finally:
            guest.close()
        answer = send(str(tmp_path / "run" / "p1-cd.media"), "eject 0")
        assert answer.startswith("error ") and "the host cannot change it here" in answer
    finally:
        loop_thread.run(daemon.stop())


def test_a_scsi_target_other_than_one_disc_is_refused(registry: Registry, loop_thread: LoopThread, tmp_path: Path) -> None:
    disc = tmp_path / "disc.iso"
    disc.write_bytes(bytes(2048))
    for units in (f"media={disc}+empty", "media=empty", f"media={disc},disk={disc}"):
        (config,) = parse_devices([f"scsi:{units},socket={tmp_path}/cd.sock,name=p1-cd"], registry.device_classes())
        daemon = Daemon(registry, "lpar", [config], run_dir=tmp_path / "run")
        with pytest.raises(DaemonError, match=r"p1-cd: scsi p1-cd: .*give one CD-ROM unit holding a disc \(media=FILE.iso\)"):
            loop_thread.run(daemon.start())
        assert daemon.served == []


def test_qemu_arguments_for_a_scsi_disc() -> None:
    args = qemu_arguments([DeviceConfig("scsi", "p1-cd", {"socket": "/run/p1-cd.sock", "media": ["/iso/a.iso"]})])
    assert args == {"p1-cd": [
        "-nodefaults",
        "-drive", "file=nbd+unix:///?socket=/run/p1-cd.sock,file.reconnect-delay=20,format=raw,if=none,id=cd0,"
                  "cache=none,readonly=on,media=cdrom",
        "-device", "spapr-vscsi,id=vscd0",
        "-device", "scsi-cd,drive=cd0,bus=vscd0.0",
    ]}


def test_qemu_arguments_per_domain_and_quoting(registry: Registry) -> None:
    classes = registry.device_classes()
    args = qemu_arguments(parse_devices(
        [
            "console:socket=/run/a,,b/vm1-vty.sock",
            "block:path=/x.img,socket=/run/vm1-disk 1.sock,readonly=on",
            "block:path=/y.img,socket=/run/vm1-d2.sock",
            "console:socket=/run/vm2-vty.sock",
        ],
        classes,
    ))
    assert sorted(args) == ["vm1", "vm2"]
    assert args["vm1"][1:5] == ["-chardev", "socket,id=vty0,path=/run/a,,b/vm1-vty.sock,reconnect=1",
                                "-device", "spapr-vty,chardev=vty0"]
    assert "file=nbd+unix:///?socket=/run/vm1-disk%201.sock,file.reconnect-delay=20,format=raw,if=none,id=d0,cache=none,readonly=on" in args["vm1"]
    assert "scsi-hd,drive=d1,bus=vs1.0" in args["vm1"]
    assert args["vm2"] == ["-nodefaults", "-chardev", "socket,id=vty0,path=/run/vm2-vty.sock,reconnect=1",
                           "-device", "spapr-vty,chardev=vty0"]
    with pytest.raises(ValueError, match="rng vm1-r2: a pseries machine has one spapr-rng"):
        qemu_arguments(parse_devices(["rng:socket=/run/vm1-r1", "rng:socket=/run/vm1-r2"], classes))
    with pytest.raises(ValueError, match="rng rng0: socket= is required"):
        qemu_arguments(parse_devices(["rng:"], classes))
