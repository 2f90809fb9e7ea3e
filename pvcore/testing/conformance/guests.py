"""Device-class guests the kit drives: virtio over a peer's :class:`RingGuest`, or a core stream front door.

Each guest here speaks one device class's protocol from the guest's side —
virtio-blk, virtio-net, virtio-console, virtio-rng requests over any ring
transport; NBD, netdev-stream frames, chardev bytes, the rng FIFO and EGD
over the core's stream front doors — so that the kit checks every plugin with
the same requests, whatever its transport.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import time
from pathlib import Path
from typing import Any

from pvcore.devices.block.virtio_blk import (
    REQUEST_HEADER,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
)
from pvcore.devices.net.virtio_net import NET_HDR
from pvcore.streams.chardev import ChardevFrontDoor
from pvcore.streams.egd import EGD_READ_BLOCKING, EgdFrontDoor
from pvcore.streams.fifo import RngFifoFrontDoor
from pvcore.streams.nbd import (
    NBD_CMD_FLUSH,
    NBD_CMD_READ,
    NBD_CMD_WRITE,
    NBD_FLAG_C_FIXED_NEWSTYLE,
    NBD_FLAG_C_NO_ZEROES,
    NBD_OPT_EXPORT_NAME,
    NBD_OPTS_MAGIC,
    NBD_REQUEST_MAGIC,
    NbdFrontDoor,
)
from pvcore.streams.netdev_stream import NetdevStreamFrontDoor
from pvcore.testing.conformance import RingGuest

SECTOR = 512
MAX_FRAME = 1518
IO_TIMEOUT = 5.0


class GuestError(Exception):
    """The device answered a guest's request wrongly."""


class VirtioBlockGuest:
    """virtio-blk requests on queue 0 of a ring guest."""

    def __init__(self, ring: RingGuest) -> None:
        self.ring = ring

    def _status(self, data: bytes, what: str) -> bytes:
        if not data or data[-1] != VIRTIO_BLK_S_OK:
            raise GuestError(f"virtio-blk {what}: status {data[-1:]!r}, expected OK")
        return data[:-1]

    def read(self, sector: int, count: int) -> bytes:
        """An IN request."""
        used = self.ring.request(0, [REQUEST_HEADER.pack(VIRTIO_BLK_T_IN, 0, sector)], [count * SECTOR, 1])
        return self._status(used.data, f"read of sector {sector}")

    def write(self, sector: int, data: bytes) -> None:
        """An OUT request."""
        used = self.ring.request(0, [REQUEST_HEADER.pack(VIRTIO_BLK_T_OUT, 0, sector), data], [1])
        self._status(used.data, f"write of sector {sector}")

    def flush(self) -> None:
        """A FLUSH request."""
        self._status(self.ring.request(0, [REQUEST_HEADER.pack(VIRTIO_BLK_T_FLUSH, 0, 0)], [1]).data, "flush")

    def close(self) -> None:
        """Disconnect the ring."""
        self.ring.close()


class VirtioNetGuest:
    """virtio-net: frames behind a 12-byte header; queue 0 receives, queue 1 transmits."""

    def __init__(self, ring: RingGuest) -> None:
        self.ring = ring
        self.posted = False

    def send(self, frame: bytes) -> None:
        """Transmit one frame."""
        self.ring.request(1, [bytes(NET_HDR.size) + frame], [])

    def receive(self, timeout: float) -> bytes:
        """Post a receive buffer (if none is posted) and wait for a frame in it."""
        if not self.posted:
            self.ring.submit(0, [], [NET_HDR.size + MAX_FRAME])
            self.posted = True
        (used,) = self.ring.wait_used(0, 1, timeout)
        self.posted = False
        return used.data[NET_HDR.size :]

    def close(self) -> None:
        """Disconnect the ring."""
        self.ring.close()


class VirtioConsoleGuest:
    """virtio-console: queue 0 carries input to the guest, queue 1 its output."""

    def __init__(self, ring: RingGuest) -> None:
        self.ring = ring
        self.pending = bytearray()
        self.posted = False

    def send(self, data: bytes) -> None:
        """Guest output on the transmitq."""
        self.ring.request(1, [data], [])

    def receive(self, size: int, timeout: float) -> bytes:
        """Guest input from receive buffers posted one at a time."""
        deadline = time.monotonic() + timeout
        while len(self.pending) < size:
            if not self.posted:
                self.ring.submit(0, [], [size - len(self.pending)])
                self.posted = True
            (used,) = self.ring.wait_used(0, 1, max(deadline - time.monotonic(), 0.0))
            self.posted = False
            self.pending += used.data
        data, self.pending = bytes(self.pending[:size]), self.pending[size:]
        return data

    def close(self) -> None:
        """Disconnect the ring."""
        self.ring.close()


class VirtioRngGuest:
    """virtio-rng: writable buffers on queue 0."""

    def __init__(self, ring: RingGuest) -> None:
        self.ring = ring

    def read(self, size: int) -> bytes:
        """One request for ``size`` bytes."""
        return self.ring.request(0, [], [size]).data

    def close(self) -> None:
        """Disconnect the ring."""
        self.ring.close()


VIRTIO_GUESTS = {"block": VirtioBlockGuest, "net": VirtioNetGuest, "console": VirtioConsoleGuest, "rng": VirtioRngGuest}
"""Device class -> the virtio guest the kit speaks over a :class:`RingGuest`."""


