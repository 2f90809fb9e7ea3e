"""The core's four device classes, registered as plugins like any third party's.

Each of :data:`block`, :data:`net`, :data:`console` and :data:`rng` is a plugin
object named by an entry point in the ``pvcore.plugins`` group (see
pyproject.toml). It answers ``pvcore_plugin_info`` and
``pvcore_device_classes``; the class's factory builds a :class:`ServedDevice`
holding the ring form of the device (``virtio``) and its transport-independent
engine (``engine``), which is what stream front doors use.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import attrs

from pvcore.contract import CONTRACT_VERSION, DaemonContext, DeviceClass, DeviceConfig, OptionSpec, PluginInfo
from pvcore.hookspecs import hookimpl


async def _nothing() -> None:
    return None


@attrs.define(eq=False)
class ServedDevice:
    """A built device: its config, ring device, engine, and how to start and close it."""

    config: DeviceConfig
    virtio: Any
    engine: Any
    starter: Callable[[], Awaitable[None]] = _nothing
    closer: Callable[[], Awaitable[None]] = _nothing

    async def start(self) -> None:
        """Start what the engine needs besides its front door (e.g. a console's attach point)."""
        await self.starter()

    async def close(self) -> None:
        """Finish in-flight work, flush and release the engine."""
        await self.closer()


def _engine_options(config: DeviceConfig, table: Mapping[str, str]) -> dict[str, str]:
    return {key: str(value) for key, value in config.options.items() if key in table and value is not None}


def _option_table(table: Mapping[str, str]) -> dict[str, OptionSpec]:
    return {key: OptionSpec(help) for key, help in table.items()}


def _create_block(config: DeviceConfig, context: DaemonContext) -> ServedDevice:
    from pvcore.devices.block import OPTIONS, create_block_device

    backend, virtio = create_block_device(_engine_options(config, OPTIONS), name=config.name)

    async def close() -> None:
        await context.loop.run_in_executor(None, backend.close)

    return ServedDevice(config, virtio, backend, closer=close)


@attrs.define(eq=False)
class NetServedDevice:
    """A NIC: its engine is a :class:`~pvcore.devices.net.NetEndpoint`; the virtio
    device (and with it a switch port) exists only once a ring front door asks
    for it, so a stream front door can take the same MAC instead."""

    config: DeviceConfig
    engine: Any
    _virtio: Any = None
    uplink: Any = None
    """The :class:`~pvcore.devices.net.tap.TapPort` the NIC's ``uplink=`` holds while it is served."""

    @property
    def virtio(self) -> Any:
        """The :class:`~pvcore.devices.net.VirtioNet`, built on first use."""
        if self._virtio is None:
            self._virtio = self.engine.virtio_device()
        return self._virtio

    async def start(self) -> None:
        """Attach the switch's tap uplink if the NIC names one; the front door attaches the NIC's own port."""
        if self.engine.uplink is not None:
            from pvcore.devices.net.tap import tap_uplinks

            self.uplink = tap_uplinks.acquire(self.engine.switch, self.engine.uplink, asyncio.get_running_loop())

    async def close(self) -> None:
        """Take the NIC's port off the switch, if a ring front door made one, and let go of its uplink."""
        if self._virtio is not None:
            self._virtio.close()
        if self.uplink is not None:
            from pvcore.devices.net.tap import tap_uplinks

            tap_uplinks.release(self.uplink)
            self.uplink = None


def _create_net(config: DeviceConfig, context: DaemonContext) -> ServedDevice:
    from pvcore.devices.net import parse_net_options

    endpoint = parse_net_options(_engine_options(config, NET_OPTIONS), name=config.name)
    return NetServedDevice(config, endpoint)


def _create_console(config: DeviceConfig, context: DaemonContext) -> ServedDevice:
    from pvcore.devices.console import OPTIONS, create_console_device

    virtio = create_console_device(_engine_options(config, OPTIONS), name=config.name, run_dir=context.run_dir)

    async def start() -> None:
        if virtio.attach_point is not None:
            await virtio.attach_point.start()

    async def close() -> None:
        if virtio.attach_point is not None:
            await virtio.attach_point.close()
        await virtio.stream.aclose()

    return ServedDevice(config, virtio, virtio.stream, starter=start, closer=close)


def _create_rng(config: DeviceConfig, context: DaemonContext) -> ServedDevice:
    from pvcore.devices.rng import OPTIONS, create_rng_device, entropy_sources

    domain = str(config.get("domain") or config.name).partition("/")[0]  # xen's domain= is DOMID/DEVID
    virtio = create_rng_device(_engine_options(config, OPTIONS), name=config.name, domain=domain, sources=entropy_sources)

    async def close() -> None:
        virtio.reset()  # its own held requests; the domain's other devices keep theirs
        entropy_sources.release(virtio.source)

    return ServedDevice(config, virtio, virtio.source, closer=close)


NET_OPTIONS = {
    "mac": "the guest NIC's MAC, the only source address it may send from (required)",
    "switch": "name of the switch to plug into (default: default); NICs naming one switch share it",
    "mtu": "largest frame payload (default 1500)",
    "rate": "bits per second each way, e.g. rate=100M (k, M, G: powers of 1000; default: no limit)",
    "uplink": "tap:NAME: the switch also has a port on the host's tap device NAME (created if missing), to reach the host",
}


class BuiltinDeviceClass:
    """A plugin offering one of the core's device classes."""

    def __init__(self, name: str, summary: str, options: Callable[[], Mapping[str, str]], create: Any) -> None:
        self.name = name
        self.summary = summary
        self._options = options
        self._create = create

    def __repr__(self) -> str:
        return f"<pvcore device class {self.name}>"

    @hookimpl
    def pvcore_plugin_info(self) -> PluginInfo:
        """This device class, as a plugin that supplies no hypervisor primitive."""
        return PluginInfo(
            name=self.name, contract=CONTRACT_VERSION, device_classes={self.name}, description=self.summary
        )

    @hookimpl
    def pvcore_device_classes(self) -> list[DeviceClass]:
        """The one device class this plugin offers."""
        return [DeviceClass(self.name, self.summary, _option_table(self._options()), self._create)]


def _block_options() -> Mapping[str, str]:
    from pvcore.devices.block import OPTIONS

    return OPTIONS


def _console_options() -> Mapping[str, str]:
    from pvcore.devices.console import OPTIONS

    return OPTIONS


def _rng_options() -> Mapping[str, str]:
    from pvcore.devices.rng import OPTIONS

    return OPTIONS


block = BuiltinDeviceClass("block", "a raw disk image served as virtio-blk or NBD", _block_options, _create_block)
net = BuiltinDeviceClass("net", "a NIC on one of the daemon's L2 switches", lambda: NET_OPTIONS, _create_net)
console = BuiltinDeviceClass("console", "a guest console: log, scrollback, attach point", _console_options, _create_console)
rng = BuiltinDeviceClass("rng", "entropy from the host's getrandom, rate-limited per guest", _rng_options, _create_rng)
