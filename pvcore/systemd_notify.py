"""Tell systemd how the daemon is doing (sd_notify's protocol), for units with ``Type=notify``.

systemd sets ``$NOTIFY_SOCKET`` to a datagram socket (a path, or an abstract
name written with a leading ``@``); each state is one datagram of
``KEY=VALUE`` lines (``READY=1``, ``RELOADING=1``, ``STOPPING=1``,
``STATUS=...``). Without ``$NOTIFY_SOCKET`` (not started by systemd, or a
``Type=simple`` unit) every call does nothing. A failed send is logged, never
raised: systemd's bookkeeping must not take the devices down.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger("pvcore.systemd")


def notify(*assignments: str) -> bool:
    """Send ``KEY=VALUE`` lines to ``$NOTIFY_SOCKET``; True if one was sent."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        log.warning("NOTIFY_SOCKET=%s is neither a path nor an abstract name (@...): systemd not told", address)
        return False
    message = "\n".join(assignments).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message, address)
    except OSError as exc:
        log.warning("telling systemd %s through %s failed: %s", ", ".join(assignments), address, exc.strerror or exc)
        return False
    return True


def ready(status: str) -> bool:
    """Every device is up: ``READY=1`` with a one-line status."""
    return notify("READY=1", f"STATUS={status}")


def reloading() -> bool:
    """A reload (SIGHUP) began; :func:`ready` ends it."""
    return notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")


def stopping() -> bool:
    """The daemon is releasing its devices."""
    return notify("STOPPING=1", "STATUS=stopping: releasing every device")
