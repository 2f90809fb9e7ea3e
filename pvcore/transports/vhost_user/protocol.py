"""The vhost-user wire format (QEMU docs/interop/vhost-user.rst), both directions.

A message is a header of three native-endian u32 — request, flags (version
0x1, REPLY 0x4, NEED_REPLY 0x8), payload size — then the payload; file
descriptors travel as SCM_RIGHTS ancillary data with the header's bytes.

Everything a frontend sends is checked by :func:`decode` before a backend
acts on it: the request must be known and supported, the payload size must
be the one that request carries, the number of fds must be exactly what the
request needs, and sizes are bounded. Any violation is a
:class:`ProtocolError`; the backend then closes that connection (fds that came
with the message are closed too). :func:`read_message` reads one message
from a non-blocking socket on an asyncio loop.
"""

from __future__ import annotations

import asyncio
import enum
import os
import socket
import struct

import attrs

VERSION = 0x1
VERSION_MASK = 0x3
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8

F_PROTOCOL_FEATURES = 30
F_LOG_ALL = 26
"""VHOST_F_LOG_ALL: a vhost (transport) feature bit; set, the back end logs every guest write (migration)."""
"""The virtio feature bit (reserved by VIRTIO) that announces protocol features."""

VRING_INDEX_MASK = 0xFF
VRING_NOFD = 1 << 8
"""In SET_VRING_KICK/CALL/ERR: no fd is attached (polling / no notification)."""
VRING_F_LOG = 1
"""SET_VRING_ADDR flag: log used-ring writes (migration)."""

MAX_REGIONS = 8
"""Regions of a SET_MEM_TABLE (VHOST_MEMORY_BASELINE_NREGIONS)."""
MAX_FDS = MAX_REGIONS
MAX_CONFIG_SIZE = 256
"""Largest config-space access (QEMU's VHOST_USER_MAX_CONFIG_SIZE)."""
MAX_PAYLOAD = 4096
"""No request we accept carries more; a bigger size is refused before it is read."""

HEADER = struct.Struct("=III")
_U64 = struct.Struct("=Q")
_STATE = struct.Struct("=II")
_ADDR = struct.Struct("=IIQQQQ")
_LOG = struct.Struct("=QQ")
_MEMORY_HEAD = struct.Struct("=II")
_REGION = struct.Struct("=QQQQ")
_CONFIG_HEAD = struct.Struct("=III")
_INFLIGHT = struct.Struct("=QQHH4x")
"""QEMU's struct VhostUserInflight, padded to its 8-byte alignment (24 bytes)."""


class ProtocolError(Exception):
    """A message broke the vhost-user protocol; the message says how."""


