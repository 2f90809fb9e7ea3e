"""The conformance kit, a pytest plugin: ``pytest --pvcore-plugin=NAME`` checks one installed plugin.

Registered through the ``pytest11`` entry point ``pvcore`` of the pvcore
distribution, so installing pvcore is enough. Without ``--pvcore-plugin`` the
kit adds nothing to a test run. With it, the suite of
:mod:`pvcore.testing.conformance.suite` is added to the run: the plugin is
loaded from its ``pvcore.plugins`` entry point, beside the core's device
classes and every installed device-class plugin (so it may claim, say, the
scsi class), and checked — detect and probe
answer in the documented shapes; the memory and notification primitives work
(both directions, with suppression honoured on the ring); every device class
it claims serves requests end to end through its own transport; hostile
input fails one device, never the daemon.

Where the kit needs the hypervisor's side (a host where it is present, a
guest connected through its transport) it asks the plugin's
:class:`~pvcore.testing.conformance.ConformancePeer`: ``conformance_peer`` in
``pvcore_NAME.testing``, or the object ``--pvcore-peer MODULE:ATTRIBUTE`` names.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import itertools
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from xml.etree import ElementTree
from pathlib import Path
from typing import Any

import attrs
import pytest

from pvcore.config import build_config
from pvcore.contract import DeviceInstance, FrontDoor, PluginInfo
from pvcore.daemon import Daemon
from pvcore.devices import classes
from pvcore.registry import ENTRY_POINT_GROUP, PluginRecord, Registry
from pvcore.testing.conformance import ConformancePeer, KitContext, RingGuest
from pvcore.testing.conformance.guests import SECTOR, VIRTIO_GUESTS, stream_guest
from pvcore.testing.loopthread import LoopThread

SUITE = Path(__file__).resolve().with_name("conformance") / "suite.py"
"""The test module the kit adds to a run."""

IMAGE_SECTORS = 2048
"""Size of each disk image the kit serves (1 MiB)."""

CONNECT_TIMEOUT = 5.0
"""How long a front door may take to accept the guest the kit connected."""


def pytest_addoption(parser: pytest.Parser) -> None:
    """``--pvcore-plugin`` and ``--pvcore-peer``."""
    group = parser.getgroup("pvcore", "pvcore plugin conformance kit")
    group.addoption(
        "--pvcore-plugin", metavar="NAME", default=None,
        help=f"run the pvcore conformance suite on the installed plugin NAME (entry point group {ENTRY_POINT_GROUP})",
    )
    group.addoption(
        "--pvcore-peer", metavar="MODULE:ATTRIBUTE", default=None,
        help="the plugin's conformance peer (default: pvcore_NAME.testing:conformance_peer)",
    )


def pytest_load_initial_conftests(early_config: pytest.Config, parser: pytest.Parser, args: list[str]) -> None:
    """With ``--pvcore-plugin``, add the conformance suite to the paths to collect."""
    if getattr(early_config.known_args_namespace, "pvcore_plugin", None):
        args.append(str(SUITE))


def load_peer(plugin_name: str, spec: str | None) -> tuple[ConformancePeer | None, str]:
    """The peer ``spec`` (``MODULE:ATTRIBUTE``) names, else the conventional one; (None, why) when there is none."""
    module_name, _, attribute = (spec or f"pvcore_{plugin_name}.testing:conformance_peer").partition(":")
    attribute = attribute or "conformance_peer"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if spec is None and exc.name is not None and module_name.startswith(exc.name):
            return None, (
                f"plugin {plugin_name} has no conformance peer: write {module_name}.{attribute} "
                "(a pvcore.testing.conformance.ConformancePeer; docs/porting.md) or pass --pvcore-peer MODULE:ATTRIBUTE"
            )
        return None, f"conformance peer {module_name}: import failed: {exc}"
    peer = getattr(module, attribute, None)
    if not isinstance(peer, ConformancePeer):
        return None, f"{module_name}.{attribute} is {type(peer).__name__}, not a pvcore.testing.conformance.ConformancePeer"
    return peer, ""


def register_class_plugins(registry: Registry, plugin_name: str) -> None:
    """Register every installed device-class plugin (one that names no hypervisor) but ``plugin_name``.

    These are the classes a hypervisor plugin may claim besides the core's.
    One that does not load is left out: its own tests report it, and a
    plugin under test that claims its class fails as claiming an unknown one.
    """
    for found in sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name):
        if found.name == plugin_name or any(record.name == found.name for record in registry.records):
            continue
        try:
            plugin = found.load()
            info = plugin.pvcore_plugin_info()
        except Exception:  # a broken or foreign plugin is not the one under test
            continue
        if isinstance(info, PluginInfo) and not info.hypervisor and info.device_classes:
            registry.register(plugin, name=found.name, distribution=found.dist.metadata["Name"] if found.dist else "?")


def entry_point(plugin_name: str) -> importlib.metadata.EntryPoint | None:
    """The ``pvcore.plugins`` entry point called ``plugin_name``, if one is installed."""
    for candidate in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if candidate.name == plugin_name:
            return candidate
    return None


@attrs.define
class KitDevice:
    """One device the kit serves: its engine, front door, the guest connected to it, its files."""

    instance: DeviceInstance
    door: FrontDoor
    guest: Any
    ring: RingGuest | None
    image: Path | None = None
    mac: bytes = b""

    @property
    def device_class(self) -> str:
        """The device's class."""
        return self.instance.config.device_class


