"""DEVICE specifications (`CLASS:key=value,...`) and TOML config files."""

from __future__ import annotations

from pathlib import Path

import pytest

from pvcore.config import ConfigError, load_config_file, parse_bool, parse_devices, split_spec
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
    settings, configs = load_config_file(path, CLASSES)
    assert settings == {"hypervisor": "kvm"}
    assert configs[0].device_class == "block" and configs[0].get("readonly") is True
    path.write_text("[[device]]\npath = 'x'\n")
    with pytest.raises(ConfigError, match="has no class"):
        load_config_file(path, CLASSES)
    path.write_text("device = [")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config_file(path, CLASSES)
    with pytest.raises(ConfigError, match="no such file"):
        load_config_file(tmp_path / "missing.toml", CLASSES)
