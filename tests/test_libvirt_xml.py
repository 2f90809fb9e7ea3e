"""pvcore's libvirt layer against libvirt's test driver (test:///default, no daemon needed).

The test driver parses and validates domain XML with libvirt's own parser,
keeps metadata, and emits lifecycle and metadata events, so the metadata
record, deploy/undeploy, probe and the host daemon's lifecycle following are
all checked here. The hypervisor plugin is a third party's (this file's
``ThirdPartyPlugin``), chosen by the detect hook because it answers for the
test driver, and it writes its own device XML (``ThirdPartyXml``: NBD disks
and virtio channels, nothing of kvm's): no core change makes that work. The
kvm plugin's XML is checked in plugins/kvm/tests/test_kvm_libvirt.py.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from xml.etree import ElementTree

import attrs
import libvirt
import pytest

from pvcore.config import parse_devices, split_spec
from pvcore.contract import CONTRACT_VERSION, Detection, DeviceConfig, DeviceSlot, HostContext, LibvirtXml, PluginInfo
from pvcore.devices import classes
from pvcore.hookspecs import hookimpl
from pvcore.libvirt import LibvirtError
from pvcore.libvirt.connection import choose_hypervisor
from pvcore.libvirt.deploy import deploy, undeploy
from pvcore.libvirt.devicexml import free_disk_target, next_disk_targets
from pvcore.libvirt.follower import HostDaemon
from pvcore.libvirt.metadata import (
    NAMESPACE,
    format_spec,
    read_specs,
    set_in_definition,
    specs_in_definition,
    write_live_specs,
)
from pvcore.libvirt.probe import probe
from pvcore.registry import Registry
from pvcore.streams.unix import UnixListener
from pvcore.testing.loopthread import LoopThread

URI = "test:///default"


class ThirdPartyFrontDoor:
    """A front door that listens on the device's socket and records that it served."""

    def __init__(self, path: str, log: list[str], name: str) -> None:
        self.description = f"test-driver socket {path}"
        self._listener = UnixListener(path, self._serve, what=f"testvirt {name}")
        self._log, self._name = log, name

    async def _serve(self, reader, writer) -> None:
        await reader.read()

    async def start(self) -> None:
        await self._listener.start()
        self._log.append(f"start {self._name}")

    async def stop(self) -> None:
        await self._listener.stop()
        self._log.append(f"stop {self._name}")


CHANNEL = "org.testvirt."
REFUSED = "no testvirt devices"


class ThirdPartyXml:
    """testvirt's libvirt device XML: a block device is an NBD disk on the device's socket, a console or an
    rng a virtio channel named org.testvirt.CLASS.NAME; a domain described as "no testvirt devices" refuses them."""

    def element(self, config: DeviceConfig, domain: ElementTree.Element) -> ElementTree.Element:
        socket = str(config.get("socket"))
        if config.device_class == "block":
            disk = ElementTree.Element("disk", type="network", device="disk")
            source = ElementTree.SubElement(disk, "source", protocol="nbd", name=config.name)
            ElementTree.SubElement(source, "host", transport="unix", socket=socket)
            ElementTree.SubElement(disk, "target", dev=free_disk_target(domain), bus="virtio")
            return disk
        if config.device_class in ("console", "rng"):
            channel = ElementTree.Element("channel", type="unix")
            ElementTree.SubElement(channel, "source", mode="connect", path=socket)
            ElementTree.SubElement(channel, "target", type="virtio", name=f"{CHANNEL}{config.device_class}.{config.name}")
            return channel
        raise ValueError(f"{config.name}: testvirt has no libvirt element for {config.device_class}")

    def served(self, config: DeviceConfig) -> DeviceConfig:
        protocol = "nbd" if config.device_class == "block" else "channel"
        return attrs.evolve(config, options={**config.options, "protocol": protocol})

    def _read(self, element: ElementTree.Element) -> tuple[str, str] | None:
        if element.tag == "disk" and element.get("type") == "network":
            host = element.find("source[@protocol='nbd']/host[@transport='unix']")
            return ("block", host.get("socket", "")) if host is not None else None
        target, source = element.find("target"), element.find("source")
        name = target.get("name", "") if target is not None else ""
        if element.tag == "channel" and name.startswith(CHANNEL) and source is not None:
            return name[len(CHANNEL):].split(".")[0], source.get("path", "")
        return None

    def socket(self, element: ElementTree.Element) -> str | None:
        found = self._read(element)
        return found[1] if found else None

    def slots(self, domain_name: str, domain: ElementTree.Element) -> list[DeviceSlot]:
        found = [self._read(element) for element in domain.iterfind("devices/*")]
        return [DeviceSlot("testvirt", kind, path, domain_name, {"socket": path}) for kind, path in filter(None, found)]

    def check(self, domain_name: str, domain: ElementTree.Element, configs) -> list[str]:
        if domain.findtext("description") != REFUSED or not configs:
            return []
        return [f"domain {domain_name} says {REFUSED!r}: change its <description> (virsh desc {domain_name} '')"]


