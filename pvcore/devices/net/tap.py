"""A tap uplink: the host's kernel as one more port on a switch, so guests reach the host.

A NIC asks for it with ``uplink=tap:NAME`` (see :func:`parse_uplink`): its
switch then has a :class:`TapPort` on the host's tap device ``NAME``, opened
through ``/dev/net/tun`` with ``IFF_TAP | IFF_NO_PI`` (plain Ethernet frames,
no packet-information header). Every NIC of a switch may name the same
uplink; it attaches with the first NIC that names it and closes with the
last (:class:`TapUplinks`). One tap serves one switch.

**Create or attach, never persistent.** If ``NAME`` exists (made beforehand,
e.g. ``ip tuntap add dev NAME mode tap``, then given its address and set up),
pvcore attaches to it and leaves it as it found it when it closes. If it does
not exist, pvcore creates it, without ``TUNSETPERSIST``: it disappears, with
its addresses, when pvcore closes it. pvcore never brings the link up or gives
it an address; that is the host's configuration. Creating a tap needs
``CAP_NET_ADMIN``; attaching to a persistent one needs it too unless the tap
was made for pvcore's user (``ip tuntap add ... user USER``).

The port has no MAC: it is a trusted uplink and may send from any unicast
source the host uses, except an address that belongs to another port (the
switch's rule). The fd is non-blocking and served from the event loop:
readable frames go to the switch (at most :data:`READ_BATCH` per wake-up);
frames for the host are written at once, and if the kernel refuses for now
(``EAGAIN``) they wait in a bounded queue (:data:`DEFAULT_QUEUE` frames) until
the fd is writable; a frame that finds the queue full is refused and the
switch counts it ``dropped_full``. A failed write counts there too and in
:attr:`TapStats.write_errors`; a failed read (the device was deleted) stops
the port reading, with one log line.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import fcntl
import logging
import os
import re
import struct
from pathlib import Path

import attrs

from pvcore.devices.net.switch import MAX_FRAME_LEN, Port, Switch
from pvcore.virtio import DeviceError

log = logging.getLogger("pvcore.net")

TUN_PATH = Path("/dev/net/tun")
TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFNAMSIZ = 16
IFREQ = struct.Struct(f"{IFNAMSIZ}sH22x")
"""struct ifreq as TUNSETIFF reads it: the name, the flags, the rest of the union."""
READ_BATCH = 64
DEFAULT_QUEUE = 256

_IFNAME = re.compile(r"[A-Za-z0-9_.-]{1,15}")


@attrs.define
class TapStats:
    """What the tap device itself refused, beyond what the switch counts."""

    write_errors: int = 0
    """Frames for the host that the kernel refused with an error (counted ``dropped_full`` too)."""
    read_errors: int = 0
    """Reads that failed; the first stops the port reading."""

    def as_dict(self) -> dict[str, int]:
        """The counters by name."""
        return attrs.asdict(self)


def check_ifname(name: str) -> str:
    """``name`` if it can name a Linux network interface; :class:`ValueError` saying why not."""
    if len(name.encode()) > IFNAMSIZ - 1:
        raise ValueError(f"tap name {name!r} is {len(name.encode())} bytes; Linux allows at most {IFNAMSIZ - 1}")
    if not _IFNAME.fullmatch(name) or name in (".", ".."):
        raise ValueError(f"tap name {name!r}: use 1-15 letters, digits, '_', '.' or '-' (e.g. pvtap0)")
    return name


def parse_uplink(text: str) -> str:
    """The tap name of an ``uplink=tap:NAME`` option; :class:`ValueError` naming the fix."""
    kind, sep, name = text.partition(":")
    if kind != "tap" or not sep:
        raise ValueError(f"uplink={text}: the one kind of uplink is a host tap device: uplink=tap:NAME")
    try:
        return check_ifname(name)
    except ValueError as exc:
        raise ValueError(f"uplink={text}: {exc}") from None


def open_tap(name: str) -> int:
    """A non-blocking fd on tap ``name`` (created if it does not exist); :class:`DeviceError` saying why not."""
    check_ifname(name)
    try:
        fd = os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise DeviceError(
            f"tap {name}: {TUN_PATH} does not exist: load the tun module (modprobe tun) "
            "or make the node (mknod /dev/net/tun c 10 200)"
        ) from None
    except OSError as exc:
        raise DeviceError(f"tap {name}: cannot open {TUN_PATH}: {exc.strerror}") from None
    try:
        fcntl.ioctl(fd, TUNSETIFF, IFREQ.pack(name.encode(), IFF_TAP | IFF_NO_PI))
    except OSError as exc:
        os.close(fd)
        raise DeviceError(f"tap {name}: {_setiff_error(exc)}") from None
    return fd


def _setiff_error(exc: OSError) -> str:
    if exc.errno == errno.EPERM:
        return (
            "operation not permitted: creating a tap needs CAP_NET_ADMIN; or create it beforehand for this user "
            "(ip tuntap add dev NAME mode tap user USER)"
        )
    if exc.errno == errno.EBUSY:
        return "busy: another process has it open (a tap without multi-queue takes one)"
    if exc.errno == errno.EINVAL:
        return "an interface of that name exists and is not a tap without multi-queue; pick another name"
    return f"TUNSETIFF failed: {exc.strerror}"


class TapPort(Port):
    """A trusted uplink port (no MAC) whose station is the host's tap device ``name``, open on ``fd``."""

    def __init__(self, name: str, fd: int, loop: asyncio.AbstractEventLoop, *, queue_limit: int = DEFAULT_QUEUE) -> None:
        super().__init__(f"tap:{name}", None)
        self.ifname = name
        self.fd = fd
        self.loop = loop
        self.queue_limit = queue_limit
        self.stats = TapStats()
        self._queue: collections.deque[bytes] = collections.deque()
        self._reading = False

    def start(self) -> None:
        """Begin reading the host's frames into the switch."""
        self.loop.add_reader(self.fd, self._readable)
        self._reading = True

    def close(self) -> None:
        """Stop reading and writing and close the fd (a tap pvcore created goes away)."""
        if self._reading:
            self.loop.remove_reader(self.fd)
            self._reading = False
        if self._queue:
            self.loop.remove_writer(self.fd)
            self._queue.clear()
        os.close(self.fd)

    def deliver(self, frame: bytes) -> bool:
        """Write ``frame`` to the host now, or queue it while the kernel says wait; False if the queue is full."""
        if self._queue:
            if len(self._queue) >= self.queue_limit:
                return False
            self._queue.append(frame)
            return True
        try:
            os.write(self.fd, frame)
        except BlockingIOError:
            self._queue.append(frame)
            self.loop.add_writer(self.fd, self._writable)
        except OSError:
            self.stats.write_errors += 1
            return False
        return True

    def _writable(self) -> None:
        while self._queue:
            try:
                os.write(self.fd, self._queue[0])
            except BlockingIOError:
                return
            except OSError:
                self.stats.write_errors += 1
                self.counters.tx_frames -= 1
                self.counters.tx_bytes -= len(self._queue[0])
                self.counters.dropped_full += 1
            self._queue.popleft()
        self.loop.remove_writer(self.fd)

    def _readable(self) -> None:
        for _ in range(READ_BATCH):
            try:
                frame = os.read(self.fd, MAX_FRAME_LEN)
            except BlockingIOError:
                return
            except OSError as exc:
                self.stats.read_errors += 1
                self.loop.remove_reader(self.fd)
                self._reading = False
                log.warning("tap %s: read failed (%s); the uplink no longer carries the host's frames", self.ifname, exc)
                return
            self.send(frame)


