"""The lpar plugin's hook implementations (entry point ``pvcore.plugins: lpar``).

What is PAPR specific, and nothing else:

* detect: ``/proc/device-tree/ibm,partition-name`` (this is a partition),
  or a libvirt domain whose machine is ``pseries``;
* probe: the partition's device tree — a blob named by
  ``$PVCORE_LPAR_DTB``, else ``/proc/device-tree`` (:mod:`pvcore_lpar.devicetree`);
* stream: QEMU pseries owns the PAPR queues (H_PUT_TERM_CHAR,
  H_SEND_LOGICAL_LAN, the v-scsi CRQ, H_RANDOM), so every device is served
  through one of the core's stream front doors, at the path in the device's
  ``socket=`` option: the chardev door (spapr-vty), the FIFO door that
  QEMU's ``rng-random`` reads (spapr-rng), the netdev stream door
  (spapr-vlan) and the NBD door (spapr-vscsi's disk; and its CD-ROM, whose
  disc is the scsi class's, QEMU's scsi-cd being the drive).
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ElementTree
from collections.abc import Mapping, Sequence
from pathlib import Path

from pvcore.contract import (
    CONTRACT_VERSION,
    DaemonContext,
    DeviceConfig,
    DeviceInstance,
    DeviceSlot,
    Detection,
    FrontDoor,
    HostContext,
    OptionSpec,
    PluginInfo,
)
from pvcore.hookspecs import hookimpl
from pvcore.ring.poll import parse_poll_max_us
from pvcore.streams.chardev import ChardevFrontDoor
from pvcore.streams.fifo import RngFifoFrontDoor
from pvcore.streams.nbd import NbdFrontDoor, block_export
from pvcore.streams.netdev_stream import NetdevStreamFrontDoor
from pvcore_lpar import HYPERVISOR
from pvcore_lpar.devicetree import device_slots, read_dtb, read_tree_directory
from pvcore_lpar.qemu import qemu_arguments

log = logging.getLogger("pvcore.lpar")

DTB_ENVIRONMENT = "PVCORE_LPAR_DTB"
"""Environment variable naming a device tree blob to probe instead of /proc/device-tree."""

SOCKET_HELP = {
    "console": "the chardev socket QEMU's -chardev socket,path=... connects to",
    "rng": "the FIFO QEMU's -object rng-random,filename=... reads",
    "net": "the socket QEMU's -netdev stream,server=off,addr.path=... connects to",
    "block": "the NBD socket QEMU's -drive file=nbd+unix:///?socket=... connects to",
    "scsi": "the NBD socket QEMU's scsi-cd drive reads the one disc (media=FILE.iso) from",
}
"""What ``socket=`` names for each device class the lpar plugin serves."""

_NBD_POLL_MAX = OptionSpec(
    "longest time in microseconds an idle NBD connection polls its socket for the next request before sleeping "
    "(adaptive: grows while requests come within it of the last reply, 0 once the client is quiet for longer); "
    "default 0, no polling",
    parse=parse_poll_max_us,
    default=0,
)


@hookimpl
def pvcore_plugin_info() -> PluginInfo:
    """The lpar plugin: device-tree probe and the core's stream front doors."""
    return PluginInfo(
        name="lpar",
        contract=CONTRACT_VERSION,
        hypervisor=HYPERVISOR,
        primitives={"detect", "probe", "stream"},
        device_classes=set(SOCKET_HELP),
        description="PAPR partitions under QEMU pseries: spapr-vty, spapr-vlan, spapr-vscsi, spapr-rng",
    )


@hookimpl
def pvcore_device_options() -> Mapping[str, Mapping[str, OptionSpec]]:
    """``socket=`` is required, and names what QEMU pseries reaches for each class (:data:`SOCKET_HELP`);
    ``poll-max-us=`` for the classes served over NBD (block, scsi)."""
    options: dict[str, dict[str, OptionSpec]] = {
        device_class: {"socket": OptionSpec(f"{text}; required", required=True)} for device_class, text in SOCKET_HELP.items()
    }
    for device_class in ("block", "scsi"):
        options[device_class]["poll-max-us"] = _NBD_POLL_MAX
    return options


