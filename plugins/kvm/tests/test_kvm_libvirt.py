"""The kvm plugin's libvirt XML (pvcore_kvm.libvirt) against libvirt's test driver (test:///default).

The test driver parses and validates domain XML with libvirt's own parser,
so what kvm writes is checked as libvirt reads it, and read back by the same
module: deploy writes it, probe and the probe hook list it (rng included),
undeploy finds and removes it. The test driver is not QEMU, so a stand-in
plugin's detect names kvm for it.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from xml.etree import ElementTree

import pvcore_kvm.plugin
import pytest
from pvcore_kvm.libvirt import LIBVIRT_XML, SHARED_MEMORY_XML

from pvcore.config import parse_devices
from pvcore.contract import CONTRACT_VERSION, Detection, DeviceSlot, HostContext, LibvirtXml, PluginInfo
from pvcore.devices import classes
from pvcore.hookspecs import hookimpl
from pvcore.registry import Registry
from pvcore.testing.loopthread import LoopThread

libvirt = pytest.importorskip("libvirt")

from pvcore.libvirt import LibvirtError  # noqa: E402
from pvcore.libvirt.deploy import deploy, undeploy  # noqa: E402
from pvcore.libvirt.follower import HostDaemon  # noqa: E402
from pvcore.libvirt.metadata import read_specs, set_in_definition  # noqa: E402
from pvcore.libvirt.probe import probe  # noqa: E402

URI = "test:///default"


class QemuStandIn:
    """Says libvirt's test driver is QEMU, so that detect chooses kvm for it."""

    @hookimpl
    def pvcore_plugin_info(self) -> PluginInfo:
        return PluginInfo(name="qemu-stand-in", contract=CONTRACT_VERSION)

    @hookimpl
    def pvcore_detect(self, host: HostContext) -> Detection | None:
        if host.libvirt is not None and host.libvirt.getType() == "TEST":
            return Detection("kvm", 99, "libvirt's test driver stands in for QEMU")
        return None


@pytest.fixture
def kvm_registry() -> Registry:
    reg = Registry()
    for name in ("block", "net", "console", "rng"):
        reg.register(getattr(classes, name), name=name)
    reg.register(pvcore_kvm.plugin, name="kvm")
    reg.register(QemuStandIn(), name="qemu-stand-in")
    return reg


@pytest.fixture
def conn() -> Iterator[object]:
    connection = libvirt.open(URI)
    yield connection
    connection.close()


@pytest.fixture
def domain_name(conn) -> Iterator[str]:
    name = f"pvk-{uuid.uuid4().hex[:6]}"
    yield name
    try:
        domain = conn.lookupByName(name)
    except libvirt.libvirtError:
        return
    if domain.isActive():
        domain.destroy()
    if domain.isPersistent():
        domain.undefine()


def domain_xml(name: str, *, shared: bool = True, devices: str = "") -> str:
    backing = "<memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>" if shared else ""
    return (
        f"<domain type='test'><name>{name}</name><memory unit='MiB'>128</memory>{backing}"
        "<os><type arch='x86_64'>hvm</type></os>"
        f"<devices>{devices}</devices></domain>"
    )


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


def test_the_hook_answers_the_one_module(kvm_registry) -> None:
    xml = kvm_registry.call("kvm", "pvcore_libvirt_xml")
    assert xml is LIBVIRT_XML and isinstance(xml, LibvirtXml)


def test_device_xml_of_each_class_is_accepted_by_libvirt(conn, kvm_registry, domain_name, tmp_path) -> None:
    _, configs = configs_for(tmp_path, kvm_registry, domain_name)
    taken = ElementTree.fromstring("<domain><devices><disk><target dev='vda'/></disk></devices></domain>")
    elements = [LIBVIRT_XML.element(c, taken) for c in configs]
    devices = "".join(ElementTree.tostring(e, encoding="unicode") for e in elements)
    domain = conn.defineXML(domain_xml(domain_name, devices=devices))
    root = ElementTree.fromstring(domain.XMLDesc(0))
    socket = LIBVIRT_XML.socket
    disk = root.find("devices/disk[@type='vhostuser']")
    assert disk is not None and socket(disk) == f"{tmp_path}/b.sock"
    assert disk.find("target").attrib == {"dev": "vdb", "bus": "virtio"}
    assert disk.find("driver").get("queues") == "2"
    assert disk.find("source/reconnect").attrib == {"enabled": "yes", "timeout": "1"}
    interface = root.find("devices/interface[@type='vhostuser']")
    assert interface.find("mac").get("address") == "52:54:00:12:34:56"
    assert interface.find("source").get("mode") == "client"
    assert socket(interface) == f"{tmp_path}/n.sock"
    console = root.find("devices/console[@type='unix']")
    assert console.find("target").get("type") == "virtio"
    assert console.find("source").get("mode") == "connect" and socket(console) == f"{tmp_path}/c.sock"
    rng = root.find("devices/rng")
    assert rng.find("backend").attrib == {"model": "egd", "type": "unix"}
    assert socket(rng) == f"{tmp_path}/r.sock"
    assert rng.find("backend/source/reconnect") is not None
    # and read back by the same module: every class it writes
    assert [(s.device_class, s.address) for s in LIBVIRT_XML.slots(domain_name, root)] == [
        ("block", f"{tmp_path}/b.sock"), ("net", f"{tmp_path}/n.sock"),
        ("console", f"{tmp_path}/c.sock"), ("rng", f"{tmp_path}/r.sock"),
    ]


