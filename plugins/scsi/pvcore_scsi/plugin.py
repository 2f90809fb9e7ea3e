"""The scsi device class's hooks (entry point ``pvcore.plugins: scsi``) and its options.

``scsi:media=A.iso+empty,disk=D.img,passthrough=/dev/sg1,socket=S`` is one
SCSI target whose logical units are numbered in the order written: each
``media`` item is a CD-ROM unit (an ISO image, or ``empty``: a drive with no
disc), then each ``disk`` item a disk unit, then each ``passthrough`` item a
host SCSI device. Items are separated by ``+``. A target with a CD-ROM unit
also listens on ``RUN_DIR/NAME.media`` for host-side eject and insert (see
:mod:`pvcore_scsi.media`).

The class offers the ring form (:class:`~pvcore_scsi.virtio_scsi.VirtioScsi`);
any hypervisor plugin with a virtio ring front door serves it (kvm:
vhost-user-scsi-pci). Its engine (:class:`ScsiTarget`) also has a stream
form for a hypervisor whose own device model is the SCSI target: the disc of
a one-CD-ROM target as a block export (lpar: NBD to QEMU's scsi-cd). It
supplies no hypervisor primitive.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

from pvcore.config import parse_bool, parse_choice
from pvcore.contract import CONTRACT_VERSION, DaemonContext, DeviceClass, DeviceConfig, OptionSpec, PluginInfo
from pvcore.devices.block import BlockBackend
from pvcore.devices.classes import ServedDevice
from pvcore.hookspecs import hookimpl
from pvcore.virtio import DeviceError
from pvcore_scsi.cdrom import CdromUnit, Disc
from pvcore_scsi.disk import DiskUnit
from pvcore_scsi.media import MediaControl
from pvcore_scsi.passthrough import PassthroughUnit
from pvcore_scsi.virtio_scsi import MAX_LUN, MAX_REQUEST_QUEUES, VirtioScsi

log = logging.getLogger("pvcore.scsi")

NAME = "scsi"
EMPTY = "empty"


def _items(text: str) -> list[str]:
    items = [item.strip() for item in text.split("+")]
    if not all(items):
        raise ValueError("expected one or more items separated by +, none empty")
    return items


def _queues(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise ValueError(f"expected a whole number 1..{MAX_REQUEST_QUEUES}") from None
    if not 1 <= value <= MAX_REQUEST_QUEUES:
        raise ValueError(f"must be between 1 and {MAX_REQUEST_QUEUES}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError("expected seconds, e.g. 30") from None
    if not 0.1 <= value <= 3600:
        raise ValueError("must be between 0.1 and 3600 seconds")
    return value


OPTIONS: Mapping[str, OptionSpec] = {
    "media": OptionSpec(f"CD-ROM units: ISO images (read-only) or {EMPTY!r}, separated by +", parse=_items),
    "disk": OptionSpec("disk units: raw images, separated by +", parse=_items),
    "disk-readonly": OptionSpec("on/off (default off): the disk units refuse writes", parse=parse_bool),
    "passthrough": OptionSpec("host SCSI devices (/dev/sgN) driven with SG_IO, separated by +", parse=_items),
    "allow": OptionSpec(
        "read (default: read-only and tray commands) or write (also writing and burning) for passthrough units",
        parse=parse_choice("read", "write", fix="expected read (the default) or write"),
    ),
    "timeout": OptionSpec("seconds each passthrough command may take (default 30)", parse=_seconds),
    "queues": OptionSpec(f"virtio-scsi request queues, 1..{MAX_REQUEST_QUEUES} (default 1)", parse=_queues),
}
"""Every option of the scsi class."""


def build_units(config: DeviceConfig, loop: asyncio.AbstractEventLoop | None = None) -> dict[int, object]:
    """The logical units ``config`` asks for, by LUN; any that opened are closed again on an error.

    With ``loop`` (the daemon's), a disc the host takes out is closed on its executor.
    """
    name = config.name
    wanted = ([("media", item) for item in config.get("media", [])]
              + [("disk", item) for item in config.get("disk", [])]
              + [("passthrough", item) for item in config.get("passthrough", [])])
    if not wanted:
        raise DeviceError(f"{name}: a scsi device needs at least one unit: media=, disk= or passthrough=")
    if len(wanted) > MAX_LUN + 1:
        raise DeviceError(f"{name}: {len(wanted)} units, at most {MAX_LUN + 1}")
    closer = (lambda disc: loop.run_in_executor(None, disc.close)) if loop is not None else Disc.close
    units: dict[int, object] = {}
    try:
        for lun, (kind, item) in enumerate(wanted):
            if kind == "media":
                units[lun] = CdromUnit(None if item == EMPTY else item, name=name, lun=lun, closer=closer)
            elif kind == "disk":
                units[lun] = DiskUnit(item, name=name, lun=lun, readonly=bool(config.get("disk-readonly")))
            else:
                units[lun] = PassthroughUnit(item, name=name, lun=lun, allow_write=config.get("allow") == "write",
                                             timeout=config.get("timeout", 30.0))
    except BaseException:
        close_units(units)
        raise
    return units


def close_units(units: Mapping[int, object]) -> None:
    """Close every unit (blocking: finishes queued I/O and closes images and devices)."""
    for unit in units.values():
        unit.close()


class ScsiTarget:
    """The engine of a scsi device: its units by LUN, and its stream form."""

    def __init__(self, units: Mapping[int, object], *, name: str) -> None:
        self.units = units
        self.name = name

    def block_export(self) -> BlockBackend:
        """The disc of a target that is one CD-ROM unit, as a read-only block engine for an NBD front door.

        This is for a hypervisor whose own device model is the SCSI target
        (QEMU pseries: scsi-cd on spapr-vscsi). That model emulates the drive,
        its tray and events, so the disc is fixed from then on: the media
        socket refuses to change it. ``ValueError`` for any other target.
        """
        units = list(self.units.values())
        unit = units[0] if len(units) == 1 else None
        if not isinstance(unit, CdromUnit) or unit.disc is None:
            raise ValueError(
                f"scsi {self.name}: this hypervisor's own SCSI target emulates the drive and reads only a disc "
                "over NBD: give one CD-ROM unit holding a disc (media=FILE.iso), nothing else; serve disks with the block class"
            )
        unit.fixed = "the disc is served over NBD to a drive the hypervisor emulates; the host cannot change it here"
        return unit.disc.backend


def _create(config: DeviceConfig, context: DaemonContext) -> ServedDevice:
    units = build_units(config, context.loop)
    virtio = VirtioScsi(units, name=config.name, queues=config.get("queues", 1))
    cdroms = {lun: unit for lun, unit in units.items() if isinstance(unit, CdromUnit)}
    control = MediaControl(context.run_dir / f"{config.name}.media", cdroms, virtio.media_changed, name=config.name)

    async def start() -> None:
        if cdroms:
            await control.start()

    async def close() -> None:
        await control.close()
        await context.loop.run_in_executor(None, close_units, units)

    return ServedDevice(config, virtio, ScsiTarget(units, name=config.name), starter=start, closer=close)


@hookimpl
def pvcore_plugin_info() -> PluginInfo:
    """The scsi device class, a plugin that supplies no hypervisor primitive."""
    return PluginInfo(name=NAME, contract=CONTRACT_VERSION, device_classes={NAME},
                      description="a SCSI target: CD-ROM units from ISO images, disks, SG_IO passthrough")


@hookimpl
def pvcore_device_classes() -> list[DeviceClass]:
    """The one class this plugin offers: ``scsi``, served as virtio-scsi."""
    return [DeviceClass(NAME, "a SCSI target (virtio-scsi): CD-ROMs from ISO images, disks, passthrough",
                        OPTIONS, _create)]
