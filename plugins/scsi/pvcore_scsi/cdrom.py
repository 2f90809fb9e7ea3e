"""A CD-ROM logical unit emulated from an ISO image (MMC-6 as Linux's sr, cdrom_id and eject use it).

The unit has a tray and at most one disc in it. The disc is an ISO image read
through pvcore's block engine (:class:`~pvcore.devices.block.BlockBackend`,
read-only) in 2048-byte blocks, straight into the guest's buffers. Commands:

INQUIRY (standard and VPD 0x00/0x80/0x83), TEST UNIT READY, REQUEST SENSE,
READ CAPACITY, READ(10), READ(12), READ TOC/PMA/ATIP (formats 0 and 1), GET
CONFIGURATION, GET EVENT STATUS NOTIFICATION (media class), MODE SENSE(6/10)
(pages 0x01, 0x2A), START STOP UNIT (eject and load), PREVENT ALLOW MEDIUM
REMOVAL, READ DISC INFORMATION, MECHANISM STATUS. Anything else is CHECK
CONDITION, ILLEGAL REQUEST / INVALID COMMAND OPERATION CODE.

Media changes, from the guest (START STOP UNIT) or the host
(:meth:`CdromUnit.host_eject`, :meth:`CdromUnit.host_insert`), are logged and
seen by the guest as MMC says: a media event for GET EVENT STATUS
NOTIFICATION and, after a new disc, UNIT ATTENTION / MEDIUM MAY HAVE CHANGED
on the next command. A locked tray (PREVENT) refuses to open.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable

from pvcore.devices.block import BlockBackend, BlockOp, RawFileStore, StoreError
from pvcore.virtio import DeviceError
from pvcore_scsi.commands import (
    INQUIRY,
    MODE_SENSE_6,
    MODE_SENSE_10,
    REPORT_LUNS,
    REQUEST_SENSE,
    TEST_UNIT_READY,
    TYPE_CDROM,
    Command,
    Outcome,
    Reply,
    Transfer,
    allocated,
    be16,
    be32,
    inquiry,
    mode_sense,
)
from pvcore_scsi.sense import (
    INVALID_COMMAND_OPERATION_CODE,
    INVALID_FIELD_IN_CDB,
    LBA_OUT_OF_RANGE,
    MEDIUM_MAY_HAVE_CHANGED,
    MEDIUM_NOT_PRESENT_TRAY_CLOSED,
    MEDIUM_NOT_PRESENT_TRAY_OPEN,
    MEDIUM_REMOVAL_PREVENTED,
    NO_ADDITIONAL_SENSE,
    UNRECOVERED_READ_ERROR,
    ScsiError,
    Sense,
    fixed_sense,
)

log = logging.getLogger("pvcore.scsi")

BLOCK_SIZE = 2048
READ_CAPACITY_10 = 0x25
READ_10 = 0x28
READ_12 = 0xA8
READ_TOC = 0x43
GET_CONFIGURATION = 0x46
GET_EVENT_STATUS_NOTIFICATION = 0x4A
START_STOP_UNIT = 0x1B
PREVENT_ALLOW_MEDIUM_REMOVAL = 0x1E
READ_DISC_INFORMATION = 0x51
MECHANISM_STATUS = 0xBD

EVENT_NONE = 0
EVENT_EJECT_REQUEST = 1
EVENT_NEW_MEDIA = 2
EVENT_MEDIA_REMOVAL = 3

PROFILE_CD_ROM = 0x0008
LEAD_OUT = 0xAA
MAX_READ_BLOCKS = 1 << 16
"""The most blocks one READ may move (128 MiB): a bigger one is refused before any buffer is touched."""

_UNIT_ATTENTION_EXEMPT = frozenset({INQUIRY, REPORT_LUNS, REQUEST_SENSE, GET_EVENT_STATUS_NOTIFICATION})
"""Commands a pending unit attention does not fail (SPC-4 5.14, MMC-6 GESN)."""


def _msf(lba: int) -> bytes:
    """A logical block address as the 4-byte (0, M, S, F) form, with the 2-second pregap."""
    frames = lba + 150
    return bytes([0, frames // (60 * 75), (frames // 75) % 60, frames % 75])


class Disc:
    """An ISO image in the tray: its file, read-only block engine and size in 2048-byte blocks."""

    def __init__(self, path: str, *, name: str) -> None:
        try:
            store = RawFileStore(path, readonly=True)
        except StoreError as exc:
            raise DeviceError(f"{name}: media {exc}") from None
        if store.size < BLOCK_SIZE:
            store.close()
            raise DeviceError(f"{name}: media={path}: {store.size} bytes, smaller than one {BLOCK_SIZE}-byte block")
        if store.size % BLOCK_SIZE:
            log.warning("%s: media=%s: the last %d bytes are not a whole block and are not visible",
                        name, path, store.size % BLOCK_SIZE)
        self.path = path
        self.blocks = store.size // BLOCK_SIZE
        self.backend = BlockBackend(store, workers=2, name=name)

    def close(self) -> None:
        """Finish queued reads and close the image (blocks: call on a thread from the loop)."""
        self.backend.close()


class CdromUnit:
    """A CD-ROM drive: tray, disc, lock and pending events; :meth:`execute` answers one command.

    ``closer`` runs a disc's blocking :meth:`Disc.close` off the event loop
    (the daemon passes one that uses its executor). ``fixed``, when set, is
    why the host may not change the disc (it is served to a drive another
    program emulates) and the answer to every host eject or insert.
    """

    def __init__(self, media: str | None, *, name: str, lun: int,
                 closer: Callable[[Disc], None] | None = None) -> None:
        self.name = name
        self.lun = lun
        self.disc: Disc | None = Disc(media, name=name) if media else None
        self.tray_open = False
        self.locked = False
        self.event = EVENT_NONE
        self.attention: Sense | None = None
        self._closer = closer or Disc.close
        self.fixed: str | None = None

    def __repr__(self) -> str:
        return f"CdromUnit({self.name!r}, lun={self.lun}, disc={self.disc.path if self.disc else None})"

    @property
    def present(self) -> bool:
        """Whether a disc is in the tray and the tray is closed (the drive is ready)."""
        return self.disc is not None and not self.tray_open

    def describe(self) -> str:
        """One line for the media control socket: tray, lock and disc."""
        disc = self.disc.path if self.disc else "no disc"
        return f"lun {self.lun}: cdrom tray {'open' if self.tray_open else 'closed'}, " \
               f"{'locked' if self.locked else 'unlocked'}, {disc}"

    def host_eject(self, *, force: bool = False) -> str:
        """The host takes the disc out; a tray the guest locked refuses unless ``force``."""
        self._check_not_fixed()
        if self.locked and not force:
            self.event = EVENT_EJECT_REQUEST
            raise ScsiError(MEDIUM_REMOVAL_PREVENTED, f"{self.name}: the guest locked the tray; use force to eject")
        self._remove_disc()
        self.tray_open = False
        self.event = EVENT_MEDIA_REMOVAL
        log.info("%s: host ejected the disc (lun %d)", self.name, self.lun)
        return self.describe()

    def host_insert(self, path: str, *, force: bool = False) -> str:
        """The host puts ``path`` in the tray and closes it; the guest sees a new disc."""
        self._check_not_fixed()
        if self.locked and self.disc is not None and not force:
            raise ScsiError(MEDIUM_REMOVAL_PREVENTED, f"{self.name}: the guest locked the tray; use force to change")
        disc = Disc(path, name=self.name)
        self._remove_disc()
        self.disc, self.tray_open = disc, False
        self.event = EVENT_NEW_MEDIA
        self.attention = MEDIUM_MAY_HAVE_CHANGED
        log.info("%s: host inserted %s (lun %d)", self.name, path, self.lun)
        return self.describe()

    def _check_not_fixed(self) -> None:
        if self.fixed:
            raise DeviceError(f"{self.name}: lun {self.lun}: {self.fixed}")

    def _remove_disc(self) -> None:
        disc, self.disc = self.disc, None
        if disc is not None:
            self._closer(disc)

    def close(self) -> None:
        """Close the disc's image (blocking)."""
        disc, self.disc = self.disc, None
        if disc is not None:
            disc.close()

    def reset(self) -> None:
        """A LUN or bus reset: the lock is released (SPC: PREVENT is cleared by a reset)."""
        self.locked = False

    def execute(self, command: Command) -> Outcome:
        """Answer one command (raises :class:`ScsiError` for CHECK CONDITION)."""
        cdb, opcode = command.cdb, command.opcode
        if self.attention is not None and opcode not in _UNIT_ATTENTION_EXEMPT:
            attention, self.attention = self.attention, None
            raise ScsiError(attention, "unit attention")
        handler = _HANDLERS.get(opcode)
        if handler is None:
            raise ScsiError(INVALID_COMMAND_OPERATION_CODE, f"opcode {opcode:#04x} is not supported")
        return handler(self, cdb)

    def _ready(self) -> Disc:
        if self.disc is None or self.tray_open:
            raise ScsiError(MEDIUM_NOT_PRESENT_TRAY_OPEN if self.tray_open else MEDIUM_NOT_PRESENT_TRAY_CLOSED)
        return self.disc

    def _inquiry(self, cdb: bytes) -> Reply:
        return Reply(data=inquiry(cdb, device_type=TYPE_CDROM, removable=True, product="VIRTUAL CDROM",
                                  serial=f"{self.name}-{self.lun}"))

    def _test_unit_ready(self, cdb: bytes) -> Reply:
        self._ready()
        return Reply()

    def _request_sense(self, cdb: bytes) -> Reply:
        if self.attention is not None:
            sense, self.attention = self.attention, None
        elif not self.present:
            sense = MEDIUM_NOT_PRESENT_TRAY_OPEN if self.tray_open else MEDIUM_NOT_PRESENT_TRAY_CLOSED
        else:
            sense = NO_ADDITIONAL_SENSE
        return Reply(data=allocated(fixed_sense(sense), cdb[4]))

    def _read_capacity(self, cdb: bytes) -> Reply:
        disc = self._ready()
        return Reply(data=struct.pack(">II", disc.blocks - 1, BLOCK_SIZE))

    def _read(self, cdb: bytes) -> Transfer | Reply:
        lba = be32(cdb, 2)
        blocks = be16(cdb, 7) if cdb[0] == READ_10 else be32(cdb, 6)
        disc = self._ready()
        if blocks > MAX_READ_BLOCKS:
            raise ScsiError(INVALID_FIELD_IN_CDB, f"READ of {blocks} blocks, at most {MAX_READ_BLOCKS}")
        if lba + blocks > disc.blocks:
            raise ScsiError(LBA_OUT_OF_RANGE, f"blocks {lba}+{blocks} end past the disc ({disc.blocks})")
        if not blocks:
            return Reply()
        return Transfer(disc.backend, BlockOp.READ, lba * BLOCK_SIZE, blocks * BLOCK_SIZE,
                        error=UNRECOVERED_READ_ERROR)

    def _read_toc(self, cdb: bytes) -> Reply:
        disc = self._ready()
        msf, form, track, allocation = bool(cdb[1] & 0x02), cdb[2] & 0x0F, cdb[6], be16(cdb, 7)
        if form == 0 and cdb[9] >> 6:
            form = cdb[9] >> 6  # the older place for the format (SFF-8020)
        address = _msf if msf else (lambda lba: struct.pack(">I", lba))
        if form == 0:
            if track > 1 and track != LEAD_OUT:
                raise ScsiError(INVALID_FIELD_IN_CDB, f"READ TOC from track {track}: the disc has track 1")
            entries = b""
            if track <= 1:
                entries += bytes([0, 0x14, 1, 0]) + address(0)
            entries += bytes([0, 0x14, LEAD_OUT, 0]) + address(disc.blocks)
            return Reply(data=allocated(struct.pack(">HBB", len(entries) + 2, 1, 1) + entries, allocation))
        if form == 1:
            entry = bytes([0, 0x14, 1, 0]) + address(0)
            return Reply(data=allocated(struct.pack(">HBB", len(entry) + 2, 1, 1) + entry, allocation))
        raise ScsiError(INVALID_FIELD_IN_CDB, f"READ TOC format {form} is not supported")

    def _features(self) -> list[tuple[int, bytes]]:
        current = 1 if self.present else 0
        return [
            (0x0000, bytes([0x03, 4]) + struct.pack(">HBB", PROFILE_CD_ROM, current, 0)),
            (0x0001, bytes([0x0B, 8]) + struct.pack(">IBxxx", 0, 0x01)),
            (0x0002, bytes([0x07, 4, 0x02, 0, 0, 0])),
            (0x0003, bytes([0x03, 4, 0x29, 0, 0, 0])),
            (0x0010, bytes([0x02 | current, 8]) + struct.pack(">IHBx", BLOCK_SIZE, 1, 0)),
            (0x001E, bytes([0x08 | current, 4, 0, 0, 0, 0])),
            (0x0100, bytes([0x03, 0])),
        ]

    def _get_configuration(self, cdb: bytes) -> Reply:
        request, start, allocation = cdb[1] & 0x03, be16(cdb, 2), be16(cdb, 7)
        if request == 3:
            raise ScsiError(INVALID_FIELD_IN_CDB, "GET CONFIGURATION request type 3")
        chosen = b""
        for code, descriptor in self._features():
            if code < start or (request == 2 and code != start) or (request == 1 and not descriptor[0] & 1):
                continue
            chosen += struct.pack(">H", code) + descriptor
        profile = PROFILE_CD_ROM if self.present else 0
        header = struct.pack(">IxxH", len(chosen) + 4, profile)
        return Reply(data=allocated(header + chosen, allocation))

    def _event_status(self, cdb: bytes) -> Reply:
        if not cdb[1] & 1:
            raise ScsiError(INVALID_FIELD_IN_CDB, "GET EVENT STATUS NOTIFICATION without the polled bit")
        classes, allocation = cdb[4], be16(cdb, 7)
        if not classes & 0x10:
            return Reply(data=allocated(struct.pack(">HBB", 2, 0x80, 0x10), allocation))
        event, self.event = self.event, EVENT_NONE
        status = (0x02 if self.present else 0) | (0x01 if self.tray_open else 0)
        return Reply(data=allocated(struct.pack(">HBB", 6, 0x04, 0x10) + bytes([event, status, 0, 0]), allocation))

    def _capabilities_page(self) -> bytes:
        mechanism = 0x29 | (0x02 if self.locked else 0)  # tray loader, eject, lock (+ locked now)
        body = bytes([0, 0, 0x70, 0, mechanism, 0]) + struct.pack(">HHHH", 706, 0, 0, 706) + bytes(6)
        return bytes([0x2A, len(body)]) + body

    def _mode_sense(self, cdb: bytes) -> Reply:
        pages = {0x01: lambda: bytes([0x01, 0x0A]) + bytes(10), 0x2A: self._capabilities_page}
        return Reply(data=mode_sense(cdb, pages))

    def _start_stop(self, cdb: bytes) -> Reply:
        load_eject, start = bool(cdb[4] & 0x02), bool(cdb[4] & 0x01)
        if (cdb[4] >> 4) & 0x0F:
            return Reply()  # a power condition: nothing to do
        if not load_eject:
            return Reply()
        if start:
            if self.tray_open:
                self.tray_open = False
                if self.disc is not None:
                    self.event, self.attention = EVENT_NEW_MEDIA, MEDIUM_MAY_HAVE_CHANGED
                log.info("%s: guest closed the tray (lun %d)", self.name, self.lun)
            return Reply()
        if self.locked:
            raise ScsiError(MEDIUM_REMOVAL_PREVENTED, "eject of a locked tray")
        if not self.tray_open:
            self.tray_open = True
            self.event = EVENT_MEDIA_REMOVAL if self.disc is not None else EVENT_NONE
            log.info("%s: guest ejected the disc (lun %d, tray open)", self.name, self.lun)
        return Reply()

    def _prevent_allow(self, cdb: bytes) -> Reply:
        self.locked = bool(cdb[4] & 0x01)
        log.debug("%s: guest %s the tray (lun %d)", self.name, "locked" if self.locked else "unlocked", self.lun)
        return Reply()

    def _disc_information(self, cdb: bytes) -> Reply:
        if cdb[1] & 0x07:
            raise ScsiError(INVALID_FIELD_IN_CDB, f"READ DISC INFORMATION data type {cdb[1] & 7}")
        self._ready()
        data = bytearray(34)
        data[0:2] = struct.pack(">H", len(data) - 2)
        data[2] = 0x0E  # last session complete, disc finalized, not erasable
        data[3:7] = bytes([1, 1, 1, 1])  # first track, sessions, first and last track of the last session
        data[16:24] = b"\xff" * 8  # no lead-in / lead-out of a next session
        return Reply(data=allocated(bytes(data), be16(cdb, 7)))

    def _mechanism_status(self, cdb: bytes) -> Reply:
        header = bytes([0, 0x10 if self.tray_open else 0, 0, 0, 0, 0, 0, 0])
        return Reply(data=allocated(header, be16(cdb, 8)))


_HANDLERS: dict[int, Callable[[CdromUnit, bytes], Outcome]] = {
    INQUIRY: CdromUnit._inquiry,
    TEST_UNIT_READY: CdromUnit._test_unit_ready,
    REQUEST_SENSE: CdromUnit._request_sense,
    READ_CAPACITY_10: CdromUnit._read_capacity,
    READ_10: CdromUnit._read,
    READ_12: CdromUnit._read,
    READ_TOC: CdromUnit._read_toc,
    GET_CONFIGURATION: CdromUnit._get_configuration,
    GET_EVENT_STATUS_NOTIFICATION: CdromUnit._event_status,
    MODE_SENSE_6: CdromUnit._mode_sense,
    MODE_SENSE_10: CdromUnit._mode_sense,
    START_STOP_UNIT: CdromUnit._start_stop,
    PREVENT_ALLOW_MEDIUM_REMOVAL: CdromUnit._prevent_allow,
    READ_DISC_INFORMATION: CdromUnit._disc_information,
    MECHANISM_STATUS: CdromUnit._mechanism_status,
}
"""The MMC commands a CD-ROM unit answers; every other opcode is INVALID COMMAND OPERATION CODE."""
