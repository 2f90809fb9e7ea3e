"""The scsi class is a plugin like a third party's: found through its entry point, options checked, errors clear."""

from __future__ import annotations

from importlib.metadata import entry_points
from pathlib import Path

import pytest

from pvcore.config import ConfigError, parse_devices
from pvcore.contract import DeviceConfig
from pvcore.registry import default_registry
from pvcore.virtio import DeviceError
from pvcore_scsi.plugin import build_units


def test_registered_through_the_entry_point_group() -> None:
    (entry,) = [e for e in entry_points(group="pvcore.plugins") if e.name == "scsi"]
    assert entry.value == "pvcore_scsi.plugin"
    registry = default_registry()
    assert "scsi" in registry.device_classes()
    assert "scsi" not in registry.hypervisors()


def test_options_parse_units_in_order(disc: Path, disk_image: Path) -> None:
    registry = default_registry()
    (config,) = parse_devices([f"scsi:media={disc}+empty,disk={disk_image},queues=2"], registry.device_classes())
    assert config.get("media") == [str(disc), "empty"] and config.get("queues") == 2
    units = build_units(config)
    try:
        assert [type(unit).__name__ for _, unit in sorted(units.items())] == ["CdromUnit", "CdromUnit", "DiskUnit"]
        assert units[1].disc is None
    finally:
        for unit in units.values():
            unit.close()


@pytest.mark.parametrize("spec, message", [
    ("scsi:queues=0", "between 1 and 16"),
    ("scsi:media=a.iso++b.iso", "none empty"),
    ("scsi:allow=burn", "expected read"),
    ("scsi:timeout=0", "between 0.1 and 3600"),
    ("scsi:lun=3", "has no option 'lun'"),
])
def test_bad_options_name_the_fix(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_devices([spec], default_registry().device_classes())


@pytest.mark.parametrize("options, message", [
    ({}, "needs at least one unit"),
    ({"media": ["/nonexistent.iso"]}, "no such file"),
    ({"disk": ["/nonexistent.img"]}, "no such file"),
    ({"passthrough": ["/dev/sg-nonexistent"]}, "cannot open"),
])
def test_units_that_cannot_open_are_clean_errors(options: dict, message: str) -> None:
    with pytest.raises(DeviceError, match=message):
        build_units(DeviceConfig("scsi", "bad", options))


def test_a_disc_smaller_than_a_block_is_refused(tmp_path: Path) -> None:
    tiny = tmp_path / "tiny.iso"
    tiny.write_bytes(b"x" * 100)
    with pytest.raises(DeviceError, match="smaller than one 2048-byte block"):
        build_units(DeviceConfig("scsi", "bad", {"media": [str(tiny)]}))


def test_kvm_attaches_the_class_with_vhost_user_scsi_pci(tmp_path: Path) -> None:
    from pvcore.testing.guest import plugin_qemu_args

    arguments = plugin_qemu_args("kvm", [f"scsi:media={tmp_path}/x.iso,socket={tmp_path}/s.sock,queues=2,name=vm-cd"])
    assert arguments == {"vm": ["-chardev", f"socket,id=pvscsi0,path={tmp_path}/s.sock",
                                "-device", "vhost-user-scsi-pci,chardev=pvscsi0,num_queues=2"]}


def test_a_hypervisor_that_cannot_carry_the_target_is_a_clean_error(disc: Path, tmp_path: Path) -> None:
    import asyncio

    from pvcore.daemon import Daemon, DaemonError

    registry = default_registry()
    (config,) = parse_devices([f"scsi:media={disc}+empty,socket={tmp_path}/s.sock,name=vm-cd"], registry.device_classes())
    daemon = Daemon(registry, "lpar", [config], run_dir=tmp_path / "run")
    with pytest.raises(DaemonError, match=r"vm-cd: scsi vm-cd: .* give one CD-ROM unit holding a disc"):
        asyncio.run(daemon.start())
    assert daemon.served == [] and not (tmp_path / "run" / "vm-cd.media").exists()
