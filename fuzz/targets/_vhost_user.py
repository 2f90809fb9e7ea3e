"""Shared body of the vhost-user targets: whole message sequences, fds included, into a real device.

An input is ``[record...] [0xFF] [guest RAM bytes]``; a record is one
message as the frontend writes it: ``fdspec(u8) length(u16 LE) bytes``. The
bytes go to the socket as they are (header and payload, so sizes, flags and
request numbers are the fuzzer's); ``fdspec``'s low nibble is how many fds
ride with them (at most 8), its high nibble their kind (see :data:`FD_KINDS`;
0 picks what the request carries: the guest RAM memfd for SET_MEM_TABLE, a
memfd sized as the payload says for SET_LOG_BASE and SET_INFLIGHT_FD, an
eventfd otherwise). The guest RAM (a sealed 1 MiB memfd, the size the seeds
were recorded with) is filled from the input's tail before the first message,
so the rings the messages point at hold fuzzed descriptors; after the last
message every eventfd sent is kicked.

Checked after the frontend leaves: the connection ends within its timeout;
fds, memfd mappings, threads and loop tasks are back at their baseline; a
well-behaved frontend (the Python one) then gets a full request served by the
same device; for net, no frame reached the switch from a source MAC other
than the NIC's.
"""

from __future__ import annotations

import mmap
import os
import socket
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path

from fuzz.harness import Baseline, InvariantError, loop_thread, wait_for
from pvcore.primitives import HypervisorPrimitives
from pvcore.ring.fdmemory import sealed_memfd
from pvcore.testing.vhost_user_frontend import VhostUserFrontend
from pvcore.transports.vhost_user import VhostUserFrontDoor
from pvcore.transports.vhost_user.protocol import HEADER, Request, encode

RAM_SIZE = 1 << 20
END = 0xFF
_RECORD = struct.Struct("<BH")
MAX_SIDE_MEMFD = 1 << 20
FD_KINDS = ("auto", "eventfd", "guest RAM memfd", "4 KiB memfd", "pipe read end", "/dev/null", "unsealed RAM copy")
CHECK_EVERY = 20
"""A well-behaved frontend is served after every this many inputs (and after the first)."""


class VhostTarget:
    """One device behind a vhost-user front door, fuzzed through the socket."""

    def __init__(self, device, good_session: Callable[[VhostUserFrontend], None],
                 after_input: Callable[[], None] | None = None) -> None:
        self.device = device
        self.good_session = good_session
        self.after_input = after_input or (lambda: None)
        self.path = Path(tempfile.mkdtemp(prefix="pvcore-fuzz-vhost-")) / "vhost.sock"
        self.door = VhostUserFrontDoor(device, self.path, primitives=HypervisorPrimitives(), name="fuzz")
        loop_thread().run(self.door.start())
        self.inputs = 0
        self._serve_well()
        self.baseline = Baseline()

    def _serve_well(self) -> None:
        self._wait_idle()
        try:
            with VhostUserFrontend.connect(self.path, ram_size=RAM_SIZE, timeout=10.0) as frontend:
                self.good_session(frontend)
        except Exception as exc:
            raise InvariantError(f"the device no longer serves a well-behaved frontend: {exc!r}") from exc
        self._wait_idle()

    def _wait_idle(self) -> None:
        wait_for(lambda: not self.door.live, "the connection's clean-up", timeout=15)

    def one_input(self, data: bytes) -> None:
        """Replay one message sequence, then check the invariants."""
        records, ram_bytes = parse(data)
        fd = sealed_memfd("pvcore-fuzz-ram", RAM_SIZE)
        ram = mmap.mmap(fd, RAM_SIZE, flags=mmap.MAP_SHARED)
        try:
            ram[: len(ram_bytes)] = ram_bytes
            self._replay(records, fd)
        finally:
            ram.close()
            os.close(fd)
        self._wait_idle()
        self.after_input()
        self.inputs += 1
        if self.inputs % CHECK_EVERY == 1:
            self._serve_well()
        self.baseline.check()

    def _replay(self, records: list[tuple[int, bytes]], ram_fd: int) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(10)
        kicks: list[int] = []
        try:
            sock.connect(os.fspath(self.path))
            for fdspec, wire in records:
                fds = _make_fds(fdspec, wire, ram_fd)
                try:
                    if fds:
                        socket.send_fds(sock, [wire], fds)
                    else:
                        sock.sendall(wire)
                except (BrokenPipeError, ConnectionResetError):
                    break
                finally:
                    for extra in fds:
                        if _is_eventfd(extra):
                            kicks.append(extra)
                        elif extra != ram_fd:
                            os.close(extra)
            for kick in kicks:
                os.eventfd_write(kick, 1)
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            while True:
                try:
                    if not sock.recv(65536):
                        break
                except ConnectionResetError:
                    break
                except TimeoutError:
                    raise InvariantError("hang: the backend neither closed nor answered 10 s after the frontend's end") from None
        finally:
            sock.close()
            for kick in kicks:
                os.close(kick)


