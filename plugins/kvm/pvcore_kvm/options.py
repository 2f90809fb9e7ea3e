"""The device options only the kvm plugin understands (its ``pvcore_device_options`` answer).

``socket-mode=`` says which side of a socket listens: pvcore (``server``,
the default) or QEMU (``client``: pvcore connects, and reconnects when QEMU
comes back). Only the vhost-user front door can connect, so a console (a
QEMU chardev) and an rng over EGD are always served listening. ``protocol=``
chooses an rng's front door: vhost-user, or EGD (what libvirt's ``<rng><backend
model='egd'>`` connects to, libvirt having no vhost-user rng). The parsers
refuse a bad value with the fix, so the front door relies on what they return.
"""

from __future__ import annotations

from collections.abc import Mapping

from pvcore.config import parse_choice
from pvcore.contract import OptionSpec

_RING_SOCKET_MODE = OptionSpec(
    "server (pvcore listens, QEMU connects; default) or client (QEMU listens with server=on, pvcore connects "
    "and reconnects)",
    parse=parse_choice("server", "client", fix=(
        "expected server (pvcore listens and QEMU connects: -chardev socket,path=S,reconnect=1; the default) "
        "or client (QEMU listens: -chardev socket,path=S,server=on,wait=off; pvcore connects)"
    )),
)

DEVICE_OPTIONS: Mapping[str, Mapping[str, OptionSpec]] = {
    "block": {"socket-mode": _RING_SOCKET_MODE},
    "net": {"socket-mode": _RING_SOCKET_MODE},
    "rng": {
        "socket-mode": OptionSpec(
            "server (default) or client, as for block; an rng with protocol=egd is always the server",
            parse=_RING_SOCKET_MODE.parse,
        ),
        "protocol": OptionSpec(
            "vhost-user (default; QEMU vhost-user-rng-pci) or egd (QEMU rng-egd, what libvirt's EGD backend uses)",
            parse=parse_choice("vhost-user", "egd", fix=(
                "expected vhost-user (QEMU -device vhost-user-rng-pci; the default) or egd (QEMU -object rng-egd, "
                "libvirt's <rng><backend model='egd'>)"
            )),
        ),
    },
    "console": {
        "socket-mode": OptionSpec(
            "server only: pvcore listens on the chardev socket (QEMU 7.2 has no vhost-user console)",
            parse=parse_choice("server", fix=(
                "kvm serves a console only as the listening side (QEMU 7.2 has no vhost-user console; QEMU "
                "connects with -chardev socket,path=S,reconnect=1): drop socket-mode="
            )),
        ),
    },
}
"""What the kvm plugin declares, by class, on top of the core's common keys and each class's own."""
