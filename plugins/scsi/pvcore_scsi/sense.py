"""SCSI status codes, sense keys and fixed-format sense data (SPC-4, section 4.5.3).

A logical unit that refuses a command raises :class:`ScsiError` with the
sense key and additional sense code; the transport answers CHECK CONDITION
with :func:`fixed_sense` of it. The codes a guest sees most are named here.
"""

from __future__ import annotations

import attrs

GOOD = 0x00
CHECK_CONDITION = 0x02

NO_SENSE = 0x0
NOT_READY = 0x2
MEDIUM_ERROR = 0x3
HARDWARE_ERROR = 0x4
ILLEGAL_REQUEST = 0x5
UNIT_ATTENTION = 0x6
ABORTED_COMMAND = 0xB

FIXED_SENSE_SIZE = 18


@attrs.frozen
class Sense:
    """A sense key with its additional sense code and qualifier."""

    key: int
    asc: int
    ascq: int = 0

    def __str__(self) -> str:
        return f"sense {self.key:#x}/{self.asc:#04x}/{self.ascq:#04x}"


INVALID_COMMAND_OPERATION_CODE = Sense(ILLEGAL_REQUEST, 0x20, 0x00)
LBA_OUT_OF_RANGE = Sense(ILLEGAL_REQUEST, 0x21, 0x00)
INVALID_FIELD_IN_CDB = Sense(ILLEGAL_REQUEST, 0x24, 0x00)
LOGICAL_UNIT_NOT_SUPPORTED = Sense(ILLEGAL_REQUEST, 0x25, 0x00)
WRITE_PROTECTED = Sense(0x7, 0x27, 0x00)
SAVING_PARAMETERS_NOT_SUPPORTED = Sense(ILLEGAL_REQUEST, 0x39, 0x00)
MEDIUM_REMOVAL_PREVENTED = Sense(ILLEGAL_REQUEST, 0x53, 0x02)
PARAMETER_LIST_LENGTH_ERROR = Sense(ILLEGAL_REQUEST, 0x1A, 0x00)
INVALID_FIELD_IN_PARAMETER_LIST = Sense(ILLEGAL_REQUEST, 0x26, 0x00)
MEDIUM_NOT_PRESENT_TRAY_CLOSED = Sense(NOT_READY, 0x3A, 0x01)
MEDIUM_NOT_PRESENT_TRAY_OPEN = Sense(NOT_READY, 0x3A, 0x02)
MEDIUM_MAY_HAVE_CHANGED = Sense(UNIT_ATTENTION, 0x28, 0x00)
UNRECOVERED_READ_ERROR = Sense(MEDIUM_ERROR, 0x11, 0x00)
WRITE_ERROR = Sense(MEDIUM_ERROR, 0x0C, 0x00)
INTERNAL_TARGET_FAILURE = Sense(HARDWARE_ERROR, 0x44, 0x00)
COMMAND_TIMEOUT = Sense(ABORTED_COMMAND, 0x2E, 0x02)
NO_ADDITIONAL_SENSE = Sense(NO_SENSE, 0x00, 0x00)


class ScsiError(Exception):
    """A command the logical unit answers with CHECK CONDITION and ``sense``."""

    def __init__(self, sense: Sense, reason: str = "") -> None:
        super().__init__(reason or str(sense))
        self.sense = sense


def fixed_sense(sense: Sense) -> bytes:
    """18 bytes of fixed-format sense data (response code 0x70, current error)."""
    data = bytearray(FIXED_SENSE_SIZE)
    data[0] = 0x70
    data[2] = sense.key & 0x0F
    data[7] = FIXED_SENSE_SIZE - 8
    data[12] = sense.asc
    data[13] = sense.ascq
    return bytes(data)

