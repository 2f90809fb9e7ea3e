"""A served device's I/O limits, read and changed live (the control socket's ``set-limits``).

A block device's limits are :class:`~pvcore.throttle.ThrottleLimits`
(``iops=500,bps=50M,...``, or ``off``); changing those of a device in a
throttle group changes the group's, for every device of it, as QEMU's
``block_set_io_throttle`` does. A NIC's limit is its ``rate=`` in bits per
second. Bad limits raise :class:`~pvcore.throttle.ThrottleError` and change
nothing.
"""

from __future__ import annotations

from typing import Any

from pvcore.contract import DeviceInstance
from pvcore.devices.block.backend import BlockBackend
from pvcore.devices.net.virtio_net import NetEndpoint, describe_rate
from pvcore.throttle import Throttle, ThrottleError, ThrottleGroups, ThrottleLimits, throttle_groups


def device_throttle(instance: DeviceInstance) -> Throttle | None:
    """The throttle of a block device or NIC, if it has one."""
    engine = instance.engine
    if isinstance(engine, (BlockBackend, NetEndpoint)):
        return engine.throttle
    return None


def describe_limits(instance: DeviceInstance) -> dict[str, Any]:
    """``limits`` as text (``off`` for none) and ``group`` (None: the device's own) of a device."""
    throttle = device_throttle(instance)
    if throttle is None:
        return {"limits": "off", "group": None}
    limits = throttle.group.limits
    text = describe_rate(limits) if isinstance(instance.engine, NetEndpoint) else str(limits)
    own = len(throttle.group.members) == 1 and throttle.group.name == instance.config.name
    return {"limits": text, "group": None if own else throttle.group.name}


def set_limits(instance: DeviceInstance, text: str, *, groups: ThrottleGroups = throttle_groups) -> dict[str, Any]:
    """Give ``instance`` the limits ``text``; what :func:`describe_limits` says afterwards."""
    engine = instance.engine
    name = instance.config.name
    if isinstance(engine, NetEndpoint):
        engine.set_rate(text)
    elif isinstance(engine, BlockBackend):
        try:
            limits = ThrottleLimits.parse_text(text)
        except ThrottleError as exc:
            raise ThrottleError(f"{name}: {exc}") from None
        if engine.throttle is not None:
            engine.throttle.group.set_limits(limits)
        elif not limits.empty:
            engine.throttle = groups.join(name, limits)
    else:
        raise ThrottleError(f"{name}: a {instance.config.device_class} device has no I/O limits (block and net devices do)")
    return describe_limits(instance)
