"""The NBD front door: a block engine exported over the Network Block Device protocol.

For hypervisors whose own device model owns the ring (QEMU pseries serving a
PAPR guest's v-scsi disk or CD-ROM, or any QEMU ``-drive file=nbd+unix://...``),
:class:`NbdFrontDoor` serves one :class:`~pvcore.devices.block.backend.BlockBackend`
as one export on a Unix socket; :func:`block_export` finds it for a device. It speaks the fixed newstyle handshake and
the transmission phase with simple or structured replies, as described in
the protocol document of the NetworkBlockDevice project (doc/proto.md):

* handshake: ``NBD_FLAG_FIXED_NEWSTYLE`` and ``NBD_FLAG_NO_ZEROES``; options
  ``NBD_OPT_EXPORT_NAME``, ``NBD_OPT_GO``, ``NBD_OPT_INFO`` (answering
  ``NBD_INFO_EXPORT``, ``NBD_INFO_NAME`` when asked, and always
  ``NBD_INFO_BLOCK_SIZE`` with a minimum of 1 byte), ``NBD_OPT_LIST``,
  ``NBD_OPT_ABORT``, ``NBD_OPT_STRUCTURED_REPLY`` (no data, once; otherwise
  ``NBD_REP_ERR_INVALID``), and after it ``NBD_OPT_LIST_META_CONTEXT`` and
  ``NBD_OPT_SET_META_CONTEXT`` with the one context ``base:allocation``
  (before structured replies, or malformed: ``NBD_REP_ERR_INVALID``; an
  unknown export: ``NBD_REP_ERR_UNKNOWN``; queries in other namespaces match
  nothing). Every other option, TLS and extended headers included, is
  refused with ``NBD_REP_ERR_UNSUP``. The empty export name means the
  default (the only) export.
* transmission: READ, WRITE, FLUSH, TRIM, WRITE_ZEROES (``NO_HOLE`` keeps the
  range allocated), BLOCK_STATUS and DISC; the ``FUA`` flag makes a write
  durable before its reply. Many requests are in flight per connection and
  replies go out as each finishes, matched by the client's handle.
  Transmission flags: HAS_FLAGS, SEND_FLUSH, SEND_FUA and CAN_MULTI_CONN
  (every connection uses the same backend and a flush syncs the whole file,
  so a flush on one connection covers writes completed on any), SEND_DF once
  structured replies are negotiated, plus READ_ONLY for a read-only export,
  or SEND_TRIM and SEND_WRITE_ZEROES for a writable one.

Structured replies: a client that negotiated them gets every reply as
chunks: ``NBD_REPLY_TYPE_NONE`` for a request without data, an
``NBD_REPLY_TYPE_ERROR`` chunk with the reason for a failed or refused one,
and a read as ``NBD_REPLY_TYPE_OFFSET_DATA`` chunks for its data and
``NBD_REPLY_TYPE_OFFSET_HOLE`` chunks for the holes of the backing file
(the last chunk carries ``NBD_REPLY_FLAG_DONE``). The holes come from the
block engine: a read not served on the spot from the page cache is a
``sparse`` read (:mod:`~pvcore.devices.block.extents`: ``SEEK_DATA`` and
``SEEK_HOLE``), which reads the data extents only, so a hole costs neither a
read nor its bytes on the socket; a hole sharing a page with data is sent as
data. A read with ``NBD_CMD_FLAG_DF`` is one OFFSET_DATA chunk, zeros
included (up to :data:`MAX_REQUEST_LEN`, so never ``EOVERFLOW``).
``NBD_CMD_BLOCK_STATUS`` (``REQ_ONE`` honoured) is a block engine
``MAP`` request, checked, limited and counted like the others, and answered
with one ``NBD_REPLY_TYPE_BLOCK_STATUS`` chunk of at most
:data:`~pvcore.devices.block.extents.MAX_EXTENTS` extents, ``NBD_STATE_HOLE |
NBD_STATE_ZERO`` for a hole and 0 for data (it may cover less than asked; the
client asks again for the rest). A client that did not ask for structured
replies gets simple replies, as before.

Clients are hostile until proven otherwise:

* a wrong magic number, unknown client flags, an option longer than
  :data:`MAX_OPTION_LEN`, too many options, or a handshake slower than
  :data:`HANDSHAKE_TIMEOUT` end that connection (logged with the reason);
* a READ longer than :data:`MAX_REQUEST_LEN` gets ``EINVAL`` and the
  connection goes on; a WRITE longer than that gets ``EINVAL`` and the
  connection is then closed, because its payload cannot be skipped without
  reading up to 4 GiB the client should never have sent;
* a request past the end of the export gets ``ENOSPC`` for WRITE and
  WRITE_ZEROES (as the protocol asks) and ``EINVAL`` for anything else; a
  WRITE's payload is read and dropped first so the stream stays in step;
* BLOCK_STATUS of 0 bytes, or without ``base:allocation`` selected, gets
  ``EINVAL``; an option after the export is chosen is a bad request magic
  and ends the connection;
* an unknown command, or a flag not valid for the command, gets ``EINVAL``;
  a write on a read-only export gets ``EPERM``;
* per connection at most :data:`MAX_IN_FLIGHT` requests and
  :data:`MAX_IN_FLIGHT_BYTES` of buffers are in flight; beyond that the
  connection's next request is not read until earlier ones finish.

Replies: a small read (below :data:`SPLICE_MIN_BYTES`) is read into one
buffer that has room for the reply header (simple, or OFFSET_DATA chunk) in front of the data, so header and
data leave in one ``send`` with no copy in Python (a structured read with
holes sends each data extent from its place in that buffer) (the page-cache hit on an
idle device is served on the spot, as the block engine's ``serve_now``
allows). A bigger read of a plain image file (the block engine's
``splices_reads``) is answered without copying its bytes at all: an I/O
thread splices the range from the page cache into a pipe of the connection's
own (``splice(2)``: page references), and on completion the reply header is
written to the socket and the data spliced from the pipe after it (a
structured read with holes splices only its data extents, and sends each
behind its chunk header; the socket
is a Unix one, where ``MSG_MORE`` would change nothing). When the socket is
full the rest of the reply waits in the pipe, and every later reply of the
connection waits behind it in the connection's output queue, until the socket
is writable again (watched on a duplicate of its descriptor, so the stream
transport keeps its own); a client that stops reading stops being read from
once :data:`WRITE_BUFFER_HIGH` bytes wait. If the read comes up short (the
file was truncated under the export) the pipe is emptied and the reply is
``EIO`` with no data, so the stream never carries a wrong length; if the
socket fails midway the connection is aborted. Such reads go through the
block engine like any other (its checks, its I/O limits, its counters and
service times); :attr:`NbdFrontDoor.spliced_reads` counts them and
:attr:`NbdFrontDoor.socket_full_waits` the times a reply had to wait for the
socket. Any other store, a read that does not fit a pipe, or a connection
that has :data:`MAX_PIPES` pipes busy, takes the buffer path.

A WRITE payload of :data:`POOLED_WRITE_BYTES` or more is read into a buffer
the connection kept from an earlier write of that length, and given back when
the write completes: a fresh megabyte costs a page fault and a zeroed page per
4 KiB, a kept one only the copy. A connection keeps at most
:data:`MAX_KEPT_PAYLOAD_BYTES` of them, and never a refused write's.

Each connection is served by its own task, so a misbehaving client affects
no other. The task runs the handshake; then the connection's socket is handed
to a :class:`_RequestStream`, which cuts requests from the bytes as they
arrive (a WRITE's payload is received straight into its own buffer) and
starts each at once: a request costs no task wake-up, and the replies of a
batch of requests served on the spot leave in one ``send``. Stopping the door closes the socket, lets in-flight requests finish
and send their replies, then closes every connection.

An export made with ``poll_max_ns`` (the lpar plugin's ``poll-max-us=``)
polls: a connection left idle keeps the event loop turning for an adaptive
window (:class:`~pvcore.ring.poll.PollWindow`) instead of sleeping, so a
client that sends its next request within it is read without a wake-up;
:meth:`NbdFrontDoor.poll_counts` says what the windows did.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import fcntl
import logging
import os
import struct
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import attrs

from pvcore.devices.block.backend import BlockBackend, BlockOp, BlockRequest, BlockResult, BlockStatus
from pvcore.devices.block.extents import Extent
from pvcore.ring.poll import PollWindow
from pvcore.streams.unix import UnixListener, peer_description

log = logging.getLogger("pvcore.nbd")

NBD_MAGIC = 0x4E42444D41474943
"""``NBDMAGIC``: the first 8 bytes a server sends."""
NBD_OPTS_MAGIC = 0x49484156454F5054
"""``IHAVEOPT``: newstyle handshake magic, also the start of every option."""
NBD_REP_MAGIC = 0x3E889045565A9
NBD_REQUEST_MAGIC = 0x25609513
NBD_SIMPLE_REPLY_MAGIC = 0x67446698
NBD_STRUCTURED_REPLY_MAGIC = 0x668E33EF

NBD_FLAG_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_NO_ZEROES = 1 << 1
NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_C_NO_ZEROES = 1 << 1
KNOWN_CLIENT_FLAGS = NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES

NBD_FLAG_HAS_FLAGS = 1 << 0
NBD_FLAG_READ_ONLY = 1 << 1
NBD_FLAG_SEND_FLUSH = 1 << 2
NBD_FLAG_SEND_FUA = 1 << 3
NBD_FLAG_SEND_TRIM = 1 << 5
NBD_FLAG_SEND_WRITE_ZEROES = 1 << 6
NBD_FLAG_SEND_DF = 1 << 7
NBD_FLAG_CAN_MULTI_CONN = 1 << 8

NBD_OPT_EXPORT_NAME = 1
NBD_OPT_ABORT = 2
NBD_OPT_LIST = 3
NBD_OPT_INFO = 6
NBD_OPT_GO = 7
NBD_OPT_STRUCTURED_REPLY = 8
NBD_OPT_LIST_META_CONTEXT = 9
NBD_OPT_SET_META_CONTEXT = 10

NBD_REP_ACK = 1
NBD_REP_SERVER = 2
NBD_REP_INFO = 3
NBD_REP_META_CONTEXT = 4
NBD_REP_ERR_UNSUP = (1 << 31) + 1
NBD_REP_ERR_INVALID = (1 << 31) + 3
NBD_REP_ERR_UNKNOWN = (1 << 31) + 6

NBD_INFO_EXPORT = 0
NBD_INFO_NAME = 1
NBD_INFO_BLOCK_SIZE = 3

NBD_CMD_READ = 0
NBD_CMD_WRITE = 1
NBD_CMD_DISC = 2
NBD_CMD_FLUSH = 3
NBD_CMD_TRIM = 4
NBD_CMD_WRITE_ZEROES = 6
NBD_CMD_BLOCK_STATUS = 7

NBD_CMD_FLAG_FUA = 1 << 0
NBD_CMD_FLAG_NO_HOLE = 1 << 1
NBD_CMD_FLAG_DF = 1 << 2
NBD_CMD_FLAG_REQ_ONE = 1 << 3

NBD_REPLY_FLAG_DONE = 1 << 0
NBD_REPLY_TYPE_NONE = 0
NBD_REPLY_TYPE_OFFSET_DATA = 1
NBD_REPLY_TYPE_OFFSET_HOLE = 2
NBD_REPLY_TYPE_BLOCK_STATUS = 5
NBD_REPLY_TYPE_ERROR = (1 << 15) + 1

NBD_STATE_HOLE = 1 << 0
NBD_STATE_ZERO = 1 << 1

BASE_ALLOCATION = b"base:allocation"
"""The one metadata context served: which extents are holes (``NBD_STATE_HOLE | NBD_STATE_ZERO``) and which data."""
ALLOCATION_CONTEXT_ID = 1
"""The id ``NBD_OPT_SET_META_CONTEXT`` gives ``base:allocation``."""
MAX_ERROR_MESSAGE = 256
"""Bytes of the reason sent with an error chunk (the protocol allows up to 4096)."""

NBD_EPERM = 1
NBD_EIO = 5
NBD_EINVAL = 22
NBD_ENOSPC = 28

MAX_REQUEST_LEN = 32 * 1024 * 1024
"""The largest READ or WRITE payload accepted (the protocol's default maximum)."""
PREFERRED_BLOCK_SIZE = 4096
MAX_EXPORT_NAME_LEN = 4096
MAX_OPTION_LEN = 64 * 1024
MAX_OPTIONS = 256
"""Options one connection may send before it must choose an export."""
HANDSHAKE_TIMEOUT = 60.0
MAX_IN_FLIGHT = 128
MAX_IN_FLIGHT_BYTES = 2 * MAX_REQUEST_LEN
MAX_CONNECTIONS = 16
WRITE_BUFFER_HIGH = 4 * 1024 * 1024
SPLICE_MIN_BYTES = 128 * 1024 + 1
"""Reads this long or longer are spliced (see the module docstring); shorter ones are copied once."""
PIPE_SIZE = 1024 * 1024
"""The capacity asked for each splice pipe (``F_SETPIPE_SZ``; the kernel may grant less)."""
MAX_PIPES = 8
"""Splice pipes per connection; reads beyond that many at once take the buffer path."""
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
POOLED_WRITE_BYTES = 64 * 1024
"""WRITE payloads this long or longer are read into reused buffers (see :meth:`_Connection._payload_buffer`)."""
MAX_CORKED_BYTES = 256 * 1024
"""Replies gathered from one batch of requests before they are written (see :meth:`_Connection._cork`)."""
INPUT_BUFFER_BYTES = 64 * 1024
"""Bytes of requests a connection takes from its socket at a time (WRITE payloads go to their own buffers)."""
MAX_POOLED_PER_SIZE = 8
"""Reused payload buffers a connection keeps per payload length."""
MAX_KEPT_PAYLOAD_BYTES = 8 * 1024 * 1024
"""Bytes of reused payload buffers a connection keeps in all (so a client cannot make it keep more)."""
CLOSE_FLUSH_TIMEOUT = 5.0
"""Seconds a closing connection gives its queued replies to reach a client that has stopped reading."""
MAX_LOGGED_REFUSALS = 10
"""Refused or failed requests logged per connection, so a hostile client cannot flood the log."""

_HANDSHAKE_START = struct.Struct(">QQH")
_OPTION_HEADER = struct.Struct(">QII")
_OPTION_REPLY = struct.Struct(">QIII")
_EXPORT_REPLY = struct.Struct(">QH")
_REQUEST = struct.Struct(">IHHQQI")
_REPLY = struct.Struct(">IIQ")
_CHUNK = struct.Struct(">IHHQI")
_DATA_CHUNK = struct.Struct(">IHHQIQ")
"""A chunk header with the offset of an ``NBD_REPLY_TYPE_OFFSET_DATA`` payload: the data follows."""
_HOLE_CHUNK = struct.Struct(">IHHQIQI")
_ERROR_CHUNK = struct.Struct(">IHHQIIH")
_DESCRIPTOR = struct.Struct(">II")
_ZEROS = memoryview(bytes(SPLICE_MIN_BYTES))
"""Zeros to compare a read served on the spot with (a memcmp; it is never longer than a splice)."""
_U32 = struct.Struct(">I")
_U16 = struct.Struct(">H")

_COMMAND_OPS = {
    NBD_CMD_READ: BlockOp.READ,
    NBD_CMD_WRITE: BlockOp.WRITE,
    NBD_CMD_FLUSH: BlockOp.FLUSH,
    NBD_CMD_TRIM: BlockOp.DISCARD,
    NBD_CMD_WRITE_ZEROES: BlockOp.WRITE_ZEROES,
    NBD_CMD_BLOCK_STATUS: BlockOp.MAP,
}
_ALLOWED_FLAGS = {
    NBD_CMD_READ: NBD_CMD_FLAG_FUA,
    NBD_CMD_WRITE: NBD_CMD_FLAG_FUA,
    NBD_CMD_FLUSH: NBD_CMD_FLAG_FUA,
    NBD_CMD_TRIM: NBD_CMD_FLAG_FUA,
    NBD_CMD_WRITE_ZEROES: NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE,
    NBD_CMD_BLOCK_STATUS: NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_REQ_ONE,
}
_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


class _Pipe:
    """A non-blocking pipe a connection splices read replies through; ``capacity`` is in bytes."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            self.capacity = fcntl.fcntl(self.write_fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:  # above the user's pipe page limit: keep the default size
            self.capacity = fcntl.fcntl(self.write_fd, fcntl.F_GETPIPE_SZ)

    def holds(self, offset: int, length: int) -> bool:
        """Whether the page-cache pages of ``offset``..+``length`` fit (the pipe takes one slot per page)."""
        pages = (offset % PAGE_SIZE + length + PAGE_SIZE - 1) // PAGE_SIZE
        return pages * PAGE_SIZE <= self.capacity

    def drain(self) -> None:
        """Throw away whatever the pipe holds."""
        try:
            while os.read(self.read_fd, self.capacity):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        """Close both ends."""
        os.close(self.read_fd)
        os.close(self.write_fd)


class _Splice:
    """Queued output: data of a read reply waiting in ``pipe``, ``remaining`` bytes still to send.

    ``release``: the pipe is free again once these bytes are sent (the last
    data of its read; a structured reply may take several from one pipe).
    """

    def __init__(self, pipe: _Pipe, remaining: int, release: bool = True) -> None:
        self.pipe = pipe
        self.remaining = remaining
        self.release = release


class ProtocolViolation(Exception):
    """A client broke the protocol in a way that ends its connection; the message says how."""


@attrs.define
class NbdRequest:
    """One transmission-phase request header as the client sent it."""

    flags: int
    command: int
    handle: int
    offset: int
    length: int


def nbd_error(result: BlockResult, command: int) -> int:
    """The NBD error value for a block engine result (0 when it succeeded)."""
    status = result.status
    if status is BlockStatus.OK:
        return 0
    if status is BlockStatus.READ_ONLY:
        return NBD_EPERM
    if status is BlockStatus.OUT_OF_RANGE:
        return NBD_ENOSPC if command in (NBD_CMD_WRITE, NBD_CMD_WRITE_ZEROES) else NBD_EINVAL
    if status in (BlockStatus.INVALID, BlockStatus.UNSUPPORTED):
        return NBD_EINVAL
    if result.errno in _SPACE_ERRNOS:
        return NBD_ENOSPC
    return NBD_EIO


def _check_export_name(name: str) -> bytes:
    encoded = name.encode()
    if len(encoded) > MAX_EXPORT_NAME_LEN or "\0" in name:
        raise ValueError(f"export name {name!r}: at most {MAX_EXPORT_NAME_LEN} bytes of UTF-8 without NUL")
    return encoded


def block_export(device) -> BlockBackend:
    """The block engine an NBD front door exports for ``device`` (a :class:`~pvcore.contract.DeviceInstance`).

    The block class's engine is one; a class whose stream form is a block
    medium gives it from its engine's ``block_export()`` (the scsi class:
    the disc of a one-CD-ROM target), which raises ``ValueError`` saying why
    when this device has none. Any other engine is a ``ValueError`` naming
    the device.
    """
    engine = device.engine
    if isinstance(engine, BlockBackend):
        return engine
    export = getattr(engine, "block_export", None)
    if export is None:
        config = device.config
        raise ValueError(f"{config.device_class} {config.name}: the class has no block form for an NBD export")
    return export()


class NbdFrontDoor:
    """Serves ``backend`` as the NBD export ``export_name`` on the Unix socket ``socket_path``.

    The export is read-only if ``readonly`` is set or the backend is
    read-only. The door does not close the backend; the device instance that
    owns it does.
    """

    def __init__(
        self,
        backend: BlockBackend,
        socket_path: Path | str,
        export_name: str = "",
        readonly: bool = False,
        *,
        max_connections: int = MAX_CONNECTIONS,
        poll_max_ns: int = 0,
    ) -> None:
        if poll_max_ns < 0:
            raise ValueError(f"poll_max_ns must be >= 0, not {poll_max_ns}")
        self.backend = backend
        self.socket_path = Path(socket_path)
        self.export_name = export_name
        self.encoded_export_name = _check_export_name(export_name)
        self.readonly = readonly or backend.readonly
        self.max_connections = max_connections
        mode = "read-only" if self.readonly else "read-write"
        self.description = f"nbd export {export_name!r} of {backend.name} ({mode}) on {self.socket_path}"
        self.log_name = f"nbd {backend.name}"
        self._listener = UnixListener(self.socket_path, self._serve_connection, what=self.log_name)
        self._next_id = 0
        self.spliced_reads = 0
        """Reads answered by splicing from the page cache to the socket (see the module docstring)."""
        self.socket_full_waits = 0
        """Times a connection's replies had to wait in its output queue for the socket to take more."""
        self.poll_max_ns = poll_max_ns
        """The longest window in which an idle connection polls its socket for the next request (0: never)."""
        self._polling: set[PollWindow] = set()
        self._past_polls = {"polls": 0, "polls_caught": 0, "poll_ns": 0}
        self._poll_lock = threading.Lock()
        """Held while a window's counts move to the past ones, and while the metrics thread adds them up."""

    def __repr__(self) -> str:
        return f"NbdFrontDoor({self.description})"

    @property
    def transmission_flags(self) -> int:
        """The transmission flags every client of this export is given."""
        flags = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA | NBD_FLAG_CAN_MULTI_CONN
        if self.readonly:
            return flags | NBD_FLAG_READ_ONLY
        return flags | NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES

    @property
    def connection_count(self) -> int:
        """How many clients are connected now."""
        return self._listener.connection_count

    async def start(self) -> None:
        """Listen on the socket."""
        await self._listener.start()
        log.info("%s: serving %s", self.log_name, self.description)

    async def stop(self) -> None:
        """Stop listening, let in-flight requests finish and reply, close every connection."""
        await self._listener.stop()

    def poll_window(self) -> PollWindow | None:
        """A new connection's polling window (None when the export does not poll), counted by :meth:`poll_counts`."""
        if not self.poll_max_ns:
            return None
        window = PollWindow(self.poll_max_ns)
        with self._poll_lock:
            self._polling.add(window)
        return window

    def poll_ended(self, window: PollWindow) -> None:
        """A connection's window is closed for good: keep its counts."""
        with self._poll_lock:
            if window in self._polling:
                self._polling.discard(window)
                for key, value in window.counts().items():
                    if key in self._past_polls:
                        self._past_polls[key] += value

    def poll_counts(self) -> dict[str, int]:
        """``polls``, ``polls_caught`` and ``poll_ns`` of every connection this export served ({} if it does not poll)."""
        if not self.poll_max_ns:
            return {}
        with self._poll_lock:
            counts = dict(self._past_polls)
            for window in self._polling:
                counts["polls"] += window.polls
                counts["polls_caught"] += window.caught
                counts["poll_ns"] += window.poll_ns
        return counts

    def export_matches(self, name: bytes) -> bool:
        """Whether a client asking for export ``name`` gets this export (the empty name is the default)."""
        return name in (b"", self.encoded_export_name)

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._next_id += 1
        client = f"client {self._next_id} ({peer_description(writer)})"
        if self._listener.connection_count > self.max_connections:
            log.warning("%s: %s refused: already %d connections", self.log_name, client, self.max_connections)
            return
        log.info("%s: %s connected", self.log_name, client)
        connection = _Connection(self, reader, writer, client)
        reason = "closed by the client"
        try:
            reason = await connection.serve()
        except asyncio.CancelledError:
            reason = "server stopping"
            raise
        finally:
            await connection.close()
            log.info("%s: %s disconnected: %s", self.log_name, client, reason)


