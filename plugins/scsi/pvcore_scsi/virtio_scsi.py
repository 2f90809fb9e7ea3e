"""virtio-scsi (VIRTIO 1.x section 5.6): the ring device of the scsi class.

Queues: 0 is the control queue (task management and asynchronous-notification
requests), 1 the event queue (buffers the driver lends for events), 2 and up
the request queues. A request chain is, readable: ``{u8 lun[8]; le64 id; u8
task_attr, prio, crn; u8 cdb[cdb_size]}`` then data-out; writable: ``{le32
sense_len, residual; le16 status_qualifier; u8 status, response; u8
sense[sense_size]}`` then data-in. Headers may be split across descriptors.

Everything in a chain is the guest's and is checked before use. A malformed
request fails that request, never the device:

* a writable part too short for the response header: returned with nothing
  written (there is nowhere to say why), logged;
* a readable part shorter than the request header: response FAILURE;
* a LUN address that is not target 0 in the single-level format, or a second
  level: BAD_TARGET (Linux then stops scanning that target); a LUN of
  target 0 without a unit: INQUIRY says "no unit here" (peripheral qualifier
  3), REPORT LUNS lists the units, anything else is CHECK CONDITION ILLEGAL
  REQUEST / LOGICAL UNIT NOT SUPPORTED;
* data in both directions (VIRTIO_SCSI_F_INOUT is not offered): FAILURE;
* a data-in (or data-out) buffer smaller than what the command moves: OVERRUN,
  with nothing transferred;
* an unknown opcode: CHECK CONDITION ILLEGAL REQUEST / INVALID COMMAND OPERATION CODE;
* a unit whose code fails on a command: CHECK CONDITION HARDWARE ERROR /
  INTERNAL TARGET FAILURE for that command (logged), the device goes on.

Task management answers as SAM-5 says: ABORT TASK of a tag that is not in
flight is FUNCTION COMPLETE (nothing to abort), QUERY TASK of one is FUNCTION
COMPLETE (not in the task set), a known one FUNCTION SUCCEEDED; an abort or
reset waits until the requests it aborts were answered ABORTED, as the spec
requires before the TMF is answered. A TMF for another target is BAD_TARGET,
for a LUN without a unit INCORRECT_LUN, an unknown TMF FUNCTION_REJECTED.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Mapping, Sequence

import attrs

from pvcore.devices.block import BlockOp, BlockRequest, BlockResult
from pvcore.ring.memory import GuestMemoryError, gather, scatter
from pvcore.virtio import VIRTIO_ID_SCSI, VirtioDevice, VirtioQueue, bit
from pvcore_scsi.commands import (
    INQUIRY,
    REPORT_LUNS,
    REQUEST_SENSE,
    Command,
    Deferred,
    Outcome,
    Reply,
    Transfer,
    WithParameters,
    absent_unit_inquiry,
    report_luns,
)
from pvcore_scsi.sense import (
    CHECK_CONDITION,
    INTERNAL_TARGET_FAILURE,
    INVALID_FIELD_IN_CDB,
    LOGICAL_UNIT_NOT_SUPPORTED,
    MEDIUM_MAY_HAVE_CHANGED,
    PARAMETER_LIST_LENGTH_ERROR,
    ScsiError,
    fixed_sense,
)

log = logging.getLogger("pvcore.scsi")

VIRTIO_SCSI_F_INOUT = 0
VIRTIO_SCSI_F_HOTPLUG = 1
VIRTIO_SCSI_F_CHANGE = 2

S_OK = 0
S_OVERRUN = 1
S_ABORTED = 2
S_BAD_TARGET = 3
S_RESET = 4
S_BUSY = 5
S_TRANSPORT_FAILURE = 6
S_TARGET_FAILURE = 7
S_NEXUS_FAILURE = 8
S_FAILURE = 9
S_FUNCTION_SUCCEEDED = 10
S_FUNCTION_REJECTED = 11
S_INCORRECT_LUN = 12
S_FUNCTION_COMPLETE = S_OK

T_TMF = 0
T_AN_QUERY = 1
T_AN_SUBSCRIBE = 2

TMF_ABORT_TASK = 0
TMF_ABORT_TASK_SET = 1
TMF_CLEAR_ACA = 2
TMF_CLEAR_TASK_SET = 3
TMF_I_T_NEXUS_RESET = 4
TMF_LOGICAL_UNIT_RESET = 5
TMF_QUERY_TASK = 6
TMF_QUERY_TASK_SET = 7

T_NO_EVENT = 0
T_PARAM_CHANGE = 3
T_EVENTS_MISSED = 0x80000000

CONTROL_QUEUE = 0
EVENT_QUEUE = 1
FIRST_REQUEST_QUEUE = 2
MAX_REQUEST_QUEUES = 16
DEFAULT_CDB_SIZE = 32
DEFAULT_SENSE_SIZE = 96
MAX_CDB_SIZE = 255
MAX_SENSE_SIZE = 255
MAX_SECTORS = 0xFFFF
MAX_LUN = 16383
MAX_EVENT_BUFFERS = 64

REQUEST_FIXED = struct.Struct("<8sQBBB")
"""The request header before the CDB: lun, id, task_attr, prio, crn (19 bytes)."""
RESPONSE_FIXED = struct.Struct("<IIHBB")
"""The response header before the sense data: sense_len, residual, status_qualifier, status, response (12 bytes)."""
TMF_REQUEST = struct.Struct("<II8sQ")
AN_REQUEST = struct.Struct("<I8sI")
EVENT = struct.Struct("<I8sI")
CONFIG = struct.Struct("<IIIIIIIHHI")
"""struct virtio_scsi_config: num_queues, seg_max, max_sectors, cmd_per_lun, event_info_size,
sense_size, cdb_size, max_channel, max_target, max_lun (36 bytes)."""
SENSE_SIZE_OFFSET = 20
CDB_SIZE_OFFSET = 24

Buffers = Sequence[tuple[int, int]]


def split_buffers(buffers: Buffers, count: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Split (address, length) buffers after their first ``count`` bytes."""
    front: list[tuple[int, int]] = []
    back: list[tuple[int, int]] = []
    for addr, length in buffers:
        take = min(count, length)
        if take:
            front.append((addr, take))
        if length > take:
            back.append((addr + take, length - take))
        count -= take
    return front, back