def _connect(path: Path | str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(IO_TIMEOUT)
    try:
        sock.connect(os.fspath(path))
    except OSError:
        sock.close()
        raise
    return sock


def _receive_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise GuestError(f"the front door closed the connection after {len(data)} of {size} bytes")
        data += chunk
    return bytes(data)


class NbdBlockGuest:
    """A disk reached through the core's NBD front door (fixed newstyle, default export)."""

    def __init__(self, path: Path | str) -> None:
        self.sock = _connect(path)
        self.cookie = 0
        _, opts_magic, _flags = struct.unpack(">QQH", _receive_exactly(self.sock, 18))
        if opts_magic != NBD_OPTS_MAGIC:
            raise GuestError(f"NBD {path}: not a newstyle server (magic {opts_magic:#x})")
        self.sock.sendall(struct.pack(">I", NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES))
        self.sock.sendall(struct.pack(">QII", NBD_OPTS_MAGIC, NBD_OPT_EXPORT_NAME, 0))
        self.size, _transmission_flags = struct.unpack(">QH", _receive_exactly(self.sock, 10))

    def _command(self, command: int, offset: int, length: int, payload: bytes = b"", reply_length: int = 0) -> bytes:
        self.cookie += 1
        self.sock.sendall(struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, 0, command, self.cookie, offset, length) + payload)
        _magic, error, cookie = struct.unpack(">IIQ", _receive_exactly(self.sock, 16))
        if error or cookie != self.cookie:
            raise GuestError(f"NBD command {command}: error {error}, cookie {cookie} (sent {self.cookie})")
        return _receive_exactly(self.sock, reply_length)

    def read(self, sector: int, count: int) -> bytes:
        """NBD_CMD_READ."""
        return self._command(NBD_CMD_READ, sector * SECTOR, count * SECTOR, reply_length=count * SECTOR)

    def write(self, sector: int, data: bytes) -> None:
        """NBD_CMD_WRITE."""
        self._command(NBD_CMD_WRITE, sector * SECTOR, len(data), data)

    def flush(self) -> None:
        """NBD_CMD_FLUSH."""
        self._command(NBD_CMD_FLUSH, 0, 0)

    def close(self) -> None:
        """Close the connection."""
        self.sock.close()


class StreamNetGuest:
    """A NIC reached through the core's netdev stream front door (4-byte big-endian lengths)."""

    def __init__(self, path: Path | str) -> None:
        self.sock = _connect(path)

    def send(self, frame: bytes) -> None:
        """One length-prefixed frame."""
        self.sock.sendall(struct.pack(">I", len(frame)) + frame)

    def receive(self, timeout: float) -> bytes:
        """The next length-prefixed frame."""
        self.sock.settimeout(timeout)
        try:
            (length,) = struct.unpack(">I", _receive_exactly(self.sock, 4))
            return _receive_exactly(self.sock, length)
        except socket.timeout:
            raise TimeoutError(f"no frame within {timeout}s") from None
        finally:
            self.sock.settimeout(IO_TIMEOUT)

    def close(self) -> None:
        """Close the connection."""
        self.sock.close()


class ChardevConsoleGuest:
    """A console reached through the core's chardev front door (raw bytes both ways)."""

    def __init__(self, path: Path | str) -> None:
        self.sock = _connect(path)

    def send(self, data: bytes) -> None:
        """Guest output."""
        self.sock.sendall(data)

    def receive(self, size: int, timeout: float) -> bytes:
        """Guest input."""
        self.sock.settimeout(timeout)
        try:
            return _receive_exactly(self.sock, size)
        except socket.timeout:
            raise TimeoutError(f"{size} input bytes did not arrive within {timeout}s") from None
        finally:
            self.sock.settimeout(IO_TIMEOUT)

    def close(self) -> None:
        """Close the connection."""
        self.sock.close()


class FifoRngGuest:
    """Entropy read from the core's rng FIFO front door, as QEMU's rng-random reads it."""

    def __init__(self, path: Path | str) -> None:
        self.fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)

    def read(self, size: int) -> bytes:
        """What the FIFO holds, up to ``size`` bytes (waiting for the first)."""
        deadline = time.monotonic() + IO_TIMEOUT
        while True:
            try:
                data = os.read(self.fd, size)
            except BlockingIOError:
                data = b""
            if data:
                return data
            if time.monotonic() > deadline:
                raise TimeoutError(f"the rng FIFO stayed empty for {IO_TIMEOUT}s")
            select.select([self.fd], [], [], 0.05)

    def close(self) -> None:
        """Close the FIFO."""
        os.close(self.fd)


class EgdRngGuest:
    """Entropy from the core's EGD front door (blocking reads)."""

    def __init__(self, path: Path | str) -> None:
        self.sock = _connect(path)

    def read(self, size: int) -> bytes:
        """One blocking read of ``min(size, 255)`` bytes."""
        count = min(size, 255)
        self.sock.sendall(bytes([EGD_READ_BLOCKING, count]))
        return _receive_exactly(self.sock, count)

    def close(self) -> None:
        """Close the connection."""
        self.sock.close()


def stream_guest(door: Any) -> Any | None:
    """A guest for one of the core's stream front doors, or None when ``door`` is not one."""
    if isinstance(door, NbdFrontDoor):
        return NbdBlockGuest(door.socket_path)
    if isinstance(door, NetdevStreamFrontDoor):
        return StreamNetGuest(door.socket_path)
    if isinstance(door, ChardevFrontDoor):
        return ChardevConsoleGuest(door.socket_path)
    if isinstance(door, RngFifoFrontDoor):
        return FifoRngGuest(door.fifo_path)
    if isinstance(door, EgdFrontDoor):
        return EgdRngGuest(door.socket_path)
    return None
