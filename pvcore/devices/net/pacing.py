"""A NIC's ``rate=`` applied to a front door that moves whole frames in order (e.g. Xen's netif).

:class:`PacedPort` wraps the door's switch :class:`~pvcore.devices.net.switch.Port`
and the NIC's :class:`~pvcore.throttle.Throttle` (one bytes-per-second bucket
each way, :func:`~pvcore.devices.net.virtio_net.net_limits`). As with
virtio-net, a frame the rate holds back waits; it is never dropped:

* transmit: the door hands each frame of its guest to :meth:`PacedPort.transmit`.
  One the rate holds back is kept (only one) and the door reads no further
  until it goes, so the guest's next frames wait in its own ring;
* receive: the door asks :meth:`PacedPort.may_receive` before it writes the
  next frame of its backlog into the guest, and leaves it there if not.

Either way the door's ``retry`` runs on the event loop when the held frame's
turn comes. ``pvcore ctl set-limits`` changes the throttle's group, so a
running door follows a new rate at once.
"""

from __future__ import annotations

import asyncio

from pvcore.devices.net.switch import Port
from pvcore.throttle import Pacer, Release, Throttle


class PacedPort:
    """Frames of ``port`` through ``throttle`` (None: no rate), both ways; ``retry`` resumes the door."""

    def __init__(self, port: Port, throttle: Throttle | None, retry: Release) -> None:
        self.port = port
        self.retry = retry
        self.tx = Pacer(throttle, write=True)
        self.rx = Pacer(throttle, write=False)
        self.held: bytes | None = None
        """The transmitted frame the rate holds back, if any."""

    def transmit(self, frame: bytes | None = None) -> bool:
        """Send ``frame`` (or the held one) to the switch if the rate lets it go; False: it is held.

        Call it with no frame to let the held one go before reading more; True if none is held.
        """
        if frame is not None:
            assert self.held is None, "a frame is already held: read no further while one is"
            self.held = frame
        if self.held is None:
            return True
        if not self.tx.may_go(len(self.held), self.retry, asyncio.get_running_loop()):
            return False
        frame, self.held = self.held, None
        self.port.send(frame)
        return True

    def may_receive(self, nbytes: int) -> bool:
        """Whether the next received frame (``nbytes``) may be written into the guest now."""
        return self.rx.may_go(nbytes, self.retry, asyncio.get_running_loop())

    def flush(self) -> None:
        """The door disconnects: the held frame goes at once and any wait is forgotten."""
        self.tx.reset()
        self.rx.reset()
        if self.held is not None:
            frame, self.held = self.held, None
            self.port.send(frame)