@attrs.define
class KitSession:
    """The plugin under test, its peer, a registry holding it and the installed device classes, and a loop."""

    plugin_name: str
    context: KitContext
    peer: ConformancePeer | None
    peer_problem: str
    registry: Registry
    record: PluginRecord
    _counter: Iterator[int] = attrs.field(factory=lambda: itertools.count(1))

    @property
    def info(self) -> PluginInfo:
        """The plugin's own description (fails the test when the plugin did not load)."""
        if self.record.info is None:
            pytest.fail(f"plugin {self.plugin_name} did not load: {self.record.error}")
        return self.record.info

    @property
    def hypervisor(self) -> str:
        """The hypervisor the plugin serves."""
        if not self.info.hypervisor:
            pytest.fail(f"plugin {self.plugin_name} names no hypervisor in its PluginInfo: it is not a hypervisor plugin")
        return self.info.hypervisor

    def hook(self, name: str) -> Any:
        """The plugin's own implementation of hook ``name`` (None if it has none)."""
        return getattr(self.record.plugin, name, None)

    def require_peer(self) -> ConformancePeer:
        """The peer, or a test failure saying how to write one."""
        if self.peer is None:
            pytest.fail(self.peer_problem)
        return self.peer

    def _class_options(self, device_class: str, name: str, number: int, switch: str) -> tuple[dict[str, str], Path | None, bytes]:
        directory = self.context.directory
        if device_class == "block":
            image = directory / f"{name}.img"
            image.write_bytes(b"".join(bytes([sector & 0xFF]) * SECTOR for sector in range(IMAGE_SECTORS)))
            return {"path": str(image)}, image, b""
        if device_class == "net":
            mac = bytes([0x52, 0x54, 0x00, 0x6B, number >> 8 & 0xFF, number & 0xFF])
            return {"mac": mac.hex(":"), "switch": switch}, None, mac
        if device_class == "console":
            return {"log": str(directory / f"{name}.log")}, None, b""
        return {}, None, b""

    def open_guest(self, instance: DeviceInstance, door: FrontDoor) -> tuple[Any, RingGuest | None]:
        """Connect a guest to a served device: through the peer, else through a core stream front door."""
        guest = self.peer.open_guest(instance, door) if self.peer is not None else None
        if guest is None:
            guest = stream_guest(door)
        if guest is None:
            problem = self.peer_problem or "the peer's open_guest returned None"
            pytest.fail(f"{instance.config.name}: nothing reaches the device served by {door.description}: {problem}")
        if isinstance(guest, RingGuest):
            return VIRTIO_GUESTS[instance.config.device_class](guest), guest
        return guest, None

    def wait_connected(self, door: FrontDoor) -> None:
        """Wait until a door that reports ``connected`` (the core's chardev and netdev doors) has taken its guest."""
        deadline = time.monotonic() + CONNECT_TIMEOUT
        while not getattr(door, "connected", True):
            if time.monotonic() > deadline:
                pytest.fail(f"{door.description}: the guest's connection was not taken within {CONNECT_TIMEOUT}s")
            time.sleep(0.01)

    @contextlib.contextmanager
    def serving(self, device_classes: Sequence[str]) -> Iterator[list[KitDevice]]:
        """A daemon serving one device of each of ``device_classes`` through the plugin, with a guest on each."""
        peer = self.require_peer()
        available = self.registry.device_classes()
        declared = self.registry.plugin_options(self.hypervisor)
        switch = f"kit-{next(self._counter)}"
        configs, files = [], []
        for index, device_class in enumerate(device_classes):
            number = next(self._counter)
            name = f"kit{number}-{device_class}"
            options, image, mac = self._class_options(device_class, name, number, switch)
            options.update(peer.device_options(device_class, name))
            configs.append(build_config(
                device_class, {"name": name, **options}, available, origin=name, index=index, options=declared
            ))
            files.append((image, mac))
        daemon = Daemon(self.registry, self.hypervisor, configs, run_dir=self.context.directory / "run")
        self.context.loop.run(daemon.start())
        served: list[KitDevice] = []
        try:
            for (instance, door), (image, mac) in zip(daemon.served, files, strict=True):
                guest, ring = self.open_guest(instance, door)
                served.append(KitDevice(instance, door, guest, ring, image, mac))
            for device in served:
                self.wait_connected(device.door)
            yield served
            assert len(daemon.served) == len(configs), "the daemon lost a device while serving"
        finally:
            for device in served:
                device.guest.close()
            self.context.loop.run(daemon.stop())


