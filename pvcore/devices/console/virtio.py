"""virtio-console (device id 3): one port, no MULTIPORT, feeding a ConsoleStream.

Queues: 0 is the receiveq (host to guest: the driver posts writable buffers,
the device holds them until input arrives), 1 is the transmitq (guest to host:
readable bytes go to :meth:`~pvcore.devices.console.stream.ConsoleStream.output`
and the chain completes with 0 bytes written).

Input that arrives while the guest has no receive buffer posted waits in a
bounded queue (:data:`PENDING_INPUT_LIMIT`); what does not fit is dropped and
counted in :attr:`VirtioConsole.input_dropped`.

Config space (VIRTIO 1.x 5.3.4): ``le16 cols, le16 rows, le32 max_nr_ports,
le32 emerg_wr``. F_SIZE is offered when a size was given; F_EMERG_WRITE is
always offered, and a byte written to ``emerg_wr`` is console output.

When the receiveq stops, the receive buffers the device holds are completed
with 0 bytes written, so that the driver gets every buffer back; a driver
treats an empty receive buffer as no input.
"""

from __future__ import annotations

import collections
import logging
import struct

from pvcore.devices.console.attach import ConsoleAttachPoint
from pvcore.devices.console.stream import ConsoleStream
from pvcore.ring.memory import GuestMemoryError
from pvcore.ring.session import RunningQueue
from pvcore.ring.virtqueue import DescriptorChain
from pvcore.virtio import VIRTIO_ID_CONSOLE, VirtioDevice, bit

log = logging.getLogger("pvcore.console")

VIRTIO_CONSOLE_F_SIZE = 0
VIRTIO_CONSOLE_F_MULTIPORT = 1
VIRTIO_CONSOLE_F_EMERG_WRITE = 2

RECEIVEQ = 0
TRANSMITQ = 1

CONFIG = struct.Struct("<HHII")
EMERG_WR_OFFSET = 8

PENDING_INPUT_LIMIT = 64 * 1024
"""Bytes of input held for the guest while it has no receive buffer posted."""

TRANSMIT_CHUNK = 64 * 1024

MAX_TRANSMIT_BYTES = 256 * 1024
"""Most bytes of one transmit chain passed on; the rest is counted in ``output_dropped``.

A chain may describe gigabytes (many descriptors over the same pages); Linux
sends at most a few pages per chain. Copying more would stall the event loop
every guest shares.
"""


class VirtioConsole(VirtioDevice):
    """A single-port virtio console whose bytes flow through ``stream``.

    ``cols``/``rows`` (both non-zero) offer VIRTIO_CONSOLE_F_SIZE. The
    optional ``attach_point`` is carried along for the daemon to start and
    close; the device itself never touches it.
    """

    device_id = VIRTIO_ID_CONSOLE

    def __init__(
        self,
        stream: ConsoleStream,
        *,
        cols: int = 0,
        rows: int = 0,
        attach_point: ConsoleAttachPoint | None = None,
    ) -> None:
        if not (0 <= cols <= 0xFFFF and 0 <= rows <= 0xFFFF):
            raise ValueError(f"console size {cols}x{rows} does not fit 16 bits")
        self.stream = stream
        self.cols = cols
        self.rows = rows
        self.attach_point = attach_point
        self.input_dropped = 0
        self.output_dropped = 0
        self._pending_input = bytearray()
        self._receive_buffers: collections.deque[DescriptorChain] = collections.deque()
        self._receiveq: RunningQueue | None = None
        stream.on_input = self.input

    def __repr__(self) -> str:
        return f"VirtioConsole({self.stream.name!r})"

    def num_queues(self) -> int:
        """receiveq and transmitq of port 0."""
        return 2

    def features(self) -> int:
        """EMERG_WRITE always; SIZE when both cols and rows are set."""
        offered = bit(VIRTIO_CONSOLE_F_EMERG_WRITE)
        if self.cols and self.rows:
            offered |= bit(VIRTIO_CONSOLE_F_SIZE)
        return offered

    def config(self) -> bytes:
        """cols, rows, max_nr_ports (1), emerg_wr (reads as 0)."""
        return CONFIG.pack(self.cols, self.rows, 1, 0)

    def write_config(self, offset: int, data: bytes) -> None:
        """A write that covers the first byte of ``emerg_wr`` outputs that byte; other writes are ignored."""
        index = EMERG_WR_OFFSET - offset
        if 0 <= index < len(data):
            self.stream.output(bytes(data[index : index + 1]))

    def queue_started(self, queue: RunningQueue) -> None:
        """Remember the receiveq so that input can be delivered into it."""
        if queue.index == RECEIVEQ:
            self._receiveq = queue

    def handle(self, queue: RunningQueue, chain: DescriptorChain) -> None:
        """Hold a receive buffer (and fill it if input waits), or pass transmitted bytes to the stream."""
        if queue.index == RECEIVEQ:
            if not chain.writable_len:
                log.warning("console %s: receive buffer %d is not writable; returned empty", self.stream.name, chain.head)
                queue.complete(chain, 0)
                return
            self._receiveq = queue
            self._receive_buffers.append(chain)
            self._deliver_input()
            return
        memory = queue.memory
        passed = 0
        for addr, length in chain.readable:
            length = min(length, MAX_TRANSMIT_BYTES - passed)
            for offset in range(0, length, TRANSMIT_CHUNK):
                self.stream.output(memory.read(addr + offset, min(TRANSMIT_CHUNK, length - offset)))
            passed += length
            if passed == MAX_TRANSMIT_BYTES:
                break
        dropped = chain.readable_len - passed
        if dropped:
            if not self.output_dropped:
                log.warning(
                    "console %s: a transmit chain of %d bytes; passing on %d bytes per chain, dropping the rest",
                    self.stream.name, chain.readable_len, MAX_TRANSMIT_BYTES,
                )
            self.output_dropped += dropped
        queue.complete(chain, 0)

    def input(self, data: bytes) -> None:
        """Bytes for the guest to read (the stream calls this for the attached person's keys)."""
        room = max(PENDING_INPUT_LIMIT - len(self._pending_input), 0)
        if len(data) > room:
            if not self.input_dropped:
                log.warning("console %s: guest is not reading input; dropping what does not fit", self.stream.name)
            self.input_dropped += len(data) - room
            data = data[:room]
        self._pending_input += data
        self._deliver_input()

    def _deliver_input(self) -> None:
        queue = self._receiveq
        if queue is None or queue.session.broken:  # a failed device keeps its input for the next session
            return
        while self._pending_input and self._receive_buffers:
            chain = self._receive_buffers.popleft()
            try:
                written = queue.write(chain, self._pending_input[: chain.writable_len])
            except GuestMemoryError as exc:
                queue.session.fail(f"console receive buffer {chain.head}: {exc}")
                return
            del self._pending_input[:written]
            queue.complete(chain, written)

    def queue_stopping(self, queue: RunningQueue) -> None:
        """Give every held receive buffer back with 0 bytes written."""
        if queue.index != RECEIVEQ:
            return
        while self._receive_buffers:
            queue.complete(self._receive_buffers.popleft(), 0)
        if self._receiveq is queue:
            self._receiveq = None

    def reset(self) -> None:
        """Forget held buffers and waiting input (the session is gone)."""
        self._receive_buffers.clear()
        self._pending_input.clear()
        self._receiveq = None
