"""Helpers for plugins that print QEMU command lines (the ``pvcore_qemu_args`` hook).

Device options come from users and from domain metadata, so every value put
into a QEMU option string goes through :func:`option_value`: a comma would
otherwise start a new option (``mac=52:54:...,romfile=/etc/shadow``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from pvcore.contract import DeviceConfig


def option_value(text: object) -> str:
    """``text`` as one QEMU option value: a literal comma is written twice."""
    return str(text).replace(",", ",,")


def arguments_per_domain(
    configs: Sequence[DeviceConfig],
    device_arguments: Callable[[DeviceConfig, str, int], list[str]],
    *,
    leading: Sequence[str] = (),
) -> dict[str, list[str]]:
    """Each domain's QEMU arguments, in config order.

    ``device_arguments(config, socket, index)`` gives one device's arguments;
    ``index`` counts the devices of that class in that domain (for unique
    QEMU ids). Every domain's list starts with ``leading``. A device without
    ``socket=`` is a ``ValueError`` naming it.
    """
    per_domain: dict[str, list[str]] = {}
    counts: dict[tuple[str, str], int] = {}
    for config in configs:
        socket = config.get("socket")
        if not socket:
            raise ValueError(f"{config.device_class} {config.name}: socket= is required to attach it to QEMU")
        domain = str(config.get("domain") or config.name)
        key = (domain, config.device_class)
        index = counts.get(key, 0)
        counts[key] = index + 1
        per_domain.setdefault(domain, list(leading)).extend(device_arguments(config, str(socket), index))
    return per_domain
