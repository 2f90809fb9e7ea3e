"""The QEMU arguments that attach a guest to pvcore's devices, asked of the plugin that serves them.

Tests and benchmarks do not write the ``-chardev``/``-device``/``-netdev``/
``-drive`` arguments of a device pvcore serves by hand: they ask the serving
plugin's ``pvcore_qemu_args`` hook, so that a guest boots with exactly what
``pvcore serve --print-qemu-args`` prints, workarounds included. The runner
(:class:`~pvcore.testing.guest.qemu.Guest`) adds the machine, memory, kernel
and accelerator, and a test adds the QEMU-owned devices pvcore does not serve.
"""

from __future__ import annotations

from collections.abc import Sequence

from pvcore.config import parse_devices
from pvcore.contract import DeviceConfig
from pvcore.registry import Registry, default_registry
from pvcore.testing.guest.errors import GuestError

__all__ = ["plugin_qemu_args"]


def plugin_qemu_args(
    hypervisor: str, devices: Sequence[str | DeviceConfig], registry: Registry | None = None
) -> dict[str, list[str]]:
    """Per domain, the QEMU arguments the plugin serving ``hypervisor`` gives for ``devices``.

    ``devices`` are ``pvcore serve`` DEVICE strings (parsed as the daemon
    parses them, with the plugin's own options) or
    :class:`~pvcore.contract.DeviceConfig` s, in the order their devices
    appear in each guest. ``registry`` defaults to every installed plugin.
    A device the plugin cannot attach raises its ``ValueError``; a plugin
    without the hook raises :class:`GuestError`.
    """
    registry = registry if registry is not None else default_registry()
    specs = [device for device in devices if isinstance(device, str)]
    parsed = iter(parse_devices(specs, registry.device_classes(), registry.plugin_options(hypervisor)))
    configs = [next(parsed) if isinstance(device, str) else device for device in devices]
    try:
        return dict(registry.qemu_args(hypervisor, configs))
    except LookupError as exc:
        raise GuestError(str(exc)) from None