@pytest.fixture(scope="session")
def pvcore_kit(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KitSession]:
    """The plugin named by ``--pvcore-plugin``, loaded beside the installed device classes, and its peer started."""
    plugin_name = request.config.getoption("pvcore_plugin")
    if not plugin_name:
        pytest.skip("the conformance suite needs --pvcore-plugin=NAME")
    peer, problem = load_peer(plugin_name, request.config.getoption("pvcore_peer"))
    loop = LoopThread("pvcore-kit")
    context = KitContext(tmp_path_factory.mktemp(f"kit-{plugin_name}"), loop)
    try:
        if peer is not None:
            peer.start(context)
        registry = Registry()
        for builtin in (classes.block, classes.net, classes.console, classes.rng):
            registry.register(builtin, name=builtin.name)
        register_class_plugins(registry, plugin_name)
        plugin = peer.plugin() if peer is not None else None
        if plugin is not None:
            record = registry.register(plugin, name=plugin_name, distribution="(conformance peer)")
        else:
            found = entry_point(plugin_name)
            if found is None:
                record = PluginRecord(plugin_name, "?", "?", error=(
                    f"no entry point {plugin_name!r} in group {ENTRY_POINT_GROUP}: is the plugin installed (pip install -e .)?"
                ))
            else:
                registry.load_entry_points([found])
                record = registry.records[-1]
        yield KitSession(plugin_name, context, peer, problem, registry, record)
    finally:
        try:
            if peer is not None:
                peer.stop()
        finally:
            loop.close()


@attrs.frozen
class KitRun:
    """The outcome of one kit run in a subprocess: each test's outcome by name, and the output."""

    returncode: int
    outcomes: dict[str, str]
    output: str

    def failures(self) -> list[str]:
        """Names of the tests that failed or errored."""
        return sorted(name for name, outcome in self.outcomes.items() if outcome in ("failed", "error"))


def run_kit(
    plugin_name: str, directory: Path, *, peer: str | None = None, pythonpath: Sequence[Path] = (), timeout: float = 300
) -> KitRun:
    """Run ``pytest --pvcore-plugin=plugin_name`` in a subprocess (in ``directory``) and collect each test's outcome.

    This is how a plugin's own test suite runs the kit in CI. The kit is
    loaded with ``-p pvcore.testing.kit`` and other pytest plugins are not
    auto-loaded, so the run does not depend on what else is installed.
    ``pythonpath`` is prepended to ``PYTHONPATH`` (e.g. where the peer module lives).
    """
    report = directory / f"kit-{plugin_name}.xml"
    command = [sys.executable, "-m", "pytest", "-p", "pvcore.testing.kit", f"--pvcore-plugin={plugin_name}",
               "-p", "no:cacheprovider", "-q", "-rfEs", f"--junit-xml={report}", f"--rootdir={directory}"]
    if peer is not None:
        command.append(f"--pvcore-peer={peer}")
    environment = dict(os.environ, PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
    environment["PYTHONPATH"] = os.pathsep.join([*map(str, pythonpath), *filter(None, [environment.get("PYTHONPATH")])])
    done = subprocess.run(command, cwd=directory, env=environment, capture_output=True, text=True, timeout=timeout)
    outcomes: dict[str, str] = {}
    if report.exists():
        for case in ElementTree.parse(report).getroot().iter("testcase"):
            outcome = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
            outcomes[case.get("name", "?")] = {"failure": "failed"}.get(outcome, outcome)
    return KitRun(done.returncode, outcomes, done.stdout + done.stderr)