class Request(enum.IntEnum):
    """Front-end request types (the ones the spec defines)."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40


class ProtocolFeature(enum.IntEnum):
    """Protocol feature bit numbers."""

    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16


class Payload(enum.Enum):
    """The payload shapes of the requests a pvcore backend accepts."""

    NONE = "none"
    U64 = "u64"
    STATE = "vring state"
    ADDR = "vring address"
    MEMORY = "memory table"
    LOG = "log description"
    CONFIG = "config space"
    INFLIGHT = "inflight description"


SUPPORTED: dict[Request, Payload] = {
    Request.GET_FEATURES: Payload.NONE,
    Request.SET_FEATURES: Payload.U64,
    Request.SET_OWNER: Payload.NONE,
    Request.RESET_OWNER: Payload.NONE,
    Request.SET_MEM_TABLE: Payload.MEMORY,
    Request.SET_VRING_NUM: Payload.STATE,
    Request.SET_VRING_ADDR: Payload.ADDR,
    Request.SET_VRING_BASE: Payload.STATE,
    Request.GET_VRING_BASE: Payload.STATE,
    Request.SET_VRING_KICK: Payload.U64,
    Request.SET_VRING_CALL: Payload.U64,
    Request.SET_VRING_ERR: Payload.U64,
    Request.GET_PROTOCOL_FEATURES: Payload.NONE,
    Request.SET_PROTOCOL_FEATURES: Payload.U64,
    Request.GET_QUEUE_NUM: Payload.NONE,
    Request.SET_VRING_ENABLE: Payload.STATE,
    Request.GET_CONFIG: Payload.CONFIG,
    Request.SET_CONFIG: Payload.CONFIG,
    Request.RESET_DEVICE: Payload.NONE,
    Request.SET_LOG_BASE: Payload.LOG,
    Request.GET_INFLIGHT_FD: Payload.INFLIGHT,
    Request.SET_INFLIGHT_FD: Payload.INFLIGHT,
}
"""Every request a pvcore backend serves, with its payload shape."""

NOTIFIER_REQUESTS = frozenset({Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR})


@attrs.frozen
class VringState:
    """A vring state description: queue index and a number (size, base, enable)."""

    index: int
    num: int


@attrs.frozen
class VringAddr:
    """A vring address description (frontend user addresses of the three rings)."""

    index: int
    flags: int
    desc: int
    used: int
    avail: int
    log: int = 0


@attrs.frozen
class LogDesc:
    """Where the dirty log is in the fd that comes with SET_LOG_BASE (LOG_SHMFD)."""

    size: int
    offset: int


@attrs.frozen
class InflightDesc:
    """The inflight region (INFLIGHT_SHMFD): its place in the fd, and the queues it was made for."""

    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int


@attrs.frozen
class RegionDesc:
    """One region of a memory table."""

    guest_addr: int
    size: int
    user_addr: int
    mmap_offset: int


@attrs.frozen
class MemoryTable:
    """A memory regions description (SET_MEM_TABLE)."""

    regions: tuple[RegionDesc, ...]


@attrs.frozen
class ConfigSpace:
    """A virtio device config space access: offset, size, flags and the bytes."""

    offset: int
    size: int
    flags: int
    payload: bytes


Body = int | VringState | VringAddr | MemoryTable | ConfigSpace | LogDesc | InflightDesc | None


@attrs.define
class Message:
    """One raw message as read from the socket: header fields, payload and the fds that came with it."""

    request: int
    flags: int
    payload: bytes
    fds: list[int] = attrs.field(factory=list)

    @property
    def need_reply(self) -> bool:
        """The frontend set NEED_REPLY (it wants an ack if REPLY_ACK was negotiated)."""
        return bool(self.flags & FLAG_NEED_REPLY)

    @property
    def name(self) -> str:
        """The request's name, or its number if unknown."""
        try:
            return Request(self.request).name
        except ValueError:
            return f"request {self.request}"

    def close_fds(self) -> None:
        """Close every fd that came with the message and was not taken."""
        fds, self.fds = self.fds, []
        for fd in fds:
            os.close(fd)


def encode(request: int, payload: bytes = b"", *, flags: int = VERSION) -> bytes:
    """A whole message: header and payload."""
    return HEADER.pack(request, flags, len(payload)) + payload


def encode_u64(value: int) -> bytes:
    """A u64 payload."""
    return _U64.pack(value)


def encode_state(state: VringState) -> bytes:
    """A vring state payload."""
    return _STATE.pack(state.index, state.num)


def encode_log(log: LogDesc) -> bytes:
    """A SET_LOG_BASE payload (size, then offset)."""
    return _LOG.pack(log.size, log.offset)


def encode_inflight(inflight: InflightDesc) -> bytes:
    """A GET/SET_INFLIGHT_FD payload."""
    return _INFLIGHT.pack(inflight.mmap_size, inflight.mmap_offset, inflight.num_queues, inflight.queue_size)


