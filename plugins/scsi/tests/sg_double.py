"""A stand-in for the SG_IO ioctl alone, and a passthrough target that uses it.

No host here has a SCSI device (no /dev/sg*, no optical drive), so
:class:`FakeSg` plays the kernel's SG_IO: it reads the ``sg_io_hdr`` the unit
built (the CDB, direction, lengths, timeout and buffer addresses) from the
unit's own memory, writes data-in, sense and the status fields back as the
kernel would, and records every call.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
from collections.abc import Iterator
from pathlib import Path

from pvcore.contract import DeviceConfig
from pvcore.testing.loopback import Loopback
from pvcore_scsi.passthrough import DID_TIME_OUT, SG_DXFER_FROM_DEV, SG_DXFER_TO_DEV, SG_IO, SG_IO_HDR
from pvcore_scsi.plugin import build_units, close_units
from pvcore_scsi.sense import CHECK_CONDITION, Sense, fixed_sense
from pvcore_scsi.virtio_scsi import VirtioScsi

INQUIRY_DATA = bytes([0x05, 0x80, 0x05, 0x02, 31, 0, 0, 0]) + b"HLDTST  DVDRAM GH24NSD1 LG00"


class FakeSg:
    """The SG_IO ioctl of a CD writer: INQUIRY answers, TEST UNIT READY says no disc, WRITE(10) is kept."""

    def __init__(self, *, block: bool = False, timeout: bool = False) -> None:
        self.calls: list[dict[str, object]] = []
        self.written = b""
        self.block, self.timeout = block, timeout
        self.started, self.release = threading.Event(), threading.Event()

    def __call__(self, fd: int, request: int, header: bytearray) -> int:
        assert request == SG_IO and len(header) == SG_IO_HDR.size
        fields = list(SG_IO_HDR.unpack(header))
        interface, direction, cmd_len, max_sense, _, size, data, cdbp, sensep, timeout = fields[:10]
        assert interface == ord("S")
        cdb = ctypes.string_at(cdbp, cmd_len)
        self.calls.append({"cdb": cdb, "direction": direction, "size": size, "timeout": timeout})
        if self.block:
            self.started.set()
            self.release.wait(30)
        status, sense, resid, host = 0, b"", 0, 0
        if self.timeout:
            host = DID_TIME_OUT
        elif cdb[0] == 0x12 and direction == SG_DXFER_FROM_DEV:
            reply = INQUIRY_DATA[:size]
            ctypes.memmove(data, reply, len(reply))
            resid = size - len(reply)
        elif cdb[0] == 0x00:
            status, sense = CHECK_CONDITION, fixed_sense(Sense(0x2, 0x3A, 0x01))
        elif cdb[0] == 0x2A and direction == SG_DXFER_TO_DEV:
            self.written += ctypes.string_at(data, size)
        sense = sense[:max_sense]
        ctypes.memmove(sensep, sense, len(sense))
        fields[13], fields[16], fields[17], fields[19] = status, len(sense), host, resid
        header[:] = SG_IO_HDR.pack(*fields)
        return 0


@contextlib.contextmanager
def passthrough_target(path: Path, fake: FakeSg, **options: object) -> Iterator[tuple[Loopback, VirtioScsi]]:
    """A target whose LUN 0 is ``path`` passed through with ``fake`` as the ioctl."""
    config = DeviceConfig("scsi", "pt", {"passthrough": [str(path)], **options})
    units = build_units(config)
    units[0]._ioctl = fake
    device = VirtioScsi(units, name="pt")
    try:
        with Loopback(device, name="pt") as lb:
            yield lb, device
    finally:
        close_units(units)
