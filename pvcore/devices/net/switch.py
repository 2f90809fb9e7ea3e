"""The daemon's L2 learning switch and the port interface every guest NIC implements.

Every network device pvcore serves, whatever its hypervisor or front door
(virtio-net queues, ``-netdev stream`` frames, a tap uplink to the host), is a
:class:`Port` on a :class:`Switch`. Devices that name the same switch share it
through :func:`get_switch`.

The switch is the only path between guests, and it trusts no guest:

* a port with a MAC address may send only from that address; any other source
  is dropped and counted (``dropped_spoof``). A port without one (a trusted
  uplink such as a tap device) may send from any unicast address, except one
  that belongs to another port;
* frames shorter than an Ethernet header or longer than :data:`MAX_FRAME_LEN`,
  and frames with a multicast source, are dropped and counted
  (``dropped_malformed``);
* a frame longer than a port's :attr:`Port.max_frame_len` (e.g. a guest NIC's
  negotiated MTU) is not delivered to it and is counted as ``dropped_too_big``
  on that port, never as transmitted;
* delivery never blocks: a port that cannot take a frame (its bounded queue is
  full, or its guest is not receiving yet) refuses it and the switch counts
  ``dropped_full`` on that port, so one slow guest cannot stall another;
* a frame is never sent back out of the port it came in on.

A port's own MAC is known from its configuration, so it is entered in the
table when the port attaches and never ages out. Addresses seen behind
uplink ports are learned from the source of their frames and forgotten after
``ageing`` seconds without traffic. Unknown unicast, broadcast and multicast
destinations are flooded to every other port.

The switch is not thread safe: attach, detach and forward from the daemon's
event loop thread (or before the loop runs).
"""

from __future__ import annotations

import abc
import logging
import re
import time
from collections.abc import Callable

import attrs

from pvcore.virtio import DeviceError

log = logging.getLogger("pvcore.net")

ETH_ALEN = 6
ETH_HEADER_LEN = 14
MIN_FRAME_LEN = ETH_HEADER_LEN
MAX_FRAME_LEN = 65535 + ETH_HEADER_LEN
DEFAULT_AGEING = 300.0

_LOGGED_DROPS = frozenset({1, 10, 100, 1000, 10000, 100000})
"""Spoofed frames of a port that get a log line: the first, then every tenfold."""
DEFAULT_MAX_ENTRIES = 4096

_MAC_TEXT = re.compile(r"[0-9A-Fa-f]{2}(?::[0-9A-Fa-f]{2}){5}")


def parse_mac(text: str) -> bytes:
    """The 6 bytes of a MAC written as ``52:54:00:12:34:56``; :class:`ValueError` if malformed."""
    if not _MAC_TEXT.fullmatch(text):
        raise ValueError(f"{text!r} is not a MAC address (six hex pairs separated by ':', e.g. 52:54:00:12:34:56)")
    return bytes(int(pair, 16) for pair in text.split(":"))


def format_mac(mac: bytes) -> str:
    """A MAC address as lowercase colon-separated hex."""
    return ":".join(f"{b:02x}" for b in mac)


def is_multicast(mac: bytes) -> bool:
    """Whether ``mac`` is a group (multicast or broadcast) address."""
    return bool(mac[0] & 1)


def check_station_mac(mac: bytes) -> None:
    """Raise :class:`ValueError` unless ``mac`` can be one NIC's own address."""
    if len(mac) != ETH_ALEN:
        raise ValueError(f"a MAC address is {ETH_ALEN} bytes, not {len(mac)}")
    if is_multicast(mac):
        raise ValueError(
            f"{format_mac(mac)} is a multicast address (low bit of the first byte set); "
            "a NIC needs a unicast one, e.g. 52:54:00:12:34:56"
        )
    if mac == bytes(ETH_ALEN):
        raise ValueError("00:00:00:00:00:00 is not a usable MAC address")


