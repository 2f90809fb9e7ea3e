"""The QEMU pseries arguments that attach a partition to the devices a daemon serves.

:func:`qemu_arguments` turns the daemon's device configurations into, for
each domain, the arguments to add to ``qemu-system-ppc64 -M pseries``: the
partition's vty, l-lan, v-scsi disk or CD-ROM (a scsi device: QEMU's
read-only scsi-cd reading the disc over NBD) and rng, each connected to the
socket (or FIFO) the lpar plugin's front door serves. ``-nodefaults`` keeps QEMU from
adding its own vty, v-scsi and NIC. Start ``pvcore serve`` first: QEMU
connects to the sockets when it starts.

Every device comes back by itself when pvcore restarts on the same paths:
the vty's chardev has ``reconnect=1``, QEMU's rng-random keeps reading the
same FIFO, and the NBD drive has ``file.reconnect-delay=``
:data:`NBD_RECONNECT_DELAY`: while the server is gone, disk requests wait
(QEMU retries the connection 1, 3, 7 and 15 s after it dropped, then every
16 s) instead of failing, and a request that had no reply is sent again on
the new connection. QEMU 7.2 takes the option only in this form: a
``reconnect-delay`` in the URI's query is refused ("No valid URL specified").
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Sequence

from pvcore.config import parse_bool
from pvcore.contract import DeviceConfig
from pvcore.qemu import arguments_per_domain, option_value
from pvcore.devices.net.switch import format_mac, parse_mac

NBD_RECONNECT_DELAY = 20
"""Seconds a v-scsi disk's requests wait for pvcore's NBD server to come back before they fail with EIO.

Long enough for QEMU's retry 15 s after the connection dropped; shorter than
the 30 s a Linux guest's sd driver waits for a SCSI command before it aborts.
"""


def qemu_arguments(configs: Sequence[DeviceConfig]) -> dict[str, list[str]]:
    """QEMU pseries arguments per domain (the ``domain`` option), in config order.

    Raises ``ValueError`` naming the device for one that cannot be attached:
    no ``socket=``, a second rng in one domain (QEMU allows one spapr-rng
    per machine), a net device without a valid ``mac=``, or a class the
    lpar plugin does not serve.
    """
    return arguments_per_domain(configs, _device_arguments, leading=["-nodefaults"])


def _device_arguments(config: DeviceConfig, path: str, index: int) -> list[str]:
    if config.device_class == "console":
        return ["-chardev", f"socket,id=vty{index},path={option_value(path)},reconnect=1",
                "-device", f"spapr-vty,chardev=vty{index}"]
    if config.device_class == "rng":
        if index:
            raise ValueError(f"rng {config.name}: a pseries machine has one spapr-rng; domain already has an rng")
        return ["-object", f"rng-random,id=rng{index},filename={option_value(path)}", "-device", f"spapr-rng,rng=rng{index}"]
    if config.device_class == "net":
        try:
            mac = format_mac(parse_mac(str(config.get("mac", ""))))
        except ValueError as exc:
            raise ValueError(f"net {config.name}: mac={config.get('mac')}: {exc}") from None
        return ["-netdev", f"stream,id=n{index},server=off,addr.type=unix,addr.path={option_value(path)}",
                "-device", f"spapr-vlan,netdev=n{index},mac={mac}"]
    if config.device_class in ("block", "scsi"):
        cdrom = config.device_class == "scsi"
        uri = "nbd+unix:///?socket=" + urllib.parse.quote(path, safe="/")
        readonly = ",readonly=on" if cdrom or parse_bool(str(config.get("readonly", "off"))) else ""
        ident, bus = (f"cd{index}", f"vscd{index}") if cdrom else (f"d{index}", f"vs{index}")
        drive = f"file={option_value(uri)},file.reconnect-delay={NBD_RECONNECT_DELAY},format=raw,if=none,id={ident}"
        return ["-drive", f"{drive},cache=none{readonly}{',media=cdrom' if cdrom else ''}",
                "-device", f"spapr-vscsi,id={bus}", "-device", f"scsi-{'cd' if cdrom else 'hd'},drive={ident},bus={bus}.0"]
    raise ValueError(f"{config.name}: the lpar plugin attaches console, net, block, scsi and rng, not {config.device_class}")
