"""Notification between the two sides of a ring.

A :class:`Notifier` is one direction of signalling: a *kick* notifier becomes
readable (``fileno()``) when the guest side has posted buffers, and
:meth:`~Notifier.consume` clears it; a *call* notifier's :meth:`~Notifier.signal`
interrupts the guest. Hypervisor plugins supply the real ones (KVM's
ioeventfd/irqfd are eventfds; Xen's are event-channel ports); the core only
ever uses this small interface.
"""

from __future__ import annotations

import os
from typing import Protocol, runtime_checkable


@runtime_checkable
class Notifier(Protocol):
    """One direction of guest<->backend signalling."""

    def fileno(self) -> int:
        """A file descriptor that polls readable when the other side signalled."""

    def consume(self) -> int:
        """Clear a pending signal; return how many arrived (0 if none)."""

    def signal(self) -> None:
        """Signal the other side (interrupt the guest, or kick the device)."""

    def close(self) -> None:
        """Release the underlying descriptor."""


class EventFdNotifier:
    """A :class:`Notifier` on a Linux eventfd (KVM ioeventfd/irqfd, or a loopback pair).

    ``fd`` is adopted (closed by :meth:`close`); without one a new non-blocking
    eventfd is created.
    """

    def __init__(self, fd: int | None = None) -> None:
        if fd is None:
            fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        else:
            os.set_blocking(fd, False)
        self.fd = fd
        self.signals = 0

    @classmethod
    def adopt(cls, fd: int) -> EventFdNotifier:
        """Adopt an fd a frontend sent as an eventfd; anything else is a ``ValueError``.

        Transports that receive notification fds over a socket (vhost-user,
        and any fd-passing transport) must not poll or write whatever
        descriptor a hostile frontend hands them.
        """
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError as exc:
            raise ValueError(f"fd {fd} is not open: {exc.strerror}") from None
        if target != "anon_inode:[eventfd]":
            raise ValueError(f"fd {fd} is {target}, not an eventfd")
        return cls(fd)

    def __repr__(self) -> str:
        return f"EventFdNotifier(fd={self.fd})"

    def fileno(self) -> int:
        """The eventfd."""
        return self.fd

    def consume(self) -> int:
        """Read and reset the eventfd counter."""
        try:
            return os.eventfd_read(self.fd)
        except BlockingIOError:
            return 0

    def signal(self) -> None:
        """Add one to the eventfd counter."""
        self.signals += 1
        try:
            os.eventfd_write(self.fd, 1)
        except BlockingIOError:
            pass  # the counter is saturated: the other side is already signalled

    def close(self) -> None:
        """Close the eventfd (idempotent)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