@attrs.define
class PortCounters:
    """Traffic through one port, seen from the switch.

    ``rx`` is what the port sent into the switch (and the switch accepted),
    ``tx`` what the switch delivered out of the port. A frame the port took
    but then found its station can never receive (a guest whose receive
    buffers are all too small for it) is moved from ``tx`` to
    ``dropped_too_big`` (:meth:`Port.count_too_big`), so every frame
    switched to a port is counted once: as sent or as dropped.
    """

    rx_frames: int = 0
    rx_bytes: int = 0
    tx_frames: int = 0
    tx_bytes: int = 0
    dropped_spoof: int = 0
    """Frames the port sent from an address that is not its own."""
    dropped_malformed: int = 0
    """Frames the port sent that were too short, too long or otherwise invalid."""
    dropped_full: int = 0
    """Frames for the port that it could not take (queue full, or not receiving)."""
    dropped_too_big: int = 0
    """Frames for the port longer than its station can receive (:attr:`Port.max_frame_len`, or its buffers)."""

    def as_dict(self) -> dict[str, int]:
        """The counters by name."""
        return attrs.asdict(self)


@attrs.define
class SwitchCounters:
    """What the switch did with the frames its ports sent into it."""

    forwarded: int = 0
    """Frames sent to the one port that a learned or static address named."""
    flooded: int = 0
    """Frames sent to every other port (broadcast, multicast, or an unknown destination)."""
    dropped_forged: int = 0
    """Frames dropped because their source address was not the sending port's own (anti-spoofing)."""


class Port(abc.ABC):
    """One attachment point on a :class:`Switch`.

    ``mac`` is the only source address the port may send from, or None for a
    trusted uplink (a tap port) that forwards frames of many stations.
    """

    def __init__(self, name: str, mac: bytes | None) -> None:
        if mac is not None:
            check_station_mac(mac)
        self.name = name
        self.mac = mac
        self.counters = PortCounters()
        self.switch: Switch | None = None

    def __repr__(self) -> str:
        mac = format_mac(self.mac) if self.mac is not None else "uplink"
        return f"{type(self).__name__}({self.name!r}, {mac})"

    @property
    def max_frame_len(self) -> int:
        """The longest frame the port's station can receive; the switch drops longer ones for it."""
        return MAX_FRAME_LEN

    def count_too_big(self, frame: bytes) -> None:
        """A frame this port took turns out too big for its station: count it dropped, not sent.

        It moves from ``tx`` to ``dropped_too_big``. Called from the event loop thread only.
        """
        self.counters.tx_frames -= 1
        self.counters.tx_bytes -= len(frame)
        self.counters.dropped_too_big += 1

    @abc.abstractmethod
    def deliver(self, frame: bytes) -> bool:
        """Take a frame the switch forwards to this port, without blocking.

        Return False if the port cannot take it now (bounded queue full, or
        nobody receiving); the switch then counts it as ``dropped_full``.
        Called from the event loop thread only.
        """

    def send(self, frame: bytes | bytearray | memoryview) -> int:
        """Hand a frame from this port's station to its switch; return how many ports got it.

        A port that is not attached to a switch drops the frame and returns 0.
        """
        if self.switch is None:
            return 0
        return self.switch.forward(self, frame)


@attrs.define
class _Entry:
    port: Port
    last_seen: float
    static: bool


