"""The grant-mapped virtio front door: a xenbus backend driving a core ring session.

The xenstore contract (docs/hypervisors/xen.md, "virtio over xenbus") in
short: at InitWait the backend publishes ``features`` (hex), ``num-queues``,
``max-queue-size`` and ``config`` (hex bytes); the frontend answers with the
``features`` it accepts (hex) and, per queue ``n``, ``queue-n/size``,
``queue-n/desc``, ``queue-n/avail``, ``queue-n/used`` (hex grant DMA
addresses) and ``queue-n/event-channel`` (a port it allocated for the
backend), then goes Initialised. On connect the door negotiates, installs
:class:`~pvcore_xen.grants.GrantMemory` (``pvcore_map_memory``), binds each
queue's event channel (``pvcore_open_notifier``; one channel carries both the
guest's kicks and the backend's interrupts) and starts the queues. Rings,
validation and the device are the core's; when the ring engine breaks the
session, the error notifier fails the device through the handshake.

A pick-up after a backend restart (``connect(..., resume=True)``) does the
same on rings the driver is already using, and starts each queue at the used
ring's ``idx`` (the last completion the previous backend published): every
chain the driver made available after that is handled now, which includes
the ones the previous backend had taken but not completed (they run again).
Each channel is signalled once, in case the previous backend published
completions but died before the interrupt.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from pvcore.ring.memory import GuestMemoryError
from pvcore.ring.notify import EventFdNotifier
from pvcore.ring.session import SessionError, VirtioSession
from pvcore.virtio import (
    TRANSPORT_FEATURES,
    VIRTIO_ID_BLOCK,
    VIRTIO_ID_NET,
    VIRTIO_ID_RNG,
    VIRTIO_ID_SCSI,
    DeviceError,
    VirtioDevice,
)
from pvcore_xen.grants import GrantMemory
from pvcore_xen.xenbus import XenbusBackend, XenDeviceError, require_number
from pvcore_xen.xenstore import XenstoreClient

log = logging.getLogger("pvcore.xen")

VIRTIO_TYPES = {"block": VIRTIO_ID_BLOCK, "net": VIRTIO_ID_NET, "rng": VIRTIO_ID_RNG, "scsi": VIRTIO_ID_SCSI}
"""Device class -> virtio device id; libxl's backend ``type`` node is ``virtio,device<id in hex>``.

scsi is the pvcore-scsi plugin's class (virtio-scsi); any class with a ring form could be listed here.
"""

U64 = (1 << 64) - 1
MAX_PORT = (1 << 32) - 1


def virtio_type(device_class: str) -> str:
    """The ``type`` node libxl writes for a virtio device of ``device_class``."""
    return f"virtio,device{VIRTIO_TYPES[device_class]:x}"


class XenVirtioBackend(XenbusBackend):
    """Serves one virtio device to one Xen guest through grant-mapped rings."""

    kind = "virtio"

    def __init__(self, device: VirtioDevice, device_class: str, **where: Any) -> None:
        super().__init__(**where)
        self.device = device
        self.device_class = device_class
        self.session: VirtioSession | None = None
        self.memory: GrantMemory | None = None
        self._error: EventFdNotifier | None = None

    async def announce(self, client: XenstoreClient) -> None:
        """Check the toolstack's ``type`` node; publish features, queue count and limit, config."""
        try:
            kind = (await client.read(f"{self.backend_path}/type")).decode("ascii", "replace")
        except OSError:
            kind = None
        if kind is not None and kind != virtio_type(self.device_class):
            raise XenDeviceError(f"{self.backend_path}/type is {kind!r}, but this backend serves {virtio_type(self.device_class)}")
        offered = TRANSPORT_FEATURES | self.device.features()
        for node, value in (
            ("features", f"{offered:x}"),
            ("num-queues", str(self.device.num_queues())),
            ("max-queue-size", str(self.device.max_queue_size)),
            ("config", self.device.config().hex()),
        ):
            await client.write(f"{self.backend_path}/{node}", value)

    async def connect(self, client: XenstoreClient, *, resume: bool = False) -> None:
        """Read the frontend's queues and start a ring session on them (from the used index, to ``resume``)."""
        front = self.frontend_path
        features = await require_number(client, f"{front}/features", limit=U64, base=16)
        queues = []
        for index in range(self.device.num_queues()):
            prefix = f"{front}/queue-{index}"
            size = await require_number(client, f"{prefix}/size", limit=0xFFFF)
            rings = [await require_number(client, f"{prefix}/{ring}", limit=U64, base=16) for ring in ("desc", "avail", "used")]
            port = await require_number(client, f"{prefix}/event-channel", limit=MAX_PORT)
            queues.append((size, rings, port))
        loop = asyncio.get_running_loop()
        self.session = VirtioSession(self.device, name=self.name, loop=loop)
        try:
            self._error = EventFdNotifier()
            loop.add_reader(self._error.fileno(), self._on_session_error)
            self.session.negotiate(features)
            self.memory = self.map_memory()
            self.session.set_memory(self.memory)
            channels = []
            for index, (size, (desc, avail, used), port) in enumerate(queues):
                channel = self.open_channel(port, f"queue {index}")
                channels.append(channel)
                self.session.configure_queue(
                    index, size=size, desc=desc, avail=avail, used=used, kick=channel, call=channel, err=self._error
                )
                if resume:
                    try:
                        self.session.set_queue_base(index, self.memory.read_u16(used + 2))
                    except GuestMemoryError as exc:
                        raise XenDeviceError(f"queue {index}: used ring: {exc}") from None
            for index in range(len(queues)):
                self.session.start_queue(index)
            if resume:
                for channel in channels:
                    channel.signal()
        except (SessionError, GuestMemoryError, DeviceError, ValueError) as exc:
            await self.disconnect()
            raise XenDeviceError(str(exc)) from None
        except Exception:
            await self.disconnect()
            raise
        log.info(
            "%s: dom%d virtio %s %d %s, %d queues",
            self.name, self.domid, self.device_class, self.devid, "picked up" if resume else "connected", len(queues),
        )

    def _on_session_error(self) -> None:
        if self._error is not None:
            self._error.consume()
        if self.session is not None and self.session.broken:
            self.fail(f"ring: {self.session.broken}")

    async def disconnect(self) -> None:
        """Stop the queues (finishing in-flight requests), close the session, unmap the grants."""
        if self._error is not None:
            asyncio.get_running_loop().remove_reader(self._error.fileno())
        if self.session is not None:
            await self.session.shutdown()
            self.session = None
        if self._error is not None:
            self._error.close()
            self._error = None
        if self.memory is not None:
            self.memory.close()
            self.memory = None
