"""The guest side of virtio-scsi for tests: requests, TMFs and event buffers over a :class:`Loopback`."""

from __future__ import annotations

import struct

import attrs

from pvcore.testing.loopback import Loopback

REQUEST_QUEUE = 2
DISC_BLOCKS = 64
"""Blocks of the test disc the fixtures make."""
RESPONSE_SIZE = 12 + 96


def lun_address(lun: int, target: int = 0) -> bytes:
    """The 8-byte virtio-scsi LUN field as Linux writes it."""
    return bytes([1, target, 0x40 | (lun >> 8), lun & 0xFF, 0, 0, 0, 0])


def request_header(cdb: bytes, *, lun: int = 0, tag: int = 1, target: int = 0) -> bytes:
    """The 51-byte request header: lun, id, task attribute, priority, crn, a 32-byte CDB field."""
    return lun_address(lun, target) + struct.pack("<QBBB", tag, 0, 0, 0) + cdb.ljust(32, b"\0")


@attrs.frozen
class Answer:
    """A request's response header, sense and data-in as the driver reads them back."""

    response: int
    status: int
    residual: int
    sense: bytes
    data: bytes
    written: int

    @property
    def sense_triple(self) -> tuple[int, int, int]:
        """(key, ASC, ASCQ) of fixed-format sense data."""
        return self.sense[2] & 0x0F, self.sense[12], self.sense[13]


def parse_answer(data: bytes, written: int) -> Answer:
    """Decode what the device wrote into a request's writable buffers."""
    sense_len, residual, _, status, response = struct.unpack_from("<IIHBB", data)
    return Answer(response, status, residual, data[12 : 12 + sense_len], data[RESPONSE_SIZE:written], written)


def command(lb: Loopback, cdb: bytes, data_in: int = 0, *, lun: int = 0, tag: int = 1, data_out: bytes = b"",
            target: int = 0, timeout: float = 10.0) -> Answer:
    """One SCSI command on the first request queue; the device's answer."""
    readable = [request_header(cdb, lun=lun, tag=tag, target=target)] + ([data_out] if data_out else [])
    writable = [RESPONSE_SIZE] + ([data_in] if data_in else [])
    used = lb.request(REQUEST_QUEUE, readable, writable, timeout=timeout)
    return parse_answer(used.data, used.written)


def tmf(lb: Loopback, subtype: int, *, lun: int = 0, tag: int = 0, target: int = 0) -> int:
    """A task management function on the control queue; its response byte."""
    request = struct.pack("<II", 0, subtype) + lun_address(lun, target) + struct.pack("<Q", tag)
    used = lb.request(0, [request], [1])
    assert used.written == 1
    return used.data[0]
