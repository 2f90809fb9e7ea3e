"""virtio-net (VIRTIO 1.x section 5.1): a guest NIC as a port on a :class:`Switch`.

One queue pair: receiveq0 (index 0, the device writes frames for the guest)
and transmitq0 (index 1, the guest's frames for the switch). There is no
control queue, so neither CTRL_VQ nor MQ is offered. No checksum or
segmentation offload is offered either, so every frame either way is a
complete Ethernet frame and the virtio-net header carries nothing but
``num_buffers``. Offered: MAC, STATUS (the link is always up), MRG_RXBUF and
MTU.

Transmit: each chain is a virtio-net header followed by one frame. A header
that asks for an offload that was never offered, a frame longer than the MTU
allows (when MTU was negotiated) or a chain too short for a header is dropped
and counted as ``dropped_malformed`` on the port; everything else goes to the
switch, which applies the source MAC filter.

Receive: the switch calls the port's ``deliver`` (on the loop thread), which
queues the frame in a bounded backlog and refuses it when the backlog is full.
A frame longer than the negotiated MTU allows never gets that far: the port's
``max_frame_len`` says so and the switch counts it as ``dropped_too_big``.
Receive chains the guest posts are held (they count as in flight) until a
frame arrives for them. With MRG_RXBUF a frame is spread over as many held
chains as it needs and ``num_buffers`` says how many; without it one chain
must hold header and frame. A frame that cannot fit (a chain too small, or
bigger than the whole ring) is dropped and moved from the port's ``tx``
counters to ``dropped_too_big``.
When the receive queue stops, the chains still held are completed with
nothing written, which hands every buffer back to the driver and lets the
stop finish at once.

Rate (``rate=`` bits per second, :mod:`pvcore.throttle`): a NIC's throttle has
a bytes-per-second bucket each way, transmit (the write direction) and receive
(the read direction), counting Ethernet frame bytes. A transmitted frame the
rate holds back stays in the guest's ring (its chain is held, so the queue
bounds what waits) and goes to the switch in order once its turn comes; a
received frame waits in the bounded backlog, so a full backlog drops, as
without a rate. When the transmit queue stops, held frames go at once.
"""

from __future__ import annotations

import collections
import logging
import re
import struct

import attrs

from pvcore.devices.net.switch import (
    ETH_HEADER_LEN,
    MAX_FRAME_LEN,
    Port,
    Switch,
    check_station_mac,
    format_mac,
    get_switch,
    parse_mac,
)
from pvcore.devices.net.tap import parse_uplink
from pvcore.ring.memory import GuestMemoryError
from pvcore.ring.session import RunningQueue
from pvcore.ring.virtqueue import DescriptorChain
from pvcore.throttle import Cost, Throttle, ThrottleError, ThrottleGroup, ThrottleLimits, parse_rate
from pvcore.virtio import VIRTIO_F_VERSION_1, VIRTIO_ID_NET, DeviceError, VirtioDevice, bit

log = logging.getLogger("pvcore.net")

VIRTIO_NET_F_MTU = 3
VIRTIO_NET_F_MAC = 5
VIRTIO_NET_F_MRG_RXBUF = 15
VIRTIO_NET_F_STATUS = 16

VIRTIO_NET_S_LINK_UP = 1
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_GSO_NONE = 0

RX_QUEUE = 0
TX_QUEUE = 1

NET_HDR = struct.Struct("<BBHHHHH")
"""struct virtio_net_hdr_v1: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers."""
LEGACY_HDR_LEN = 10
"""A legacy driver that negotiated neither VERSION_1 nor MRG_RXBUF omits num_buffers."""
NET_CONFIG = struct.Struct("<6sHHH")
"""struct virtio_net_config up to mtu: mac, status, max_virtqueue_pairs, mtu."""

VLAN_TAG_LEN = 4
MIN_MTU = 68
MAX_MTU = MAX_FRAME_LEN - ETH_HEADER_LEN
DEFAULT_MTU = 1500
DEFAULT_RX_BACKLOG = 256
DEFAULT_SWITCH = "default"