class ThirdPartyPlugin:
    """A third party's hypervisor plugin that answers for libvirt's test driver, with its own device XML."""

    def __init__(self) -> None:
        self.doors: list[str] = []
        self.protocols: dict[str, str | None] = {}
        self.xml = ThirdPartyXml()

    @hookimpl
    def pvcore_plugin_info(self) -> PluginInfo:
        return PluginInfo(name="testvirt", contract=CONTRACT_VERSION, hypervisor="testvirt", primitives={"detect", "stream"})

    @hookimpl
    def pvcore_detect(self, host: HostContext) -> Detection | None:
        if host.libvirt is not None and host.libvirt.getType() == "TEST":
            return Detection("testvirt", 95, "libvirt connection type is TEST")
        return None

    @hookimpl
    def pvcore_libvirt_xml(self) -> ThirdPartyXml:
        return self.xml

    @hookimpl
    def pvcore_front_door(self, device, context) -> ThirdPartyFrontDoor:
        self.protocols[device.config.name] = device.config.get("protocol")
        return ThirdPartyFrontDoor(device.config.get("socket"), self.doors, device.config.name)


@pytest.fixture
def registry() -> tuple[Registry, ThirdPartyPlugin]:
    reg = Registry()
    for name in ("block", "net", "console", "rng"):
        reg.register(getattr(classes, name), name=name)
    plugin = ThirdPartyPlugin()
    reg.register(plugin, name="testvirt")
    return reg, plugin


@pytest.fixture
def conn() -> Iterator[object]:
    connection = libvirt.open(URI)
    yield connection
    connection.close()


def domain_xml(name: str, *, shared: bool = True, devices: str = "") -> str:
    backing = "<memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>" if shared else ""
    return (
        f"<domain type='test'><name>{name}</name><memory unit='MiB'>128</memory>{backing}"
        "<os><type arch='x86_64'>hvm</type></os>"
        f"<devices>{devices}</devices></domain>"
    )


@pytest.fixture
def domain_name(conn) -> Iterator[str]:
    name = f"pvcore-{uuid.uuid4().hex[:8]}"
    yield name
    try:
        domain = conn.lookupByName(name)
    except libvirt.libvirtError:
        return
    if domain.isActive():
        domain.destroy()
    if domain.isPersistent():
        domain.undefine()


