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

from pvcore.contract import OptionSpec

SOCKET_MODES = ("server", "client")
RNG_PROTOCOLS = ("vhost-user", "egd")


def parse_socket_mode(text: str) -> str:
    """``server`` or ``client``; anything else is a ``ValueError`` that says what each means."""
    mode = text.strip().lower()
    if mode not in SOCKET_MODES:
        raise ValueError(
            "expected server (pvcore listens and QEMU connects: -chardev socket,path=S,reconnect=1; the default) "
            "or client (QEMU listens: -chardev socket,path=S,server=on,wait=off; pvcore connects)"
        )
    return mode


def parse_console_socket_mode(text: str) -> str:
    """``server`` only: a console is a QEMU chardev socket that pvcore listens on."""
    if text.strip().lower() != "server":
        raise ValueError(
            "kvm serves a console only as the listening side (QEMU 7.2 has no vhost-user console; QEMU "
            "connects with -chardev socket,path=S,reconnect=1): drop socket-mode="
        )
    return "server"


def parse_rng_protocol(text: str) -> str:
    """``vhost-user`` or ``egd``; anything else is a ``ValueError`` that says what each is for."""
    protocol = text.strip().lower()
    if protocol not in RNG_PROTOCOLS:
        raise ValueError(
            "expected vhost-user (QEMU -device vhost-user-rng-pci; the default) or egd (QEMU -object rng-egd, "
            "libvirt's <rng><backend model='egd'>)"
        )
    return protocol


_RING_SOCKET_MODE = OptionSpec(
    "server (pvcore listens, QEMU connects; default) or client (QEMU listens with server=on, pvcore connects "
    "and reconnects)",
    parse=parse_socket_mode,
)

DEVICE_OPTIONS: Mapping[str, Mapping[str, OptionSpec]] = {
    "block": {"socket-mode": _RING_SOCKET_MODE},
    "net": {"socket-mode": _RING_SOCKET_MODE},
    "rng": {
        "socket-mode": OptionSpec(
            "server (default) or client, as for block; an rng with protocol=egd is always the server",
            parse=parse_socket_mode,
        ),
        "protocol": OptionSpec(
            "vhost-user (default; QEMU vhost-user-rng-pci) or egd (QEMU rng-egd, what libvirt's EGD backend uses)",
            parse=parse_rng_protocol,
        ),
    },
    "console": {
        "socket-mode": OptionSpec(
            "server only: pvcore listens on the chardev socket (QEMU 7.2 has no vhost-user console)",
            parse=parse_console_socket_mode,
        ),
    },
}
"""What the kvm plugin declares, by class, on top of the core's common keys and each class's own."""