_SWITCH_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@attrs.define
class VirtioNetStats:
    """Receive-side events of one virtio-net device that the switch cannot see."""

    rx_bad_buffers: int = 0
    """Receive chains returned unused because they could not even hold a header."""


class VirtioNetPort(Port):
    """The switch port of a :class:`VirtioNet`: delivers into the guest's receive queue."""

    def __init__(self, device: VirtioNet, name: str, mac: bytes) -> None:
        super().__init__(name, mac)
        self.device = device

    @property
    def max_frame_len(self) -> int:
        """The longest frame the guest takes: its MTU plus Ethernet and VLAN headers, once MTU is negotiated."""
        return self.device.max_frame_len

    def deliver(self, frame: bytes) -> bool:
        """Queue ``frame`` for the guest; False if it is not receiving or its backlog is full."""
        return self.device.receive(frame)


class VirtioNet(VirtioDevice):
    """A virtio-net device whose NIC is a port on ``switch``.

    The port attaches on construction (a name or MAC already on the switch
    is a :class:`DeviceError`) and stays attached until :meth:`close`.
    ``rx_backlog`` bounds the frames waiting for receive buffers (or for
    their turn under ``throttle``, the NIC's rate).
    """

    device_id = VIRTIO_ID_NET

    def __init__(
        self,
        *,
        name: str,
        mac: bytes,
        switch: Switch,
        mtu: int = DEFAULT_MTU,
        rx_backlog: int = DEFAULT_RX_BACKLOG,
        throttle: Throttle | None = None,
    ) -> None:
        if not MIN_MTU <= mtu <= MAX_MTU:
            raise DeviceError(f"net device {name}: mtu {mtu} is outside {MIN_MTU}..{MAX_MTU}")
        self.name = name
        self.mtu = mtu
        self.rx_backlog = rx_backlog
        self.stats = VirtioNetStats()
        self.port = VirtioNetPort(self, name, mac)
        self._hdr_len = NET_HDR.size
        self._mergeable = False
        self._max_frame = MAX_FRAME_LEN
        self._rx: RunningQueue | None = None
        self._held: collections.deque[tuple[DescriptorChain, int]] = collections.deque()
        self._backlog: collections.deque[bytes] = collections.deque()
        self.throttle = throttle
        self._tx_held: collections.deque[tuple[RunningQueue, DescriptorChain]] = collections.deque()
        self._rx_paid = False
        self._rx_waiting = False
        switch.attach(self.port)

    def __repr__(self) -> str:
        return f"VirtioNet({self.name!r}, {format_mac(self.mac)})"

    @property
    def max_frame_len(self) -> int:
        """The longest frame either way: MTU plus Ethernet and VLAN headers once MTU is negotiated."""
        return self._max_frame

    @property
    def mac(self) -> bytes:
        """The NIC's MAC address (the only source address it may send from)."""
        assert self.port.mac is not None
        return self.port.mac

    def close(self) -> None:
        """Detach from the switch; the device takes no more frames."""
        if self.port.switch is not None:
            self.port.switch.detach(self.port)

    def num_queues(self) -> int:
        """receiveq0 and transmitq0."""
        return 2

    def features(self) -> int:
        """MAC, STATUS, MRG_RXBUF and MTU; no offloads, no control queue."""
        return bit(VIRTIO_NET_F_MAC) | bit(VIRTIO_NET_F_STATUS) | bit(VIRTIO_NET_F_MRG_RXBUF) | bit(VIRTIO_NET_F_MTU)

    def config(self) -> bytes:
        """mac, status (link up), max_virtqueue_pairs (1), mtu."""
        return NET_CONFIG.pack(self.mac, VIRTIO_NET_S_LINK_UP, 1, self.mtu)

    def activate(self, features: int) -> None:
        """Fix the header length, receive buffer merging and the transmit size limit."""
        self._mergeable = bool(features & bit(VIRTIO_NET_F_MRG_RXBUF))
        modern = bool(features & bit(VIRTIO_F_VERSION_1))
        self._hdr_len = NET_HDR.size if modern or self._mergeable else LEGACY_HDR_LEN
        if features & bit(VIRTIO_NET_F_MTU):
            self._max_frame = self.mtu + ETH_HEADER_LEN + VLAN_TAG_LEN
        else:
            self._max_frame = MAX_FRAME_LEN

    def queue_started(self, queue: RunningQueue) -> None:
        """Remember the receive queue; frames for the guest flow from now on."""
        if queue.index == RX_QUEUE:
            previous = self._rx
            if previous is not None and previous is not queue:
                # another connection's receive queue (a migration's source) hands over: its buffers go back
                held = list(self._held)
                self._held.clear()
                for chain, _ in held:
                    previous.complete(chain, 0)
            self._rx = queue
            self._held.clear()

    def handle(self, queue: RunningQueue, chain: DescriptorChain) -> None:
        """Hold a receive buffer, or send a transmitted frame to the switch."""
        if queue.index == RX_QUEUE:
            self._post_rx_buffer(queue, chain)
        else:
            self._transmit(queue, chain)

    def queue_stopping(self, queue: RunningQueue) -> None:
        """Receive queue: give every held buffer back unused and drop the backlog; transmit: send held frames."""
        if queue.index == TX_QUEUE and self.throttle is not None:
            self.throttle.release_all()
            return
        if queue.index != RX_QUEUE or self._rx is not queue:
            return  # not the receive queue frames flow to (another connection's took over)
        held = list(self._held)
        self._held.clear()
        self._backlog.clear()
        self._rx_paid = False
        self._rx = None
        for chain, _ in held:
            queue.complete(chain, 0)

    def reset(self) -> None:
        """Forget the session: held buffers, backlog and negotiated features."""
        self._rx = None
        self._held.clear()
        self._backlog.clear()
        self._tx_held.clear()
        if self.throttle is not None:
            self.throttle.release_all()  # what was held belongs to the old session: nothing is sent
        self._rx_paid = self._rx_waiting = False
        self._hdr_len = NET_HDR.size
        self._mergeable = False
        self._max_frame = MAX_FRAME_LEN

    def receive(self, frame: bytes) -> bool:
        """Queue a frame from the switch for the guest and write what fits now.

        The switch never passes a frame longer than :attr:`max_frame_len`
        (it counts those as ``dropped_too_big``); False if the guest is not
        receiving or the backlog is full.
        """
        queue = self._rx
        if queue is None or queue.session.broken or len(self._backlog) >= self.rx_backlog:
            return False
        self._backlog.append(frame)
        self._fill_rx(queue)
        return True

    def _transmit(self, queue: RunningQueue, chain: DescriptorChain) -> None:
        length = sum(size for _, size in chain.readable)
        if not self._hdr_len + ETH_HEADER_LEN <= length <= self._hdr_len + self._max_frame:
            self.port.counters.dropped_malformed += 1
            queue.complete(chain, 0)
            return
        throttle = self.throttle
        if throttle is not None and not throttle.try_go(Cost(True, 0, length - self._hdr_len)):
            self._tx_held.append((queue, chain))
            throttle.go(Cost(True, 0, length - self._hdr_len), self._tx_turn, queue.session.loop)
            return
        self._send(queue, chain)

    def _tx_turn(self) -> None:
        """The rate lets the oldest held frame go."""
        if not self._tx_held:
            return  # the session it came from was reset
        queue, chain = self._tx_held.popleft()
        if queue.session.broken:
            return
        try:
            self._send(queue, chain)
        except GuestMemoryError as exc:
            queue.session.fail(f"queue {TX_QUEUE}: {exc}")

    def _send(self, queue: RunningQueue, chain: DescriptorChain) -> None:
        data = queue.read(chain)
        flags, gso_type = data[0], data[1]
        if flags & VIRTIO_NET_HDR_F_NEEDS_CSUM or gso_type != VIRTIO_NET_HDR_GSO_NONE:
            self.port.counters.dropped_malformed += 1
        else:
            self.port.send(data[self._hdr_len :])
        queue.complete(chain, 0)

    def _rx_turn(self) -> None:
        """The rate lets the oldest backlog frame go: write it (and what else may go) if the guest is receiving."""
        self._rx_waiting = False
        self._rx_paid = bool(self._backlog)
        if self._rx is not None and not self._rx.session.broken:
            self._fill_rx(self._rx)

    def _post_rx_buffer(self, queue: RunningQueue, chain: DescriptorChain) -> None:
        capacity = sum(size for _, size in chain.writable)
        if capacity < self._hdr_len:
            self.stats.rx_bad_buffers += 1
            queue.complete(chain, 0)
            return
        self._held.append((chain, capacity))
        if self._backlog and queue is self._rx:
            self._fill_rx(queue)

    def _fill_rx(self, queue: RunningQueue) -> None:
        """Write backlog frames into held buffers, oldest first, while they fit."""
        throttle = self.throttle
        try:
            while self._backlog and self._held:
                if throttle is not None and not self._rx_paid:
                    cost = Cost(False, 0, len(self._backlog[0]))
                    if self._rx_waiting:
                        return
                    if not throttle.try_go(cost):
                        self._rx_waiting = True
                        throttle.go(cost, self._rx_turn, queue.session.loop)
                        return
                    self._rx_paid = True
                if not self._place(queue, self._backlog[0]):
                    return
                self._backlog.popleft()
                self._rx_paid = False
        except GuestMemoryError as exc:
            queue.session.fail(f"queue {RX_QUEUE}: {exc}")

    def _place(self, queue: RunningQueue, frame: bytes) -> bool:
        """Write (or drop) one frame; False if it must wait for more receive buffers."""
        needed = self._hdr_len + len(frame)
        held = self._held
        if not self._mergeable:
            chain, capacity = held[0]
            if capacity < needed:
                self.port.count_too_big(frame)
                return True
            held.popleft()
            queue.write(chain, NET_HDR.pack(0, VIRTIO_NET_HDR_GSO_NONE, 0, 0, 0, 0, 1)[: self._hdr_len] + frame)
            queue.complete(chain, needed)
            return True
        count, room = 0, 0
        for _, capacity in held:
            count += 1
            room += capacity
            if room >= needed:
                break
        else:
            if len(held) >= queue.vq.size:
                self.port.count_too_big(frame)
                return True
            return False
        packet = memoryview(NET_HDR.pack(0, VIRTIO_NET_HDR_GSO_NONE, 0, 0, 0, 0, count) + frame)
        offset = 0
        for _ in range(count):
            chain, _ = held.popleft()
            written = queue.write(chain, packet[offset:])
            offset += written
            queue.complete(chain, written)
        return True


