"""The daemon: one device's failure to stop, or to reopen its log, does not leave the others behind."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from pvcore.config import parse_devices
from pvcore.contract import CONTRACT_VERSION, PluginInfo
from pvcore.daemon import Daemon
from pvcore.devices import classes
from pvcore.hookspecs import hookimpl
from pvcore.registry import Registry


class RecordingDoor:
    def __init__(self, name: str, stopped: list[str], fail: bool) -> None:
        self.description = f"test door {name}"
        self.name, self.stopped, self.fail = name, stopped, fail

    async def start(self) -> None:
        if self.name.startswith("slow"):
            await asyncio.sleep(0.2)  # a door that takes a while to come up: adds overlap

    async def stop(self) -> None:
        self.stopped.append(self.name)
        if self.fail:
            raise RuntimeError(f"{self.name} refused to stop")


class FakeHypervisor:
    def __init__(self) -> None:
        self.stopped: list[str] = []

    @hookimpl
    def pvcore_plugin_info(self) -> PluginInfo:
        return PluginInfo(name="testhv", contract=CONTRACT_VERSION, hypervisor="testhv", primitives={"stream"})

    @hookimpl
    def pvcore_front_door(self, device, context):
        return RecordingDoor(device.config.name, self.stopped, fail=device.config.name == "bad")


@pytest.fixture
def registry() -> tuple[Registry, FakeHypervisor]:
    registry = Registry()
    for name in ("block", "net", "console", "rng"):
        registry.register(getattr(classes, name), name=name)
    plugin = FakeHypervisor()
    assert registry.register(plugin, name="testhv").error is None
    return registry, plugin


def test_a_door_that_fails_to_stop_does_not_keep_the_others_running(
    registry, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    registry, plugin = registry
    configs = parse_devices(["rng:name=first", "rng:name=bad", "rng:name=last"], registry.device_classes())
    daemon = Daemon(registry, "testhv", configs, run_dir=tmp_path / "run")

    async def scenario() -> None:
        await daemon.start()
        await daemon.stop()

    with caplog.at_level(logging.ERROR, logger="pvcore.daemon"):
        asyncio.run(scenario())
    assert sorted(plugin.stopped) == ["bad", "first", "last"]
    assert daemon.served == []
    assert "device bad: stopping its front door failed" in caplog.text


def test_a_log_that_cannot_be_reopened_is_reported_and_the_rest_reopen(
    registry, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    registry, _ = registry
    gone, kept = tmp_path / "gone", tmp_path / "kept"
    gone.mkdir()
    kept.mkdir()
    specs = [f"console:name=a,log={gone}/a.log", f"console:name=b,log={kept}/b.log"]
    daemon = Daemon(registry, "testhv", parse_devices(specs, registry.device_classes()), run_dir=tmp_path / "run")

    async def scenario() -> None:
        await daemon.start()
        (kept / "b.log").rename(kept / "b.log.1")
        (gone / "a.log").unlink()
        gone.rmdir()  # log rotation removed the directory
        daemon.reopen_logs()
        await daemon.stop()

    with caplog.at_level(logging.ERROR, logger="pvcore.daemon"):
        asyncio.run(scenario())
    assert "a.log" in caplog.text
    assert (kept / "b.log").exists(), "the second console's log was not reopened"


def test_two_adds_of_one_name_at_once_serve_one_device(registry, tmp_path: Path) -> None:
    """A second ``ctl add`` arriving while the first still starts its device is refused, not served twice."""
    from pvcore.control import ControlError

    registry, _ = registry
    daemon = Daemon(registry, "testhv", parse_devices(["rng:name=first"], registry.device_classes()),
                    run_dir=tmp_path / "run")
    twins = parse_devices(["rng:name=slow"], registry.device_classes()) * 2

    async def scenario() -> list[object]:
        await daemon.start()
        try:
            return await asyncio.gather(*(daemon.add_config(config) for config in twins), return_exceptions=True)
        finally:
            await daemon.stop()

    results = asyncio.run(scenario())
    assert sorted(map(type, results), key=str) == sorted([str, ControlError], key=str), results
    assert "two devices are named 'slow'" in str(next(r for r in results if isinstance(r, ControlError)))
