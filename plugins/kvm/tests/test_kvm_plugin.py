"""The kvm plugin's hooks: info, detect, probe, memory, notification, front doors."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import attrs
import pytest

from pvcore.config import ConfigError, parse_devices
from pvcore.contract import (
    CONTRACT_VERSION,
    DaemonContext,
    DeviceConfig,
    DeviceSlot,
    EventFdChannel,
    FdMemoryLayout,
    FdRegion,
    HostContext,
)
from pvcore.devices.console.stream import ConsoleStream
from pvcore.devices.rng import EntropySource
from pvcore.ring.fdmemory import FdGuestMemory, sealed_memfd
from pvcore.registry import default_registry
from pvcore.ring.notify import EventFdNotifier
from pvcore.streams.chardev import ChardevFrontDoor
from pvcore.streams.egd import EgdFrontDoor
from pvcore.transports.vhost_user import VhostUserFrontDoor

DOMAIN_XML = """
<domain type='qemu'>
  <name>vm1</name>
  <devices>
    <disk type='vhostuser' device='disk'>
      <driver name='qemu' type='raw'/>
      <source type='unix' path='/run/pvcore/vm1-vda.sock'><reconnect enabled='yes' timeout='1'/></source>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'><source file='/var/lib/x.img'/><target dev='vdb' bus='virtio'/></disk>
    <interface type='vhostuser'>
      <mac address='52:54:00:00:00:01'/>
      <source type='unix' path='/run/pvcore/vm1-net.sock' mode='server'/>
      <model type='virtio'/>
    </interface>
    <interface type='vhostuser'>
      <source type='unix' path='/run/pvcore/vm1-net2.sock' mode='client'/>
    </interface>
    <interface type='network'><source network='default'/></interface>
    <serial type='unix'><source mode='connect' path='/run/pvcore/vm1-con.sock'/><target port='0'/></serial>
    <console type='unix'><source mode='connect' path='/run/pvcore/vm1-con.sock'/><target type='serial'/></console>
    <serial type='unix'><source mode='bind' path='/run/other.sock'/></serial>
  </devices>