def test_rng_is_served_over_egd_and_others_keep_their_protocol(kvm_registry, tmp_path) -> None:
    _, configs = configs_for(tmp_path, kvm_registry, "vm")
    protocols = {c.device_class: LIBVIRT_XML.served(c).get("protocol") for c in configs}
    assert protocols == {"block": None, "net": None, "console": None, "rng": "egd"}


def test_shared_memory_check_refuses_and_explains(conn, kvm_registry, domain_name, tmp_path) -> None:
    conn.defineXML(domain_xml(domain_name, shared=False))
    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(4096))
    with pytest.raises(LibvirtError) as refused:
        deploy(conn, kvm_registry, URI, domain_name, [f"block:path={disk}"], run_dir=tmp_path)
    message = str(refused.value)
    assert f"domain {domain_name} has no shared memory" in message
    assert f"block {domain_name}-block0" in message
    assert f"virsh edit {domain_name}" in message
    assert SHARED_MEMORY_XML in message
    domain = conn.lookupByName(domain_name)
    assert read_specs(domain, libvirt.VIR_DOMAIN_AFFECT_CONFIG, libvirt) == []
    assert ElementTree.fromstring(domain.XMLDesc(0)).find("devices/disk") is None


@pytest.fixture
def run_dir() -> Iterator[Path]:
    """A short run directory: a console's attach socket beside its socket must fit in 107 bytes."""
    with tempfile.TemporaryDirectory(prefix="pvk-") as path:
        yield Path(path)


