"""A disk logical unit over a raw image, through pvcore's block engine (SBC-3 as Linux's sd uses it).

Reads and writes go to :class:`~pvcore.devices.block.BlockBackend` with the
guest's buffers, so the engine's I/O threads, flush barriers (SYNCHRONIZE
CACHE is a FLUSH, ordered after every write before it), FUA writes and cache
modes carry over unchanged. 512-byte blocks. Commands: INQUIRY, TEST UNIT
READY, REQUEST SENSE, READ CAPACITY(10/16), READ and WRITE (6/10/12/16),
SYNCHRONIZE CACHE(10/16), UNMAP (discard: a writable disk says so in READ
CAPACITY(16) and VPD pages 0xB0 block limits and 0xB2 provisioning, as
Linux's sd asks), MODE SENSE(6/10) (caching page), START STOP UNIT, PREVENT
ALLOW MEDIUM REMOVAL; anything else is INVALID COMMAND OPERATION CODE.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable

from pvcore.devices.block import BlockBackend, BlockOp, CacheMode, RawFileStore, StoreError
from pvcore.virtio import DeviceError
from pvcore_scsi.commands import (
    INQUIRY,
    MODE_SENSE_6,
    MODE_SENSE_10,
    REQUEST_SENSE,
    TEST_UNIT_READY,
    TYPE_DISK,
    Command,
    Outcome,
    Reply,
    Transfer,
    WithParameters,
    allocated,
    be16,
    be32,
    be64,
    inquiry,
    mode_sense,
)
from pvcore_scsi.sense import (
    INVALID_COMMAND_OPERATION_CODE,
    INVALID_FIELD_IN_CDB,
    INVALID_FIELD_IN_PARAMETER_LIST,
    LBA_OUT_OF_RANGE,
    NO_ADDITIONAL_SENSE,
    UNRECOVERED_READ_ERROR,
    WRITE_ERROR,
    WRITE_PROTECTED,
    ScsiError,
    fixed_sense,
)

log = logging.getLogger("pvcore.scsi")

BLOCK_SIZE = 512
MAX_TRANSFER_BLOCKS = 1 << 18
"""The most blocks one READ or WRITE may move (128 MiB)."""
MAX_UNMAP_BLOCKS = 1 << 22
"""The most blocks one UNMAP descriptor may discard (2 GiB), as VPD page 0xB0 says."""
MAX_UNMAP_DESCRIPTORS = 32
"""The most descriptors one UNMAP may carry, as VPD page 0xB0 says."""
UNMAP_HEADER = 8
UNMAP_DESCRIPTOR = struct.Struct(">QI4x")

READ_6, READ_10, READ_12, READ_16 = 0x08, 0x28, 0xA8, 0x88
WRITE_6, WRITE_10, WRITE_12, WRITE_16 = 0x0A, 0x2A, 0xAA, 0x8A
READ_CAPACITY_10 = 0x25
SERVICE_ACTION_IN_16 = 0x9E
READ_CAPACITY_16 = 0x10
SYNCHRONIZE_CACHE_10 = 0x35
SYNCHRONIZE_CACHE_16 = 0x91
START_STOP_UNIT = 0x1B
PREVENT_ALLOW_MEDIUM_REMOVAL = 0x1E
UNMAP = 0x42


def _address(cdb: bytes) -> tuple[int, int]:
    """(first block, number of blocks) of a READ or WRITE CDB of any size."""
    size = cdb[0] >> 5
    if size == 0:
        blocks = cdb[4] or 256
        return ((cdb[1] & 0x1F) << 16) | be16(cdb, 2), blocks
    if size == 1:
        return be32(cdb, 2), be16(cdb, 7)
    if size == 5:
        return be32(cdb, 2), be32(cdb, 6)
    return be64(cdb, 2), be32(cdb, 10)


class DiskUnit:
    """A disk on a raw image; ``readonly`` refuses writes with DATA PROTECT / WRITE PROTECTED."""

    def __init__(self, path: str, *, name: str, lun: int, readonly: bool = False,
                 cache: CacheMode = CacheMode.WRITEBACK) -> None:
        try:
            store = RawFileStore(path, readonly=readonly)
        except StoreError as exc:
            raise DeviceError(f"{name}: disk {exc}") from None
        if store.size < BLOCK_SIZE:
            store.close()
            raise DeviceError(f"{name}: disk={path}: {store.size} bytes, smaller than one {BLOCK_SIZE}-byte block")
        self.name = name
        self.lun = lun
        self.path = path
        self.blocks = store.size // BLOCK_SIZE
        self.backend = BlockBackend(store, cache=cache, name=name)

    def __repr__(self) -> str:
        return f"DiskUnit({self.name!r}, lun={self.lun}, path={self.path!r})"

    def reset(self) -> None:
        """Nothing survives a reset on a disk."""

    def close(self) -> None:
        """Finish queued I/O, flush and close the image (blocking)."""
        self.backend.close()

    def execute(self, command: Command) -> Outcome:
        """Answer one command (raises :class:`ScsiError` for CHECK CONDITION)."""
        handler = _HANDLERS.get(command.opcode)
        if handler is None:
            raise ScsiError(INVALID_COMMAND_OPERATION_CODE, f"opcode {command.opcode:#04x} is not supported")
        return handler(self, command.cdb)

    def _inquiry(self, cdb: bytes) -> Reply:
        pages = {}
        if not self.backend.readonly:
            limits = bytearray(60)  # block limits: the unmap limits, nothing else stated
            limits[16:24] = struct.pack(">II", MAX_UNMAP_BLOCKS, MAX_UNMAP_DESCRIPTORS)
            pages = {0xB0: bytes(limits), 0xB2: bytes([0, 0x80, 0, 0])}  # provisioning: LBPU (UNMAP works)
        return Reply(data=inquiry(cdb, device_type=TYPE_DISK, removable=False, product="VIRTUAL DISK",
                                  serial=f"{self.name}-{self.lun}", pages=pages))

    def _good(self, cdb: bytes) -> Reply:
        return Reply()

    def _request_sense(self, cdb: bytes) -> Reply:
        return Reply(data=allocated(fixed_sense(NO_ADDITIONAL_SENSE), cdb[4]))

    def _read_capacity(self, cdb: bytes) -> Reply:
        return Reply(data=struct.pack(">II", min(self.blocks - 1, 0xFFFFFFFF), BLOCK_SIZE))

    def _service_action_in(self, cdb: bytes) -> Reply:
        if cdb[1] & 0x1F != READ_CAPACITY_16:
            raise ScsiError(INVALID_FIELD_IN_CDB, f"SERVICE ACTION IN(16) action {cdb[1] & 0x1F:#x}")
        provisioning = 0 if self.backend.readonly else 0x80  # LBPME: UNMAP is supported
        data = struct.pack(">QIxxB17x", self.blocks - 1, BLOCK_SIZE, provisioning)
        return Reply(data=allocated(data, be32(cdb, 10)))

    def _transfer(self, cdb: bytes) -> Transfer | Reply:
        write = cdb[0] in (WRITE_6, WRITE_10, WRITE_12, WRITE_16)
        if write and self.backend.readonly:
            raise ScsiError(WRITE_PROTECTED, "write to a read-only disk")
        lba, blocks = _address(cdb)
        if blocks > MAX_TRANSFER_BLOCKS:
            raise ScsiError(INVALID_FIELD_IN_CDB, f"transfer of {blocks} blocks, at most {MAX_TRANSFER_BLOCKS}")
        if lba + blocks > self.blocks:
            raise ScsiError(LBA_OUT_OF_RANGE, f"blocks {lba}+{blocks} end past the disk ({self.blocks})")
        if not blocks:
            return Reply()
        fua = write and cdb[0] != WRITE_6 and bool(cdb[1] & 0x08)
        return Transfer(self.backend, BlockOp.WRITE if write else BlockOp.READ, lba * BLOCK_SIZE,
                        blocks * BLOCK_SIZE, fua=fua, error=WRITE_ERROR if write else UNRECOVERED_READ_ERROR)

    def _unmap(self, cdb: bytes) -> WithParameters:
        if self.backend.readonly:
            raise ScsiError(WRITE_PROTECTED, "UNMAP of a read-only disk")
        return WithParameters(UNMAP_HEADER + MAX_UNMAP_DESCRIPTORS * UNMAP_DESCRIPTOR.size, self._unmap_list)

    def _unmap_list(self, parameters: bytes) -> Reply | Transfer:
        """The UNMAP parameter list: every descriptor is checked before any range is discarded."""
        if not parameters:
            return Reply()
        if len(parameters) < UNMAP_HEADER:
            raise ScsiError(INVALID_FIELD_IN_PARAMETER_LIST, f"UNMAP list of {len(parameters)} bytes")
        size = be16(parameters, 2)
        if size % UNMAP_DESCRIPTOR.size or UNMAP_HEADER + size > len(parameters):
            raise ScsiError(INVALID_FIELD_IN_PARAMETER_LIST, f"UNMAP descriptors of {size} bytes")
        ranges = []
        for lba, blocks in UNMAP_DESCRIPTOR.iter_unpack(parameters[UNMAP_HEADER : UNMAP_HEADER + size]):
            if blocks > MAX_UNMAP_BLOCKS:
                raise ScsiError(INVALID_FIELD_IN_PARAMETER_LIST, f"UNMAP of {blocks} blocks, at most {MAX_UNMAP_BLOCKS}")
            if lba + blocks > self.blocks:
                raise ScsiError(LBA_OUT_OF_RANGE, f"UNMAP of blocks {lba}+{blocks} past the disk ({self.blocks})")
            if blocks:
                ranges.append((lba * BLOCK_SIZE, blocks * BLOCK_SIZE))
        return Transfer(self.backend, BlockOp.DISCARD, ranges=tuple(ranges), error=WRITE_ERROR)

    def _synchronize(self, cdb: bytes) -> Transfer:
        return Transfer(self.backend, BlockOp.FLUSH, error=WRITE_ERROR)

    def _caching_page(self) -> bytes:
        body = bytearray(18)
        body[0] = 0x04 if self.backend.cache is CacheMode.WRITEBACK else 0  # WCE
        return bytes([0x08, len(body)]) + bytes(body)

    def _mode_sense(self, cdb: bytes) -> Reply:
        protect = 0x80 if self.backend.readonly else 0
        return Reply(data=mode_sense(cdb, {0x08: self._caching_page}, device_specific=protect))


_HANDLERS: dict[int, Callable[[DiskUnit, bytes], Outcome]] = {
    INQUIRY: DiskUnit._inquiry,
    TEST_UNIT_READY: DiskUnit._good,
    REQUEST_SENSE: DiskUnit._request_sense,
    READ_CAPACITY_10: DiskUnit._read_capacity,
    SERVICE_ACTION_IN_16: DiskUnit._service_action_in,
    **{opcode: DiskUnit._transfer for opcode in (READ_6, READ_10, READ_12, READ_16,
                                                 WRITE_6, WRITE_10, WRITE_12, WRITE_16)},
    SYNCHRONIZE_CACHE_10: DiskUnit._synchronize,
    SYNCHRONIZE_CACHE_16: DiskUnit._synchronize,
    MODE_SENSE_6: DiskUnit._mode_sense,
    MODE_SENSE_10: DiskUnit._mode_sense,
    START_STOP_UNIT: DiskUnit._good,
    PREVENT_ALLOW_MEDIUM_REMOVAL: DiskUnit._good,
    UNMAP: DiskUnit._unmap,
}
"""The SBC commands a disk unit answers."""
