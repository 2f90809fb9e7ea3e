"""The device options only the kvm plugin understands (its ``pvcore_device_options`` answer).

``socket-mode=`` says which side of a socket listens: pvcore (``server``,
the default) or QEMU (``client``: pvcore connects, and reconnects when QEMU
comes back). Only the vhost-user front door can connect, so a console (a
QEMU chardev) and an rng over EGD are always served listening. ``protocol=``
chooses an rng's front door: vhost-user, or EGD (what libvirt's ``<rng><backend
model='egd'>`` connects to, libvirt having no vhost-user rng). The parsers
refuse a bad value with the fix, so the front door relies on what they return.
``poll-max-us=`` bounds how long each vhost-user queue polls its ring for the
next request before it sleeps on its kick (QEMU's iothread ``poll-max-ns``;
see :mod:`pvcore.ring.poll`); 0 turns polling off.
"""

from __future__ import annotations

from collections.abc import Mapping

from pvcore.config import parse_choice
from pvcore.contract import OptionSpec
from pvcore.ring.poll import DEFAULT_POLL_MAX_NS, parse_poll_max_us

_RING_SOCKET_MODE = OptionSpec(
    "server (pvcore listens, QEMU connects; default) or client (QEMU listens with server=on, pvcore connects "
    "and reconnects)",
    parse=parse_choice("server", "client", fix=(
        "expected server (pvcore listens and QEMU connects: -chardev socket,path=S,reconnect=1; the default) "
        "or client (QEMU listens: -chardev socket,path=S,server=on,wait=off; pvcore connects)"
    )),
)

_RING_POLL_MAX = OptionSpec(
    f"longest time in microseconds each queue polls its ring for the next request before sleeping on its kick "
    f"(adaptive: 0 while polling catches nothing); default 0, no polling (as qemu-storage-daemon without an "
    f"iothread); QEMU's iothreads use {DEFAULT_POLL_MAX_NS // 1000}",
    parse=parse_poll_max_us,
    default=0,
)

DEVICE_OPTIONS: Mapping[str, Mapping[str, OptionSpec]] = {
    "block": {"socket-mode": _RING_SOCKET_MODE, "poll-max-us": _RING_POLL_MAX},
    "net": {"socket-mode": _RING_SOCKET_MODE, "poll-max-us": _RING_POLL_MAX},
    "rng": {
        "socket-mode": OptionSpec(
            "server (default) or client, as for block; an rng with protocol=egd is always the server",
            parse=_RING_SOCKET_MODE.parse,
        ),
        "poll-max-us": _RING_POLL_MAX,
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
