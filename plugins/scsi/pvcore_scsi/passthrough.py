"""A logical unit that is a host SCSI device (``/dev/sgN``), driven with the SG_IO ioctl.

Only opcodes on the allow-list reach the device: by default the read-only and
tray set (:data:`READ_OPCODES`: what reading, playing and ejecting a disc
needs); ``allow=write`` adds :data:`WRITE_OPCODES` (writing and burning).
Anything else is CHECK CONDITION INVALID COMMAND OPERATION CODE without
touching the device. Each command runs on a thread with a timeout (SG_IO's
own); the device's status and sense data go back to the guest as they are,
and a timeout is ABORTED COMMAND / COMMAND TIMEOUT.

The ioctl is the one boundary with the host: :class:`PassthroughUnit` takes
it as a parameter (``ioctl``, default :func:`fcntl.ioctl`), so tests drive
the whole CDB, buffer and sense handling above it with a stand-in for the
ioctl alone. No real optical drive has been driven through this code.
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import os
import struct
from collections.abc import Callable

from pvcore.virtio import DeviceError
from pvcore_scsi.commands import MAX_DATA_IN, Command, Deferred, Reply
from pvcore_scsi.sense import (
    CHECK_CONDITION,
    COMMAND_TIMEOUT,
    INTERNAL_TARGET_FAILURE,
    INVALID_COMMAND_OPERATION_CODE,
    ScsiError,
    fixed_sense,
)

log = logging.getLogger("pvcore.scsi")

SG_IO = 0x2285
SG_DXFER_NONE = -1
SG_DXFER_TO_DEV = -2
SG_DXFER_FROM_DEV = -3
SG_INTERFACE_ID = ord("S")
DID_TIME_OUT = 0x03
MAX_SENSE = 252

SG_IO_HDR = struct.Struct("<iiBBHIQQQIIi4xQBBBBHHiII4x")
"""struct sg_io_hdr on 64-bit Linux (88 bytes): interface_id, dxfer_direction, cmd_len, mx_sb_len,
iovec_count, dxfer_len, dxferp, cmdp, sbp, timeout, flags, pack_id, usr_ptr, status, masked_status,
msg_status, sb_len_wr, host_status, driver_status, resid, duration, info."""

READ_OPCODES = frozenset({
    0x00, 0x03, 0x12, 0x1A, 0x1B, 0x1E, 0x25, 0x28, 0x42, 0x43, 0x46, 0x4A, 0x51, 0x52, 0x5A,
    0xA0, 0xA4, 0xA8, 0xAC, 0xAD, 0xB9, 0xBB, 0xBD, 0xBE,
})
"""Read-only and tray commands: TEST UNIT READY, REQUEST SENSE, INQUIRY, MODE SENSE(6/10), START STOP
UNIT, PREVENT ALLOW, READ CAPACITY, READ(10/12), READ SUB-CHANNEL, READ TOC, GET CONFIGURATION, GET EVENT
STATUS NOTIFICATION, READ DISC/TRACK INFORMATION, REPORT LUNS, REPORT KEY, GET PERFORMANCE, READ DISC
STRUCTURE, READ CD (MSF), SET CD SPEED, MECHANISM STATUS."""

WRITE_OPCODES = frozenset({0x04, 0x2A, 0x2E, 0x35, 0x53, 0x54, 0x55, 0x5B, 0x5D, 0xA1, 0xA3, 0xAA, 0xB6, 0xBF})
"""Writing and burning, only with ``allow=write``: FORMAT UNIT, WRITE(10/12), WRITE AND VERIFY,
SYNCHRONIZE CACHE, RESERVE TRACK, SEND OPC, MODE SELECT(10), CLOSE TRACK/SESSION, SEND CUE SHEET,
BLANK, SEND KEY, SET STREAMING, SEND DISC STRUCTURE."""

_CDB_LENGTH = {0: 6, 1: 10, 2: 10, 4: 16, 5: 12}
"""CDB length by opcode group (the top three bits); groups 3, 6 and 7 are never passed through."""

Ioctl = Callable[[int, int, bytearray], object]


class PassthroughUnit:
    """A host ``/dev/sgN`` behind an opcode allow-list, each command with ``timeout`` seconds."""

    def __init__(self, path: str, *, name: str, lun: int, allow_write: bool = False, timeout: float = 30.0,
                 ioctl: Ioctl = fcntl.ioctl) -> None:
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise DeviceError(f"{name}: passthrough={path}: cannot open: {exc.strerror}") from None
        self.path = path
        self.name = name
        self.lun = lun
        self.allowed = READ_OPCODES | WRITE_OPCODES if allow_write else READ_OPCODES
        self.timeout_ms = max(1, int(timeout * 1000))
        self._ioctl = ioctl

    def __repr__(self) -> str:
        return f"PassthroughUnit({self.name!r}, lun={self.lun}, path={self.path!r})"

    def reset(self) -> None:
        """The host device keeps its own state; nothing to forget here."""

    def close(self) -> None:
        """Close the device."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def execute(self, command: Command) -> Deferred:
        """Check the opcode and CDB; the SG_IO runs later on a thread."""
        opcode = command.opcode
        length = _CDB_LENGTH.get(opcode >> 5)
        if opcode not in self.allowed or length is None:
            log.info("%s: lun %d: opcode %#04x refused (not on the allow-list)", self.name, self.lun, opcode)
            raise ScsiError(INVALID_COMMAND_OPERATION_CODE, f"opcode {opcode:#04x} is not allowed")
        cdb = command.cdb[:length]
        if command.data_in_len:
            direction, size = SG_DXFER_FROM_DEV, command.data_in_len
        elif command.data_out_len:
            direction, size = SG_DXFER_TO_DEV, command.data_out_len
        else:
            direction, size = SG_DXFER_NONE, 0
        return Deferred(lambda data_out: self.sg_io(cdb, direction, size, data_out), MAX_DATA_IN)

    def sg_io(self, cdb: bytes, direction: int, size: int, data_out: bytes) -> Reply:
        """One SG_IO call (blocking): the device's status, data-in and sense as a :class:`Reply`."""
        cdb_buffer = ctypes.create_string_buffer(cdb, len(cdb))
        data_buffer = ctypes.create_string_buffer(data_out.ljust(size, b"\0")[:size], max(size, 1))
        sense_buffer = ctypes.create_string_buffer(MAX_SENSE)
        header = bytearray(SG_IO_HDR.pack(
            SG_INTERFACE_ID, direction, len(cdb), MAX_SENSE, 0, size, ctypes.addressof(data_buffer),
            ctypes.addressof(cdb_buffer), ctypes.addressof(sense_buffer), self.timeout_ms, 0, 0, 0,
            0, 0, 0, 0, 0, 0, 0, 0, 0,
        ))
        try:
            self._ioctl(self.fd, SG_IO, header)
        except OSError as exc:
            log.warning("%s: lun %d: SG_IO of opcode %#04x failed: %s", self.name, self.lun, cdb[0], exc.strerror)
            return Reply(CHECK_CONDITION, sense=fixed_sense(INTERNAL_TARGET_FAILURE))
        fields = SG_IO_HDR.unpack(header)
        status, sense_written, host_status, resid = fields[13] & 0xFF, fields[16], fields[17], fields[19]
        if host_status == DID_TIME_OUT:
            log.warning("%s: lun %d: opcode %#04x timed out after %d ms", self.name, self.lun, cdb[0], self.timeout_ms)
            return Reply(CHECK_CONDITION, sense=fixed_sense(COMMAND_TIMEOUT))
        if host_status:
            log.warning("%s: lun %d: opcode %#04x: host status %#x", self.name, self.lun, cdb[0], host_status)
            return Reply(CHECK_CONDITION, sense=fixed_sense(INTERNAL_TARGET_FAILURE))
        sense = sense_buffer.raw[: min(sense_written, MAX_SENSE)]
        data = b""
        if direction == SG_DXFER_FROM_DEV:
            data = data_buffer.raw[: size - min(max(resid, 0), size)]
        return Reply(status, data, sense)