def decode_lun(lun: bytes) -> tuple[int, int] | None:
    """(target, LUN) of a virtio-scsi single-level LUN address, or None if it is not one."""
    if lun[0] != 1 or any(lun[4:8]):
        return None
    method = lun[2] >> 6
    if method == 1:  # flat space addressing, as Linux sends every LUN
        return lun[1], ((lun[2] & 0x3F) << 8) | lun[3]
    if method == 0 and lun[2] == 0:  # peripheral device addressing of bus 0
        return lun[1], lun[3]
    return None


@attrs.define(eq=False)
class _InFlight:
    """A request whose answer is not written yet: where it goes and whether a TMF aborted it."""

    queue: VirtioQueue
    chain: object
    generation: int
    lun: int
    tag: int
    response: list[tuple[int, int]]
    data_in_len: int
    aborted: bool = False
    waiting_tmfs: list[_PendingTmf] = attrs.field(factory=list)


@attrs.define(eq=False)
class _PendingTmf:
    """A task management request answered once the requests it aborted are."""

    queue: VirtioQueue
    chain: object
    outstanding: int


class VirtioScsi(VirtioDevice):
    """A virtio-scsi target (target 0) whose logical units are ``units`` by LUN.

    Each unit has ``execute(Command) -> Outcome`` and ``reset()``; see
    :mod:`pvcore_scsi.commands`. ``queues`` request queues.
    """

    device_id = VIRTIO_ID_SCSI

    def __init__(self, units: Mapping[int, object], *, name: str = "scsi", queues: int = 1) -> None:
        if not 1 <= queues <= MAX_REQUEST_QUEUES:
            raise ValueError(f"{name}: queues={queues} must be between 1 and {MAX_REQUEST_QUEUES}")
        if not units:
            raise ValueError(f"{name}: a SCSI target needs at least one logical unit")
        self.units = dict(units)
        self.name = name
        self.queues = queues
        self.negotiated = 0
        self.cdb_size = DEFAULT_CDB_SIZE
        self.sense_size = DEFAULT_SENSE_SIZE
        self._generation = 0
        self._in_flight: set[_InFlight] = set()
        self._event_buffers: list[tuple[VirtioQueue, object]] = []
        self._pending_events: list[tuple[int, int, int]] = []
        self._events_missed = False

    def __repr__(self) -> str:
        return f"VirtioScsi({self.name!r}, luns={sorted(self.units)}, queues={self.queues})"

    def num_queues(self) -> int:
        """Control, event and the request queues."""
        return FIRST_REQUEST_QUEUE + self.queues

    def features(self) -> int:
        """CHANGE: unit attentions (a new disc) are also sent as events; HOTPLUG, with which Linux
        lends the event buffers at all (the units never come or go, so no hot-plug event is sent)."""
        return bit(VIRTIO_SCSI_F_CHANGE) | bit(VIRTIO_SCSI_F_HOTPLUG)

    def config(self) -> bytes:
        """struct virtio_scsi_config: one channel, one target, LUNs up to the highest unit's."""
        return CONFIG.pack(self.queues, self.max_queue_size - 2, MAX_SECTORS, 128, EVENT.size,
                           self.sense_size, self.cdb_size, 0, 0, max(self.units))

    def write_config(self, offset: int, data: bytes) -> None:
        """The driver may set ``sense_size`` and ``cdb_size``; values past 255 are refused."""
        for field_offset, attribute, limit in ((SENSE_SIZE_OFFSET, "sense_size", MAX_SENSE_SIZE),
                                               (CDB_SIZE_OFFSET, "cdb_size", MAX_CDB_SIZE)):
            if offset == field_offset and len(data) == 4:
                value = int.from_bytes(data, "little")
                if 1 <= value <= limit:
                    setattr(self, attribute, value)
                else:
                    log.warning("%s: driver wrote %s=%d (allowed 1..%d); ignored", self.name, attribute, value, limit)
                return
        log.debug("%s: config write at %d+%d ignored (read-only field)", self.name, offset, len(data))

    def activate(self, features: int) -> None:
        """Remember the negotiated features."""
        self.negotiated = features
        log.debug("%s: driver accepted features %#x (CHANGE events %s)", self.name, features,
                  "on" if features & bit(VIRTIO_SCSI_F_CHANGE) else "off")

    def reset(self) -> None:
        """Forget the session: late completions are dropped, lent event buffers forgotten, sizes restored."""
        self._generation += 1
        self._in_flight.clear()
        self._event_buffers.clear()
        self._pending_events.clear()
        self._events_missed = False
        self.negotiated = 0
        self.cdb_size, self.sense_size = DEFAULT_CDB_SIZE, DEFAULT_SENSE_SIZE
        for unit in self.units.values():
            unit.reset()

    def queue_stopping(self, queue: VirtioQueue) -> None:
        """Give the event buffers lent on a stopping event queue back, unused."""
        if queue.index == EVENT_QUEUE:
            lent, self._event_buffers = self._event_buffers, []
            for owner, chain in lent:
                owner.complete(chain, 0)

    def handle(self, queue: VirtioQueue, chain) -> None:
        """Serve one chain of the control, event or a request queue."""
        if queue.index == CONTROL_QUEUE:
            self._control(queue, chain)
        elif queue.index == EVENT_QUEUE:
            self._lend_event_buffer(queue, chain)
        else:
            self._request(queue, chain)

    def media_changed(self, lun: int) -> None:
        """A unit's medium changed: send a parameter-change event (with VIRTIO_SCSI_F_CHANGE)."""
        if not self.negotiated & bit(VIRTIO_SCSI_F_CHANGE):
            return
        self._pending_events.append((T_PARAM_CHANGE, lun, MEDIUM_MAY_HAVE_CHANGED.asc | MEDIUM_MAY_HAVE_CHANGED.ascq << 8))
        self._send_events()

    # -- request queues -------------------------------------------------------------------------------------

    def _request(self, queue: VirtioQueue, chain) -> None:
        response_size = RESPONSE_FIXED.size + self.sense_size
        if chain.writable_len < response_size:
            log.warning("%s: request at head %d has %d writable bytes, the response needs %d; returned unanswered",
                        self.name, chain.head, chain.writable_len, response_size)
            queue.complete(chain, 0)
            return
        response, data_in = split_buffers(chain.writable, response_size)
        header_size = REQUEST_FIXED.size + self.cdb_size
        if chain.readable_len < header_size:
            log.warning("%s: request at head %d: header of %d bytes, need %d", self.name, chain.head,
                        chain.readable_len, header_size)
            self._answer(queue, chain, response, code=S_FAILURE)
            return
        header_buffers, data_out = split_buffers(chain.readable, header_size)
        try:
            header = gather(queue.memory, header_buffers)
        except GuestMemoryError as exc:
            log.warning("%s: request at head %d: %s", self.name, chain.head, exc)
            self._answer(queue, chain, response, code=S_FAILURE)
            return
        lun_bytes, tag, _attr, _prio, _crn = REQUEST_FIXED.unpack_from(header)
        cdb = header[REQUEST_FIXED.size:].ljust(DEFAULT_CDB_SIZE, b"\0")  # a driver's short field reads as zeros
        address = decode_lun(lun_bytes)
        if address is None or address[0] != 0:
            self._answer(queue, chain, response, code=S_BAD_TARGET)
            return
        lun = address[1]
        data_in_len = sum(length for _, length in data_in)
        data_out_len = sum(length for _, length in data_out)
        if data_in_len and data_out_len:
            log.warning("%s: request at head %d moves data both ways (INOUT not offered)", self.name, chain.head)
            self._answer(queue, chain, response, code=S_FAILURE)
            return
        command = Command(cdb, data_out_len, data_in_len)
        request = _InFlight(queue, chain, self._generation, lun, tag, response, data_in_len)
        try:
            outcome = self._execute(lun, command)
            if isinstance(outcome, WithParameters):
                outcome = self._with_parameters(queue, outcome, data_out)
        except ScsiError as exc:
            log.debug("%s: lun %d opcode %#04x: %s", self.name, lun, cdb[0], exc)
            self._finish(request, Reply(CHECK_CONDITION, sense=fixed_sense(exc.sense)), data_in)
            return
        except Exception:  # a unit's bug answers this command, it does not fail the device
            log.exception("%s: lun %d opcode %#04x: unit error", self.name, lun, cdb[0])
            self._finish(request, Reply(CHECK_CONDITION, sense=fixed_sense(INTERNAL_TARGET_FAILURE)), data_in)
            return
        if isinstance(outcome, Reply):
            self._finish(request, outcome, data_in)
        elif isinstance(outcome, Transfer):
            self._transfer(request, outcome, data_in, data_out)
        else:
            self._defer(request, outcome, data_in, data_out)

    def _execute(self, lun: int, command: Command) -> Outcome:
        if command.opcode == REPORT_LUNS:
            return Reply(data=report_luns(command.cdb, sorted(self.units)))
        unit = self.units.get(lun)
        if unit is not None:
            return unit.execute(command)
        if command.opcode == INQUIRY:
            return Reply(data=absent_unit_inquiry(command.cdb))
        if command.opcode == REQUEST_SENSE:
            return Reply(data=fixed_sense(LOGICAL_UNIT_NOT_SUPPORTED)[: command.cdb[4]])
        raise ScsiError(LOGICAL_UNIT_NOT_SUPPORTED, f"no logical unit {lun}")

    def _with_parameters(self, queue: VirtioQueue, outcome: WithParameters, data_out: Buffers) -> Outcome:
        """Read a command's parameter list (bounded by the unit's limit) and let the unit answer."""
        if sum(length for _, length in data_out) > outcome.limit:
            raise ScsiError(PARAMETER_LIST_LENGTH_ERROR, f"parameter list longer than {outcome.limit} bytes")
        return outcome.then(gather(queue.memory, data_out) if data_out else b"")

    def _transfer(self, request: _InFlight, transfer: Transfer, data_in: Buffers, data_out: Buffers) -> None:
        queue, memory = request.queue, request.queue.memory
        op = transfer.op
        if op is BlockOp.DISCARD:
            self._discard(request, transfer)
            return
        if op is BlockOp.READ or op is BlockOp.WRITE:
            buffers = data_in if op is BlockOp.READ else data_out
            if sum(length for _, length in buffers) < transfer.length:
                log.debug("%s: %s of %d bytes into smaller buffers: overrun", self.name, op.value, transfer.length)
                self._answer(queue, request.chain, request.response, code=S_OVERRUN)
                return
            used, _ = split_buffers(buffers, transfer.length)
            try:
                views = [view for addr, size in used for view in memory.views(addr, size, write=op is BlockOp.READ)]
            except GuestMemoryError as exc:
                log.warning("%s: request at head %d: %s", self.name, request.chain.head, exc)
                self._answer(queue, request.chain, request.response, code=S_FAILURE)
                return
            block_request = BlockRequest(op, transfer.offset, transfer.length, views, fua=transfer.fua)
        else:
            block_request = BlockRequest(op)
        moved = transfer.length if op is BlockOp.READ else 0
        if block_request.op is not BlockOp.FLUSH and transfer.backend.serve_now(block_request):
            self._finish(request, Reply(), (), data_written=moved)
            return
        self._in_flight.add(request)

        def done(result: BlockResult) -> None:
            if not self._track_done(request):
                return
            if result.ok:
                self._finish(request, Reply(), (), data_written=moved)
            else:
                log.warning("%s: lun %d %s failed: %s", self.name, request.lun, op.value, result.message)
                sense = transfer.error or INTERNAL_TARGET_FAILURE
                self._finish(request, Reply(CHECK_CONDITION, sense=fixed_sense(sense)), ())

        transfer.backend.submit(block_request, done)

    def _discard(self, request: _InFlight, transfer: Transfer) -> None:
        """Every range of an UNMAP as one block-engine DISCARD; GOOD once all are done, else the first error."""
        if not transfer.ranges:
            self._finish(request, Reply(), (), data_written=0)
            return
        self._in_flight.add(request)
        outstanding = [len(transfer.ranges)]
        failures: list[BlockResult] = []

        def done(result: BlockResult) -> None:
            outstanding[0] -= 1
            if not result.ok:
                failures.append(result)
            if outstanding[0] or not self._track_done(request):
                return
            if failures:
                log.warning("%s: lun %d discard failed: %s", self.name, request.lun, failures[0].message)
                self._finish(request, Reply(CHECK_CONDITION, sense=fixed_sense(transfer.error or INTERNAL_TARGET_FAILURE)), ())
            else:
                self._finish(request, Reply(), (), data_written=0)

        for offset, length in transfer.ranges:
            transfer.backend.submit(BlockRequest(BlockOp.DISCARD, offset, length), done)

    def _defer(self, request: _InFlight, deferred: Deferred, data_in: Buffers, data_out: Buffers) -> None:
        if max(request.data_in_len, sum(n for _, n in data_out)) > deferred.data_limit:
            self._finish(request, Reply(CHECK_CONDITION, sense=fixed_sense(INVALID_FIELD_IN_CDB)), ())
            return
        memory = request.queue.memory
        self._in_flight.add(request)

        def run() -> Reply:
            return deferred.job(gather(memory, data_out) if data_out else b"")

        def done(future: asyncio.Future[Reply]) -> None:
            if not self._track_done(request):
                return
            try:
                reply = future.result()
            except Exception:
                log.exception("%s: lun %d: passthrough command failed", self.name, request.lun)
                reply = Reply(CHECK_CONDITION, sense=fixed_sense(INTERNAL_TARGET_FAILURE))
            self._finish(request, reply, data_in)

        asyncio.get_running_loop().run_in_executor(None, run).add_done_callback(done)

    def _track_done(self, request: _InFlight) -> bool:
        """A held request came back: False if it belongs to an old session; answers it ABORTED if a TMF said so."""
        if request.generation != self._generation:
            return False
        self._in_flight.discard(request)
        if request.aborted:
            self._answer(request.queue, request.chain, request.response, code=S_ABORTED)
            for tmf in request.waiting_tmfs:
                tmf.outstanding -= 1
                if tmf.outstanding == 0:
                    self._answer_tmf(tmf.queue, tmf.chain, S_FUNCTION_COMPLETE)
            return False
        return True

    def _finish(self, request: _InFlight, reply: Reply, data_in: Buffers, *, data_written: int | None = None) -> None:
        """Write ``reply``'s data (unless the engine already did: ``data_written``) and its response."""
        queue, chain = request.queue, request.chain
        written = data_written
        if written is None:
            if len(reply.data) > request.data_in_len:
                log.debug("%s: %d bytes of data-in into %d: overrun", self.name, len(reply.data), request.data_in_len)
                self._answer(queue, chain, request.response, code=S_OVERRUN)
                return
            try:
                written = scatter(queue.memory, data_in, reply.data) if reply.data else 0
            except GuestMemoryError as exc:
                log.warning("%s: request at head %d: %s", self.name, chain.head, exc)
                self._answer(queue, chain, request.response, code=S_FAILURE)
                return
        self._answer(queue, chain, request.response, status=reply.status, sense=reply.sense,
                     residual=request.data_in_len - written, data_written=written)

    def _answer(self, queue: VirtioQueue, chain, response: Buffers, *,
                status: int = 0, sense: bytes = b"", residual: int = 0, data_written: int = 0,
                code: int = S_OK) -> None:
        sense = sense[: self.sense_size]
        header = RESPONSE_FIXED.pack(len(sense), max(residual, 0), 0, status, code)
        try:
            scatter(queue.memory, response, header + sense.ljust(self.sense_size, b"\0"))
        except GuestMemoryError as exc:
            log.warning("%s: response at head %d: %s", self.name, chain.head, exc)
            queue.complete(chain, 0)
            return
        queue.complete(chain, RESPONSE_FIXED.size + self.sense_size + data_written)

    # -- control queue --------------------------------------------------------------------------------------

    def _control(self, queue: VirtioQueue, chain) -> None:
        try:
            request = gather(queue.memory, split_buffers(chain.readable, TMF_REQUEST.size)[0])
        except GuestMemoryError as exc:
            log.warning("%s: control request at head %d: %s", self.name, chain.head, exc)
            queue.complete(chain, 0)
            return
        kind = int.from_bytes(request[:4], "little") if len(request) >= 4 else None
        if kind == T_TMF and chain.writable_len >= 1:
            if len(request) < TMF_REQUEST.size:
                self._answer_tmf(queue, chain, S_FAILURE)
                return
            self._tmf(queue, chain, *TMF_REQUEST.unpack(request)[1:])
        elif kind in (T_AN_QUERY, T_AN_SUBSCRIBE) and chain.writable_len >= 5:
            ok = len(request) >= AN_REQUEST.size
            answer = struct.pack("<IB", 0, S_OK if ok else S_FAILURE)  # no asynchronous notification is supported
            self._write_control(queue, chain, answer)
        else:
            log.warning("%s: control request at head %d: type %s with %d writable bytes; returned unanswered",
                        self.name, chain.head, kind, chain.writable_len)
            queue.complete(chain, 0)

    def _tmf(self, queue: VirtioQueue, chain, subtype: int, lun_bytes: bytes, tag: int) -> None:
        address = decode_lun(lun_bytes)
        if address is None or address[0] != 0:
            self._answer_tmf(queue, chain, S_BAD_TARGET)
            return
        lun = address[1]
        if subtype != TMF_I_T_NEXUS_RESET and lun not in self.units:
            self._answer_tmf(queue, chain, S_INCORRECT_LUN)
            return
        same_lun = [r for r in self._in_flight if r.lun == lun]
        if subtype == TMF_ABORT_TASK:
            victims = [r for r in same_lun if r.tag == tag]
        elif subtype in (TMF_ABORT_TASK_SET, TMF_CLEAR_TASK_SET):
            victims = same_lun
        elif subtype == TMF_LOGICAL_UNIT_RESET:
            victims = same_lun
            self.units[lun].reset()
        elif subtype == TMF_I_T_NEXUS_RESET:
            victims = list(self._in_flight)
            for unit in self.units.values():
                unit.reset()
        elif subtype == TMF_QUERY_TASK:
            found = any(r.tag == tag for r in same_lun)
            self._answer_tmf(queue, chain, S_FUNCTION_SUCCEEDED if found else S_FUNCTION_COMPLETE)
            return
        elif subtype == TMF_QUERY_TASK_SET:
            self._answer_tmf(queue, chain, S_FUNCTION_SUCCEEDED if same_lun else S_FUNCTION_COMPLETE)
            return
        else:
            log.debug("%s: TMF subtype %d rejected", self.name, subtype)
            self._answer_tmf(queue, chain, S_FUNCTION_REJECTED)
            return
        if not victims:
            self._answer_tmf(queue, chain, S_FUNCTION_COMPLETE)
            return
        tmf = _PendingTmf(queue, chain, len(victims))
        for victim in victims:
            victim.aborted = True
            victim.waiting_tmfs.append(tmf)
        log.info("%s: TMF %d on lun %d aborts %d request(s)", self.name, subtype, lun, len(victims))

    def _answer_tmf(self, queue: VirtioQueue, chain, code: int) -> None:
        self._write_control(queue, chain, bytes([code]))

    def _write_control(self, queue: VirtioQueue, chain, answer: bytes) -> None:
        try:
            written = scatter(queue.memory, chain.writable, answer)
        except GuestMemoryError as exc:
            log.warning("%s: control answer at head %d: %s", self.name, chain.head, exc)
            written = 0
        queue.complete(chain, written)

    # -- event queue ----------------------------------------------------------------------------------------

    def _lend_event_buffer(self, queue: VirtioQueue, chain) -> None:
        if chain.writable_len < EVENT.size or len(self._event_buffers) >= MAX_EVENT_BUFFERS:
            log.warning("%s: event buffer at head %d (%d writable bytes) refused", self.name, chain.head,
                        chain.writable_len)
            queue.complete(chain, 0)
            return
        self._event_buffers.append((queue, chain))
        self._send_events()

    def _send_events(self) -> None:
        while self._event_buffers and (self._pending_events or self._events_missed):
            queue, chain = self._event_buffers.pop(0)
            if self._pending_events:
                event, lun, reason = self._pending_events.pop(0)
                lun_bytes = bytes([1, 0, 0x40 | (lun >> 8), lun & 0xFF, 0, 0, 0, 0])
            else:
                event, lun_bytes, reason = T_NO_EVENT, bytes(8), 0
            if self._events_missed:
                event |= T_EVENTS_MISSED
                self._events_missed = False
            self._write_control(queue, chain, EVENT.pack(event, lun_bytes, reason))
            log.debug("%s: event %#x (lun field %s, reason %#x) sent", self.name, event, lun_bytes.hex(), reason)
        if len(self._pending_events) > MAX_EVENT_BUFFERS:
            self._pending_events.clear()
            self._events_missed = True
