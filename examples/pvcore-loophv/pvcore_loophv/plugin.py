"""The loophv hooks: detect, probe, memory, notification and the front door."""

from __future__ import annotations

from typing import Any

from pvcore.contract import (CONTRACT_VERSION, DaemonContext, Detection, DeviceInstance, DeviceSlot, EventFdChannel,
                             FdMemoryLayout, FrontDoor, HostContext, PluginInfo)
from pvcore.hookspecs import hookimpl
from pvcore.ring.fdmemory import FdGuestMemory, map_fd_layout
from pvcore.ring.notify import EventFdNotifier
from pvcore_loophv.transport import HYPERVISOR, LoopFrontDoor

DEVICE_CLASSES = ("block", "net", "console", "rng")
HOST_DIRECTORY = "/run/loophv"
"""Present when the loophv host runs; its file ``devices`` lists ``DOMAIN CLASS SOCKET`` lines."""


@hookimpl
def pvcore_plugin_info() -> PluginInfo:
    """The loophv plugin: every primitive, every device class."""
    return PluginInfo(name="loophv", contract=CONTRACT_VERSION, hypervisor=HYPERVISOR,
                      primitives={"detect", "probe", "memory", "notification", "stream"},
                      device_classes=set(DEVICE_CLASSES), description="worked example: memfd RAM, eventfds, a socket")


@hookimpl
def pvcore_detect(host: HostContext) -> Detection | None:
    """The loophv host directory exists."""
    if host.path(HOST_DIRECTORY).is_dir():
        return Detection(HYPERVISOR, 70, f"{HOST_DIRECTORY} exists")
    return None


@hookimpl
def pvcore_probe(hypervisor: str, host: HostContext) -> list[DeviceSlot] | None:
    """One slot per ``DOMAIN CLASS SOCKET`` line of the host's device list."""
    if hypervisor != HYPERVISOR:
        return None
    listing = host.path(HOST_DIRECTORY) / "devices"
    if not listing.exists():
        return []
    slots = []
    for number, line in enumerate(listing.read_text(errors="replace").splitlines(), 1):
        fields = line.split()
        if len(fields) != 3 or fields[1] not in DEVICE_CLASSES:
            raise ValueError(f"{listing}:{number}: expected DOMAIN CLASS SOCKET with CLASS one of {DEVICE_CLASSES}")
        domain, device_class, socket_path = fields
        slots.append(DeviceSlot(HYPERVISOR, device_class, socket_path, domain, {"socket": socket_path}))
    return slots


@hookimpl
def pvcore_map_memory(hypervisor: str, layout: Any) -> FdGuestMemory | None:
    """Guest RAM is one memfd region, mapped by the core."""
    if hypervisor != HYPERVISOR or not isinstance(layout, FdMemoryLayout):
        return None
    return map_fd_layout(layout)


@hookimpl
def pvcore_open_notifier(hypervisor: str, channel: Any) -> EventFdNotifier | None:
    """Kicks and interrupts are eventfds; any other descriptor is refused."""
    if hypervisor != HYPERVISOR or not isinstance(channel, EventFdChannel):
        return None
    return EventFdNotifier.adopt(channel.fd)


@hookimpl
def pvcore_front_door(hypervisor: str, device: DeviceInstance, context: DaemonContext) -> FrontDoor | None:
    """Every class is served as virtio over the loophv socket."""
    if hypervisor != HYPERVISOR:
        return None
    config = device.config
    if config.device_class not in DEVICE_CLASSES or device.virtio is None:
        raise ValueError(f"{config.name}: loophv serves {', '.join(DEVICE_CLASSES)}, not {config.device_class}")
    socket_path = config.get("socket") or context.run_dir / f"{config.name}.sock"
    return LoopFrontDoor(device.virtio, socket_path, hook=context.hook, name=config.name)