class _Connection:
    """One client: its handshake, then its requests."""

    def __init__(
        self, door: NbdFrontDoor, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, client: str
    ) -> None:
        self.door = door
        self.backend = door.backend
        self.reader = reader
        self.writer = writer
        self.client = client
        self.what = f"{door.log_name}: {client}"
        self.in_flight = 0
        self.in_flight_bytes = 0
        self.refusals = 0
        self._changed = asyncio.Event()
        self._socket_fd = writer.get_extra_info("socket").fileno()
        self._pipes: list[_Pipe] = []
        self._free_pipes: list[_Pipe] = []
        self._payload_buffers: dict[int, list[bytearray]] = {}
        self._kept_bytes = 0
        self._out: collections.deque[bytes | bytearray | memoryview | _Splice] = collections.deque()
        self._out_bytes = 0
        self._watch_fd = -1
        self._watching = False
        self._loop = asyncio.get_running_loop()
        self.structured = False
        """Whether the client negotiated structured replies."""
        self.allocation_context = False
        """Whether the client selected ``base:allocation`` (it may send NBD_CMD_BLOCK_STATUS)."""
        self._read_header = _REPLY.size
        self._stream: _RequestStream | None = None
        self._corked: list[bytes | bytearray | memoryview] | None = None
        self._corked_bytes = 0
        writer.transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH)

    async def serve(self) -> str:
        """Run the connection to its end; returns why it ended."""
        try:
            try:
                async with asyncio.timeout(HANDSHAKE_TIMEOUT):
                    chosen = await self._handshake()
            except TimeoutError:
                log.warning("%s: handshake not finished within %gs", self.what, HANDSHAKE_TIMEOUT)
                return "handshake timed out"
            if not chosen:
                return "handshake aborted by the client"
            return await self._transmission()
        except ProtocolViolation as exc:
            log.warning("%s: %s; closing the connection", self.what, exc)
            return str(exc)
        except asyncio.IncompleteReadError:
            return "closed by the client"
        except ConnectionError as exc:
            return f"connection lost: {exc.strerror or exc}"

    async def close(self) -> None:
        """Read no more requests, wait for those in flight to reply, then close the socket."""
        if self._stream is not None:
            self._stream.end("server stopping")
        try:
            await self._wait_until(lambda: self.in_flight == 0)
            if self._out:
                try:
                    async with asyncio.timeout(CLOSE_FLUSH_TIMEOUT):
                        await self._wait_until(lambda: not self._out)
                except TimeoutError:
                    log.warning("%s: replies still queued after %gs; dropped", self.what, CLOSE_FLUSH_TIMEOUT)
        finally:
            self._drop_output()
            if self._watch_fd >= 0:
                os.close(self._watch_fd)
                self._watch_fd = -1
            self.writer.close()
            for pipe in self._pipes:
                pipe.close()
            self._pipes.clear()
            self._free_pipes.clear()

    async def _wait_until(self, ready: Callable[[], bool]) -> None:
        while not ready():
            self._changed.clear()
            await self._changed.wait()

    # handshake

    async def _handshake(self) -> bool:
        """Negotiate; True once an export is chosen, False if the client aborted."""
        handshake_flags = NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES
        self.writer.write(_HANDSHAKE_START.pack(NBD_MAGIC, NBD_OPTS_MAGIC, handshake_flags))
        (client_flags,) = _U32.unpack(await self.reader.readexactly(4))
        if client_flags & ~KNOWN_CLIENT_FLAGS:
            raise ProtocolViolation(f"unknown client flags {client_flags:#x}")
        no_zeroes = bool(client_flags & NBD_FLAG_C_NO_ZEROES)
        for _ in range(MAX_OPTIONS):
            magic, option, length = _OPTION_HEADER.unpack(await self.reader.readexactly(_OPTION_HEADER.size))
            if magic != NBD_OPTS_MAGIC:
                raise ProtocolViolation(f"bad option magic {magic:#x}")
            if length > MAX_OPTION_LEN:
                raise ProtocolViolation(f"option {option} of {length} bytes (limit {MAX_OPTION_LEN})")
            data = await self.reader.readexactly(length)
            if option == NBD_OPT_EXPORT_NAME:
                if not self.door.export_matches(data):
                    raise ProtocolViolation(f"asked for unknown export {data[:256]!r}")
                reply = _EXPORT_REPLY.pack(self.backend.size, self._transmission_flags())
                self.writer.write(reply if no_zeroes else reply + bytes(124))
                return True
            if option == NBD_OPT_ABORT:
                self._option_reply(option, NBD_REP_ACK)
                return False
            if option == NBD_OPT_LIST:
                self._list(data)
            elif option in (NBD_OPT_INFO, NBD_OPT_GO):
                if self._info(option, data) and option == NBD_OPT_GO:
                    return True
            elif option == NBD_OPT_STRUCTURED_REPLY:
                self._structured_reply(data)
            elif option in (NBD_OPT_LIST_META_CONTEXT, NBD_OPT_SET_META_CONTEXT):
                self._meta_context(option, data)
            else:
                self._option_error(option, NBD_REP_ERR_UNSUP, f"option {option} is not supported")
            await self.writer.drain()
        raise ProtocolViolation(f"more than {MAX_OPTIONS} options without choosing an export")

    def _transmission_flags(self) -> int:
        """The door's transmission flags, with ``NBD_FLAG_SEND_DF`` once structured replies are negotiated."""
        flags = self.door.transmission_flags
        return flags | NBD_FLAG_SEND_DF if self.structured else flags

    def _structured_reply(self, data: bytes) -> None:
        """Answer NBD_OPT_STRUCTURED_REPLY: it takes no data and is negotiated once."""
        if data:
            self._option_error(NBD_OPT_STRUCTURED_REPLY, NBD_REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")
        elif self.structured:
            self._option_error(NBD_OPT_STRUCTURED_REPLY, NBD_REP_ERR_INVALID, "structured replies already negotiated")
        else:
            self.structured = True
            self._read_header = _DATA_CHUNK.size
            self._option_reply(NBD_OPT_STRUCTURED_REPLY, NBD_REP_ACK)

    def _meta_context(self, option: int, data: bytes) -> None:
        """Answer NBD_OPT_LIST_META_CONTEXT or NBD_OPT_SET_META_CONTEXT (``base:allocation`` is the one context).

        A SET replaces the selection even when it fails. Both need structured replies first. A query in an
        unknown namespace, or naming an unknown ``base:`` context, matches nothing; ``base:`` lists
        ``base:allocation`` but selects nothing, as the protocol says.
        """
        listing = option == NBD_OPT_LIST_META_CONTEXT
        if not listing:
            self.allocation_context = False
        if not self.structured:
            self._option_error(option, NBD_REP_ERR_INVALID, "negotiate structured replies first")
            return
        parsed = _parse_meta_request(data)
        if parsed is None:
            self._option_error(option, NBD_REP_ERR_INVALID, "malformed export name or query list")
            return
        name, queries = parsed
        if not self.door.export_matches(name):
            self._option_error(option, NBD_REP_ERR_UNKNOWN, f"no export {name[:256]!r}")
            return
        wanted = {BASE_ALLOCATION, b"base:"} if listing else {BASE_ALLOCATION}
        if (listing and not queries) or wanted.intersection(queries):
            context_id = 0 if listing else ALLOCATION_CONTEXT_ID
            self._option_reply(option, NBD_REP_META_CONTEXT, _U32.pack(context_id) + BASE_ALLOCATION)
            if not listing:
                self.allocation_context = True
        self._option_reply(option, NBD_REP_ACK)

    def _option_reply(self, option: int, reply: int, data: bytes = b"") -> None:
        self.writer.write(_OPTION_REPLY.pack(NBD_REP_MAGIC, option, reply, len(data)) + data)

    def _option_error(self, option: int, reply: int, message: str) -> None:
        self._option_reply(option, reply, message.encode())

    def _list(self, data: bytes) -> None:
        if data:
            self._option_error(NBD_OPT_LIST, NBD_REP_ERR_INVALID, "NBD_OPT_LIST takes no data")
            return
        name = self.door.encoded_export_name
        self._option_reply(NBD_OPT_LIST, NBD_REP_SERVER, _U32.pack(len(name)) + name)
        self._option_reply(NBD_OPT_LIST, NBD_REP_ACK)

    def _info(self, option: int, data: bytes) -> bool:
        """Answer NBD_OPT_INFO or NBD_OPT_GO; True if the export was described (and acknowledged)."""
        parsed = _parse_info_request(data)
        if parsed is None:
            self._option_error(option, NBD_REP_ERR_INVALID, "malformed export name or information request list")
            return False
        name, requests = parsed
        if not self.door.export_matches(name):
            self._option_error(
                option, NBD_REP_ERR_UNKNOWN, f"no export {name[:256]!r}; this server exports {self.door.export_name!r}"
            )
            return False
        export = _U16.pack(NBD_INFO_EXPORT) + _EXPORT_REPLY.pack(self.backend.size, self._transmission_flags())
        self._option_reply(option, NBD_REP_INFO, export)
        if NBD_INFO_NAME in requests:
            self._option_reply(option, NBD_REP_INFO, _U16.pack(NBD_INFO_NAME) + self.door.encoded_export_name)
        sizes = struct.pack(">HIII", NBD_INFO_BLOCK_SIZE, 1, PREFERRED_BLOCK_SIZE, MAX_REQUEST_LEN)
        self._option_reply(option, NBD_REP_INFO, sizes)
        self._option_reply(option, NBD_REP_ACK)
        return True

    # transmission

    async def _transmission(self) -> str:
        """Hand the socket to a :class:`_RequestStream` and serve requests until DISC, a violation, or the end."""
        transport = self.writer.transport
        if transport.is_closing():
            return "closed by the client"
        stream = _RequestStream(self, transport)
        transport.set_protocol(stream)
        self._stream = stream
        self.reader.feed_eof()  # the handshake's reader gets nothing more: what it holds is the first requests
        stream.receive(await self.reader.read())
        return await stream.ended

    def _payload_buffer(self, length: int) -> bytearray:
        """A buffer for a WRITE payload: a big one kept from an earlier write of that length, else a new one.

        A fresh buffer of a megabyte costs the kernel a page fault and a zeroed page per 4 KiB (it is
        mapped anew each time); a kept one is only copied into. :meth:`_release_payload` gives it back.
        """
        if length >= POOLED_WRITE_BYTES:
            kept = self._payload_buffers.get(length)
            if kept:
                self._kept_bytes -= length
                return kept.pop()
        return bytearray(length)

    def _release_payload(self, payload: bytes | bytearray) -> None:
        """Keep a big WRITE payload buffer for the next write of its length (a few per length, at most
        :data:`MAX_KEPT_PAYLOAD_BYTES` in all)."""
        length = len(payload)
        if isinstance(payload, bytearray) and length >= POOLED_WRITE_BYTES:
            if self._kept_bytes + length > MAX_KEPT_PAYLOAD_BYTES:
                return
            kept = self._payload_buffers.setdefault(length, [])
            if len(kept) < MAX_POOLED_PER_SIZE:
                kept.append(payload)
                self._kept_bytes += length

    def _may_read(self) -> bool:
        """Whether the client's next request may be read: its replies are being taken off the socket."""
        return self._out_bytes <= WRITE_BUFFER_HIGH

    def _progressed(self) -> None:
        """A request finished or output left: wake :meth:`close` and let the request stream go on."""
        self._changed.set()
        if self._stream is not None:
            self._stream.resume()

    def _cork(self) -> None:
        """Collect replies sent until :meth:`_uncork` (those of a batch of requests served on the spot)."""
        self._corked = []
        self._corked_bytes = 0

    def _uncork(self) -> None:
        """Send the replies collected since :meth:`_cork` with one write."""
        corked, self._corked = self._corked, None
        if corked:
            self._send(corked[0] if len(corked) == 1 else b"".join(corked))

    def _flush_cork(self) -> None:
        """Send what is corked now (:data:`MAX_CORKED_BYTES` gathered) and go on collecting."""
        self._uncork()
        self._cork()

    def _has_room(self, request: NbdRequest) -> bool:
        """Whether the connection's in-flight limits let ``request`` start now."""
        cost = request.length if request.command in (NBD_CMD_READ, NBD_CMD_WRITE) else 0
        return self.in_flight == 0 or (
            self.in_flight < MAX_IN_FLIGHT and self.in_flight_bytes + cost <= MAX_IN_FLIGHT_BYTES
        )

    def _try_start(self, request: NbdRequest, payload: bytes) -> bool:
        """Check and start a request whose payload is read; False (nothing done) if it must wait for room.

        A refused request is answered here (True).
        """
        command, length = request.command, request.length
        error, reason = self._validate(request)
        if error:
            where = f"command {command}, {request.offset}+{length}"
            self._log_refusal(f"request {request.handle:#x} ({where}) refused: {reason}")
            self._reply(request, error, reason)
            return True  # a refused write's payload buffer is not kept: it would let a client pile them up
        if not self._has_room(request):
            return False
        cost = length if command in (NBD_CMD_READ, NBD_CMD_WRITE) else 0
        if command == NBD_CMD_BLOCK_STATUS:
            self.in_flight += 1
            self._block_status(request)
            return True
        pipe = None
        buffer = None
        if command == NBD_CMD_READ:
            if length >= SPLICE_MIN_BYTES and self.backend.splices_reads:
                pipe = self._take_pipe(request.offset, length)
            if pipe is None:
                header = self._read_header
                buffer = bytearray(header + length)  # the reply header goes in front of the data
                buffers: tuple[memoryview, ...] = (memoryview(buffer)[header:],)
            else:
                buffers = ()
        elif command == NBD_CMD_WRITE:
            buffers = (memoryview(payload),)
        else:
            buffers = ()
        block_request = BlockRequest(
            _COMMAND_OPS[command],
            offset=request.offset,
            length=length,
            buffers=buffers,
            fua=bool(request.flags & NBD_CMD_FLAG_FUA) and command != NBD_CMD_READ,
            may_unmap=not request.flags & NBD_CMD_FLAG_NO_HOLE,
            pipe=-1 if pipe is None else pipe.write_fd,
            sparse=self.structured and command == NBD_CMD_READ and not request.flags & NBD_CMD_FLAG_DF,
        )
        self.in_flight += 1
        self.in_flight_bytes += cost
        if pipe is not None:
            self.backend.submit(block_request, lambda result: self._complete_spliced(request, cost, pipe, result))
        elif self.backend.serve_now(block_request):
            self._complete(request, cost, buffer, BlockResult(BlockStatus.OK, length), payload)
        else:
            self.backend.submit(block_request, lambda result: self._complete(request, cost, buffer, result, payload))
        return True

    def _block_status(self, request: NbdRequest) -> None:
        """Ask the block engine for the extents of a checked NBD_CMD_BLOCK_STATUS range; reply when it answers."""
        block_request = BlockRequest(BlockOp.MAP, offset=request.offset, length=request.length)
        self.backend.submit(block_request, lambda result: self._complete_block_status(request, result))

    def _complete_block_status(self, request: NbdRequest, result: BlockResult) -> None:
        """Send the ``base:allocation`` extents as one NBD_REPLY_TYPE_BLOCK_STATUS chunk (one extent for REQ_ONE)."""
        self.in_flight -= 1
        self._progressed()
        extents = result.extents
        if not result.ok or not extents:
            message = result.message or "no extents"
            self._log_refusal(f"request {request.handle:#x} (block status) failed: {message}")
            self._reply(request, nbd_error(result, request.command) or NBD_EIO, message)
            return
        if request.flags & NBD_CMD_FLAG_REQ_ONE:
            extents = extents[:1]
        hole = NBD_STATE_HOLE | NBD_STATE_ZERO
        descriptors = b"".join(_DESCRIPTOR.pack(e.length, hole if e.hole else 0) for e in extents)
        header = _CHUNK.pack(
            NBD_STRUCTURED_REPLY_MAGIC, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_BLOCK_STATUS, request.handle,
            4 + len(descriptors),
        )
        self._send(header + _U32.pack(ALLOCATION_CONTEXT_ID) + descriptors)

    def _take_pipe(self, offset: int, length: int) -> _Pipe | None:
        """A free pipe with room for this read's reply, or None (then the read takes the buffer path)."""
        if self._free_pipes:
            pipe = self._free_pipes[-1]
            if not pipe.holds(offset, length):
                return None
            return self._free_pipes.pop()
        if len(self._pipes) >= MAX_PIPES:
            return None
        try:
            pipe = _Pipe()
        except OSError as exc:  # out of file descriptors: copy instead
            self._log_refusal(f"no pipe for a spliced read ({exc.strerror or exc}); copying")
            return None
        self._pipes.append(pipe)
        if not pipe.holds(offset, length):
            self._free_pipes.append(pipe)
            return None
        return pipe

    def _log_refusal(self, message: str) -> None:
        """Log a refused or failed request, up to :data:`MAX_LOGGED_REFUSALS` per connection."""
        self.refusals += 1
        if self.refusals <= MAX_LOGGED_REFUSALS:
            last = self.refusals == MAX_LOGGED_REFUSALS
            suffix = "; further refusals on this connection are not logged" if last else ""
            log.warning("%s: %s%s", self.what, message, suffix)

    def _validate(self, request: NbdRequest) -> tuple[int, str]:
        """The error value and reason a request is refused with before any I/O, or (0, "")."""
        command = request.command
        allowed = _ALLOWED_FLAGS.get(command)
        if allowed is None:
            return NBD_EINVAL, "unknown command"
        if command == NBD_CMD_READ and self.structured:
            allowed |= NBD_CMD_FLAG_DF
        if request.flags & ~allowed:
            return NBD_EINVAL, f"flags {request.flags:#x} not valid for this command"
        if command == NBD_CMD_FLUSH:
            if request.offset or request.length:
                return NBD_EINVAL, "flush with a nonzero offset or length"
            return 0, ""
        if command == NBD_CMD_READ and request.length > MAX_REQUEST_LEN:
            return NBD_EINVAL, f"read longer than {MAX_REQUEST_LEN} bytes"
        if command == NBD_CMD_BLOCK_STATUS:
            if not self.allocation_context:
                return NBD_EINVAL, "block status without a selected metadata context"
            if not request.length:
                return NBD_EINVAL, "block status of 0 bytes"
        elif command != NBD_CMD_READ and self.door.readonly:
            return NBD_EPERM, "the export is read-only"
        if request.offset + request.length > self.backend.size:
            error = NBD_ENOSPC if command in (NBD_CMD_WRITE, NBD_CMD_WRITE_ZEROES) else NBD_EINVAL
            return error, f"past the end of the export ({self.backend.size} bytes)"
        return 0, ""

    def _complete(
        self, request: NbdRequest, cost: int, buffer: bytearray | None, result: BlockResult, payload: bytes | bytearray
    ) -> None:
        self._release_payload(payload)
        self.in_flight -= 1
        self.in_flight_bytes -= cost
        self._progressed()
        error = nbd_error(result, request.command)
        if error:
            self._log_refusal(f"request {request.handle:#x} (command {request.command}) failed: {result.message}")
            self._reply(request, error, result.message)
        elif buffer is None:
            self._reply(request, 0)
        elif not self.structured:
            _REPLY.pack_into(buffer, 0, NBD_SIMPLE_REPLY_MAGIC, 0, request.handle)
            self._send(buffer)
        else:
            self._send_read_chunks(request, result.extents, buffer)

    def _send_read_chunks(self, request: NbdRequest, extents: Sequence[Extent], buffer: bytearray) -> None:
        """Answer a structured read from ``buffer`` (the data after room for a chunk header): a chunk per extent.

        A read served whole on the spot (no extents, no DF) that reads as all zeros is one OFFSET_HOLE chunk
        (the page cache serves a hole's zero pages too, unmapped); otherwise a read with no holes goes out as one
        OFFSET_DATA chunk whose header is written in front of the data, in one send. A mapped read with
        holes is an OFFSET_HOLE chunk per hole and an OFFSET_DATA chunk per data extent, sent from its
        place in the buffer. The last chunk has DONE. A read of 0 bytes gets a NONE chunk: a data or hole
        chunk must describe at least one byte.
        """
        if not request.length:
            self._reply(request, 0)
            return
        unmapped = not extents and request.length < len(_ZEROS) and not request.flags & NBD_CMD_FLAG_DF
        if unmapped and buffer.startswith(_ZEROS[: request.length], _DATA_CHUNK.size):
            extents = (Extent(request.offset, request.length, True),)
        if not extents or (len(extents) == 1 and not extents[0].hole):
            _DATA_CHUNK.pack_into(
                buffer, 0, NBD_STRUCTURED_REPLY_MAGIC, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_OFFSET_DATA,
                request.handle, 8 + request.length, request.offset,
            )
            self._send(buffer)
            return
        view = memoryview(buffer)
        last = len(extents) - 1
        for index, extent in enumerate(extents):
            header = self._content_chunk(request, extent, index == last)
            if extent.hole:
                self._send(header)
            else:
                start = _DATA_CHUNK.size + extent.offset - request.offset
                self._send(header)
                self._send(view[start : start + extent.length])

    @staticmethod
    def _content_chunk(request: NbdRequest, extent: Extent, done: bool) -> bytes:
        """An OFFSET_HOLE chunk, or the header of an OFFSET_DATA chunk (its data follows), for ``extent``."""
        flags = NBD_REPLY_FLAG_DONE if done else 0
        if extent.hole:
            return _HOLE_CHUNK.pack(
                NBD_STRUCTURED_REPLY_MAGIC, flags, NBD_REPLY_TYPE_OFFSET_HOLE, request.handle, 12,
                extent.offset, extent.length,
            )
        return _DATA_CHUNK.pack(
            NBD_STRUCTURED_REPLY_MAGIC, flags, NBD_REPLY_TYPE_OFFSET_DATA, request.handle, 8 + extent.length,
            extent.offset,
        )

    def _complete_spliced(self, request: NbdRequest, cost: int, pipe: _Pipe, result: BlockResult) -> None:
        """Answer a read whose data waits in ``pipe``: the header, then the data spliced, or the error."""
        self.in_flight -= 1
        self.in_flight_bytes -= cost
        self._progressed()
        error = nbd_error(result, request.command)
        if error or self.writer.is_closing():
            pipe.drain()
            self._free_pipes.append(pipe)
            if error:
                self._log_refusal(f"request {request.handle:#x} (command {request.command}) failed: {result.message}")
                self._reply(request, error, result.message)
            return
        self.door.spliced_reads += 1
        if not self.structured:
            self._queue(_REPLY.pack(NBD_SIMPLE_REPLY_MAGIC, 0, request.handle))
            self._queue(_Splice(pipe, request.length))
            self._pump()
            return
        extents = result.extents or (Extent(request.offset, request.length, False),)
        data_left = sum(extent.length for extent in extents if not extent.hole)
        if not data_left:
            self._free_pipes.append(pipe)  # all holes: nothing went into the pipe
        last = len(extents) - 1
        for index, extent in enumerate(extents):
            self._queue(self._content_chunk(request, extent, index == last))
            if not extent.hole:
                data_left -= extent.length
                self._queue(_Splice(pipe, extent.length, release=not data_left))
        self._pump()

    def _reply(self, request: NbdRequest, error: int, message: str = "") -> None:
        """A reply without data: a simple reply, or once structured replies are negotiated a NONE or ERROR chunk.

        ``message`` (cut to :data:`MAX_ERROR_MESSAGE` bytes) goes with an error chunk.
        """
        if not self.structured:
            self._send(_REPLY.pack(NBD_SIMPLE_REPLY_MAGIC, error, request.handle))
        elif not error:
            done = NBD_REPLY_FLAG_DONE
            self._send(_CHUNK.pack(NBD_STRUCTURED_REPLY_MAGIC, done, NBD_REPLY_TYPE_NONE, request.handle, 0))
        else:
            text = message.encode(errors="replace")[:MAX_ERROR_MESSAGE].decode(errors="ignore").encode()
            chunk = _ERROR_CHUNK.pack(
                NBD_STRUCTURED_REPLY_MAGIC, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_ERROR, request.handle,
                6 + len(text), error, len(text),
            )
            self._send(chunk + text)

    def _send(self, data: bytes | bytearray | memoryview) -> None:
        """Send ``data`` after every reply before it: through the transport, or behind the output queue."""
        if self.writer.is_closing():
            return
        if self._corked is not None:
            self._corked.append(data)
            self._corked_bytes += len(data)
            if self._corked_bytes >= MAX_CORKED_BYTES:
                self._flush_cork()  # the transport learns how much waits, and pauses the reading of requests
        elif self._out:
            self._queue(data)
        else:
            self.writer.write(data)

    def _queue(self, item: bytes | bytearray | memoryview | _Splice) -> None:
        self._out.append(item)
        self._out_bytes += item.remaining if isinstance(item, _Splice) else len(item)

    def _pump(self) -> None:
        """Send queued output while the socket takes it; watch for writability while some is left."""
        out = self._out
        transport = self.writer.transport
        try:
            while out:
                if transport.get_write_buffer_size():
                    break  # the transport sends what it holds first
                item = out[0]
                if isinstance(item, _Splice):
                    while item.remaining:
                        count = os.splice(
                            item.pipe.read_fd, self._socket_fd, item.remaining, flags=os.SPLICE_F_NONBLOCK
                        )
                        item.remaining -= count
                        self._out_bytes -= count
                    if item.release:
                        self._free_pipes.append(item.pipe)
                else:
                    transport.write(item)
                    self._out_bytes -= len(item)
                out.popleft()
        except BlockingIOError:
            pass
        except OSError as exc:
            log.info("%s: sending a read reply failed: %s", self.what, exc.strerror or exc)
            self._drop_output()
            transport.abort()
        self._progressed()
        if out and not self._watching:
            self.door.socket_full_waits += 1
            if self._watch_fd < 0:
                self._watch_fd = os.dup(self._socket_fd)  # the transport's own descriptor cannot be watched twice
            self._loop.add_writer(self._watch_fd, self._pump)
            self._watching = True
        elif not out and self._watching:
            self._loop.remove_writer(self._watch_fd)
            self._watching = False

    def _drop_output(self) -> None:
        """Throw away queued output (the connection is ending), freeing its pipes."""
        for item in self._out:
            if isinstance(item, _Splice) and item.release:
                item.pipe.drain()
                self._free_pipes.append(item.pipe)
        self._out.clear()
        self._out_bytes = 0
        if self._watching:
            self._loop.remove_writer(self._watch_fd)
            self._watching = False


class _RequestStream(asyncio.BufferedProtocol):
    """The transmission phase of one connection: requests cut from the socket's bytes as they arrive.

    After the handshake the connection's transport is handed to this protocol,
    so that a request costs no task wake-up: the bytes land in an input buffer
    (a WRITE's payload straight in its own buffer), and every whole request in
    it is started at once, the replies of those served on the spot leaving in
    one write. Reading pauses while the connection has no room for the next
    request (see :meth:`_Connection._has_room`), while its replies wait for a
    client that does not read them, and at the end; :meth:`resume` goes on
    when one of those clears. :attr:`ended` gets why the stream ended: DISC,
    the client's end of the socket, or a protocol violation (logged here).

    On an export that polls (``poll-max-us``), a connection left with nothing
    to do (no bytes buffered, no request in flight) keeps the event loop
    turning for its adaptive :attr:`poll` window instead of letting it sleep:
    each turn looks at every socket without blocking (``epoll_wait`` with a
    zero timeout), so a request that arrives within the window is read
    without the process, and its CPU, being woken (see :mod:`pvcore.ring.poll`
    for how the window grows and shrinks).
    """

    def __init__(self, connection: _Connection, transport: asyncio.BaseTransport) -> None:
        self.connection = connection
        self.transport = transport
        self.ended: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._input = bytearray(INPUT_BUFFER_BYTES)
        self._start = 0
        self._end = 0
        self._payload: bytearray | None = None
        """The WRITE payload being received (for :attr:`_payload_request`), or None."""
        self._payload_request: NbdRequest | None = None
        self._payload_received = 0
        self._waiting: tuple[NbdRequest, bytes | bytearray] | None = None
        """A request read whole that waits for room on the connection."""
        self._write_paused = False
        self._reading = True
        self._parsing = False
        self._loop = asyncio.get_running_loop()
        self.poll = connection.door.poll_window()
        """The connection's adaptive polling window and its counters (None: the export does not poll)."""
        self._poll_handle: asyncio.Handle | None = None
        self._poll_start = 0
        self._poll_deadline = 0
        self._idle_since = 0
        self._waited_out = False
        """A window passed with nothing from the client: no other opens until it sends (replies leaving
        the socket do not make a request more likely)."""

    def receive(self, data: bytes) -> None:
        """Take bytes read before this stream had the socket (requests the client sent behind its handshake)."""
        if not data or self.ended.done():
            return
        if len(self._input) - self._end < len(data):
            self._input.extend(bytes(len(data)))
        self._input[self._end : self._end + len(data)] = data
        self._end += len(data)
        self._parse()

    def get_buffer(self, sizehint: int) -> memoryview:
        """Where the next bytes from the socket go: the rest of a WRITE payload, or the input buffer."""
        if self._payload is not None:
            return memoryview(self._payload)[self._payload_received :]
        if self._start == self._end:
            self._start = self._end = 0
        elif len(self._input) - self._end < _REQUEST.size:
            left = self._end - self._start
            self._input[:left] = self._input[self._start : self._end]
            self._start, self._end = 0, left
        return memoryview(self._input)[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        """Bytes arrived where :meth:`get_buffer` said: start every request they complete."""
        if self.poll is not None:
            self._arrived()
        if self._payload is not None:
            self._payload_received += nbytes
            if self._payload_received < len(self._payload):
                return
            self._waiting = (self._payload_request, self._payload)
            self._payload = self._payload_request = None
        else:
            self._end += nbytes
        self._parse()

    def eof_received(self) -> bool:
        """The client sent its last byte: end, keeping the socket open for the replies still to go."""
        self.end("closed by the client")
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        """The socket is gone."""
        self.end("closed by the client" if exc is None else f"connection lost: {getattr(exc, 'strerror', None) or exc}")

    def pause_writing(self) -> None:
        """The transport holds more than :data:`WRITE_BUFFER_HIGH` of replies: read no request until it sends them."""
        self._write_paused = True

    def resume_writing(self) -> None:
        """The transport sent its replies: go on reading requests."""
        self._write_paused = False
        self.resume()

    def resume(self) -> None:
        """Go on if reading was paused and what paused it has cleared (a request finished, replies left)."""
        if not self._reading and not self.ended.done():
            self._parse()
        elif self.poll is not None:
            self._idle()

    def end(self, reason: str) -> None:
        """Read no more requests (those started still reply); :attr:`ended` gets ``reason`` if it has none yet."""
        if not self.ended.done():
            self.ended.set_result(reason)
        self._set_reading(False)
        if self.poll is not None:
            if self._poll_handle is not None:
                self._poll_handle.cancel()
                self._poll_handle = None
                self.poll.expired(time.monotonic_ns() - self._poll_start)
            self.connection.door.poll_ended(self.poll)

    def _idle(self) -> None:
        """If the connection has nothing to do, open its polling window, or note when its sleep begins."""
        poll = self.poll
        assert poll is not None
        if (self._poll_handle is not None or self._waited_out or self._start != self._end
                or self._payload is not None or self.connection.in_flight or not self._reading or self.ended.done()):
            return
        now = time.monotonic_ns()
        if poll.window_ns:
            poll.started()
            self._poll_start = now
            self._poll_deadline = now + poll.window_ns
            self._poll_handle = self._loop.call_soon(self._poll_once)
        elif not self._idle_since:
            self._idle_since = now

    def _poll_once(self) -> None:
        """One turn of the window: let the loop look at the sockets again, or close the window when it is over.

        Between turns the loop thread yields the CPU, and with it the GIL, to the
        I/O threads (as the ring's polling does).
        """
        assert self.poll is not None
        self._poll_handle = None
        now = time.monotonic_ns()
        if now < self._poll_deadline:
            os.sched_yield()
            self._poll_handle = self._loop.call_soon(self._poll_once)
            return
        self.poll.expired(now - self._poll_start)
        self._idle_since = self._poll_start  # the wait began with the window: woke() judges it whole
        self._waited_out = True

    def _arrived(self) -> None:
        """Bytes came: a window that was open caught them; after a sleep, grow the window if one would have."""
        assert self.poll is not None
        if self._poll_handle is not None:
            self._poll_handle.cancel()
            self._poll_handle = None
            self.poll.hit(time.monotonic_ns() - self._poll_start)
        elif self._idle_since:
            self.poll.woke(time.monotonic_ns() - self._idle_since)
        self._idle_since = 0
        self._waited_out = False

    def _blocked(self) -> bool:
        return self._write_paused or not self.connection._may_read() or self.ended.done()

    def _set_reading(self, reading: bool) -> None:
        if reading != self._reading and not self.transport.is_closing():
            if reading:
                self.transport.resume_reading()
            else:
                self.transport.pause_reading()
        self._reading = reading

    def _parse(self) -> None:
        """Start every whole request in the input buffer, unless something blocks; then read or pause."""
        if self._parsing:
            return
        self._parsing = True
        connection = self.connection
        connection._cork()
        try:
            self._parse_requests(connection)
        except ProtocolViolation as exc:
            log.warning("%s: %s; closing the connection", connection.what, exc)
            self.end(str(exc))
        finally:
            self._parsing = False
            connection._uncork()
        self._set_reading(self._waiting is None and not self._blocked())
        if self.poll is not None:
            self._idle()

    def _parse_requests(self, connection: _Connection) -> None:
        data = self._input
        while not self._blocked():
            if self._waiting is not None:
                request, payload = self._waiting
                if not connection._try_start(request, payload):
                    return
                self._waiting = None
            if self._payload is not None or self._end - self._start < _REQUEST.size:
                return
            magic, flags, command, handle, offset, length = _REQUEST.unpack_from(data, self._start)
            self._start += _REQUEST.size
            if magic != NBD_REQUEST_MAGIC:
                raise ProtocolViolation(f"bad request magic {magic:#x}")
            request = NbdRequest(flags, command, handle, offset, length)
            if command == NBD_CMD_DISC:
                self.end("disconnect requested by the client")
                return
            if command != NBD_CMD_WRITE:
                if not connection._try_start(request, b""):
                    self._waiting = (request, b"")
                continue
            if length > MAX_REQUEST_LEN:
                connection._reply(request, NBD_EINVAL, f"write longer than {MAX_REQUEST_LEN} bytes")
                raise ProtocolViolation(
                    f"write of {length} bytes (limit {MAX_REQUEST_LEN}); its payload cannot be skipped"
                )
            present = min(length, self._end - self._start)
            if present == length and length < POOLED_WRITE_BYTES:
                payload: bytes | bytearray = bytes(data[self._start : self._start + length])
                self._start += length
                self._waiting = (request, payload)
                continue
            buffer = connection._payload_buffer(length)
            buffer[:present] = data[self._start : self._start + present]
            self._start += present
            if present == length:
                self._waiting = (request, buffer)
            else:
                self._payload, self._payload_request, self._payload_received = buffer, request, present


def _parse_info_request(data: bytes) -> tuple[bytes, set[int]] | None:
    """The export name and requested information types of an INFO/GO option, or None if malformed."""
    if len(data) < 4:
        return None
    (name_len,) = _U32.unpack_from(data)
    if name_len > MAX_EXPORT_NAME_LEN or len(data) < 4 + name_len + 2:
        return None
    name = data[4 : 4 + name_len]
    (count,) = _U16.unpack_from(data, 4 + name_len)
    rest = data[4 + name_len + 2 :]
    if len(rest) != 2 * count:
        return None
    return name, {value for (value,) in struct.iter_unpack(">H", rest)}


def _parse_meta_request(data: bytes) -> tuple[bytes, list[bytes]] | None:
    """The export name and queries of a LIST/SET_META_CONTEXT option, or None if malformed.

    Each query must be UTF-8 of at most :data:`MAX_EXPORT_NAME_LEN` bytes without NUL, and start with a
    namespace and a colon; the lengths must account for the data exactly.
    """
    if len(data) < 8:
        return None
    (name_len,) = _U32.unpack_from(data)
    if name_len > MAX_EXPORT_NAME_LEN or len(data) < 4 + name_len + 4:
        return None
    name = data[4 : 4 + name_len]
    (count,) = _U32.unpack_from(data, 4 + name_len)
    position = 8 + name_len
    queries = []
    for _ in range(count):
        if len(data) < position + 4:
            return None
        (length,) = _U32.unpack_from(data, position)
        position += 4
        query = data[position : position + length]
        position += length
        if len(query) != length or length > MAX_EXPORT_NAME_LEN or b"\0" in query or b":" not in query[1:]:
            return None
        try:
            query.decode()
        except UnicodeDecodeError:
            return None
        queries.append(query)
    return (name, queries) if position == len(data) else None