@hookimpl
def pvcore_detect(host: HostContext) -> Detection | None:
    """A partition's device tree (confident), or a libvirt pseries domain or machine."""
    name_file = host.path("/proc/device-tree/ibm,partition-name")
    if name_file.exists():
        return Detection(HYPERVISOR, 90, f"{name_file} exists: this is a PAPR partition")
    if host.libvirt is None:
        return None
    try:
        domains = [domain.XMLDesc(0) for domain in host.libvirt.listAllDomains(0)]
        capabilities = host.libvirt.getCapabilities()
    except Exception as exc:  # libvirt raises its own libvirtError
        log.debug("libvirt query failed: %s", exc)
        return None
    for text in domains:
        machine = _domain_machine(text)
        if machine.startswith("pseries"):
            return Detection(HYPERVISOR, 80, f"a libvirt domain runs machine {machine}")
    if _has_pseries_machine(capabilities):
        return Detection(HYPERVISOR, 40, "libvirt can run pseries guests on this host")
    return None


def _domain_machine(xml_text: str) -> str:
    try:
        os_type = ElementTree.fromstring(xml_text).find("os/type")
    except ElementTree.ParseError:
        return ""
    return "" if os_type is None else os_type.get("machine", "")


def _has_pseries_machine(xml_text: str) -> bool:
    try:
        root = ElementTree.fromstring(xml_text)
    except ElementTree.ParseError:
        return False
    return any((machine.text or "").startswith("pseries") for machine in root.iter("machine"))


@hookimpl
def pvcore_probe(host: HostContext) -> list[DeviceSlot]:
    """The partition's console, net, block and rng devices, from its device tree.

    ``$PVCORE_LPAR_DTB`` (a host path, not under ``host.root``) names a blob,
    e.g. one written by ``qemu-system-ppc64 -M pseries,dumpdtb=FILE``;
    without it ``/proc/device-tree`` under ``host.root`` is read, and a host
    without one has no slots.
    """
    blob = host.environ.get(DTB_ENVIRONMENT)
    if blob:
        return device_slots(read_dtb(Path(blob)))
    tree_dir = host.path("/proc/device-tree")
    if not tree_dir.is_dir():
        return []
    return device_slots(read_tree_directory(tree_dir))


@hookimpl
def pvcore_front_door(device: DeviceInstance, context: DaemonContext) -> FrontDoor:
    """The core's stream front door for ``device``, at its ``socket=`` path."""
    config = device.config
    if config.device_class not in SOCKET_HELP:
        raise ValueError(
            f"{config.name}: the lpar plugin serves {', '.join(sorted(SOCKET_HELP))}, not {config.device_class}"
        )
    path = config.get("socket")
    if not path:
        raise ValueError(f"{config.device_class} {config.name}: socket= is required ({SOCKET_HELP[config.device_class]})")
    if config.device_class == "console":
        return ChardevFrontDoor(device.engine, path)
    if config.device_class == "rng":
        return RngFifoFrontDoor(device.engine, path)
    if config.device_class in ("block", "scsi"):
        return NbdFrontDoor(block_export(device), path, poll_max_ns=config.get("poll-max-us", 0))
    endpoint = device.engine
    return NetdevStreamFrontDoor(endpoint.switch, path, endpoint.mac, name=config.name, throttle=endpoint.throttle)


@hookimpl
def pvcore_qemu_args(configs: Sequence[DeviceConfig]) -> dict[str, list[str]]:
    """The QEMU pseries arguments that attach each partition (see :mod:`pvcore_lpar.qemu`)."""
    return qemu_arguments(configs)
