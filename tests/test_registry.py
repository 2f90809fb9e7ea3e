"""The plugin registry: entry-point loading, validation, and `pvcore plugins`."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pvcore.contract import CONTRACT_VERSION, ContractError, DeviceClass, Detection, HostContext, OptionSpec, PluginInfo
from pvcore.hookspecs import hookimpl
from pvcore.registry import Registry

GOOD = f"""
from pvcore.contract import PluginInfo, Detection
from pvcore.hookspecs import hookimpl

@hookimpl
def pvcore_plugin_info():
    return PluginInfo(name="goodhv", contract={CONTRACT_VERSION}, hypervisor="goodhv",
                      primitives={{"detect", "probe"}}, device_classes={{"block"}})

@hookimpl
def pvcore_detect(host):
    return Detection("goodhv", 10, "always here")
"""

BROKEN_IMPORT = "raise RuntimeError('this plugin cannot be imported')\n"

UNKNOWN_HOOK = f"""
from pvcore.contract import PluginInfo
from pvcore.hookspecs import hookimpl

@hookimpl
def pvcore_plugin_info():
    return PluginInfo(name="typo", contract={CONTRACT_VERSION})

@hookimpl
def pvcore_detekt(host):
    return None
"""

WRONG_ARGS = f"""
from pvcore.contract import PluginInfo
from pvcore.hookspecs import hookimpl

@hookimpl
def pvcore_plugin_info():
    return PluginInfo(name="wrongargs", contract={CONTRACT_VERSION})

@hookimpl
def pvcore_detect(host, flavour):
    return None
"""

OLD_CONTRACT = """
from pvcore.contract import PluginInfo
from pvcore.hookspecs import hookimpl

@hookimpl
def pvcore_plugin_info():
    return PluginInfo(name="old", contract=999)
"""

CONTRACT_ONE = """
from pvcore.contract import PluginInfo
from pvcore.hookspecs import hookimpl

@hookimpl
def pvcore_plugin_info():
    return PluginInfo(name="firsthv", contract=1, hypervisor="firsthv", primitives={"probe"})

@hookimpl
def pvcore_probe(hypervisor, host):
    return [] if hypervisor == "firsthv" else None
