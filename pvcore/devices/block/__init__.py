"""The block device class: a backing store served to guests.

* :mod:`~pvcore.devices.block.store` — backing stores (a raw file or host block device);
* :mod:`~pvcore.devices.block.backend` — :class:`BlockBackend`, the engine every
  front door shares (I/O threads, priorities, flush barriers, cache modes);
* :mod:`~pvcore.devices.block.virtio_blk` — :class:`VirtioBlock`, the virtio-blk ring device.

:func:`create_block_device` builds both from the string options a user writes
(``path=disk.img,readonly=on,cache=writethrough,queues=2,serial=disk0``), and
the device's limits (:mod:`pvcore.throttle`: ``iops=500,bps=50M,group=g``).
"""

from __future__ import annotations

import logging

from pvcore.devices.block.backend import (
    MAX_WORKERS,
    SECTOR_SIZE,
    BlockBackend,
    BlockCounters,
    BlockOp,
    BlockRequest,
    BlockResult,
    BlockStatus,
    CacheMode,
    ioprio,
    ioprio_rank,
)
from pvcore.devices.block.store import RawFileStore, StoreError
from pvcore.devices.block.virtio_blk import CONFIG_LAYOUT, MAX_QUEUES, VIRTIO_BLK_ID_BYTES, VirtioBlock
from pvcore.throttle import OPTIONS as THROTTLE_OPTIONS
from pvcore.throttle import ThrottleError, ThrottleGroups, limits_from_options, throttle_groups
from pvcore.virtio import DeviceError

__all__ = [
    "BlockBackend",
    "BlockCounters",
    "BlockOp",
    "BlockRequest",
    "BlockResult",
    "BlockStatus",
    "CONFIG_LAYOUT",
    "CacheMode",
    "OPTIONS",
    "RawFileStore",
    "VirtioBlock",
    "create_block_device",
    "ioprio",
    "ioprio_rank",
]

log = logging.getLogger("pvcore.block")

DEFAULT_WORKERS = 4

OPTIONS = {
    "path": "backing file or host block device (required)",
    "readonly": "on/off (default off)",
    "cache": "writeback or writethrough (default writeback)",
    "queues": f"number of request queues, 1..{MAX_QUEUES} (default 1)",
    "serial": f"disk serial returned by GET_ID, up to {VIRTIO_BLK_ID_BYTES} ASCII characters (default empty)",
    "workers": f"most requests of this disk the shared I/O threads run at once, 1..{MAX_WORKERS} "
    f"(default {DEFAULT_WORKERS})",
    "spread": "on: under pvcore serve --workers N every worker serves this disk (its NBD export's connections "
    "in turn, a vhost-user disk's queues spread over them); needs socket=; no I/O limits or group then "
    "(default off)",
    **THROTTLE_OPTIONS,
}
"""Every option :func:`create_block_device` accepts, with what it means."""

_TRUE = frozenset({"on", "true", "yes", "1"})
_FALSE = frozenset({"off", "false", "no", "0"})


def _parse_bool(prefix: str, key: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise DeviceError(f"{prefix}: {key}={value}: expected on or off")


def _parse_int(prefix: str, key: str, value: str, low: int, high: int) -> int:
    try:
        number = int(value.strip(), 10)
    except ValueError:
        raise DeviceError(f"{prefix}: {key}={value}: expected a whole number {low}..{high}") from None
    if not low <= number <= high:
        raise DeviceError(f"{prefix}: {key}={value}: must be between {low} and {high}")
    return number


def _parse_serial(prefix: str, value: str) -> bytes:
    if not value.isascii() or not value.isprintable():
        raise DeviceError(f"{prefix}: serial={value!r}: only printable ASCII characters are allowed")
    if len(value) > VIRTIO_BLK_ID_BYTES:
        raise DeviceError(f"{prefix}: serial={value}: {len(value)} characters, at most {VIRTIO_BLK_ID_BYTES}")
    return value.encode("ascii")


def create_block_device(
    options: dict[str, str], *, name: str, groups: ThrottleGroups = throttle_groups
) -> tuple[BlockBackend, VirtioBlock]:
    """Open the backing store named by ``options`` and build its backend and virtio-blk device.

    Raises :class:`~pvcore.virtio.DeviceError` with a message naming the
    option and the fix for any bad option, or a backing file that cannot be
    used. The caller owns the backend and closes it (:meth:`BlockBackend.close`);
    with limits, the backend joins its throttle group in ``groups``.
    """
    prefix = f"block {name}" if name else "block"
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise DeviceError(f"{prefix}: unknown option {', '.join(unknown)}; known options: {', '.join(OPTIONS)}")
    path = options.get("path", "").strip()
    if not path:
        raise DeviceError(f"{prefix}: path= is required (the backing file or block device)")
    readonly = _parse_bool(prefix, "readonly", options.get("readonly", "off"))
    cache_name = options.get("cache", CacheMode.WRITEBACK.value).strip().lower()
    try:
        cache = CacheMode(cache_name)
    except ValueError:
        raise DeviceError(f"{prefix}: cache={options['cache']}: expected writeback or writethrough") from None
    queues = _parse_int(prefix, "queues", options.get("queues", "1"), 1, MAX_QUEUES)
    workers = _parse_int(prefix, "workers", options.get("workers", str(DEFAULT_WORKERS)), 1, MAX_WORKERS)
    serial = _parse_serial(prefix, options.get("serial", ""))
    try:
        limits, group = limits_from_options(options)
        groups.check(group, limits)
    except ThrottleError as exc:
        raise DeviceError(f"{prefix}: {exc}") from None
    spread = _parse_bool(prefix, "spread", options.get("spread", "off"))
    if spread and set(options) & set(THROTTLE_OPTIONS):
        raise DeviceError(f"{prefix}: spread=on takes no I/O limits or group (each worker would apply them to its "
                          "own connections); remove spread=on or the limits")
    try:
        store = RawFileStore(path, readonly=readonly)
    except StoreError as exc:
        raise DeviceError(f"{prefix}: {exc}") from None
    if store.size < SECTOR_SIZE:
        store.close()
        raise DeviceError(f"{prefix}: path={path}: {store.size} bytes, smaller than one {SECTOR_SIZE}-byte sector")
    if store.size % SECTOR_SIZE:
        log.warning(
            "%s: path=%s: size %d is not a multiple of %d; the last %d bytes are not visible to the guest",
            prefix,
            path,
            store.size,
            SECTOR_SIZE,
            store.size % SECTOR_SIZE,
        )
    try:
        throttle = groups.join(name or "block", limits, group)
    except ThrottleError as exc:
        store.close()
        raise DeviceError(f"{prefix}: {exc}") from None
    backend = BlockBackend(store, cache=cache, workers=workers, name=name or "block", throttle=throttle,
                           inline_writes=not spread)  # other workers write the file too: never wait on their lock
    return backend, VirtioBlock(backend, name=name or "block", queues=queues, serial=serial)