class Switch:
    """An L2 learning switch; see the module documentation for its rules.

    ``clock`` returns monotonic seconds (tests inject their own); ``ageing``
    is how long a learned address stays without traffic; at most
    ``max_entries`` addresses are learned at a time (beyond that the switch
    floods for new stations rather than grow).
    """

    def __init__(
        self,
        name: str,
        *,
        ageing: float = DEFAULT_AGEING,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ageing <= 0:
            raise ValueError(f"switch {name}: ageing must be positive, not {ageing}")
        self.name = name
        self.ageing = ageing
        self.max_entries = max_entries
        self.clock = clock
        self.ports: dict[str, Port] = {}
        self.counters = SwitchCounters()
        self._table: dict[bytes, _Entry] = {}

    def __repr__(self) -> str:
        return f"Switch({self.name!r}, {len(self.ports)} ports)"

    def attach(self, port: Port) -> None:
        """Connect ``port``; its name and its MAC must be unique on this switch."""
        if port.switch is not None:
            raise DeviceError(f"port {port.name} is already attached to switch {port.switch.name}")
        if port.name in self.ports:
            raise DeviceError(f"switch {self.name}: a port named {port.name} is already attached")
        if port.mac is not None:
            owner = self._table.get(port.mac)
            if owner is not None and owner.static:
                raise DeviceError(
                    f"switch {self.name}: MAC {format_mac(port.mac)} of port {port.name} is already "
                    f"used by port {owner.port.name}; give each NIC its own mac=..."
                )
            self._table[port.mac] = _Entry(port, self.clock(), static=True)
        self.ports[port.name] = port
        port.switch = self

    def detach(self, port: Port) -> None:
        """Disconnect ``port`` and forget every address behind it (no-op if not attached)."""
        if port.switch is not self:
            return
        del self.ports[port.name]
        port.switch = None
        for mac in [mac for mac, entry in self._table.items() if entry.port is port]:
            del self._table[mac]

    def lookup(self, mac: bytes) -> Port | None:
        """The port behind ``mac``, or None if unknown or aged out."""
        entry = self._table.get(mac)
        if entry is None:
            return None
        if not entry.static and self.clock() - entry.last_seen > self.ageing:
            del self._table[mac]
            return None
        return entry.port

    def table(self) -> dict[str, str]:
        """The current (unexpired) address table: MAC text -> port name."""
        now = self.clock()
        return {
            format_mac(mac): entry.port.name
            for mac, entry in self._table.items()
            if entry.static or now - entry.last_seen <= self.ageing
        }

    def forward(self, ingress: Port, frame: bytes | bytearray | memoryview) -> int:
        """Switch one frame that ``ingress`` sent; return how many ports it was delivered to."""
        if ingress.switch is not self:
            raise ValueError(f"port {ingress.name} is not attached to switch {self.name}")
        frame = bytes(frame)
        counters = ingress.counters
        if not MIN_FRAME_LEN <= len(frame) <= MAX_FRAME_LEN:
            counters.dropped_malformed += 1
            return 0
        dst, src = frame[:ETH_ALEN], frame[ETH_ALEN : 2 * ETH_ALEN]
        if ingress.mac is not None and src != ingress.mac:
            counters.dropped_spoof += 1
            self.counters.dropped_forged += 1
            if counters.dropped_spoof in _LOGGED_DROPS:
                log.warning(
                    "switch %s: port %s sent from %s, not its own MAC %s; dropped (anti-spoofing, %d so far)",
                    self.name, ingress.name, format_mac(src), format_mac(ingress.mac), counters.dropped_spoof,
                )
            return 0
        if is_multicast(src):
            counters.dropped_malformed += 1
            return 0
        if ingress.mac is None and not self._learn(ingress, src):
            counters.dropped_spoof += 1
            self.counters.dropped_forged += 1
            return 0
        counters.rx_frames += 1
        counters.rx_bytes += len(frame)
        if not is_multicast(dst):
            egress = self.lookup(dst)
            if egress is ingress:
                return 0
            if egress is not None:
                self.counters.forwarded += 1
                return self._deliver(egress, frame)
        self.counters.flooded += 1
        delivered = 0
        for port in list(self.ports.values()):
            if port is not ingress:
                delivered += self._deliver(port, frame)
        return delivered

    def _learn(self, port: Port, src: bytes) -> bool:
        """Record that ``src`` is behind uplink ``port``; False if another port owns it."""
        now = self.clock()
        entry = self._table.get(src)
        if entry is not None:
            if entry.static:
                return entry.port is port
            entry.port, entry.last_seen = port, now
            return True
        if len(self._table) >= self.max_entries:
            self._expire(now)
            if len(self._table) >= self.max_entries:
                return True
        self._table[src] = _Entry(port, now, static=False)
        return True

    def _expire(self, now: float) -> None:
        stale = [mac for mac, e in self._table.items() if not e.static and now - e.last_seen > self.ageing]
        for mac in stale:
            del self._table[mac]

    @staticmethod
    def _deliver(port: Port, frame: bytes) -> int:
        if len(frame) > port.max_frame_len:
            port.counters.dropped_too_big += 1
            return 0
        if port.deliver(frame):
            port.counters.tx_frames += 1
            port.counters.tx_bytes += len(frame)
            return 1
        port.counters.dropped_full += 1
        return 0


class SwitchRegistry:
    """Switches by name, created on first use, so that devices naming one share it."""

    def __init__(self) -> None:
        self._switches: dict[str, Switch] = {}

    def get(self, name: str) -> Switch:
        """The switch called ``name``, created with default settings if new."""
        switch = self._switches.get(name)
        if switch is None:
            switch = self._switches[name] = Switch(name)
        return switch

    def names(self) -> list[str]:
        """Names of the switches that exist."""
        return sorted(self._switches)


switches = SwitchRegistry()
"""The daemon's switches."""


def get_switch(name: str) -> Switch:
    """The daemon's switch called ``name`` (created on first use)."""
    return switches.get(name)
