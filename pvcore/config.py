"""Device specifications: ``CLASS:key=value,...`` strings and TOML files.

This is the syntax users script against (``pvcore serve DEVICE...``)::

    block:path=disk.img,socket=/run/pvcore/vm1-vda.sock,readonly=on
    net:socket=/run/pvcore/vm1-net.sock,mac=52:54:00:00:00:01,switch=lan0

A literal comma inside a value is written ``,,`` (as QEMU does). Every class
accepts the common keys of :data:`COMMON_OPTIONS`; the rest come from the
class's own :class:`~pvcore.contract.OptionSpec` table. The same devices may be
listed in a TOML file (``--config``)::

    hypervisor = "kvm"
    [[device]]
    class = "block"
    path = "disk.img"
    socket = "/run/pvcore/vm1-vda.sock"
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pvcore.contract import DeviceClass, DeviceConfig, OptionSpec


class ConfigError(Exception):
    """A device specification or config file is wrong; the message says how to fix it."""


COMMON_OPTIONS: Mapping[str, OptionSpec] = {
    "name": OptionSpec("unique name of the device within the daemon (default: derived from the socket or class)"),
    "socket": OptionSpec("Unix socket the guest's hypervisor connects to (for an lpar rng: the FIFO QEMU reads)"),
    "socket-mode": OptionSpec(
        "server (pvcore listens, the hypervisor connects; default) or client (the hypervisor listens)"
    ),
    "protocol": OptionSpec("front door where the hypervisor offers several (kvm rng: vhost-user, the default, or egd)"),
    "hypervisor": OptionSpec("serve this device through another hypervisor plugin than --hypervisor (one daemon, many hypervisors)"),
    "domain": OptionSpec("name of the guest the device belongs to (default: derived from the socket name)"),
}


def split_spec(text: str) -> tuple[str, dict[str, str]]:
    """Split ``CLASS:key=value,...`` into the class and its raw options."""
    device_class, sep, rest = text.partition(":")
    device_class = device_class.strip()
    if not device_class or not device_class.replace("-", "").replace("_", "").isalnum():
        raise ConfigError(f"device {text!r}: expected CLASS:key=value,... (e.g. block:path=disk.img)")
    options: dict[str, str] = {}
    if not sep or not rest:
        return device_class, options
    for item in rest.replace(",,", "\0").split(","):
        item = item.replace("\0", ",")
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ConfigError(f"device {text!r}: {item!r} is not key=value")
        if key in options:
            raise ConfigError(f"device {text!r}: key {key!r} given twice")
        options[key] = value
    return device_class, options


def build_config(
    device_class: str,
    raw: Mapping[str, Any],
    classes: Mapping[str, DeviceClass],
    *,
    origin: str,
    index: int,
) -> DeviceConfig:
    """Check raw options against the class's option table and parse them."""
    spec = classes.get(device_class)
    if spec is None:
        known = ", ".join(sorted(classes)) or "none (no device plugin loaded)"
        raise ConfigError(f"{origin}: unknown device class {device_class!r}; known classes: {known}")
    table = {**COMMON_OPTIONS, **spec.options}
    parsed: dict[str, Any] = {}
    for key, value in raw.items():
        option = table.get(key)
        if option is None:
            raise ConfigError(f"{origin}: {device_class} has no option {key!r}; options: {', '.join(sorted(table))}")
        try:
            parsed[key] = option.parse(str(value)) if not isinstance(value, bool) else option.parse("on" if value else "off")
        except ValueError as exc:
            raise ConfigError(f"{origin}: {key}={value}: {exc}") from None
    for key, option in table.items():
        if key not in parsed:
            if option.required:
                raise ConfigError(f"{origin}: {device_class} needs {key}= ({option.help})")
            if option.default is not None:
                parsed[key] = option.default
    name = parsed.get("name") or _derive_name(device_class, parsed.get("socket"), index)
    if parsed.get("domain") is None:
        parsed["domain"] = _derive_domain(name)
    return DeviceConfig(device_class, name, parsed)


def _derive_name(device_class: str, socket: str | None, index: int) -> str:
    if socket:
        return Path(socket).stem
    return f"{device_class}{index}"


def _derive_domain(name: str) -> str:
    return name.split("-", 1)[0]


def parse_devices(specs: Iterable[str], classes: Mapping[str, DeviceClass]) -> list[DeviceConfig]:
    """Parse command-line DEVICE arguments; names must come out unique."""
    configs = []
    for index, text in enumerate(specs):
        device_class, raw = split_spec(text)
        configs.append(build_config(device_class, raw, classes, origin=f"device {text!r}", index=index))
    return check_unique(configs)


def load_config_file(path: Path, classes: Mapping[str, DeviceClass]) -> tuple[dict[str, Any], list[DeviceConfig]]:
    """Read a TOML config: top-level settings, and the ``[[device]]`` tables."""
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config {path}: no such file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config {path}: not valid TOML: {exc}") from None
    devices = data.pop("device", [])
    if not isinstance(devices, list):
        raise ConfigError(f"config {path}: 'device' must be an array of tables ([[device]])")
    configs = []
    for index, table in enumerate(devices):
        table = dict(table)
        device_class = table.pop("class", None)
        if not isinstance(device_class, str):
            raise ConfigError(f"config {path}: device #{index + 1} has no class = \"block|net|console|rng\"")
        configs.append(build_config(device_class, table, classes, origin=f"config {path} device #{index + 1}", index=index))
    return data, configs


def check_unique(configs: list[DeviceConfig]) -> list[DeviceConfig]:
    """Refuse two devices with one name or one socket."""
    seen_names: set[str] = set()
    seen_sockets: set[str] = set()
    for config in configs:
        if config.name in seen_names:
            raise ConfigError(f"two devices are named {config.name!r}: give one of them name=")
        seen_names.add(config.name)
        socket = config.get("socket")
        if socket:
            if socket in seen_sockets:
                raise ConfigError(f"two devices use socket {socket}")
            seen_sockets.add(socket)
    return configs


def parse_bool(text: str) -> bool:
    """``on/off``, ``yes/no``, ``true/false``, ``1/0`` (as QEMU accepts)."""
    value = text.strip().lower()
    if value in ("on", "yes", "true", "1"):
        return True
    if value in ("off", "no", "false", "0"):
        return False
    raise ValueError("expected on or off")

