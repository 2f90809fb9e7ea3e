"""`pvcore demo` attaches its guests with the kvm plugin's pvcore_qemu_args, not arguments of its own."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from pvcore.contract import CONTRACT_VERSION, DeviceConfig, PluginInfo
from pvcore.demo import DemoError, demo_devices, guest_arguments
from pvcore.devices import classes
from pvcore.hookspecs import hookimpl
from pvcore.registry import Registry, default_registry


def test_demo_guests_get_what_print_qemu_args_prints_workarounds_included(tmp_path: Path) -> None:
    devices = demo_devices(tmp_path, tmp_path / "disk.img", tmp_path / "console.log")
    arguments = guest_arguments(default_registry(), devices)
    assert sorted(arguments) == ["vm1", "vm2"]
    vm1, vm2 = " ".join(arguments["vm1"]), " ".join(arguments["vm2"])
    assert "-device vhost-user-blk-pci,chardev=pvblock0" in vm1
    assert "-device virtio-net-pci,netdev=pvnet0n,mac=52:54:00:00:00:01,vectors=0" in vm1
    assert f"-chardev socket,id=pvrng0,path={tmp_path}/rng.sock -device vhost-user-rng-pci,chardev=pvrng0" in vm1
    assert "-device virtconsole,chardev=pvconsole0" in vm1
    assert vm2 == (f"-chardev socket,id=pvnet0,path={tmp_path}/vm2-net.sock,reconnect=1 "
                   "-netdev vhost-user,id=pvnet0n,chardev=pvnet0 "
                   "-device virtio-net-pci,netdev=pvnet0n,mac=52:54:00:00:00:02,vectors=0")


class RecordingKvm:
    """A stand-in kvm plugin that records what pvcore_qemu_args was asked."""

    def __init__(self) -> None:
        self.asked: list[DeviceConfig] = []

    @hookimpl
    def pvcore_plugin_info(self) -> PluginInfo:
        return PluginInfo(name="kvm", contract=CONTRACT_VERSION, hypervisor="kvm")

    @hookimpl
    def pvcore_qemu_args(self, configs: Sequence[DeviceConfig]) -> dict[str, list[str]]:
        self.asked.extend(configs)
        return {"vm1": ["-from-the-hook"]}


def test_demo_arguments_come_from_the_hook_and_failures_are_demo_errors(tmp_path: Path) -> None:
    registry = Registry()
    registry.register(classes.rng, name="rng")
    kvm = RecordingKvm()
    registry.register(kvm, name="kvm")
    assert guest_arguments(registry, ["rng:socket=/s,domain=vm1"]) == {"vm1": ["-from-the-hook"]}
    assert [(c.device_class, c.get("socket")) for c in kvm.asked] == [("rng", "/s")]
    with pytest.raises(DemoError, match="unknown device class 'block'"):
        guest_arguments(registry, ["block:path=/d.img"])
    with pytest.raises(DemoError, match="no plugin serves hypervisor 'kvm'"):
        guest_arguments(Registry(), [])