class TapUplinks:
    """The daemon's tap uplinks by tap name, each attached while at least one NIC names it."""

    def __init__(self) -> None:
        self._ports: dict[str, tuple[TapPort, int]] = {}

    def acquire(self, switch: Switch, name: str, loop: asyncio.AbstractEventLoop) -> TapPort:
        """The uplink on tap ``name`` of ``switch``, opened and attached if it is the first use.

        :class:`DeviceError` if the tap cannot be opened or is another switch's uplink.
        """
        held = self._ports.get(name)
        if held is not None:
            port, users = held
            if port.switch is not switch:
                other = port.switch.name if port.switch is not None else "none"
                raise DeviceError(f"tap {name} is already the uplink of switch {other}; one tap serves one switch")
            self._ports[name] = (port, users + 1)
            return port
        port = TapPort(name, open_tap(name), loop)
        try:
            switch.attach(port)
        except DeviceError:
            port.close()
            raise
        port.start()
        self._ports[name] = (port, 1)
        log.info("switch %s: uplink to the host through tap %s", switch.name, name)
        return port

    def release(self, port: TapPort) -> None:
        """One NIC no longer names ``port``; the last one detaches and closes it."""
        held = self._ports.get(port.ifname)
        if held is None or held[0] is not port:
            return
        users = held[1] - 1
        if users:
            self._ports[port.ifname] = (port, users)
            return
        del self._ports[port.ifname]
        if port.switch is not None:
            port.switch.detach(port)
        port.close()


tap_uplinks = TapUplinks()
"""The daemon's tap uplinks."""
