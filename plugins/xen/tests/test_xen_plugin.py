"""The xen plugin's hooks: self-description through the registry, and detect."""

from __future__ import annotations

import pytest

from pvcore.config import ConfigError, parse_devices
from pvcore.contract import HostContext
from pvcore.devices import classes
from pvcore.registry import Registry
from pvcore_xen import plugin


class FakeLibvirt:
    """A libvirt connection that only answers getType."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def getType(self) -> str:  # noqa: N802 (libvirt's name)
        """The connection's driver type."""
        return self.kind


def test_registry_accepts_the_plugin():
    registry = Registry()
    registry.register(plugin, name="xen")
    assert registry.hypervisors()["xen"].state == "ok"


def test_detect_xen_from_sys_hypervisor(tmp_path):
    (tmp_path / "sys/hypervisor").mkdir(parents=True)
    (tmp_path / "sys/hypervisor/type").write_text("xen\n")
    detection = plugin.pvcore_detect(HostContext(root=tmp_path, environ={}))
    assert detection is not None and detection.hypervisor == "xen" and detection.confidence == 80


def test_detect_xen_from_libvirt(tmp_path):
    detection = plugin.pvcore_detect(HostContext(root=tmp_path, libvirt=FakeLibvirt("Xen"), environ={}))
    assert detection is not None and "libvirt" in detection.evidence
    assert plugin.pvcore_detect(HostContext(root=tmp_path, libvirt=FakeLibvirt("QEMU"), environ={})) is None


def test_detect_xenstore_endpoint_alone(tmp_path):
    (tmp_path / "dev/xen").mkdir(parents=True)
    (tmp_path / "dev/xen/xenbus").touch()
    detection = plugin.pvcore_detect(HostContext(root=tmp_path, environ={}))
    assert detection is not None and detection.confidence == 50


def test_no_xen_here(tmp_path):
    (tmp_path / "sys/hypervisor").mkdir(parents=True)
    (tmp_path / "sys/hypervisor/type").write_text("kvm\n")
    assert plugin.pvcore_detect(HostContext(root=tmp_path, environ={})) is None


def test_domain_is_a_domid_and_devid_checked_at_parse_time():
    registry = Registry()
    for name in ("net", "console"):
        registry.register(getattr(classes, name), name=name)
    registry.register(plugin, name="xen")
    options = registry.plugin_options("xen")
    (config,) = parse_devices(["console:domain=3/2"], registry.device_classes(), options)
    assert config.get("domain") == "3/2"
    with pytest.raises(ConfigError, match=r"domain=vm3: on xen, write the guest's domain id and the device id, e.g. domain=3/0"):
        parse_devices(["console:domain=vm3"], registry.device_classes(), options)
    with pytest.raises(ConfigError, match=r"console needs domain= \(DOMID/DEVID"):
        parse_devices(["console:log=/tmp/con.log"], registry.device_classes(), options)