def test_third_party_xml_is_a_libvirt_xml_and_the_test_driver_accepts_it(conn, registry, domain_name, tmp_path) -> None:
    reg, plugin = registry
    (tmp_path / "d.img").write_bytes(bytes(4096))
    assert isinstance(plugin.xml, LibvirtXml)
    assert reg.call("testvirt", "pvcore_libvirt_xml") is plugin.xml
    configs = parse_devices(
        [f"block:path={tmp_path}/d.img,socket={tmp_path}/b.sock,name=b", f"rng:socket={tmp_path}/r.sock,name=r"],
        reg.device_classes(),
    )
    scratch = ElementTree.fromstring(domain_xml(domain_name, devices="<disk type='file'><target dev='vda'/></disk>"))
    devices = "".join(ElementTree.tostring(plugin.xml.element(c, scratch), encoding="unicode") for c in configs)
    root = ElementTree.fromstring(conn.defineXML(domain_xml(domain_name, devices=devices)).XMLDesc(0))
    assert [slot.device_class for slot in plugin.xml.slots(domain_name, root)] == ["block", "rng"]
    assert root.find("devices/disk[@type='network']/target").get("dev") == "vdb"
    assert plugin.xml.socket(root.find("devices/channel")) == f"{tmp_path}/r.sock"


