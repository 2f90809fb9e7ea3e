"""The Xen PV network front door (``io/netif.h``): a netfront as one more port on the core's switch.

The frontend (Linux's xen-netfront) grants a transmit and a receive ring page
and publishes ``tx-ring-ref``, ``rx-ring-ref``, ``event-channel`` (one
channel for both rings), ``request-rx-copy`` = 1 and its ``feature-*`` nodes
in ``device/vif/<devid>``. The backend advertises ``feature-rx-copy`` (the
only receive mode it has: it copies into the guest's pages, never flips
them), ``feature-sg`` and one queue; no checksum, GSO or multicast-control
feature, no split event channels. Data moves by grant copy both ways
(``IOCTL_GNTDEV_GRANT_COPY``): the backend maps only the two ring pages.

Transmit (``netif_tx_request``: gref, offset, flags, id, size): a packet is
its first request, the ``netif_extra_info`` slots ``NETTXF_extra_info``
announces, then one slot per ``NETTXF_more_data``; the first request's
``size`` is the whole packet's. Every slot is answered (``netif_tx_response``:
id, status; an extra slot with ``NETIF_RSP_NULL``). A slot that crosses its
page, a packet of more than :data:`MAX_SLOTS` slots or whose slots are not all
published, or ring indexes that overrun the ring fail the device; a packet
whose sizes do not add up, of a bad length, with extra info (no GSO or
multicast control was offered) or whose grant cannot be copied is answered
``NETIF_RSP_ERROR`` and counted. A ``NETTXF_csum_blank`` frame gets its
checksum completed (:mod:`pvcore.devices.net.checksum`). The frame then goes
to the switch, which drops a forged source MAC as on every other port.

With ``attach`` the backend writes the device's xenstore nodes itself
(:mod:`pvcore_xen.toolstack`, with the ``mac`` on both sides as libxl writes
it) under ``backend/pvcore-vif``, which the kernel's netback does not watch;
otherwise it serves ``backend/vif/<domid>/<devid>`` as the toolstack wrote it
(only where netback is not loaded).

Receive (``netif_rx_request``: id, gref): frames the switch delivers wait in a
bounded backlog until the guest posts requests; each frame is copied into one
page, or with the frontend's ``feature-sg`` into as many as it needs
(``NETRXF_more_data`` on all but the last), and answered with id, offset 0
and its length as status. Ids are the frontend's own and only echoed.

Rate: the NIC's ``rate=`` (changed live by ``pvcore ctl set-limits``) goes
through :class:`~pvcore.devices.net.pacing.PacedPort`: a transmitted frame the
rate holds back is kept (one) and the tx ring is read no further until it
goes, so the guest's next packets wait in its own ring (a disconnect lets
the held frame go at once); received frames wait in the backlog.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import struct
from typing import Any

import attrs

from pvcore.devices.net import NetEndpoint, Port, format_mac, parse_mac
from pvcore.devices.net.checksum import complete_checksum
from pvcore.devices.net.pacing import PacedPort
from pvcore.devices.net.switch import ETH_HEADER_LEN
from pvcore.ring.memory import GuestMemoryError
from pvcore_xen.grants import GrantMemory, grant_address
from pvcore_xen.host import GNTST_OKAY, PAGE_SIZE, EventChannel, GrantCopy
from pvcore_xen.ring import BackRing, RingError
from pvcore_xen.xenbus import XenbusBackend, XenDeviceError, read_number, require_number
from pvcore_xen.xenstore import XenstoreClient

log = logging.getLogger("pvcore.xen")

TX_REQUEST = struct.Struct("<IHHHH")
"""``netif_tx_request``: gref, offset, flags, id, size."""
TX_RESPONSE = struct.Struct("<Hh")
"""``netif_tx_response``: id, status."""
EXTRA_INFO = struct.Struct("<BB6x")
"""``netif_extra_info``: type, flags (and 6 bytes of type-specific data)."""
RX_REQUEST = struct.Struct("<H2xI")
"""``netif_rx_request``: id, gref."""
RX_RESPONSE = struct.Struct("<HHHh")
"""``netif_rx_response``: id, offset, flags, status (a length when positive)."""

NETTXF_CSUM_BLANK = 1 << 0
NETTXF_MORE_DATA = 1 << 2
NETTXF_EXTRA_INFO = 1 << 3
NETRXF_MORE_DATA = 1 << 2
XEN_NETIF_EXTRA_FLAG_MORE = 1 << 0
NETIF_RSP_ERROR = -1
NETIF_RSP_OKAY = 0
NETIF_RSP_NULL = 1

MAX_SLOTS = 18
"""Slots one packet may take (``XEN_NETBK_LEGACY_SLOTS_MAX``, what netfront never exceeds)."""
RX_BACKLOG = 256
"""Frames kept for a guest that posts no receive requests, before the switch counts them dropped_full."""
MAX_GRANT_REF = 0xFFFFFFFF
PVCORE_KIND = "pvcore-vif"
"""The backend type of the NICs pvcore attaches itself (netback watches ``vif`` only)."""
BACKEND_FEATURES = {"feature-rx-copy": "1", "feature-rx-flip": "0", "feature-sg": "1", "multi-queue-max-queues": "1"}


@attrs.define
class NetifStats:
    """What the backend refused or could not do, beyond what the switch counts."""

    tx_errors: int = 0
    """Packets answered ``NETIF_RSP_ERROR``: sizes that do not add up, extra info, a grant that cannot be copied."""
    rx_errors: int = 0
    """Frames whose copy into the guest's pages failed (a receive request with a bad grant)."""


