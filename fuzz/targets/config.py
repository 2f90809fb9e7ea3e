"""The TOML config file and the DEVICE strings, through the real registry's device classes.

First byte even: the rest is lines of DEVICE arguments (``block:path=x,...``)
given to :func:`pvcore.config.parse_devices` with kvm's plugin options; odd:
the rest is a TOML file read by :func:`~pvcore.config.read_config_file`
whose devices go through :func:`~pvcore.config.build_configs`. Anything but
a :class:`~pvcore.config.ConfigError` (or a clean :class:`ValueError` subclass
that names the bad text) escaping is a finding.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from pvcore.config import ConfigError, build_configs, check_unique, parse_devices, read_config_file
from pvcore.registry import default_registry

_state: dict[str, object] = {}


def setup() -> None:
    """Load the registry (core classes and installed plugins) once."""
    registry = default_registry()
    _state["classes"] = registry.device_classes()
    _state["options"] = registry.plugin_options("kvm")
    _state["path"] = Path(tempfile.mkdtemp(prefix="pvcore-fuzz-config-")) / "pvcore.toml"


def one_input(data: bytes) -> None:
    """Parse one DEVICE list or TOML file."""
    if not data:
        return
    text = data[1:].decode("utf-8", "replace")
    classes, options = _state["classes"], _state["options"]
    try:
        if data[0] % 2 == 0:
            parse_devices([line for line in text.split("\n") if line], classes, options)
        else:
            path = _state["path"]
            path.write_text(text)
            _settings, specs = read_config_file(path)
            check_unique(build_configs(specs, classes, options))
    except ConfigError:
        pass


def seeds() -> dict[str, bytes]:
    """DEVICE lines and a config file as the docs and tests write them."""
    return {
        "devices": b"\0" + b"\n".join([
            b"block:path=/tmp/disk.img,readonly=on,serial=disk0",
            b"net:mac=52:54:00:12:34:56,switch=br0",
            b"console:name=con0,scrollback=64K",
            b"rng:rate=1024/1s",
            b"block:path=a,,b.img,cache=none,queues=2",
        ]),
        "toml": b"\1" + b"""run-dir = "/tmp/pvcore"
log-level = "info"

[[device]]
class = "block"
path = "/tmp/disk.img"
readonly = true

[[device]]
class = "net"
mac = "52:54:00:12:34:57"

[[device]]
class = "rng"
rate = "4096/1s"
""",
    }