_EVENTFDS: set[int] = set()


def _is_eventfd(fd: int) -> bool:
    return fd in _EVENTFDS


def _eventfd() -> int:
    fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    _EVENTFDS.add(fd)
    return fd


def _memfd(size: int) -> int:
    fd = os.memfd_create("pvcore-fuzz-side", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def _make_fds(fdspec: int, wire: bytes, ram_fd: int) -> list[int]:
    _EVENTFDS.clear()
    count = min(fdspec & 0x0F, 8)
    kind = (fdspec >> 4) % len(FD_KINDS)
    request = struct.unpack_from("<I", wire)[0] if len(wire) >= 4 else -1
    fds = []
    for _ in range(count):
        if kind == 0:
            if request in (Request.SET_MEM_TABLE,):
                fds.append(os.dup(ram_fd))
            elif request in (Request.SET_LOG_BASE, Request.SET_INFLIGHT_FD):
                size = struct.unpack_from("<Q", wire, HEADER.size)[0] if len(wire) >= HEADER.size + 8 else 4096
                fds.append(_memfd(min(max(size, 1), MAX_SIDE_MEMFD)))
            else:
                fds.append(_eventfd())
        elif kind == 1:
            fds.append(_eventfd())
        elif kind == 2:
            fds.append(os.dup(ram_fd))
        elif kind == 3:
            fds.append(_memfd(4096))
        elif kind == 4:
            read_end, write_end = os.pipe2(os.O_CLOEXEC)
            os.close(write_end)
            fds.append(read_end)
        elif kind == 5:
            fds.append(os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC))
        else:
            fds.append(_memfd(RAM_SIZE))
    return fds


def parse(data: bytes) -> tuple[list[tuple[int, bytes]], bytes]:
    """Split an input into its records (fdspec, wire bytes) and the guest RAM bytes."""
    records, at = [], 0
    while at < len(data) and len(records) < 64:
        if data[at] == END or at + _RECORD.size > len(data):
            at += 1
            break
        fdspec, length = _RECORD.unpack_from(data, at)
        at += _RECORD.size
        records.append((fdspec, data[at : at + length]))
        at += length
    return records, data[at : at + RAM_SIZE]


def record_session(session: Callable[[VhostUserFrontend], None], device) -> bytes:
    """Run ``session`` with the Python frontend against ``device`` and record it as a seed input.

    The messages are recorded as sent (the fds by kind: the RAM memfd, an
    eventfd, or "auto" for side memfds), and the guest RAM's first 32 KiB
    (the rings and their first buffers) as they stood at the end.
    """
    path = Path(tempfile.mkdtemp(prefix="pvcore-fuzz-record-")) / "vhost.sock"
    door = VhostUserFrontDoor(device, path, primitives=HypervisorPrimitives(), name="record")
    loop_thread().run(door.start())
    out = bytearray()
    try:
        with VhostUserFrontend.connect(path, ram_size=RAM_SIZE, timeout=10.0) as frontend:
            original = frontend.send

            def send(request: int, payload: bytes = b"", fds=(), *, flags: int = 1) -> None:
                kind = 0
                if fds and fds[0] == frontend.ram.fd:
                    kind = 2
                elif fds and request not in (Request.SET_LOG_BASE, Request.SET_INFLIGHT_FD):
                    kind = 1
                wire = encode(request, payload, flags=flags)
                out.extend(_RECORD.pack(kind << 4 | len(fds), len(wire)) + wire)
                original(request, payload, fds, flags=flags)

            frontend.send = send
            session(frontend)
            out.append(END)
            out.extend(frontend.ram.memory.read(0, 32 * 1024))
    finally:
        loop_thread().run(door.stop())
    return bytes(out)
