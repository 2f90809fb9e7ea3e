"""DEVICE specifications (`CLASS:key=value,...`) and TOML config files."""

from __future__ import annotations

from pathlib import Path

import pytest

from pvcore.config import (
    ConfigError,
    PluginOptions,
    build_configs,
    parse_bool,
    parse_choice,
    parse_devices,
    read_config_file,
    split_spec,
)
from pvcore.contract import DeviceClass, OptionSpec

CLASSES = {
    "block": DeviceClass(
        "block",
        "a disk",
        {"path": OptionSpec("image", required=True), "readonly": OptionSpec("read-only", parse=parse_bool, default=False)},
        lambda config, context: None,
    ),
    "rng": DeviceClass("rng", "entropy", {"rate": OptionSpec("rate")}, lambda config, context: None),
}


def test_split_spec_and_escaped_comma() -> None:
    assert split_spec("block:path=a,,b.img,readonly=on") == ("block", {"path": "a,b.img", "readonly": "on"})
    assert split_spec("rng") == ("rng", {})


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "expected CLASS:key=value"),
        ("block:path", "is not key=value"),
        ("block:path=a,path=b", "given twice"),
        ("disk:path=a", "unknown device class 'disk'; known classes: block, rng"),
        ("block:size=3", "block has no option 'size'"),
        ("block:readonly=maybe", "readonly=maybe: expected on or off"),
        ("block:socket=/s", "block needs path="),
    ],
)
def test_bad_specs_name_the_fix(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_devices([text], CLASSES)


def test_names_and_domains_are_derived_and_unique() -> None:
    configs = parse_devices(["block:path=a.img,socket=/run/x/vm1-vda.sock", "rng:socket=/run/x/vm1-rng.sock"], CLASSES)
    assert [c.name for c in configs] == ["vm1-vda", "vm1-rng"]
    assert configs[0].get("domain") == "vm1" and configs[0].get("readonly") is False
    with pytest.raises(ConfigError, match="two devices use socket"):
        parse_devices(["block:path=a,socket=/s,name=a", "rng:socket=/s"], CLASSES)
    with pytest.raises(ConfigError, match="two devices are named"):
        parse_devices(["rng:name=x", "rng:name=x"], CLASSES)


def test_toml_config(tmp_path: Path) -> None:
    path = tmp_path / "pvcore.toml"
    path.write_text('hypervisor = "kvm"\n[[device]]\nclass = "block"\npath = "d.img"\nreadonly = true\n')
    settings, devices = read_config_file(path)
    assert settings == {"hypervisor": "kvm"}
    configs = build_configs(devices, CLASSES)
    assert configs[0].device_class == "block" and configs[0].get("readonly") is True
    path.write_text("[[device]]\npath = 'x'\n")
    with pytest.raises(ConfigError, match="has no class"):
        read_config_file(path)
    path.write_text("device = [")
    with pytest.raises(ConfigError, match="not valid TOML"):
        read_config_file(path)
    with pytest.raises(ConfigError, match="no such file"):
        read_config_file(tmp_path / "missing.toml")


def test_parse_choice_takes_one_of_its_values_in_any_case() -> None:
    parse = parse_choice("server", "client", fix="expected server or client")
    assert parse(" Client") == "client"
    with pytest.raises(ValueError, match="^expected server or client$"):
        parse("listen")


PLUGINS = {
    "ringhv": {
        "rng": {"socket-mode": OptionSpec("who listens", parse=parse_choice("server", "client", fix="expected server or client"))}
    },
    "streamhv": {"rng": {"socket": OptionSpec("the FIFO", required=True)}},
    "greedyhv": {"rng": {"rate": OptionSpec("a rate of its own")}},
}


def _declared(hypervisor: str) -> dict:
    if hypervisor not in PLUGINS:
        raise LookupError(f"no plugin serves hypervisor {hypervisor!r} (available: ringhv, streamhv)")
    return PLUGINS[hypervisor]


def test_a_plugins_keys_are_accepted_only_for_the_devices_it_serves() -> None:
    (config,) = parse_devices(["rng:socket-mode=client"], CLASSES, PluginOptions(_declared, "ringhv"))
    assert config.get("socket-mode") == "client"
    with pytest.raises(ConfigError, match="rng has no option 'socket-mode' when served by streamhv; options: domain, hypervisor, name, rate, socket$"):
        parse_devices(["rng:socket=/f,socket-mode=client"], CLASSES, PluginOptions(_declared, "streamhv"))
    # hypervisor= picks the plugin whose keys a device takes, whatever the daemon's default
    (config,) = parse_devices(["rng:socket-mode=client,hypervisor=ringhv"], CLASSES, PluginOptions(_declared, "streamhv"))
    assert config.get("socket-mode") == "client"
    with pytest.raises(ConfigError, match="rng has no option 'socket-mode'; options"):
        parse_devices(["rng:socket-mode=client"], CLASSES)
    # a plugin may make a common key required for its devices
    with pytest.raises(ConfigError, match=r"rng needs socket= \(the FIFO\)"):
        parse_devices(["rng:rate=1/1s"], CLASSES, PluginOptions(_declared, "streamhv"))
    with pytest.raises(ConfigError, match="socket-mode=listen: expected server or client"):
        parse_devices(["rng:socket-mode=listen"], CLASSES, PluginOptions(_declared, "ringhv"))
    with pytest.raises(ConfigError, match="no plugin serves hypervisor 'nosuch'"):
        parse_devices(["rng:hypervisor=nosuch"], CLASSES, PluginOptions(_declared, "ringhv"))


def test_a_plugin_cannot_redefine_a_classs_own_key() -> None:
    with pytest.raises(ConfigError, match="the plugin serving greedyhv declares rate for rng, which the rng class already"):
        parse_devices(["rng:socket=/s"], CLASSES, PluginOptions(_declared, "greedyhv"))


def test_the_default_hypervisor_is_chosen_only_when_a_device_needs_it() -> None:
    chosen: list[str] = []

    def detect() -> str:
        chosen.append("ringhv")
        return "ringhv"

    options = PluginOptions(_declared, detect)
    assert parse_devices([], CLASSES, options) == [] and chosen == []
    with pytest.raises(ConfigError, match="unknown device class"):
        parse_devices(["disk:path=x"], CLASSES, options)
    assert chosen == []
    parse_devices(["rng:socket-mode=server", "rng:name=b,socket-mode=client"], CLASSES, options)
    assert chosen == ["ringhv"] and options.serving() == "ringhv"
