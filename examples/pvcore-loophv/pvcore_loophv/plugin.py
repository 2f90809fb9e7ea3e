"""The loophv hooks: detect, probe and the front door (memory and eventfds are the core's defaults)."""

from __future__ import annotations

from pvcore.contract import (CONTRACT_VERSION, DaemonContext, Detection, DeviceInstance, DeviceSlot, FrontDoor,
                             HostContext, PluginInfo)
from pvcore.hookspecs import hookimpl
from pvcore_loophv.transport import HYPERVISOR, LoopFrontDoor

DEVICE_CLASSES = ("block", "net", "console", "rng")
HOST_DIRECTORY = "/run/loophv"
"""Present when the loophv host runs; its file ``devices`` lists ``DOMAIN CLASS SOCKET`` lines."""


@hookimpl
def pvcore_plugin_info() -> PluginInfo:
    """The loophv plugin: detect, probe and a front door for every device class."""
    return PluginInfo(name="loophv", contract=CONTRACT_VERSION, hypervisor=HYPERVISOR,
                      primitives={"detect", "probe", "stream"},
                      device_classes=set(DEVICE_CLASSES), description="worked example: memfd RAM, eventfds, a socket")


@hookimpl
def pvcore_detect(host: HostContext) -> Detection | None:
    """The loophv host directory exists."""
    if host.path(HOST_DIRECTORY).is_dir():
        return Detection(HYPERVISOR, 70, f"{HOST_DIRECTORY} exists")
    return None


@hookimpl
def pvcore_probe(host: HostContext) -> list[DeviceSlot]:
    """One slot per ``DOMAIN CLASS SOCKET`` line of the host's device list."""
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
def pvcore_front_door(device: DeviceInstance, context: DaemonContext) -> FrontDoor:
    """Every class is served as virtio over the loophv socket."""
    config = device.config
    if config.device_class not in DEVICE_CLASSES or device.virtio is None:
        raise ValueError(f"{config.name}: loophv serves {', '.join(DEVICE_CLASSES)}, not {config.device_class}")
    socket_path = config.get("socket") or context.run_dir / f"{config.name}.sock"
    return LoopFrontDoor(device.virtio, socket_path, primitives=context.primitives, name=config.name)
