"""VIRTIO constants and the one small trait every ring device implements.

A device engine that wants to be reached through a virtio ring (vhost-user,
the in-process loopback) implements :class:`VirtioDevice`.
It never sees a transport: it gets validated :class:`~pvcore.ring.virtqueue.DescriptorChain`
objects through a :class:`VirtioQueue` and completes them.

The dependency points one way: the ring session (:mod:`pvcore.ring.session`)
imports this trait and these feature bits; this module names the session only
through the :class:`VirtioQueue` protocol its ``RunningQueue`` implements.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, ClassVar, Protocol

if TYPE_CHECKING:
    from pvcore.ring.memory import GuestMemory
    from pvcore.ring.virtqueue import DescriptorChain

VIRTIO_ID_NET = 1
VIRTIO_ID_BLOCK = 2
VIRTIO_ID_CONSOLE = 3
VIRTIO_ID_RNG = 4
VIRTIO_ID_SCSI = 8

VIRTIO_F_NOTIFY_ON_EMPTY = 24
VIRTIO_F_ANY_LAYOUT = 27
VIRTIO_RING_F_INDIRECT_DESC = 28
VIRTIO_RING_F_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32

TRANSPORT_FEATURES = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_INDIRECT_DESC) | (1 << VIRTIO_RING_F_EVENT_IDX)
"""Feature bits the core's ring engine offers for every device."""


def bit(n: int) -> int:
    """The feature mask of bit number ``n``."""
    return 1 << n


class DeviceError(Exception):
    """A device cannot be created or configured as asked (bad options, missing file)."""


class RingSession(Protocol):
    """The ring session a queue belongs to, as far as a device may use it."""

    broken: str | None
    """Why the device failed (it then needs a reset), or None while it works."""

    def fail(self, reason: str) -> None:
        """Fail this device (not the daemon, not another guest) because the guest broke the ring."""


class VirtioQueue(Protocol):
    """One started virtqueue as a device sees it (:class:`pvcore.ring.session.RunningQueue` is the one there is)."""

    index: int
    session: RingSession

    @property
    def memory(self) -> GuestMemory:
        """The guest memory this queue's buffers live in."""

    def read(self, chain: DescriptorChain) -> bytes:
        """All readable bytes of ``chain``, concatenated."""

    def write(self, chain: DescriptorChain, data: bytes | memoryview) -> int:
        """Write ``data`` into the writable buffers of ``chain``; return the bytes written."""

    def complete(self, chain: DescriptorChain, written: int) -> None:
        """Hand ``chain`` back to the driver with ``written`` bytes written into it."""


class VirtioDevice(abc.ABC):
    """A device engine reached through virtqueues.

    The ring session calls, in order: :meth:`activate` once the features are
    negotiated, :meth:`queue_started` for each queue the driver enables,
    :meth:`handle` for every validated chain, :meth:`queue_stopping` when a
    queue is stopped, and :meth:`reset` when the session ends. All calls come
    from the session's event loop thread. :meth:`handle` may complete the chain
    at once or keep it and call ``queue.complete`` later (from the loop thread).
    """

    device_id: ClassVar[int]
    max_queue_size: ClassVar[int] = 256

    @abc.abstractmethod
    def num_queues(self) -> int:
        """How many virtqueues the device has."""

    def features(self) -> int:
        """Device-specific feature bits offered (transport bits are added by the core)."""
        return 0

    def config(self) -> bytes:
        """The device configuration space, as the driver reads it."""
        return b""

    def write_config(self, offset: int, data: bytes) -> None:
        """The driver wrote ``data`` at ``offset`` of the config space; default: ignore."""

    def activate(self, features: int) -> None:
        """Features were negotiated; remember the ones that change request handling."""

    def queue_started(self, queue: VirtioQueue) -> None:
        """A queue became ready to carry requests."""

    @abc.abstractmethod
    def handle(self, queue: VirtioQueue, chain: DescriptorChain) -> None:
        """Serve one validated chain; call ``queue.complete(chain, written)`` when done."""

    def queue_stopping(self, queue: VirtioQueue) -> None:
        """A queue is being stopped: complete (or give up) every chain held back on it."""

    def reset(self) -> None:
        """The session ended: drop per-session state (the device may be reused)."""