</domain>
"""


@attrs.define
class FakeDomain:
    domain_name: str
    xml: str

    def name(self) -> str:
        return self.domain_name

    def XMLDesc(self, flags: int) -> str:
        return self.xml


@attrs.define
class FakeLibvirt:
    kind: str = "QEMU"
    domains: list[FakeDomain] = attrs.field(factory=list)

    def getType(self) -> str:
        return self.kind

    def listAllDomains(self, flags: int) -> list[FakeDomain]:
        return self.domains


@attrs.define
class FakeDevice:
    config: DeviceConfig
    virtio: object = None
    engine: object = None

    async def close(self) -> None:
        return None


def test_plugin_info(registry):
    (info,) = registry.hook.pvcore_plugin_info()
    assert info.name == "kvm" and info.hypervisor == "kvm" and info.contract == CONTRACT_VERSION
    assert info.primitives == {"detect", "probe", "stream"}
    assert info.device_classes == {"block", "net", "rng", "scsi", "console"}
    assert set(registry.hypervisors()) == {"kvm"}


def test_detect(registry, tmp_path):
    assert registry.detect(HostContext(root=tmp_path)) == []
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev" / "kvm").touch()
    (found,) = registry.detect(HostContext(root=tmp_path))
    assert found.hypervisor == "kvm" and "/dev/kvm" in found.evidence
    (by_libvirt,) = registry.detect(HostContext(root=tmp_path, libvirt=FakeLibvirt()))
    assert by_libvirt.confidence > found.confidence and "libvirt" in by_libvirt.evidence
    assert registry.detect(HostContext(root=tmp_path / "none", libvirt=FakeLibvirt(kind="Xen"))) == []


def test_probe_libvirt_domains(registry):
    host = HostContext(libvirt=FakeLibvirt(domains=[FakeDomain("vm1", DOMAIN_XML), FakeDomain("vm2", "<domain/>")]))
    slots = registry.call("kvm", "pvcore_probe", host=host)
    assert slots == [
        DeviceSlot("kvm", "block", "/run/pvcore/vm1-vda.sock", "vm1",
                   {"socket": "/run/pvcore/vm1-vda.sock", "socket-mode": "server", "target": "vda"}),
        DeviceSlot("kvm", "net", "/run/pvcore/vm1-net.sock", "vm1",
                   {"socket": "/run/pvcore/vm1-net.sock", "socket-mode": "client", "mac": "52:54:00:00:00:01"}),
        DeviceSlot("kvm", "net", "/run/pvcore/vm1-net2.sock", "vm1",
                   {"socket": "/run/pvcore/vm1-net2.sock", "socket-mode": "server"}),
        DeviceSlot("kvm", "console", "/run/pvcore/vm1-con.sock", "vm1", {"socket": "/run/pvcore/vm1-con.sock"}),
    ]
    assert registry.call("kvm", "pvcore_probe", host=HostContext()) == []
    with pytest.raises(LookupError, match="no plugin serves hypervisor 'xen'"):
        registry.call("xen", "pvcore_probe", host=host)


class FakeLibvirtError(Exception):
    """What libvirt raises (its own libvirtError, an Exception)."""


class VanishedDomain(FakeDomain):
    def XMLDesc(self, flags: int) -> str:
        raise FakeLibvirtError(f"Domain not found: no domain with matching name '{self.domain_name}'")


def test_probe_skips_broken_and_vanished_domains(registry, caplog):
    domains = [FakeDomain("bad", "<domain><devices>"), VanishedDomain("gone", ""), FakeDomain("vm1", DOMAIN_XML)]
    host = HostContext(libvirt=FakeLibvirt(domains=domains))
    with caplog.at_level(logging.WARNING, logger="pvcore.kvm"):
        slots = registry.call("kvm", "pvcore_probe", host=host)
    assert {slot.domain for slot in slots} == {"vm1"} and len(slots) == 4
    skipped = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(skipped) == 2, caplog.text
    assert "libvirt domain bad" in skipped[0] and "unreadable XML" in skipped[0]
    assert "libvirt domain gone" in skipped[1] and "Domain not found" in skipped[1]


def test_memory_and_notification_are_the_core_defaults(registry):
    primitives = registry.primitives("kvm")
    fd = sealed_memfd("t", 1 << 16)
    try:
        layout = FdMemoryLayout((FdRegion(fd, 0x1000, 1 << 16, 0x7000_0000, 0),))
        memory = primitives.map_memory(layout)
        assert isinstance(memory, FdGuestMemory)
        memory.write(0x1000, b"abc")
        assert os.pread(fd, 3, 0) == b"abc"
        memory.close()
        with pytest.raises(ValueError, match="kvm: nothing maps guest memory described as object"):
            primitives.map_memory(object())
    finally:
        os.close(fd)
    notifier = primitives.open_notifier(EventFdChannel(os.eventfd(0)))
    assert isinstance(notifier, EventFdNotifier)
    notifier.close()
    read_end, write_end = os.pipe()
    try:
        with pytest.raises(ValueError, match="not an eventfd"):
            primitives.open_notifier(EventFdChannel(read_end))
    finally:
        os.close(read_end)
        os.close(write_end)


def test_front_doors(registry, tmp_path: Path):
    loop = asyncio.new_event_loop()
    try:
        context = DaemonContext(
            primitives=registry.primitives("kvm"), run_dir=tmp_path, loop=loop, switch=lambda name: None
        )
        block = FakeDevice(DeviceConfig("block", "disk0", {"socket": str(tmp_path / "d.sock")}), virtio=object())
        door = registry.call("kvm", "pvcore_front_door", device=block, context=context)
        assert isinstance(door, VhostUserFrontDoor) and not door.client
        assert door.socket_path == tmp_path / "d.sock"
        rng = FakeDevice(DeviceConfig("rng", "rng0", {"socket-mode": "client"}), virtio=object())
        door = registry.call("kvm", "pvcore_front_door", device=rng, context=context)
        assert door.client and door.socket_path == tmp_path / "rng0.sock"
        console = FakeDevice(DeviceConfig("console", "con0"), engine=ConsoleStream("con0"))
        door = registry.call("kvm", "pvcore_front_door", device=console, context=context)
        assert isinstance(door, ChardevFrontDoor) and door.socket_path == str(tmp_path / "con0.sock")
        with pytest.raises(ValueError, match="not gpu"):
            registry.call("kvm", "pvcore_front_door", device=FakeDevice(DeviceConfig("gpu", "g")), context=context)
        egd = FakeDevice(DeviceConfig("rng", "rng1", {"protocol": "egd"}), engine=EntropySource("rng1"))
        door = registry.call("kvm", "pvcore_front_door", device=egd, context=context)
        assert isinstance(door, EgdFrontDoor) and door.unasked_bytes == 255  # for QEMU's rng-egd after a restart
        with pytest.raises(ValueError, match="EGD is served listening.*drop socket-mode=client"):
            registry.call(
                "kvm", "pvcore_front_door",
                device=FakeDevice(DeviceConfig("rng", "r", {"protocol": "egd", "socket-mode": "client"})),
                context=context,
            )
    finally:
        loop.close()


def test_socket_mode_and_protocol_are_kvm_options_checked_at_parse_time():
    installed = default_registry()
    classes, options = installed.device_classes(), installed.plugin_options("kvm")
    net, rng, console = parse_devices(
        ["net:mac=52:54:00:00:00:01,socket-mode=client", "rng:protocol=egd", "console:socket-mode=server"],
        classes, options,
    )
    assert net.get("socket-mode") == "client" and rng.get("protocol") == "egd" and console.get("socket-mode") == "server"
    for spec, message in [
        ("net:mac=52:54:00:00:00:01,socket-mode=listen", r"socket-mode=listen: expected server \(pvcore listens"),
        ("console:socket-mode=client", "socket-mode=client: kvm serves a console only as the listening side"),
        ("rng:protocol=virtio", r"protocol=virtio: expected vhost-user \(.*\) or egd"),
        ("block:path=/d.img,protocol=egd", "block has no option 'protocol' when served by kvm; options: .*socket-mode"),
    ]:
        with pytest.raises(ConfigError, match=message):
            parse_devices([spec], classes, options)
    # the keys are kvm's: a device another plugin serves is refused them
    with pytest.raises(ConfigError, match="net has no option 'socket-mode' when served by lpar"):
        parse_devices(["net:mac=52:54:00:00:00:01,socket=/s,socket-mode=client,hypervisor=lpar"], classes, options)


def test_poll_max_us_is_a_kvm_option_that_reaches_the_vhost_user_door():
    """Off unless asked (0, as qemu-storage-daemon without an iothread); a value reaches the door in ns."""
    installed = default_registry()
    classes, options = installed.device_classes(), installed.plugin_options("kvm")
    default, short, long = parse_devices(
        ["block:path=/a.img,socket=/a.sock", "block:path=/b.img,socket=/b.sock,poll-max-us=32",
         "rng:socket=/r.sock,poll-max-us=200"], classes, options,
    )
    assert (default.get("poll-max-us"), short.get("poll-max-us"), long.get("poll-max-us")) == (0, 32_000, 200_000)
    with pytest.raises(ConfigError, match=r"poll-max-us=-5: expected 0 \(no polling\)"):
        parse_devices(["block:path=/c.img,poll-max-us=-5"], classes, options)
    loop = asyncio.new_event_loop()
    try:
        context = DaemonContext(primitives=installed.primitives("kvm"), run_dir=Path("/run/x"), loop=loop,
                                switch=lambda name: None)
        for config, expected in ((default, 0), (short, 32_000), (long, 200_000)):
            door = installed.call("kvm", "pvcore_front_door", device=FakeDevice(config, virtio=object()), context=context)
            assert isinstance(door, VhostUserFrontDoor) and door.poll_max_ns == expected
    finally:
        loop.close()


def test_entry_point_declared():
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert '[project.entry-points."pvcore.plugins"]' in text and 'kvm = "pvcore_kvm.plugin"' in text
