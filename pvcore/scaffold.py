'''``pvcore new-plugin NAME``: write the skeleton of a hypervisor plugin that installs, registers and runs the kit.

The skeleton is a distribution ``pvcore-NAME`` with package ``pvcore_NAME``:
its entry point registers the plugin; its front door already serves the four
device classes through the core's stream front doors (chardev, FIFO,
netdev stream, NBD), so the conformance kit's device tests pass from the
start. Detect and probe — what only the author knows about the hypervisor —
raise ``NotImplementedError`` naming the step of docs/porting.md to follow,
and the conformance peer does not yet say how to fake a host, so ``pytest
--pvcore-plugin=NAME`` fails exactly there until the port is done.
'''

from __future__ import annotations

import keyword
import re
from pathlib import Path

NAME_PATTERN = re.compile(r"[a-z][a-z0-9_]{0,30}")
RESERVED = frozenset({"block", "net", "console", "rng", "kvm", "xen", "lpar"})
"""Names already taken by the core's device classes and the in-tree plugins."""


class ScaffoldError(Exception):
    """The skeleton cannot be written; the message says why and what to do."""


PYPROJECT = """\
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "pvcore-{name}"
version = "0.1.0"
description = "pvcore plugin for {name}"
requires-python = ">=3.11"
dependencies = ["pvcore>=0.1.0"]

[project.entry-points."pvcore.plugins"]
{name} = "pvcore_{name}.plugin"

[tool.setuptools.packages.find]
include = ["pvcore_{name}*"]
"""

INIT = '''\
"""pvcore-{name}: the pvcore plugin for {name} (hooks in :mod:`pvcore_{name}.plugin`)."""

HYPERVISOR = "{name}"
"""The name users pass to ``pvcore serve --hypervisor``."""
'''

PLUGIN = '''\
"""The {name} plugin's hooks (entry point ``pvcore.plugins: {name}``); see docs/porting.md."""

from __future__ import annotations

from pvcore.contract import (CONTRACT_VERSION, DaemonContext, Detection, DeviceInstance, DeviceSlot, FrontDoor,
                             HostContext, PluginInfo)
from pvcore.hookspecs import hookimpl
from pvcore.streams.chardev import ChardevFrontDoor
from pvcore.streams.fifo import RngFifoFrontDoor
from pvcore.streams.nbd import NbdFrontDoor
from pvcore.streams.netdev_stream import NetdevStreamFrontDoor
from pvcore_{name} import HYPERVISOR

DEVICE_CLASSES = ("block", "net", "console", "rng")


@hookimpl
def pvcore_plugin_info() -> PluginInfo:
    """The {name} plugin."""
    return PluginInfo(name="{name}", contract=CONTRACT_VERSION, hypervisor=HYPERVISOR,
                      primitives={{"detect", "probe", "stream"}}, device_classes=set(DEVICE_CLASSES))


@hookimpl
def pvcore_detect(host: HostContext) -> Detection | None:
    """Is {name} here? Look only under host.root (host.path(...)) and at host.libvirt."""
    raise NotImplementedError("pvcore-{name}: pvcore_detect is not written yet (docs/porting.md, step 4: detect)")


@hookimpl
def pvcore_probe(host: HostContext) -> list[DeviceSlot]:
    """The devices on host that want a backend."""
    raise NotImplementedError("pvcore-{name}: pvcore_probe is not written yet (docs/porting.md, step 5: probe)")


@hookimpl
def pvcore_front_door(device: DeviceInstance, context: DaemonContext) -> FrontDoor:
    """Each class through the core's stream front door at socket= (docs/porting.md, steps 7 and 8 for a ring transport)."""
    config = device.config
    path = config.get("socket") or context.run_dir / f"{{config.name}}.sock"
    if config.device_class == "console":
        return ChardevFrontDoor(device.engine, path)
    if config.device_class == "rng":
        return RngFifoFrontDoor(device.engine, path)
    if config.device_class == "block":
        return NbdFrontDoor(device.engine, path)
    if config.device_class == "net":
        endpoint = device.engine
        return NetdevStreamFrontDoor(endpoint.switch, path, endpoint.mac, name=config.name, throttle=endpoint.throttle)
    raise ValueError(f"{{config.name}}: {name} serves {{', '.join(DEVICE_CLASSES)}}, not {{config.device_class}}")
'''

TESTING = '''\
"""The {name} conformance peer: what the kit (pytest --pvcore-plugin={name}) needs from {name}."""

from __future__ import annotations

from pvcore.testing.conformance import ConformancePeer


class Peer(ConformancePeer):
    """Override present_host and probe_host (docs/porting.md, steps 4 and 5); open_guest for a ring transport."""

    def device_options(self, device_class: str, name: str) -> dict[str, str]:
        """Each device's front door listens in the kit's directory."""
        return {{"socket": str(self.directory / f"{{name}}-{{device_class}}.sock")}}


conformance_peer = Peer()
'''

README = """\
# pvcore-{name}

The pvcore plugin for {name}, from `pvcore new-plugin {name}`.

    pip install -e .                   # registers the plugin (pvcore plugins lists it)
    pytest --pvcore-plugin={name}      # the conformance kit: fails where work is left

Follow docs/porting.md of pvcore: write detect and probe in
`pvcore_{name}/plugin.py` and teach the peer in `pvcore_{name}/testing.py` to
fake a host; add memory, notification and a ring transport if {name} shares
rings with its guests.
"""


def check_name(name: str) -> str:
    """``name`` if it can name a plugin, its package and its hypervisor; else :class:`ScaffoldError`."""
    if not NAME_PATTERN.fullmatch(name) or keyword.iskeyword(name):
        raise ScaffoldError(f"plugin name {name!r}: use lower-case letters, digits and _ (starting with a letter)")
    if name in RESERVED:
        raise ScaffoldError(f"plugin name {name!r} is taken by pvcore itself; choose another")
    return name


def new_plugin(name: str, directory: Path) -> Path:
    """Write the skeleton of plugin ``name`` as ``directory/pvcore-NAME``; return that path."""
    check_name(name)
    root = directory / f"pvcore-{name}"
    if root.exists():
        raise ScaffoldError(f"{root} exists already; remove it or choose another --directory")
    files = {
        "pyproject.toml": PYPROJECT,
        "README.md": README,
        f"pvcore_{name}/__init__.py": INIT,
        f"pvcore_{name}/plugin.py": PLUGIN,
        f"pvcore_{name}/testing.py": TESTING,
    }
    for relative, template in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(template.format(name=name))
    return root


def next_steps(root: Path, name: str) -> str:
    """What to run after :func:`new_plugin`."""
    return (
        f"wrote {root}\n"
        f"next: pip install -e {root}    # then `pvcore plugins` lists {name}\n"
        f"      pytest --pvcore-plugin={name}    # the conformance kit; see docs/porting.md\n"
    )