@attrs.frozen
class NetEndpoint:
    """Where one NIC plugs in: its switch, and the one MAC it may send from.

    This is the net class's transport-independent engine: a ring front door
    builds a :class:`VirtioNet` from it (:meth:`virtio_device`), a stream front
    door (QEMU ``-netdev stream``) attaches its own port with the same MAC.
    """

    name: str
    mac: bytes
    switch: Switch
    mtu: int = DEFAULT_MTU
    throttle: Throttle | None = attrs.field(default=None, eq=False)
    """The NIC's rate both ways (see :func:`net_limits`); every front door of the NIC spends from it."""
    uplink: str | None = None
    """The host tap device whose uplink port the NIC's switch has while the NIC is served (``uplink=tap:NAME``)."""

    def virtio_device(self) -> VirtioNet:
        """A :class:`VirtioNet` on this endpoint (its port attaches now)."""
        return VirtioNet(name=self.name, mac=self.mac, switch=self.switch, mtu=self.mtu, throttle=self.throttle)

    def set_rate(self, text: str) -> str:
        """Change the NIC's rate (``rate=BITS`` or ``off``); the rate as it reads now. A bad one changes nothing."""
        key, eq, value = text.strip().partition("=")
        if text.strip() in ("off", "none"):
            limits = ThrottleLimits()
        elif eq and key.strip() == "rate":
            limits = net_limits(value)
        else:
            raise ThrottleError(f"net device {self.name}: limits {text!r}: a NIC takes rate=BITS_PER_SECOND (e.g. rate=100M) or off")
        assert self.throttle is not None
        self.throttle.group.set_limits(limits)
        return describe_rate(limits)