def wait_until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def test_probe_lists_every_class_deploy_wrote_rng_included(conn, kvm_registry, domain_name, tmp_path, run_dir) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    conn.defineXML(domain_xml(domain_name))
    loop = LoopThread()
    host = HostDaemon(kvm_registry, URI, run_dir=run_dir)
    future = None
    sockets = {c: run_dir / f"{domain_name}-{c}0.sock" for c in ("block", "net", "console", "rng")}
    try:
        future = asyncio.run_coroutine_threadsafe(host.run(handle_signals=False), loop.loop)
        wait_until(lambda: (run_dir / "daemon.lock").exists())
        texts = [f"block:path={disk}", "net:mac=52:54:00:00:00:07", "console:", "rng:rate=4096/1s"]
        report = deploy(conn, kvm_registry, URI, domain_name, texts, run_dir=run_dir, timeout=10)
        assert report.lines[0] == f"domain {domain_name} (shut off; plugin kvm): deploying 4 device(s)"
        assert f"  block {domain_name}-block0: <disk vhostuser> vda, socket {sockets['block']}" in report.lines
        assert f"  rng {domain_name}-rng0: <rng virtio>, socket {sockets['rng']}" in report.lines
        assert all(path.is_socket() for path in sockets.values())
        lines = probe(conn, kvm_registry, URI, run_dir=run_dir)
        at = lines.index(f"domain {domain_name}: shut off, shared memory: yes")
        assert [line.split(": ", 1)[1] for line in lines[at + 2 : at + 6]] == ["backend socket present"] * 4
        # the same elements without pvcore's metadata: probe and the probe hook list all four as servable
        domain = conn.lookupByName(domain_name)
        root = ElementTree.fromstring(domain.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
        set_in_definition(root, [])
        conn.defineXML(ElementTree.tostring(root, encoding="unicode"))
        lines = probe(conn, kvm_registry, URI, run_dir=run_dir)
        at = lines.index(f"domain {domain_name}: shut off, shared memory: yes")
        assert lines[at + 1 : at + 6] == [
            "  could serve (not deployed by pvcore):",
            *(f"    {c} at {path}" for c, path in sockets.items()),
        ]
        slots = kvm_registry.call("kvm", "pvcore_probe", host=HostContext(libvirt=conn))
        rng = str(sockets["rng"])
        assert DeviceSlot("kvm", "rng", rng, domain_name, {"socket": rng, "protocol": "egd"}) in slots
        assert {s.device_class for s in slots if s.domain == domain_name} == {"block", "net", "console", "rng"}
        wait_until(lambda: not any(path.exists() for path in sockets.values()))  # no metadata: released
    finally:
        if future is not None:
            loop.loop.call_soon_threadsafe(host.request_stop)
            future.result(15)
        loop.close()


def test_undeploy_finds_and_removes_what_deploy_wrote(conn, kvm_registry, domain_name, run_dir) -> None:
    conn.defineXML(domain_xml(domain_name))
    loop = LoopThread()
    host = HostDaemon(kvm_registry, URI, run_dir=run_dir)
    future = asyncio.run_coroutine_threadsafe(host.run(handle_signals=False), loop.loop)
    try:
        wait_until(lambda: (run_dir / "daemon.lock").exists())
        deploy(conn, kvm_registry, URI, domain_name, ["console:", "rng:rate=4096/1s"], run_dir=run_dir, timeout=10)
        report = undeploy(conn, kvm_registry, URI, domain_name)
        assert report.lines[-1] == "  backends: released, sockets removed"
        root = ElementTree.fromstring(conn.lookupByName(domain_name).XMLDesc(0))
        assert root.find("devices/console[@type='unix']") is None and root.find("devices/rng") is None
    finally:
        loop.loop.call_soon_threadsafe(host.request_stop)
        future.result(15)
        loop.close()


def test_probe_reports_what_the_check_finds_missing(conn, kvm_registry, domain_name, tmp_path) -> None:
    specs, configs = configs_for(tmp_path, kvm_registry, domain_name)
    scratch = ElementTree.fromstring(domain_xml(domain_name))
    devices = "".join(ElementTree.tostring(LIBVIRT_XML.element(c, scratch), encoding="unicode") for c in configs[::3])
    root = ElementTree.fromstring(domain_xml(domain_name, shared=False, devices=devices))
    set_in_definition(root, specs[::3])
    conn.defineXML(ElementTree.tostring(root, encoding="unicode"))
    lines = probe(conn, kvm_registry, URI, run_dir=tmp_path)
    at = lines.index(f"domain {domain_name}: shut off, shared memory: no")
    assert lines[at + 2 : at + 4] == [
        f"    block {domain_name}-b socket {tmp_path}/b.sock: no socket (no backend listens); domain {domain_name} has "
        f"no shared memory, which vhost-user devices need (block {domain_name}-b) (see pvcore deploy's message)",
        f"    rng {domain_name}-r socket {tmp_path}/r.sock: no socket (no backend listens)",
    ]


def test_deploy_accepts_the_kvm_plugins_own_options(tmp_path):
    """socket-mode= is kvm's option: deploy parses specs with the options of the plugin it deploys through."""
    from pvcore.libvirt.deploy import complete_specs
    from pvcore.registry import default_registry

    completed = complete_specs(
        ["net:mac=52:54:00:00:00:07,socket-mode=client"], "vm", [], run_dir=tmp_path, local=True,
        registry=default_registry(), hypervisor="kvm",
    )
    assert completed[0][1].get("socket-mode") == "client"


@pytest.mark.parametrize("backing", [
    "<memoryBacking><source type='file'/><access mode='shared'/></memoryBacking>",
    "<memoryBacking><hugepages/><access mode='shared'/></memoryBacking>",
])
def test_shared_memory_that_is_not_a_memfd_is_a_problem(backing):
    from xml.etree import ElementTree

    from pvcore.contract import DeviceConfig
    from pvcore_kvm.libvirt import LIBVIRT_XML

    domain = ElementTree.fromstring(f"<domain><name>vm</name>{backing}<devices/></domain>")
    disk = DeviceConfig("block", "vm-block0", {"socket": "/run/x.sock"})
    (problem,) = LIBVIRT_XML.check("vm", domain, [disk])
    assert "not a memfd" in problem and "<source type='memfd'/>" in problem
    memfd = ElementTree.fromstring(
        "<domain><name>vm</name><memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking></domain>"
    )
    assert LIBVIRT_XML.check("vm", memfd, [disk]) == []


def test_host_daemon_with_workers_serves_in_them_and_a_killed_worker_serves_its_devices_again(
    conn, kvm_registry, domain_name, run_dir
) -> None:
    """``pvcore daemon --workers 2``: the follower stays in this process and each deployed device is served by
    a worker process, its child; a domain's two rng devices share one worker, the rest are spread. A worker
    killed with SIGKILL is started again with its devices on the same socket (a disk written before reads
    back), the other worker goes on, and undeploy removes the devices and their sockets from the workers.
    The metrics endpoint of the parent merges every worker's devices."""
    import os
    import signal
    import socket
    import urllib.request

    from pvcore.metrics import MetricsAddress

    from pvcore.control import request
    from pvcore.devices.block.virtio_blk import REQUEST_HEADER, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT
    from pvcore.testing.vhost_user_frontend import VhostUserFrontend

    disk, other_disk = run_dir / "disk.img", run_dir / "other.img"
    disk.write_bytes(bytes(1 << 20))
    other_disk.write_bytes(bytes(1 << 20))
    conn.defineXML(domain_xml(domain_name))
    loop = LoopThread()
    with socket.socket() as probe_port:
        probe_port.bind(("127.0.0.1", 0))
        port = probe_port.getsockname()[1]
    host = HostDaemon(kvm_registry, URI, run_dir=run_dir, workers=2, metrics=MetricsAddress.parse(f"127.0.0.1:{port}"))
    future = asyncio.run_coroutine_threadsafe(host.run(handle_signals=False), loop.loop)

    def listed() -> dict[str, dict]:
        answer = request(run_dir, {"command": "list"})
        assert answer["ok"], answer
        return {device["name"]: device for device in answer["devices"]}

    def parent_of(pid: int) -> int:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])

    try:
        wait_until(lambda: (run_dir / "control.sock").exists(), 60)
        texts = [f"block:path={disk}", f"block:path={other_disk}", "console:", "rng:rate=4096/1s", "rng:rate=4096/1s"]
        deploy(conn, kvm_registry, URI, domain_name, texts, run_dir=run_dir, timeout=30)
        devices = listed()
        block, block1, console, rng0, rng1 = (
            f"{domain_name}-{n}" for n in ("block0", "block1", "console0", "rng0", "rng1")
        )
        assert {d["state"] for d in devices.values()} == {"served"}
        assert set(devices) == {block, block1, console, rng0, rng1}
        assert {d["domain"] for d in devices.values()} == {domain_name}
        pids = {name: device["worker_pid"] for name, device in devices.items()}
        assert all(parent_of(pid) == os.getpid() for pid in pids.values())
        assert devices[rng0]["worker"] == devices[rng1]["worker"]
        assert {devices[block]["worker"], devices[block1]["worker"]} == {"w0", "w1"}  # spread by load

        frontend = VhostUserFrontend.connect(run_dir / f"{domain_name}-block0.sock", timeout=30.0)
        frontend.start(num_queues=1, queue_size=64, inflight=True)
        header = REQUEST_HEADER.pack(VIRTIO_BLK_T_OUT, 0, 5)
        assert frontend.request(0, [header, b"\x5a" * 512], [1]).data == bytes([VIRTIO_BLK_S_OK])
        os.kill(pids[block], signal.SIGKILL)
        wait_until(lambda: listed()[block].get("worker_restarts") == 1, 60)
        after = listed()
        assert after[block]["worker_pid"] != pids[block] and after[block]["state"] == "served"
        assert after[block1]["worker_pid"] == pids[block1] and after[block1]["worker_restarts"] == 0
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(run_dir / f"{domain_name}-block0.sock"))  # the parent kept the socket
        frontend.reconnect(sock)
        used = frontend.request(0, [REQUEST_HEADER.pack(VIRTIO_BLK_T_IN, 0, 5)], [512, 1])
        assert used.data == b"\x5a" * 512 + bytes([VIRTIO_BLK_S_OK])
        frontend.close()
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
        assert text.count("# TYPE pvcore_requests_total counter") == 1
        assert f'device="{block}"' in text and f'device="{block1}"' in text  # from each worker

        undeploy(conn, kvm_registry, URI, domain_name, timeout=30)
        assert not any(run_dir.glob(f"{domain_name}-*.sock")) and listed() == {}
    finally:
        loop.loop.call_soon_threadsafe(host.request_stop)
        future.result(60)
        loop.close()
    assert not any(Path(f"/proc/{pid}").exists() for pid in {after[block]["worker_pid"], *pids.values()})
