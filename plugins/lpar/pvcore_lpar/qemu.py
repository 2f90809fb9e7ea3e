"""The QEMU pseries arguments that attach a partition to the devices a daemon serves.

:func:`qemu_arguments` turns the daemon's device configurations into, for
each domain, the arguments to add to ``qemu-system-ppc64 -M pseries``: the
partition's vty, l-lan, v-scsi disk and rng, each connected to the socket (or
FIFO) the lpar plugin's front door serves. ``-nodefaults`` keeps QEMU from
adding its own vty, v-scsi and NIC. Start ``pvcore serve`` first: QEMU
connects to the sockets when it starts.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Sequence

from pvcore.config import parse_bool
from pvcore.contract import DeviceConfig
from pvcore.devices.net.switch import format_mac, parse_mac


def _value(text: str) -> str:
    """``text`` as a QEMU option value (a literal comma is written twice)."""
    return text.replace(",", ",,")


def qemu_arguments(configs: Sequence[DeviceConfig]) -> dict[str, list[str]]:
    """QEMU pseries arguments per domain (the ``domain`` option; empty if unset), in config order.

    Raises ``ValueError`` naming the device for one that cannot be attached:
    no ``socket=``, a second rng in one domain (QEMU allows one spapr-rng
    per machine), a net device without a valid ``mac=``, or a class the
    lpar plugin does not serve.
    """
    by_domain: dict[str, list[str]] = {}
    counts: dict[tuple[str, str], int] = {}
    for config in configs:
        domain = str(config.get("domain", ""))
        args = by_domain.setdefault(domain, ["-nodefaults"])
        index = counts.get((domain, config.device_class), 0)
        counts[(domain, config.device_class)] = index + 1
        path = config.get("socket")
        if not path:
            raise ValueError(f"{config.device_class} {config.name}: socket= is required to attach it to QEMU")
        args += _device_arguments(config, str(path), index)
    return by_domain


def _device_arguments(config: DeviceConfig, path: str, index: int) -> list[str]:
    if config.device_class == "console":
        return ["-chardev", f"socket,id=vty{index},path={_value(path)},reconnect=1",
                "-device", f"spapr-vty,chardev=vty{index}"]
    if config.device_class == "rng":
        if index:
            raise ValueError(f"rng {config.name}: a pseries machine has one spapr-rng; domain already has an rng")
        return ["-object", f"rng-random,id=rng{index},filename={_value(path)}", "-device", f"spapr-rng,rng=rng{index}"]
    if config.device_class == "net":
        try:
            mac = format_mac(parse_mac(str(config.get("mac", ""))))
        except ValueError as exc:
            raise ValueError(f"net {config.name}: mac={config.get('mac')}: {exc}") from None
        return ["-netdev", f"stream,id=n{index},server=off,addr.type=unix,addr.path={_value(path)}",
                "-device", f"spapr-vlan,netdev=n{index},mac={mac}"]
    if config.device_class == "block":
        uri = "nbd+unix:///?socket=" + urllib.parse.quote(path, safe="/")
        readonly = ",readonly=on" if parse_bool(str(config.get("readonly", "off"))) else ""
        return ["-drive", f"file={_value(uri)},format=raw,if=none,id=d{index},cache=none{readonly}",
                "-device", f"spapr-vscsi,id=vs{index}", "-device", f"scsi-hd,drive=d{index},bus=vs{index}.0"]
    raise ValueError(f"{config.name}: the lpar plugin attaches console, net, block and rng, not {config.device_class}")