def net_limits(text: str) -> ThrottleLimits:
    """A NIC's ``rate=`` (bits per second, each way) as throttle limits on frame bytes."""
    bits = parse_rate("rate", text)
    return ThrottleLimits(bps_read=bits / 8, bps_write=bits / 8)


def describe_rate(limits: ThrottleLimits) -> str:
    """``rate=BITS`` (or ``off``) for a NIC's limits."""
    return "off" if limits.bps_write is None else f"rate={round(limits.bps_write * 8)}"


def parse_net_options(options: dict[str, str], *, name: str) -> NetEndpoint:
    """A :class:`NetEndpoint` from configuration options.

    ``mac=52:54:00:12:34:56`` (required; it must be the MAC the guest's NIC
    uses, e.g. QEMU's ``-device virtio-net-pci,mac=...``, since the switch
    drops frames from any other source), ``switch=NAME`` (default
    ``default``; devices naming the same switch share it), ``mtu=N``
    (default 1500), ``rate=BITS`` (bits per second each way, with an optional
    k, M, G suffix; default no limit), ``uplink=tap:NAME`` (the switch also
    has a port on the host's tap device NAME: :mod:`pvcore.devices.net.tap`).
    """
    known = {"mac", "switch", "mtu", "rate", "uplink"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise DeviceError(
            f"net device {name}: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    text = options.get("mac")
    if not text:
        raise DeviceError(
            f"net device {name}: mac=... is required and must match the guest NIC's MAC "
            "(e.g. mac=52:54:00:12:34:56, as in QEMU's -device virtio-net-pci,mac=...)"
        )
    try:
        mac = parse_mac(text)
        check_station_mac(mac)
    except ValueError as exc:
        raise DeviceError(f"net device {name}: mac={text}: {exc}") from None
    switch_name = options.get("switch", DEFAULT_SWITCH)
    if not _SWITCH_NAME.fullmatch(switch_name):
        raise DeviceError(
            f"net device {name}: switch={switch_name!r}: a switch name is 1-64 letters, digits, '_', '.' or '-'"
        )
    mtu_text = options.get("mtu", str(DEFAULT_MTU))
    try:
        mtu = int(mtu_text, 10)
    except ValueError:
        raise DeviceError(f"net device {name}: mtu={mtu_text}: not a number (e.g. mtu=1500)") from None
    if not MIN_MTU <= mtu <= MAX_MTU:
        raise DeviceError(f"net device {name}: mtu {mtu} is outside {MIN_MTU}..{MAX_MTU}")
    try:
        limits = net_limits(options["rate"]) if "rate" in options else ThrottleLimits()
    except ThrottleError as exc:
        raise DeviceError(f"net device {name}: {exc}") from None
    try:
        uplink = parse_uplink(options["uplink"]) if "uplink" in options else None
    except ValueError as exc:
        raise DeviceError(f"net device {name}: {exc}") from None
    throttle = ThrottleGroup(name, limits).join(name)
    return NetEndpoint(name=name, mac=mac, switch=get_switch(switch_name), mtu=mtu, throttle=throttle, uplink=uplink)


def create_net_device(options: dict[str, str], *, name: str) -> VirtioNet:
    """A :class:`VirtioNet` from configuration options (see :func:`parse_net_options`)."""
    return parse_net_options(options, name=name).virtio_device()