class NetifPort(Port):
    """The switch port of a :class:`XenNetBackend`."""

    def __init__(self, backend: XenNetBackend, name: str, mac: bytes) -> None:
        super().__init__(name, mac)
        self.backend = backend

    @property
    def max_frame_len(self) -> int:
        """The MTU plus Ethernet and VLAN headers; one page when the frontend cannot take a frame in pieces."""
        return self.backend.max_frame_len

    def deliver(self, frame: bytes) -> bool:
        """Queue ``frame`` for the guest; False if it is not connected or its backlog is full."""
        return self.backend.receive(frame)


class XenNetBackend(XenbusBackend):
    """Serves one netfront (``backend/vif/<domid>/<devid>``) as a port of the endpoint's switch."""

    kind = "vif"
    """The toolstack's NICs (what ``pvcore probe`` lists); ``attach`` makes it :data:`PVCORE_KIND`."""
    attach_kind = PVCORE_KIND
    protocol = "netif"

    def __init__(self, endpoint: NetEndpoint, **where: Any) -> None:
        super().__init__(**where)
        self.endpoint = endpoint
        self.port = NetifPort(self, endpoint.name, endpoint.mac)
        self.stats = NetifStats()
        self.memory: GrantMemory | None = None
        self.channel: EventChannel | None = None
        self.tx: BackRing | None = None
        self.rx: BackRing | None = None
        self.sg = False
        self._backlog: collections.deque[bytes] = collections.deque()
        self._broken = False
        self.pace = PacedPort(self.port, endpoint.throttle, self._service)

    @property
    def max_frame_len(self) -> int:
        """The longest frame either way."""
        longest = self.endpoint.mtu + ETH_HEADER_LEN + 4
        return longest if self.sg else min(longest, PAGE_SIZE)

    async def start(self) -> None:
        """Attach the port (its MAC must be free on the switch), then run the handshake."""
        self.endpoint.switch.attach(self.port)
        try:
            await super().start()
        except BaseException:
            self.endpoint.switch.detach(self.port)
            raise

    async def stop(self) -> None:
        """Disconnect as every xenbus backend does, then detach the port."""
        await super().stop()
        self.endpoint.switch.detach(self.port)

    def toolstack_nodes(self) -> tuple[dict[str, str], dict[str, str]]:
        """What libxl writes for a vif besides the common nodes: its MAC and handle, on both sides."""
        nodes = {"mac": format_mac(self.endpoint.mac), "handle": str(self.devid)}
        return nodes, dict(nodes)

    async def announce(self, client: XenstoreClient) -> None:
        """Publish the features netfront reads: copying receive, scatter-gather, one queue."""
        for node, value in BACKEND_FEATURES.items():
            await client.write(f"{self.backend_path}/{node}", value)

    async def connect(self, client: XenstoreClient, *, resume: bool = False) -> None:
        """Read the frontend's nodes, map both ring pages, bind the channel, serve what is waiting.

        The rings carry on from the ``rsp_prod`` in each page (0 on a fresh
        ring, what a previous backend published on a pick-up).
        """
        front = self.frontend_path
        if await read_number(client, f"{front}/request-rx-copy", limit=1) != 1:
            raise XenDeviceError(f"{front}/request-rx-copy is not 1: this backend only copies received frames")
        if await read_number(client, f"{front}/multi-queue-num-queues", limit=0xFFFF) not in (None, 1):
            raise XenDeviceError(f"{front}/multi-queue-num-queues: this backend offers one queue")
        refs = [await require_number(client, f"{front}/{ring}-ring-ref", limit=MAX_GRANT_REF) for ring in ("tx", "rx")]
        port = await require_number(client, f"{front}/event-channel", limit=MAX_GRANT_REF)
        self.sg = await read_number(client, f"{front}/feature-sg", limit=1) == 1
        await self._check_mac(client)
        self.memory = self.map_memory()
        try:
            self.tx, self.rx = (
                BackRing(self.memory, grant_address(ref), size, name, start=self.memory.read_u32(grant_address(ref) + 8))
                for ref, size, name in zip(refs, (TX_REQUEST.size, RX_REQUEST.size), ("tx", "rx"))
            )
            self.channel = self.open_channel(port, "vif")
        except (GuestMemoryError, XenDeviceError) as exc:
            await self.disconnect()
            raise XenDeviceError(str(exc)) from None
        self._broken = False
        asyncio.get_running_loop().add_reader(self.channel.fileno(), self._on_event)
        self._service()
        if resume and self.channel is not None:
            self.channel.signal()
        log.info("%s: dom%d vif %d connected as %s on switch %s", self.name, self.domid, self.devid,
                 format_mac(self.endpoint.mac), self.endpoint.switch.name)

    async def _check_mac(self, client: XenstoreClient) -> None:
        try:
            text = (await client.read(f"{self.frontend_path}/mac")).decode("ascii", "replace")
        except OSError:
            return
        try:
            same = parse_mac(text) == self.endpoint.mac
        except ValueError:
            same = False
        if not same:
            raise XenDeviceError(
                f"{self.frontend_path}/mac is {text[:32]!r}, but this NIC is {format_mac(self.endpoint.mac)}: "
                "give the vif in xl.cfg the mac= of the pvcore device"
            )

    async def disconnect(self) -> None:
        """Unbind the channel, unmap the rings, drop the backlog."""
        if self.channel is not None:
            asyncio.get_running_loop().remove_reader(self.channel.fileno())
            self.channel.close()
            self.channel = None
        if self.memory is not None:
            self.memory.close()
            self.memory = None
        self.tx = self.rx = None
        self._backlog.clear()
        self.pace.flush()

    def receive(self, frame: bytes) -> bool:
        """A frame from the switch: queue it and copy what the guest has room for."""
        if self.rx is None or self._broken or len(self._backlog) >= RX_BACKLOG:
            return False
        self._backlog.append(frame)
        self._ring_work(self._fill_rx)
        return True

    def _on_event(self) -> None:
        if self.channel is not None:
            self.channel.consume()
            self._service()

    def _service(self) -> None:
        self._ring_work(lambda: self._transmit() | self._fill_rx())

    def _ring_work(self, work: Any) -> None:
        """Do ring ``work``; notify the guest if it asked; fail the device on a broken contract."""
        if self.channel is None or self._broken:
            return
        try:
            notify = work()
        except (GuestMemoryError, RingError, OSError) as exc:
            self._broken = True
            self.fail(str(exc))
            return
        if notify:
            self.channel.signal()

    def _transmit(self) -> bool:
        assert self.tx is not None
        notify = False
        if not self.pace.transmit():
            return False
        for _ in range(4):  # then give the loop back; the rest is served on the next pass
            waiting = self.tx.final_check()
            if not waiting:
                return notify
            while waiting and self.pace.held is None:
                waiting -= self._packet(waiting)
            notify |= self.tx.push()
            if self.pace.held is not None:
                return notify  # read on when the rate lets the held frame go
        asyncio.get_running_loop().call_soon(self._service)
        return notify

    def _packet(self, waiting: int) -> int:
        """Take, copy, answer and switch one packet; return the slots it took."""
        assert self.tx is not None
        slots = [TX_REQUEST.unpack(self.tx.take()[: TX_REQUEST.size])]
        answers: list[int | None] = [slots[0][3]]
        flags = slots[0][2]
        more = flags & NETTXF_EXTRA_INFO
        while more:
            self._check_room(len(answers), waiting)
            more = EXTRA_INFO.unpack(self.tx.take()[: EXTRA_INFO.size])[1] & XEN_NETIF_EXTRA_FLAG_MORE
            answers.append(None)
        more = flags & NETTXF_MORE_DATA
        while more:
            self._check_room(len(answers), waiting)
            slots.append(TX_REQUEST.unpack(self.tx.take()[: TX_REQUEST.size]))
            answers.append(slots[-1][3])
            more = slots[-1][2] & NETTXF_MORE_DATA
        sizes = [slots[0][4] - sum(slot[4] for slot in slots[1:]), *(slot[4] for slot in slots[1:])]
        for (_, offset, _, _, _), size in zip(slots, sizes):
            if size >= 0 and offset + size > PAGE_SIZE:
                raise RingError(f"tx ring: a slot of {size} bytes at offset {offset} crosses its page")
        status = NETIF_RSP_OKAY
        if len(answers) > len(slots) or sizes[0] < 0 or not ETH_HEADER_LEN <= slots[0][4] <= self.max_frame_len:
            status = NETIF_RSP_ERROR
        else:
            pieces = [GrantCopy(self.domid, gref, offset, size) for (gref, offset, _, _, _), size in zip(slots, sizes)]
            frame = bytearray(slots[0][4])
            if any(result != GNTST_OKAY for result in self.host.grant_copy(pieces, frame, to_guest=False)):
                status = NETIF_RSP_ERROR
        for answer in answers:
            self.tx.respond(TX_RESPONSE.pack(answer, status) if answer is not None else TX_RESPONSE.pack(0, NETIF_RSP_NULL))
        if status != NETIF_RSP_OKAY:
            self.stats.tx_errors += 1
        elif flags & NETTXF_CSUM_BLANK and (completed := complete_checksum(frame)) is None:
            self.port.counters.dropped_malformed += 1
        else:
            self.pace.transmit(bytes(completed if flags & NETTXF_CSUM_BLANK else frame))
        return len(answers)

    @staticmethod
    def _check_room(taken: int, waiting: int) -> None:
        if taken >= waiting:
            raise RingError(f"tx ring: a packet's slots were not all published ({waiting} waiting)")
        if taken >= MAX_SLOTS:
            raise RingError(f"tx ring: a packet of more than {MAX_SLOTS} slots")

    def _fill_rx(self) -> bool:
        rx = self.rx
        assert rx is not None
        written = False
        while self._backlog:
            frame = self._backlog[0]
            need = -(-len(frame) // PAGE_SIZE)
            if rx.final_check(need) < need or not self.pace.may_receive(len(frame)):
                break
            self._backlog.popleft()
            requests = [RX_REQUEST.unpack(rx.take()[: RX_REQUEST.size]) for _ in range(need)]
            pieces = [GrantCopy(self.domid, gref, 0, min(PAGE_SIZE, len(frame) - i * PAGE_SIZE)) for i, (_, gref) in enumerate(requests)]
            statuses = self.host.grant_copy(pieces, bytearray(frame), to_guest=True)
            failed = any(status != GNTST_OKAY for status in statuses)
            self.stats.rx_errors += failed
            for i, ((request_id, _), piece) in enumerate(zip(requests, pieces)):
                more = NETRXF_MORE_DATA if i < need - 1 else 0
                rx.respond(RX_RESPONSE.pack(request_id, 0, more, NETIF_RSP_ERROR if failed else piece.length))
            written = True
        return rx.push() if written else False