"""

PLUGINS = {
    "goodhv": ("pvcore-goodhv", GOOD),
    "brokenimport": ("pvcore-brokenimport", BROKEN_IMPORT),
    "typo": ("pvcore-typo", UNKNOWN_HOOK),
    "wrongargs": ("pvcore-wrongargs", WRONG_ARGS),
    "old": ("pvcore-old", OLD_CONTRACT),
    "firsthv": ("pvcore-firsthv", CONTRACT_ONE),
}


def make_site(root: Path) -> Path:
    """Installed-looking distributions (dist-info + module) for each test plugin."""
    for name, (dist, source) in PLUGINS.items():
        module = f"fake_{name}"
        (root / f"{module}.py").write_text(textwrap.dedent(source))
        info = root / f"{dist.replace('-', '_')}-1.2.3.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.2.3\n")
        (info / "entry_points.txt").write_text(f"[pvcore.plugins]\n{name} = {module}\n")
    return root


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = make_site(tmp_path)
    monkeypatch.syspath_prepend(str(root))
    return root


def test_broken_plugins_are_reported_and_do_not_stop_the_others(site: Path) -> None:
    registry = Registry()
    registry.load_entry_points()
    records = {r.name: r for r in registry.records}
    assert records["goodhv"].error is None
    assert records["goodhv"].distribution == "pvcore-goodhv"
    assert records["goodhv"].version == "1.2.3"
    assert "import failed" in records["brokenimport"].error and "cannot be imported" in records["brokenimport"].error
    assert records["brokenimport"].distribution == "pvcore-brokenimport"
    assert "unknown hook" in records["typo"].error and "pvcore_detekt" in records["typo"].error
    assert "invalid hook implementation" in records["wrongargs"].error and "flavour" in records["wrongargs"].error
    assert "contract 999" in records["old"].error
    first = records["firsthv"].error
    assert "written for contract 1" in first and "lost their hypervisor argument" in first, first
    # the built-in device classes and the good plugin still work
    assert {"block", "net", "console", "rng"} <= set(registry.device_classes())
    assert any(
        d.hypervisor == "goodhv" for d in registry.detect(HostContext())
    )
    assert registry.pm.get_plugin("typo") is None and registry.pm.get_plugin("wrongargs") is None


def test_pvcore_plugins_command_lists_state(site: Path) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run(
        [sys.executable, "-m", "pvcore.cli", "plugins"], capture_output=True, text=True, env=env, timeout=60
    )
    out = done.stdout
    assert done.returncode == 1, out  # some plugins are broken
    assert "goodhv 1.2.3 (pvcore-goodhv): ok" in out
    assert "hypervisor: goodhv" in out
    assert "primitives: detect, probe" in out
    assert "brokenimport 1.2.3 (pvcore-brokenimport): broken: import failed" in out
    assert "typo 1.2.3 (pvcore-typo): broken: implements unknown hook(s): pvcore_detekt" in out
    assert "wrongargs 1.2.3 (pvcore-wrongargs): broken: invalid hook implementation" in out
    for builtin in ("block", "net", "console", "rng"):
        assert f"\n{builtin} " in "\n" + out
    assert "Traceback" not in done.stderr


def test_explicit_registration_and_duplicates() -> None:
    class Plugin:
        @hookimpl
        def pvcore_plugin_info(self) -> PluginInfo:
            return PluginInfo(name="x", contract=CONTRACT_VERSION, hypervisor="x")

        @hookimpl
        def pvcore_detect(self, host: HostContext) -> Detection:
            raise RuntimeError("detect exploded")

    registry = Registry()
    assert registry.register(Plugin(), name="x").error is None
    assert "already registered" in (registry.register(Plugin(), name="x").error or "")
    assert registry.detect(HostContext()) == []  # its exception is contained
    assert list(registry.hypervisors()) == ["x"]


def test_missing_plugin_info_and_bad_answer() -> None:
    class NoInfo:
        @hookimpl
        def pvcore_detect(self, host: HostContext) -> None:
            return None

    class BadInfo:
        @hookimpl
        def pvcore_plugin_info(self) -> str:
            return "kvm"

    registry = Registry()
    assert "does not implement pvcore_plugin_info" in (registry.register(NoInfo(), name="a").error or "")
    assert "not PluginInfo" in (registry.register(BadInfo(), name="b").error or "")
    assert registry.pm.get_plugin("b") is None


def test_duplicate_device_class_is_an_error() -> None:
    def make(name: str) -> object:
        class Plugin:
            @hookimpl
            def pvcore_plugin_info(self) -> PluginInfo:
                return PluginInfo(name=name, contract=CONTRACT_VERSION, device_classes={"disk"})

            @hookimpl
            def pvcore_device_classes(self) -> list[DeviceClass]:
                return [DeviceClass("disk", "a disk", {}, lambda config, context: None)]

        return Plugin()

    registry = Registry()
    registry.register(make("one"), name="one")
    registry.register(make("two"), name="two")
    with pytest.raises(Exception, match="offered by both one and two"):
        registry.device_classes()


def test_device_options_are_the_serving_plugins_and_must_be_option_specs() -> None:
    def make(name: str, answer: object) -> object:
        class Plugin:
            @hookimpl
            def pvcore_plugin_info(self) -> PluginInfo:
                return PluginInfo(name=name, contract=CONTRACT_VERSION, hypervisor=name)

            @hookimpl
            def pvcore_device_options(self) -> object:
                return answer

        return Plugin()

    registry = Registry()
    registry.register(make("good", {"rng": {"speed": OptionSpec("how fast")}}), name="good")
    registry.register(make("bare", None), name="bare")
    registry.register(make("bad", {"rng": {"speed": "how fast"}}), name="bad")
    assert registry.device_options("good") == {"rng": {"speed": OptionSpec("how fast")}}
    assert registry.device_options("bare") == {}
    with pytest.raises(ContractError, match=r"plugin bad: pvcore_device_options\['rng'\] must map option names to OptionSpec"):
        registry.device_options("bad")
    options = registry.plugin_options("bare")
    assert options.for_device("rng") == ("bare", {})
    assert options.for_device("rng", "good") == ("good", {"speed": OptionSpec("how fast")})


class RecordingHypervisor:
    """A hypervisor plugin that records every hypervisor hook call it gets."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.calls: list[str] = []

    @hookimpl
    def pvcore_plugin_info(self) -> PluginInfo:
        return PluginInfo(name=self.name, contract=CONTRACT_VERSION, hypervisor=self.name, primitives={"probe", "stream"})

    @hookimpl
    def pvcore_probe(self, host):
        self.calls.append("probe")
        return [self.name]

    @hookimpl
    def pvcore_front_door(self, device, context):
        self.calls.append("front_door")
        return self.name


def test_hypervisor_hooks_reach_the_named_plugin_only() -> None:
    registry = Registry()
    first, second = RecordingHypervisor("firsthv"), RecordingHypervisor("secondhv")
    assert registry.register(first, name="firsthv").error is None
    assert registry.register(second, name="secondhv").error is None
    assert registry.call("firsthv", "pvcore_probe", host=HostContext()) == ["firsthv"]
    assert registry.call("secondhv", "pvcore_front_door", device=None, context=None) == "secondhv"
    assert first.calls == ["probe"] and second.calls == ["front_door"]
    with pytest.raises(LookupError, match="no plugin serves hypervisor 'thirdhv'"):
        registry.call("thirdhv", "pvcore_probe", host=HostContext())
    duplicate = registry.register(RecordingHypervisor("firsthv"), name="other")
    assert "already served by plugin firsthv" in duplicate.error
