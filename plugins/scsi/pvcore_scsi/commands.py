"""What a logical unit is asked and what it answers, and the SPC data every unit shares.

The virtio-scsi transport hands each unit a :class:`Command` (the CDB and
the sizes of the guest's data-out and data-in buffers). The unit answers
with one of:

* :class:`Reply` — status, data-in bytes it made (INQUIRY, READ TOC...) and sense;
* :class:`Transfer` — a read or write of its block engine into or out of the
  guest's buffers directly (READ(10), WRITE(10), SYNCHRONIZE CACHE), or
  discards of several ranges (UNMAP);
* :class:`WithParameters` — first the command's parameter list (data-out, bounded), then the answer;
* :class:`Deferred` — blocking work (an SG_IO ioctl) run on a thread.

A command the unit refuses raises :class:`~pvcore_scsi.sense.ScsiError`.
Every length in a CDB is the guest's: the helpers here read fields by
position from the fixed-size CDB field and never trust them to size a copy.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs

from pvcore.devices.block import BlockOp
from pvcore_scsi.sense import (
    GOOD,
    INVALID_FIELD_IN_CDB,
    SAVING_PARAMETERS_NOT_SUPPORTED,
    ScsiError,
    Sense,
)

INQUIRY = 0x12
REPORT_LUNS = 0xA0
REQUEST_SENSE = 0x03
TEST_UNIT_READY = 0x00
MODE_SENSE_6 = 0x1A
MODE_SENSE_10 = 0x5A

TYPE_DISK = 0x00
TYPE_CDROM = 0x05
TYPE_NO_UNIT = 0x7F
"""Peripheral qualifier 3, type 0x1F: no logical unit at this address (INQUIRY of an absent LUN)."""

VENDOR = b"PVCORE  "
REVISION = b"0.1 "
MAX_DATA_IN = 1 << 20
"""The most data-in bytes an emulated reply makes (INQUIRY and friends are far smaller)."""


@attrs.frozen
class Command:
    """One SCSI command as the guest sent it: the CDB field and the sizes of its data buffers."""

    cdb: bytes
    data_out_len: int = 0
    data_in_len: int = 0

    @property
    def opcode(self) -> int:
        """The operation code (first CDB byte)."""
        return self.cdb[0]


@attrs.frozen
class Reply:
    """An answer made at once: SCSI status, data-in bytes and sense data (CHECK CONDITION)."""

    status: int = GOOD
    data: bytes = b""
    sense: bytes = b""


@attrs.frozen
class Transfer:
    """A block-engine request whose buffers are the guest's: READ into data-in, WRITE from data-out."""

    backend: Any
    op: BlockOp
    offset: int = 0
    length: int = 0
    fua: bool = False
    error: Sense | None = None
    """The sense a failed transfer answers with (a read error, a write error)."""
    ranges: tuple[tuple[int, int], ...] = ()
    """For DISCARD: the (offset, length) byte ranges, each one block-engine request."""


@attrs.frozen
class WithParameters:
    """A command that carries a parameter list: the transport reads the data-out first.

    A data-out buffer larger than ``limit`` is CHECK CONDITION PARAMETER LIST
    LENGTH ERROR; otherwise ``then(parameters)`` gives the outcome.
    """

    limit: int
    then: Callable[[bytes], Reply | Transfer]


@attrs.frozen
class Deferred:
    """Blocking work run on a thread: ``job(data_out)`` returns the :class:`Reply`.

    The transport gathers the data-out for it on that thread; a data-in or
    data-out buffer larger than ``data_limit`` fails the command
    (INVALID FIELD IN CDB) before the job runs.
    """

    job: Callable[[bytes], Reply]
    data_limit: int = MAX_DATA_IN


Outcome = Reply | Transfer | Deferred | WithParameters


def be16(cdb: bytes, at: int) -> int:
    """A big-endian 16-bit CDB field."""
    return int.from_bytes(cdb[at : at + 2], "big")


def be32(cdb: bytes, at: int) -> int:
    """A big-endian 32-bit CDB field."""
    return int.from_bytes(cdb[at : at + 4], "big")


def be64(cdb: bytes, at: int) -> int:
    """A big-endian 64-bit CDB field."""
    return int.from_bytes(cdb[at : at + 8], "big")


def allocated(data: bytes, allocation: int) -> bytes:
    """``data`` cut to the CDB's allocation length."""
    return data[:allocation]


def ascii_field(text: str, size: int) -> bytes:
    """``text`` as a space-padded ASCII field of ``size`` bytes."""
    return text.encode("ascii", "replace")[:size].ljust(size, b" ")


