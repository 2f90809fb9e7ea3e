"""Device specifications: ``CLASS:key=value,...`` strings and TOML files.

This is the syntax users script against (``pvcore serve DEVICE...``)::

    block:path=disk.img,socket=/run/pvcore/vm1-vda.sock,readonly=on
    net:socket=/run/pvcore/vm1-net.sock,mac=52:54:00:00:00:01,switch=lan0

A literal comma inside a value is written ``,,`` (as QEMU does). Every class
accepts the common keys of :data:`COMMON_OPTIONS`; the rest come from the
class's own :class:`~pvcore.contract.OptionSpec` table and from the options
the plugin serving the device declares (``pvcore_device_options``, looked up
through :class:`PluginOptions`: the device's ``hypervisor=``, else the
daemon's). The same devices may be listed in a TOML file (``--config``)::

    hypervisor = "kvm"
    [[device]]
    class = "block"
    path = "disk.img"
    socket = "/run/pvcore/vm1-vda.sock"

Parsing is two steps, so that a daemon may choose its hypervisor (which the
config file can name) before the keys are checked: :func:`split_devices` and
:func:`read_config_file` give :class:`DeviceSpec` s, :func:`build_configs`
checks and parses them. :func:`parse_devices` does both for DEVICE strings.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs

from pvcore.contract import DeviceClass, DeviceConfig, OptionSpec


class ConfigError(Exception):
    """A device specification or config file is wrong; the message says how to fix it."""


COMMON_OPTIONS: Mapping[str, OptionSpec] = {
    "name": OptionSpec("unique name of the device within the daemon; default: derived from the socket or the class"),
    "socket": OptionSpec(
        "where the hypervisor reaches the device, for plugins that use a socket or FIFO; each plugin says what it names"
    ),
    "domain": OptionSpec("the guest the device belongs to; default: the part of the name before the first '-'"),
    "hypervisor": OptionSpec(
        "the plugin that serves this device when it is not the daemon's, so one daemon serves many hypervisors"
    ),
}
"""The keys every device class takes, whatever serves it. A plugin may declare
one of them again (``pvcore_device_options``) to give its own help, parser or
requirement for the devices it serves (e.g. lpar: ``socket=`` is required)."""


@attrs.frozen
class DeviceSpec:
    """One device as the user wrote it, before its keys are checked.

    ``raw`` maps each key to its value as written (strings, or TOML values);
    ``origin`` names the device in error messages; ``index`` counts the
    devices of its source (command line or file), for derived names.
    """

    device_class: str
    raw: Mapping[str, Any]
    origin: str
    index: int


@attrs.define
class PluginOptions:
    """The device options hypervisor plugins declare, for the devices of one daemon.

    ``declared(hypervisor)`` answers, by device class, the options the plugin
    serving ``hypervisor`` declares (:meth:`pvcore.registry.Registry.device_options`;
    ``LookupError`` when no plugin serves it). ``default`` is the hypervisor of
    a device without ``hypervisor=``: a name, or a function called once, when
    a device first needs it (so detection runs only if it must). Answers are
    cached.
    """

    declared: Callable[[str], Mapping[str, Mapping[str, OptionSpec]]]
    default: str | Callable[[], str]
    _answers: dict[str, Mapping[str, Mapping[str, OptionSpec]]] = attrs.field(factory=dict, init=False)

    def serving(self, named: str | None = None) -> str:
        """The hypervisor that serves a device whose ``hypervisor=`` is ``named`` (None: the default)."""
        if named:
            return named
        if callable(self.default):
            self.default = self.default()
        return self.default

    def for_device(self, device_class: str, named: str | None = None) -> tuple[str, Mapping[str, OptionSpec]]:
        """The serving hypervisor and the options its plugin declares for ``device_class``."""
        hypervisor = self.serving(named)
        if hypervisor not in self._answers:
            self._answers[hypervisor] = self.declared(hypervisor)
        return hypervisor, self._answers[hypervisor].get(device_class, {})


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
    options: PluginOptions | None = None,
) -> DeviceConfig:
    """Check raw options against the device's option table and parse them.

    The table is :data:`COMMON_OPTIONS`, the class's own options and, with
    ``options``, those the plugin serving the device declares for its class
    (without ``options``: none, so a plugin's keys are refused). A plugin may
    redeclare a common key (to make ``socket=`` required, say) but not one of
    the class's own: that is a :class:`ConfigError` naming both.
    """
    spec = classes.get(device_class)
    if spec is None:
        known = ", ".join(sorted(classes)) or "none (no device plugin loaded)"
        raise ConfigError(f"{origin}: unknown device class {device_class!r}; known classes: {known}")
    served, declared = "", {}
    if options is not None:
        named = raw.get("hypervisor")
        try:
            hypervisor, declared = options.for_device(device_class, str(named) if named else None)
        except LookupError as exc:
            raise ConfigError(f"{origin}: {exc}") from None
        served = f" when served by {hypervisor}"
        clash = sorted(set(declared) & set(spec.options))
        if clash:
            raise ConfigError(
                f"{origin}: the plugin serving {hypervisor} declares {', '.join(clash)} for {device_class}, which "
                f"the {device_class} class already defines; a plugin may redeclare only the common keys "
                f"({', '.join(sorted(COMMON_OPTIONS))})"
            )
    table = {**COMMON_OPTIONS, **spec.options, **declared}
    parsed: dict[str, Any] = {}
    for key, value in raw.items():
        option = table.get(key)
        if option is None:
            raise ConfigError(
                f"{origin}: {device_class} has no option {key!r}{served}; options: {', '.join(sorted(table))}"
            )
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


def build_configs(
    devices: Iterable[DeviceSpec], classes: Mapping[str, DeviceClass], options: PluginOptions | None = None
) -> list[DeviceConfig]:
    """:func:`build_config` for each of ``devices``, in order."""
    return [
        build_config(device.device_class, device.raw, classes, origin=device.origin, index=device.index, options=options)
        for device in devices
    ]


def _derive_name(device_class: str, socket: str | None, index: int) -> str:
    if socket:
        return Path(socket).stem
    return f"{device_class}{index}"


def _derive_domain(name: str) -> str:
    return name.split("-", 1)[0]


def split_devices(specs: Iterable[str]) -> list[DeviceSpec]:
    """Split command-line DEVICE arguments (syntax only; :func:`build_configs` checks the keys)."""
    devices = []
    for index, text in enumerate(specs):
        device_class, raw = split_spec(text)
        devices.append(DeviceSpec(device_class, raw, f"device {text!r}", index))
    return devices


def parse_devices(
    specs: Iterable[str], classes: Mapping[str, DeviceClass], options: PluginOptions | None = None
) -> list[DeviceConfig]:
    """Parse command-line DEVICE arguments; names must come out unique.

    Pass ``options`` (``registry.plugin_options(hypervisor)``) so that the keys
    the serving plugins declare (kvm's ``socket-mode=``, ``protocol=``...) are
    accepted and parsed; without it they are refused as unknown.
    """
    return check_unique(build_configs(split_devices(specs), classes, options))


def read_config_file(path: Path) -> tuple[dict[str, Any], list[DeviceSpec]]:
    """Read a TOML config: top-level settings, and the ``[[device]]`` tables (not yet checked)."""
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config {path}: no such file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config {path}: not valid TOML: {exc}") from None
    tables = data.pop("device", [])
    if not isinstance(tables, list):
        raise ConfigError(f"config {path}: 'device' must be an array of tables ([[device]])")
    devices = []
    for index, table in enumerate(tables):
        table = dict(table)
        device_class = table.pop("class", None)
        if not isinstance(device_class, str):
            raise ConfigError(f"config {path}: device #{index + 1} has no class = \"block|net|console|rng\"")
        devices.append(DeviceSpec(device_class, table, f"config {path} device #{index + 1}", index))
    return data, devices


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


def parse_choice(*choices: str, fix: str) -> Callable[[str], str]:
    """A parser for an option that takes one of ``choices`` (any case); anything else is a ``ValueError(fix)``."""

    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in choices:
            raise ValueError(fix)
        return value

    return parse


def parse_bool(text: str) -> bool:
    """``on/off``, ``yes/no``, ``true/false``, ``1/0`` (as QEMU accepts)."""
    value = text.strip().lower()
    if value in ("on", "yes", "true", "1"):
        return True
    if value in ("off", "no", "false", "0"):
        return False
    raise ValueError("expected on or off")

