"""pvcore's libvirt layer against libvirt's test driver (test:///default, no daemon needed).

The test driver parses and validates domain XML with libvirt's own parser,
keeps metadata, and emits lifecycle and metadata events, so the device XML,
the metadata record, the shared-memory check, deploy/undeploy and the host
daemon's lifecycle following are all checked here. The hypervisor plugin is a
third party's (this file's ``ThirdPartyPlugin``), chosen by the detect hook
because it answers for the test driver: no core change makes that work.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from xml.etree import ElementTree

import libvirt
import pytest

from pvcore.config import parse_devices, split_spec
from pvcore.contract import CONTRACT_VERSION, Detection, HostContext, PluginInfo
from pvcore.devices import classes
from pvcore.hookspecs import hookimpl
from pvcore.libvirt import LibvirtError
from pvcore.libvirt.connection import choose_hypervisor
from pvcore.libvirt.deploy import deploy, undeploy
from pvcore.libvirt.devicexml import (
    SHARED_MEMORY_XML,
    device_element,
    element_socket,
    next_disk_targets,
    served_config,
)
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


class ThirdPartyPlugin:
    """A third party's hypervisor plugin that answers for libvirt's test driver."""

    def __init__(self) -> None:
        self.doors: list[str] = []
        self.protocols: dict[str, str | None] = {}

    @hookimpl
    def pvcore_plugin_info(self) -> PluginInfo:
        return PluginInfo(name="testvirt", contract=CONTRACT_VERSION, hypervisor="testvirt", primitives={"detect", "stream"})

    @hookimpl
    def pvcore_detect(self, host: HostContext) -> Detection | None:
        if host.libvirt is not None and host.libvirt.getType() == "TEST":
            return Detection("testvirt", 95, "libvirt connection type is TEST")
        return None

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


def configs_for(tmp_path: Path, registry: Registry, domain: str):
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    specs = [
        f"block:path={disk},socket={tmp_path}/b.sock,queues=2,name={domain}-b",
        f"net:mac=52:54:00:12:34:56,socket={tmp_path}/n.sock,name={domain}-n",
        f"console:socket={tmp_path}/c.sock,name={domain}-c",
        f"rng:rate=4096/1s,socket={tmp_path}/r.sock,name={domain}-r",
    ]
    return specs, parse_devices(specs, registry.device_classes())


def test_device_xml_of_each_class_is_accepted_by_libvirt(conn, registry, domain_name, tmp_path) -> None:
    _, configs = configs_for(tmp_path, registry[0], domain_name)
    elements = [device_element(c, target_dev="vdb") for c in configs]
    devices = "".join(ElementTree.tostring(e, encoding="unicode") for e in elements)
    domain = conn.defineXML(domain_xml(domain_name, devices=devices))
    root = ElementTree.fromstring(domain.XMLDesc(0))
    disk = root.find("devices/disk[@type='vhostuser']")
    assert disk is not None and element_socket(disk) == f"{tmp_path}/b.sock"
    assert disk.find("target").attrib == {"dev": "vdb", "bus": "virtio"}
    assert disk.find("driver").get("queues") == "2"
    assert disk.find("source/reconnect").attrib == {"enabled": "yes", "timeout": "1"}
    interface = root.find("devices/interface[@type='vhostuser']")
    assert interface.find("mac").get("address") == "52:54:00:12:34:56"
    assert interface.find("source").get("mode") == "client"
    assert element_socket(interface) == f"{tmp_path}/n.sock"
    console = root.find("devices/console[@type='unix']")
    assert console.find("target").get("type") == "virtio"
    assert console.find("source").get("mode") == "connect" and element_socket(console) == f"{tmp_path}/c.sock"
    rng = root.find("devices/rng")
    assert rng.find("backend").attrib == {"model": "egd", "type": "unix"}
    assert element_socket(rng) == f"{tmp_path}/r.sock"
    assert rng.find("backend/source/reconnect") is not None


def test_rng_is_served_over_egd_and_others_keep_their_protocol(registry, tmp_path) -> None:
    _, configs = configs_for(tmp_path, registry[0], "vm")
    protocols = {c.device_class: served_config(c).get("protocol") for c in configs}
    assert protocols == {"block": None, "net": None, "console": None, "rng": "egd"}


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


def test_shared_memory_check_refuses_and_explains(conn, registry, domain_name, tmp_path) -> None:
    reg, _ = registry
    conn.defineXML(domain_xml(domain_name, shared=False))
    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(4096))
    with pytest.raises(LibvirtError) as refused:
        deploy(conn, reg, URI, domain_name, [f"block:path={disk}"], run_dir=tmp_path)
    message = str(refused.value)
    assert f"domain {domain_name} has no shared memory" in message
    assert f"block {domain_name}-block0" in message
    assert f"virsh edit {domain_name}" in message
    assert SHARED_MEMORY_XML in message
    domain = conn.lookupByName(domain_name)
    assert read_specs(domain, libvirt.VIR_DOMAIN_AFFECT_CONFIG, libvirt) == []
    assert ElementTree.fromstring(domain.XMLDesc(0)).find("devices/disk") is None


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
        assert f"  block {domain_name}-block0: <disk vhostuser> vda, socket {block_socket}" in report.lines
        assert any(line.startswith("  served by: the host daemon (pid ") for line in report.lines)
        assert plugin.protocols == {f"{domain_name}-block0": None, f"{domain_name}-rng0": "egd"}
        domain = conn.lookupByName(domain_name)
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
        report = undeploy(conn, reg, URI, domain_name)
        assert not block_socket.exists() and not rng_socket.exists()
        assert report.lines[-1] == "  backends: released, sockets removed"
        root = ElementTree.fromstring(conn.lookupByName(domain_name).XMLDesc(0))
        assert root.find("devices/disk") is None and root.find("devices/rng") is None
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
    ok = complete_specs([f"block:path={image}"], "vm", [], run_dir=run_dir, local=True, registry=registry)
    assert ok[0][1].get("socket") == str(run_dir / "vm-block0.sock")
    with pytest.raises(LibvirtError, match="is not inside the run directory"):
        complete_specs([f"block:path={image},socket=/tmp/elsewhere.sock"], "vm", [], run_dir=run_dir, local=True,
                       registry=registry)