def decode_inflight(payload: bytes) -> InflightDesc:
    """Parse a GET/SET_INFLIGHT_FD payload (24 bytes as QEMU sends it; 20 without the tail padding)."""
    if len(payload) not in (_INFLIGHT.size, _INFLIGHT.size - 4):
        raise ProtocolError(f"inflight description of {len(payload)} bytes (expected {_INFLIGHT.size})")
    return InflightDesc(*_INFLIGHT.unpack(payload.ljust(_INFLIGHT.size, b"\0")))


def encode_addr(addr: VringAddr) -> bytes:
    """A vring address payload."""
    return _ADDR.pack(addr.index, addr.flags, addr.desc, addr.used, addr.avail, addr.log)


def encode_memory(table: MemoryTable) -> bytes:
    """A memory table payload (only the regions present, as QEMU sends it)."""
    regions = b"".join(_REGION.pack(r.guest_addr, r.size, r.user_addr, r.mmap_offset) for r in table.regions)
    return _MEMORY_HEAD.pack(len(table.regions), 0) + regions


def encode_config(config: ConfigSpace) -> bytes:
    """A config space payload."""
    return _CONFIG_HEAD.pack(config.offset, config.size, config.flags) + config.payload


def decode_u64(payload: bytes) -> int:
    """Parse a u64 payload (used for replies, whose size the caller checked)."""
    return _U64.unpack(payload)[0]


def decode_state(payload: bytes) -> VringState:
    """Parse a vring state payload."""
    return VringState(*_STATE.unpack(payload))


def decode_config(payload: bytes) -> ConfigSpace:
    """Parse a config space payload; its size must match its header."""
    if len(payload) < _CONFIG_HEAD.size:
        raise ProtocolError(f"config payload of {len(payload)} bytes is shorter than its header")
    offset, size, flags = _CONFIG_HEAD.unpack_from(payload)
    if size > MAX_CONFIG_SIZE or offset > MAX_CONFIG_SIZE - size:
        raise ProtocolError(f"config access {offset}+{size} is outside the {MAX_CONFIG_SIZE}-byte config space")
    if len(payload) != _CONFIG_HEAD.size + size:
        raise ProtocolError(f"config payload of {len(payload)} bytes does not match its size field {size}")
    return ConfigSpace(offset, size, flags, payload[_CONFIG_HEAD.size :])


def _decode_memory(payload: bytes) -> MemoryTable:
    if len(payload) < _MEMORY_HEAD.size:
        raise ProtocolError(f"memory table of {len(payload)} bytes is shorter than its header")
    count, _padding = _MEMORY_HEAD.unpack_from(payload)
    if not 1 <= count <= MAX_REGIONS:
        raise ProtocolError(f"memory table with {count} regions (allowed 1..{MAX_REGIONS})")
    if len(payload) != _MEMORY_HEAD.size + count * _REGION.size:
        raise ProtocolError(f"memory table of {count} regions cannot be {len(payload)} bytes")
    regions = tuple(
        RegionDesc(*_REGION.unpack_from(payload, _MEMORY_HEAD.size + i * _REGION.size)) for i in range(count)
    )
    return MemoryTable(regions)


_FIXED_SIZES = {
    Payload.NONE: 0, Payload.U64: _U64.size, Payload.STATE: _STATE.size, Payload.ADDR: _ADDR.size,
    Payload.LOG: _LOG.size,
}
_FIXED_PARSERS = {
    Payload.NONE: lambda payload: None,
    Payload.U64: decode_u64,
    Payload.STATE: decode_state,
    Payload.ADDR: lambda payload: VringAddr(*_ADDR.unpack(payload)),
    Payload.LOG: lambda payload: LogDesc(*_LOG.unpack(payload)),
}


def _expected_fds(request: Request, body: Body) -> int:
    if request is Request.SET_MEM_TABLE:
        assert isinstance(body, MemoryTable)
        return len(body.regions)
    if request in NOTIFIER_REQUESTS:
        assert isinstance(body, int)
        return 0 if body & VRING_NOFD else 1
    if request in (Request.SET_LOG_BASE, Request.SET_INFLIGHT_FD):
        return 1
    return 0