def test_metadata_round_trips_persistent_and_live(conn, domain_name) -> None:
    specs = ["block:path=/srv/a,,b.img,socket=/run/pvcore/x.sock,name=x", "rng:rate=1/1s,name=r\"q'<&>"]
    root = ElementTree.fromstring(domain_xml(domain_name))
    set_in_definition(root, specs)
    domain = conn.defineXML(ElementTree.tostring(root, encoding="unicode"))
    assert read_specs(domain, libvirt.VIR_DOMAIN_AFFECT_CONFIG, libvirt) == specs
    inactive = ElementTree.fromstring(domain.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    assert specs_in_definition(inactive, origin="test") == specs
    assert inactive.find(f"metadata/{{{NAMESPACE}}}devices") is not None
    domain.create()
    live = ["console:socket=/run/pvcore/c.sock,name=c"]
    write_live_specs(domain, live, libvirt)
    assert read_specs(domain, libvirt.VIR_DOMAIN_AFFECT_LIVE, libvirt) == live
    assert read_specs(domain, libvirt.VIR_DOMAIN_AFFECT_CONFIG, libvirt) == specs
    write_live_specs(domain, [], libvirt)
    assert read_specs(domain, libvirt.VIR_DOMAIN_AFFECT_LIVE, libvirt) == []
    set_in_definition(inactive, [])
    domain = conn.defineXML(ElementTree.tostring(inactive, encoding="unicode"))
    assert read_specs(domain, libvirt.VIR_DOMAIN_AFFECT_CONFIG, libvirt) == []


def test_spec_text_round_trips_through_the_serve_syntax() -> None:
    options = {"path": "/a,b,,c", "socket": "/run/x.sock", "name": "n"}
    text = format_spec("block", options)
    assert text == "block:path=/a,,b,,,,c,socket=/run/x.sock,name=n"
    assert split_spec(text) == ("block", options)


def test_next_disk_targets_skip_used_names() -> None:
    assert next_disk_targets({"vda", "vdc", "sda"}, 3) == ["vdb", "vdd", "vde"]
    used = {f"vd{chr(c)}" for c in range(ord("a"), ord("z") + 1)}
    assert next_disk_targets(used, 2) == ["vdaa", "vdab"]


def test_the_plugins_check_refuses_and_explains(conn, registry, domain_name, tmp_path) -> None:
    reg, _ = registry
    root = ElementTree.fromstring(domain_xml(domain_name, shared=False))
    ElementTree.SubElement(root, "description").text = REFUSED
    conn.defineXML(ElementTree.tostring(root, encoding="unicode"))
    with pytest.raises(LibvirtError) as refused:
        deploy(conn, reg, URI, domain_name, ["rng:rate=1/1s"], run_dir=tmp_path)
    assert str(refused.value) == f"domain {domain_name} says {REFUSED!r}: change its <description> (virsh desc {domain_name} '')"
    domain = conn.lookupByName(domain_name)
    assert read_specs(domain, libvirt.VIR_DOMAIN_AFFECT_CONFIG, libvirt) == []
    assert ElementTree.fromstring(domain.XMLDesc(0)).find("devices/channel") is None
    root = ElementTree.fromstring(domain.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    root.remove(root.find("description"))  # now the check passes and the element is refused instead
    conn.defineXML(ElementTree.tostring(root, encoding="unicode"))
    with pytest.raises(LibvirtError, match="^net-x: testvirt has no libvirt element for net$"):
        deploy(conn, reg, URI, domain_name, ["net:mac=52:54:00:00:00:01,name=net-x"], run_dir=tmp_path)


def test_a_plugin_without_libvirt_xml_cannot_deploy(conn, registry, domain_name, tmp_path) -> None:
    import pvcore_lpar.plugin

    reg, _ = registry
    reg.register(pvcore_lpar.plugin, name="lpar")
    conn.defineXML(domain_xml(domain_name))
    with pytest.raises(LibvirtError, match="^plugin lpar cannot write libvirt device XML "):
        deploy(conn, reg, URI, domain_name, ["rng:rate=1/1s"], run_dir=tmp_path, hypervisor="lpar")
    assert read_specs(conn.lookupByName(domain_name), libvirt.VIR_DOMAIN_AFFECT_CONFIG, libvirt) == []


def test_probe_lists_what_the_plugins_xml_could_serve(conn, registry, domain_name, tmp_path) -> None:
    reg, plugin = registry
    (tmp_path / "d.img").write_bytes(bytes(4096))
    configs = parse_devices(
        [f"block:path={tmp_path}/d.img,socket={tmp_path}/b.sock,name=b", f"console:socket={tmp_path}/c.sock,name=c",
         f"rng:socket={tmp_path}/r.sock,name=r"],
        reg.device_classes(),
    )
    scratch = ElementTree.fromstring(domain_xml(domain_name))
    devices = "".join(ElementTree.tostring(plugin.xml.element(c, scratch), encoding="unicode") for c in configs)
    conn.defineXML(domain_xml(domain_name, devices=devices))
    lines = probe(conn, reg, URI, run_dir=tmp_path)
    at = lines.index(f"domain {domain_name}: shut off, shared memory: yes")
    assert lines[at + 1 : at + 5] == [
        "  could serve (not deployed by pvcore):",
        f"    block at {tmp_path}/b.sock",
        f"    console at {tmp_path}/c.sock",
        f"    rng at {tmp_path}/r.sock",
    ]


def test_detect_chooses_the_plugin_that_answers_for_the_driver(conn, registry) -> None:
    reg, _ = registry
    assert choose_hypervisor(reg, conn, URI) == "testvirt"
    with pytest.raises(LibvirtError, match="no plugin serves hypervisor 'xen'"):
        choose_hypervisor(reg, conn, URI, "xen")


def wait_until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def test_deploy_and_host_daemon_follow_the_domain_lifecycle(conn, registry, domain_name, tmp_path) -> None:
    reg, plugin = registry
    run_dir = tmp_path / "run"
    conn.defineXML(domain_xml(domain_name))
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    loop = LoopThread()
    host = HostDaemon(reg, URI, run_dir=run_dir)
    future = None
    try:
        future = asyncio.run_coroutine_threadsafe(host.run(handle_signals=False), loop.loop)
        wait_until(lambda: (run_dir / "daemon.lock").exists())
        report = deploy(conn, reg, URI, domain_name, [f"block:path={disk}", "rng:rate=4096/1s"], run_dir=run_dir)
        block_socket = run_dir / f"{domain_name}-block0.sock"
        rng_socket = run_dir / f"{domain_name}-rng0.sock"
        assert block_socket.is_socket() and rng_socket.is_socket()
        assert report.lines[0] == f"domain {domain_name} (shut off; plugin testvirt): deploying 2 device(s)"
        assert f"  block {domain_name}-block0: <disk network> vda, socket {block_socket}" in report.lines
        assert f"  rng {domain_name}-rng0: <channel unix>, socket {rng_socket}" in report.lines
        assert any(line.startswith("  served by: the host daemon (pid ") for line in report.lines)
        # the host daemon serves each device as the plugin's XML needs it (its served())
        assert plugin.protocols == {f"{domain_name}-block0": "nbd", f"{domain_name}-rng0": "channel"}
        domain = conn.lookupByName(domain_name)
        # what lands in the definition is testvirt's XML, and nothing of kvm's
        root = ElementTree.fromstring(domain.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
        disk_host = root.find("devices/disk[@type='network']/source[@protocol='nbd']/host")
        assert disk_host.attrib == {"transport": "unix", "socket": str(block_socket)}
        assert root.find("devices/disk[@type='network']/target").get("dev") == "vda"
        channel = root.find(f"devices/channel/target[@name='{CHANNEL}rng.{domain_name}-rng0']/..")
        assert channel.get("type") == "unix" and channel.find("source").get("path") == str(rng_socket)
        assert root.find("devices/disk[@type='vhostuser']") is None and root.find("devices/rng") is None
        specs = read_specs(domain, libvirt.VIR_DOMAIN_AFFECT_CONFIG, libvirt)
        assert specs == [
            f"block:path={disk},name={domain_name}-block0,socket={block_socket},domain={domain_name}",
            f"rng:rate=4096/1s,name={domain_name}-rng0,socket={rng_socket},domain={domain_name}",
        ]
        domain.create()
        domain.destroy()
        # stopped: the backends were released and fresh ones serve the next start
        wait_until(lambda: plugin.doors.count(f"stop {domain_name}-block0") == 1)
        wait_until(lambda: plugin.doors.count(f"start {domain_name}-block0") == 2)
        assert block_socket.is_socket()
        lines = probe(conn, reg, URI, run_dir=run_dir)
        assert f"domain {domain_name}: shut off, shared memory: yes" in lines
        assert f"    block {domain_name}-block0 socket {block_socket}: backend socket present" in lines
        assert f"    rng {domain_name}-rng0 socket {rng_socket}: backend socket present" in lines
        at = lines.index(f"domain {domain_name}: shut off, shared memory: yes")
        assert lines[at + 1 : at + 4] == [
            f"  pvcore devices (served by host daemon (pid {os.getpid()})):",
            f"    block {domain_name}-block0 socket {block_socket}: backend socket present",
            f"    rng {domain_name}-rng0 socket {rng_socket}: backend socket present",
        ]
        assert not lines[at + 4 :] or lines[at + 4].startswith("domain ")  # nothing else: no problem, no "could serve"
        report = undeploy(conn, reg, URI, domain_name)
        assert not block_socket.exists() and not rng_socket.exists()
        assert report.lines[-1] == "  backends: released, sockets removed"
        root = ElementTree.fromstring(conn.lookupByName(domain_name).XMLDesc(0))
        assert root.find("devices/disk") is None and root.find("devices/rng") is None
        assert root.find("devices/channel") is None
        assert root.find(f"metadata/{{{NAMESPACE}}}devices") is None
        deploy(conn, reg, URI, domain_name, [f"block:path={disk}"], run_dir=run_dir)
        assert block_socket.is_socket()
        conn.lookupByName(domain_name).undefine()
        wait_until(lambda: not block_socket.exists())
        assert host.served == {}
    finally:
        loop.loop.call_soon_threadsafe(host.request_stop)
        if future is not None:
            future.result(15)
        loop.close()
    assert not (run_dir / f"{domain_name}-block0.sock").exists()


def test_one_domain_server_exits_when_its_domain_stops(conn, registry, domain_name, tmp_path) -> None:
    reg, plugin = registry
    run_dir = tmp_path / "run"
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(4096))
    conn.defineXML(domain_xml(domain_name))
    spec = f"block:path={disk},socket={run_dir}/one.sock,name=one"
    root = ElementTree.fromstring(conn.lookupByName(domain_name).XMLDesc(0))
    set_in_definition(root, [spec])
    domain = conn.defineXML(ElementTree.tostring(root, encoding="unicode"))
    domain.create()
    loop = LoopThread()
    server = HostDaemon(reg, URI, run_dir=run_dir, only_domain=domain_name)
    future = asyncio.run_coroutine_threadsafe(server.run(handle_signals=False), loop.loop)
    try:
        wait_until(lambda: (run_dir / "one.sock").exists())
        domain.destroy()
        future.result(10)
        assert not (run_dir / "one.sock").exists()
        assert plugin.doors == ["start one", "stop one"]
    finally:
        if not future.done():
            loop.loop.call_soon_threadsafe(server.request_stop)
            future.result(10)
        loop.close()


def test_host_daemon_refuses_metadata_paths_outside_what_it_trusts(conn, registry, domain_name, tmp_path, caplog) -> None:
    reg, plugin = registry
    run_dir = tmp_path / "run"
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(4096))
    (tmp_path / "adir").mkdir()
    specs = [
        f"block:path={disk},socket={run_dir}/good.sock,name=good",
        f"block:path={disk},socket={tmp_path}/elsewhere.sock,name=elsewhere",
        f"block:path={disk},socket={run_dir}/../escaped.sock,name=escaped",
        f"block:path=/dev/null,socket={run_dir}/chardev.sock,name=chardev",
        f"block:path={tmp_path}/adir,socket={run_dir}/directory.sock,name=directory",
        f"block:path={tmp_path}/missing.img,socket={run_dir}/missing.sock,name=missing",
    ]
    conn.defineXML(domain_xml(domain_name))
    root = ElementTree.fromstring(conn.lookupByName(domain_name).XMLDesc(0))
    set_in_definition(root, specs)
    domain = conn.defineXML(ElementTree.tostring(root, encoding="unicode"))
    domain.create()
    loop = LoopThread()
    server = HostDaemon(reg, URI, run_dir=run_dir, only_domain=domain_name)
    future = asyncio.run_coroutine_threadsafe(server.run(handle_signals=False), loop.loop)
    try:
        wait_until(lambda: (run_dir / "good.sock").exists())
        wait_until(lambda: server.device_count == 1 and caplog.text.count("not served") == 5)
        assert plugin.doors == ["start good"]
        assert not (tmp_path / "elsewhere.sock").exists() and not (tmp_path / "escaped.sock").exists()
        assert "elsewhere.sock is not inside the run directory" in caplog.text
        assert "escaped.sock is not inside the run directory" in caplog.text
        assert "path=/dev/null is not a regular file or block device" in caplog.text
        assert "adir is not a regular file or block device" in caplog.text
        assert "missing.img" in caplog.text
        domain.destroy()
        future.result(10)
    finally:
        if not future.done():
            loop.loop.call_soon_threadsafe(server.request_stop)
            future.result(10)
        loop.close()


def pvcore(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pvcore.cli", *args], capture_output=True, text=True, timeout=60)


def test_cli_probe_and_one_line_errors() -> None:
    done = pvcore("probe", "--connect", URI)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "connection test:///default: libvirt driver TEST, libvirt " + ".".join(
        str(libvirt.getVersion() // d % 1000) for d in (1000000, 1000, 1)
    )
    assert "domain test: running, shared memory: no" in lines
    done = pvcore("deploy", "--connect", URI, "--hypervisor", "kvm", "nosuch", "rng:rate=1/1s")
    assert done.returncode == 2
    assert done.stderr.strip() == "pvcore: error: no domain 'nosuch' on test:///default (domains: test)"
    done = pvcore("deploy", "--connect", "qemu+ssh://nowhere.invalid/system", "vm", "block:path=x")
    assert done.returncode == 2 and done.stderr.startswith("pvcore: error: cannot connect to qemu+ssh://nowhere.invalid/system")
    assert "\n" not in done.stderr.strip()


def test_deploy_refuses_a_socket_outside_the_run_directory_at_once(tmp_path: Path) -> None:
    from pvcore.libvirt import LibvirtError
    from pvcore.libvirt.deploy import complete_specs
    from pvcore.registry import default_registry

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(4096))
    registry = default_registry()
    ok = complete_specs(
        [f"block:path={image}"], "vm", [], run_dir=run_dir, local=True, registry=registry, hypervisor="kvm"
    )
    assert ok[0][1].get("socket") == str(run_dir / "vm-block0.sock")
    with pytest.raises(LibvirtError, match="is not inside the run directory"):
        complete_specs([f"block:path={image},socket=/tmp/elsewhere.sock"], "vm", [], run_dir=run_dir, local=True,
                       registry=registry, hypervisor="kvm")


def test_cli_deploy_through_a_plugin_without_libvirt_xml_names_it() -> None:
    done = pvcore("deploy", "--connect", URI, "--hypervisor", "lpar", "test", "rng:rate=1/1s")
    assert done.returncode == 2
    assert done.stderr.startswith("pvcore: error: plugin lpar cannot write libvirt device XML ")
    assert "\n" not in done.stderr.strip()


def test_host_daemon_control_socket_lists_by_domain_swaps_media_into_the_record_and_refuses_add(
    conn, registry, domain_name, tmp_path, monkeypatch
) -> None:
    """`pvcore daemon`'s control socket: list (domain, served or not and why), swap-media recorded in the
    metadata without restarting the device, set-rate, and add/remove refused (the metadata is the record)."""
    from pvcore.control import control_socket_path, request

    reg, plugin = registry
    run_dir = tmp_path / "run"
    old, new = tmp_path / "old.img", tmp_path / "new.img"
    old.write_bytes(b"\x01" * 65536)
    new.write_bytes(b"\x02" * 65536)
    block = f"block:path={old},socket={run_dir}/disk.sock,name=disk,domain={domain_name}"
    rng = f"rng:rate=4096/1s,socket={run_dir}/rng.sock,name=rng,domain={domain_name}"
    missing = f"block:path={tmp_path}/missing.img,socket={run_dir}/gone.sock,name=gone,domain={domain_name}"
    root = ElementTree.fromstring(domain_xml(domain_name))
    set_in_definition(root, [block, rng, missing])
    domain = conn.defineXML(ElementTree.tostring(root, encoding="unicode"))
    domain.create()
    loop = LoopThread()
    host = HostDaemon(reg, URI, run_dir=run_dir)
    future = asyncio.run_coroutine_threadsafe(host.run(handle_signals=False), loop.loop)
    path = control_socket_path(run_dir)
    try:
        wait_until(lambda: path.exists())
        assert oct(path.stat().st_mode & 0o777) == "0o600"
        listed = request(run_dir, {"command": "list"})
        assert listed["ok"], listed
        states = {d["name"]: (d["class"], d["domain"], d["state"]) for d in listed["devices"]}
        assert states == {
            "disk": ("block", domain_name, "served"), "rng": ("rng", domain_name, "served"),
            "gone": ("block", domain_name, "not served"),
        }
        gone = next(d for d in listed["devices"] if d["name"] == "gone")
        assert "missing.img" in gone["error"] and gone["counters"] == {}

        for body, error in [
            ({"command": "add", "device": f"block:path={old}"}, "pvcore deploy"),
            ({"command": "remove", "device": "disk"}, "pvcore undeploy"),
            ({"command": "swap-media", "device": "nope", "path": str(new)}, "no device named 'nope' is served"),
            ({"command": "swap-media", "device": "disk", "path": "/dev/null"}, "is not a regular file or block device"),
            ({"command": "swap-media", "device": "disk", "path": str(tmp_path / "x.img")}, "x.img"),
        ]:
            answer = request(run_dir, body)
            assert answer["ok"] is False and error in answer["error"], (body, answer)
        assert request(run_dir, {"command": "set-rate", "device": "rng", "rate": "1024/1s"}) == {"ok": True, "rate": "1024/1000ms"}
        limited = request(run_dir, {"command": "set-limits", "device": "disk", "limits": "iops=100"})
        assert limited["ok"] and "iops=100" in str(limited["limits"]), limited
        refused = request(run_dir, {"command": "set-limits", "device": "disk", "limits": "iops=lots"})
        assert refused["ok"] is False and "iops" in refused["error"], refused

        from pvcore.libvirt import follower

        def refused(*args: object) -> None:
            raise LibvirtError("metadata write refused (injected)")

        with monkeypatch.context() as patched:  # the record cannot be written: the old file is put back
            patched.setattr(follower, "write_specs", refused)
            answer = request(run_dir, {"command": "swap-media", "device": "disk", "path": str(new)})
        assert answer["ok"] is False and "could not be recorded in its metadata: metadata write refused" in answer["error"]
        assert set(host.served[domain.UUIDString()].devices) == {block, rng}
        assert host.devices.daemons["disk"].served[0][0].engine.store.path == str(old)
        assert read_specs(domain, libvirt.VIR_DOMAIN_AFFECT_LIVE, libvirt) == [block, rng, missing]

        assert request(run_dir, {"command": "swap-media", "device": "disk", "path": str(new)}) == {"ok": True, "old": str(old)}
        swapped = block.replace(f"path={old}", f"path={new}")
        for flag in (libvirt.VIR_DOMAIN_AFFECT_LIVE, libvirt.VIR_DOMAIN_AFFECT_CONFIG):
            assert read_specs(domain, flag, libvirt) == [swapped, rng, missing]
        time.sleep(0.5)  # the metadata events are handled: the device was not restarted for its new spec
        wait_until(lambda: host._events.empty())
        served = host.served[domain.UUIDString()]
        assert set(served.devices) == {swapped, rng}
        assert host.devices.daemons["disk"].served[0][0].engine.store.path == str(new)
        assert plugin.doors.count("start disk") == 1 and "stop disk" not in plugin.doors
    finally:
        loop.loop.call_soon_threadsafe(host.request_stop)
        future.result(15)
        loop.close()
    assert not path.exists()


def test_undeploy_of_named_devices_leaves_the_others_deployed(conn, registry, domain_name, tmp_path) -> None:
    reg, _ = registry
    run_dir = tmp_path / "run"
    conn.defineXML(domain_xml(domain_name))
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    loop = LoopThread()
    host = HostDaemon(reg, URI, run_dir=run_dir)
    future = asyncio.run_coroutine_threadsafe(host.run(handle_signals=False), loop.loop)
    try:
        wait_until(lambda: (run_dir / "control.sock").exists())
        report = deploy(conn, reg, URI, domain_name, [f"block:path={disk}", "rng:rate=4096/1s"], run_dir=run_dir)
        block_socket, rng_socket = run_dir / f"{domain_name}-block0.sock", run_dir / f"{domain_name}-rng0.sock"
        assert f"  {domain_name}-block0: served, test-driver socket {block_socket}" in report.lines
        started = time.monotonic()
        with pytest.raises(LibvirtError, match=f"{domain_name}-rng1 is recorded in the domain but not served: .*nodir"):
            deploy(conn, reg, URI, domain_name, [f"rng:rate=4096/1s,socket={run_dir}/nodir/r.sock"], run_dir=run_dir)
        assert time.monotonic() - started < 10  # said at once, not after deploy's 30 s wait
        undeploy(conn, reg, URI, domain_name, [f"{domain_name}-rng1"])
        with pytest.raises(LibvirtError, match=f"pvcore owns no device named nope \\(it owns {domain_name}-block0, "):
            undeploy(conn, reg, URI, domain_name, ["nope"])
        report = undeploy(conn, reg, URI, domain_name, [f"{domain_name}-block0"])
        assert report.lines[0] == f"domain {domain_name}: undeploying 1 device(s)"
        assert not block_socket.exists() and rng_socket.is_socket()
        domain = conn.lookupByName(domain_name)
        assert [s.split(",")[0] for s in read_specs(domain, libvirt.VIR_DOMAIN_AFFECT_CONFIG, libvirt)] == ["rng:rate=4096/1s"]
        root = ElementTree.fromstring(domain.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
        assert root.find("devices/disk") is None and root.find("devices/channel") is not None
    finally:
        loop.loop.call_soon_threadsafe(host.request_stop)
        future.result(15)
        loop.close()