def standard_inquiry(device_type: int, *, removable: bool, product: str) -> bytes:
    """36 bytes of standard INQUIRY data: SPC-3, response format 2, command queueing."""
    data = bytearray(36)
    data[0] = device_type
    data[1] = 0x80 if removable else 0
    data[2] = 0x05
    data[3] = 0x02
    data[4] = len(data) - 5
    data[7] = 0x02
    data[8:16] = VENDOR
    data[16:32] = ascii_field(product, 16)
    data[32:36] = REVISION
    return bytes(data)


def inquiry(cdb: bytes, *, device_type: int, removable: bool, product: str, serial: str,
            pages: Mapping[int, bytes] | None = None) -> bytes:
    """INQUIRY: the standard data, or VPD page 0x00 (supported pages), 0x80 (serial), 0x83 (identification)
    or one of the unit's own ``pages`` (by page code: the page's body, after its 4-byte header)."""
    pages = pages or {}
    evpd, page, allocation = cdb[1] & 1, cdb[2], be16(cdb, 3)
    if not evpd:
        if page:
            raise ScsiError(INVALID_FIELD_IN_CDB, f"INQUIRY page {page:#x} without EVPD")
        return allocated(standard_inquiry(device_type, removable=removable, product=product), allocation)
    serial_bytes = serial.encode("ascii", "replace")[:64]
    if page == 0x00:
        body = bytes(sorted({0x00, 0x80, 0x83, *pages}))
    elif page == 0x80:
        body = serial_bytes
    elif page == 0x83:
        identifier = VENDOR + ascii_field(product, 16) + serial_bytes
        body = bytes([0x02, 0x01, 0x00, len(identifier)]) + identifier  # ASCII, T10 vendor ID, logical unit
    elif page in pages:
        body = pages[page]
    else:
        raise ScsiError(INVALID_FIELD_IN_CDB, f"INQUIRY VPD page {page:#x} is not supported")
    return allocated(bytes([device_type, page]) + struct.pack(">H", len(body)) + body, allocation)


def absent_unit_inquiry(cdb: bytes) -> bytes:
    """INQUIRY of a LUN with no unit: peripheral qualifier 3 (SPC-4 6.6.2), so the guest skips it."""
    if cdb[1] & 1:
        raise ScsiError(INVALID_FIELD_IN_CDB, "VPD page of an absent logical unit")
    return allocated(standard_inquiry(TYPE_NO_UNIT, removable=False, product="NO UNIT"), be16(cdb, 3))


def lun_entry(lun: int) -> bytes:
    """A LUN in the 8-byte SAM format: peripheral addressing below 256, flat addressing above."""
    if lun < 256:
        return bytes([0x00, lun]) + bytes(6)
    return bytes([0x40 | (lun >> 8), lun & 0xFF]) + bytes(6)


def report_luns(cdb: bytes, luns: Sequence[int]) -> bytes:
    """REPORT LUNS: the list of every unit's LUN (select report 0, 1 and 2 all list them)."""
    if cdb[2] not in (0x00, 0x01, 0x02):
        raise ScsiError(INVALID_FIELD_IN_CDB, f"REPORT LUNS select report {cdb[2]:#x}")
    entries = b"".join(lun_entry(lun) for lun in sorted(luns))
    return allocated(struct.pack(">I4x", len(entries)) + entries, be32(cdb, 6))


ModePages = Mapping[int, Callable[[], bytes]]
"""Mode pages by page code: each builds the whole page (code, length, body) with current values."""


def mode_sense(cdb: bytes, pages: ModePages, *, device_specific: int = 0) -> bytes:
    """MODE SENSE(6) or (10) of ``pages`` (0x3F: all of them), without block descriptors.

    Page control 0 and 2 give current (= default) values, 1 the changeable
    mask (nothing is changeable), 3 (saved) is refused.
    """
    ten = cdb[0] == MODE_SENSE_10
    control, code, subpage = cdb[2] >> 6, cdb[2] & 0x3F, cdb[3]
    if control == 3:
        raise ScsiError(SAVING_PARAMETERS_NOT_SUPPORTED, "MODE SENSE of saved values")
    if subpage not in (0x00, 0xFF) or (subpage == 0xFF and code != 0x3F):
        raise ScsiError(INVALID_FIELD_IN_CDB, f"MODE SENSE subpage {subpage:#x}")
    if code == 0x3F:
        chosen = [pages[number]() for number in sorted(pages)]
    elif code in pages:
        chosen = [pages[code]()]
    else:
        raise ScsiError(INVALID_FIELD_IN_CDB, f"MODE SENSE page {code:#x} is not supported")
    if control == 1:
        chosen = [page[:2] + bytes(len(page) - 2) for page in chosen]
    body = b"".join(chosen)
    if ten:
        header = struct.pack(">HBBxxH", len(body) + 6, 0, device_specific, 0)
        return allocated(header + body, be16(cdb, 7))
    header = bytes([min(len(body) + 3, 0xFF), 0, device_specific, 0])
    return allocated(header + body, cdb[4])