def decode(message: Message) -> tuple[Request, Body]:
    """Validate ``message`` and parse its payload.

    Raises :class:`ProtocolError` (after closing the message's fds) for an
    unknown or unsupported request, a bad version, a payload size that is not
    the request's, or a number of fds that is not what the request carries.
    """
    try:
        return _decode(message)
    except ProtocolError:
        message.close_fds()
        raise


def _decode(message: Message) -> tuple[Request, Body]:
    if message.flags & VERSION_MASK != VERSION:
        raise ProtocolError(f"{message.name}: version {message.flags & VERSION_MASK} (only {VERSION} exists)")
    try:
        request = Request(message.request)
    except ValueError:
        raise ProtocolError(f"unknown request {message.request}") from None
    shape = SUPPORTED.get(request)
    if shape is None:
        raise ProtocolError(f"{request.name} is not supported (its protocol feature was never offered)")
    payload = message.payload
    body: Body
    if shape is Payload.MEMORY:
        body = _decode_memory(payload)
    elif shape is Payload.CONFIG:
        body = decode_config(payload)
    elif shape is Payload.INFLIGHT:
        body = decode_inflight(payload)
    else:
        expected = _FIXED_SIZES[shape]
        if len(payload) != expected:
            raise ProtocolError(f"{request.name}: payload of {len(payload)} bytes, a {shape.value} is {expected}")
        body = _FIXED_PARSERS[shape](payload)
    wanted = _expected_fds(request, body)
    if len(message.fds) != wanted:
        raise ProtocolError(f"{request.name}: came with {len(message.fds)} fds, needs exactly {wanted}")
    return request, body


async def _ready(loop: asyncio.AbstractEventLoop, sock: socket.socket, *, write: bool = False) -> None:
    ready = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    (loop.add_writer if write else loop.add_reader)(sock.fileno(), wake)
    try:
        await ready
    finally:
        (loop.remove_writer if write else loop.remove_reader)(sock.fileno())


async def send_message(loop: asyncio.AbstractEventLoop, sock: socket.socket, data: bytes, fds: list[int]) -> None:
    """Send ``data`` on non-blocking ``sock`` with ``fds`` attached to its first bytes (SCM_RIGHTS)."""
    while True:
        try:
            sent = socket.send_fds(sock, [data], fds)
            break
        except BlockingIOError:
            await _ready(loop, sock, write=True)
    if sent < len(data):
        await loop.sock_sendall(sock, data[sent:])


async def read_message(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> Message | None:
    """Read one message from non-blocking ``sock``; None at a clean end of stream.

    Raises :class:`ProtocolError` for a stream that ends inside a message,
    for more fds than any request carries, and for a payload size above
    :data:`MAX_PAYLOAD` (the payload is then not read).
    """
    header = bytearray()
    fds: list[int] = []
    try:
        while len(header) < HEADER.size:
            try:
                data, new_fds, msg_flags, _ = socket.recv_fds(
                    sock, HEADER.size - len(header), MAX_FDS, socket.MSG_CMSG_CLOEXEC
                )
            except BlockingIOError:
                await _ready(loop, sock)
                continue
            fds.extend(new_fds)
            if msg_flags & socket.MSG_CTRUNC:
                raise ProtocolError(f"message came with more than {MAX_FDS} fds")
            if not data:
                if header or fds:
                    raise ProtocolError("connection closed inside a message header")
                return None
            header += data
        request, flags, size = HEADER.unpack(header)
        if size > MAX_PAYLOAD:
            raise ProtocolError(f"request {request}: payload size {size} exceeds {MAX_PAYLOAD}")
        payload = bytearray()
        while len(payload) < size:
            chunk = await loop.sock_recv(sock, size - len(payload))
            if not chunk:
                raise ProtocolError(f"connection closed inside a payload ({len(payload)} of {size} bytes)")
            payload += chunk
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return Message(request, flags, bytes(payload), fds)
