"""A disk unit over the real ring engine and pvcore's block engine (SBC commands Linux's sd sends)."""

from __future__ import annotations

import os
import struct
from pathlib import Path

from scsi_driver import command

from pvcore.contract import DeviceConfig
from pvcore.testing.loopback import Loopback
from pvcore_scsi.plugin import build_units, close_units
from pvcore_scsi.virtio_scsi import VirtioScsi

DISK = 1  # the fixture's disk is LUN 1, after the CD-ROM


def test_inquiry_capacity_and_reads_of_every_size(target, disk_image: Path) -> None:
    lb, _ = target
    image = disk_image.read_bytes()
    assert command(lb, bytes([0x12, 0, 0, 0, 36, 0]), 36, lun=DISK).data[0] == 0x00
    assert struct.unpack(">II", command(lb, bytes([0x25] + [0] * 9), 8, lun=DISK).data) == (2047, 512)
    sixteen = command(lb, bytes([0x9E, 0x10] + [0] * 8 + [0, 0, 0, 32, 0, 0]), 32, lun=DISK)
    assert struct.unpack_from(">QI", sixteen.data) == (2047, 512)
    read6 = command(lb, bytes([0x08, 0, 0, 4, 2, 0]), 1024, lun=DISK)
    assert read6.data == image[4 * 512 : 6 * 512]
    read16 = command(lb, bytes([0x88, 0] + list((2040).to_bytes(8, "big")) + [0, 0, 0, 8, 0, 0]), 4096, lun=DISK)
    assert read16.data == image[2040 * 512 :]
    past = command(lb, bytes([0x28, 0, 0, 0, 7, 0xFF, 0, 0, 2, 0]), 1024, lun=DISK)
    assert past.sense_triple == (0x5, 0x21, 0x00)


def test_write_fua_and_synchronize_cache_reach_the_image(target, disk_image: Path) -> None:
    lb, _ = target
    data = os.urandom(8 * 512)
    assert command(lb, bytes([0x2A, 0x08, 0, 0, 0, 16, 0, 0, 8, 0]), lun=DISK, data_out=data).status == 0
    assert command(lb, bytes([0x35] + [0] * 9), lun=DISK).status == 0
    assert disk_image.read_bytes()[16 * 512 : 24 * 512] == data
    assert command(lb, bytes([0x28, 0, 0, 0, 0, 16, 0, 0, 8, 0]), 4096, lun=DISK).data == data


def test_caching_page_and_unknown_opcode(target) -> None:
    lb, _ = target
    page = command(lb, bytes([0x1A, 0, 0x08, 0, 255, 0]), 255, lun=DISK).data
    assert page[4] == 0x08 and page[6] & 0x04  # writeback: WCE
    assert command(lb, bytes([0x43] + [0] * 9), 12, lun=DISK).sense_triple == (0x5, 0x20, 0x00)


def test_readonly_disk_refuses_writes_with_write_protected(disk_image: Path) -> None:
    before = disk_image.read_bytes()
    units = build_units(DeviceConfig("scsi", "ro", {"disk": [str(disk_image)], "disk-readonly": True}))
    try:
        with Loopback(VirtioScsi(units, name="ro")) as lb:
            answer = command(lb, bytes([0x2A, 0, 0, 0, 0, 0, 0, 0, 1, 0]), data_out=b"x" * 512)
            assert answer.sense_triple == (0x7, 0x27, 0x00)
            assert command(lb, bytes([0x1A, 0, 0x3F, 0, 255, 0]), 255).data[2] & 0x80  # write-protected
    finally:
        close_units(units)
    assert disk_image.read_bytes() == before


def unmap_list(*ranges: tuple[int, int]) -> bytes:
    descriptors = b"".join(struct.pack(">QI4x", lba, blocks) for lba, blocks in ranges)
    return struct.pack(">HH4x", len(descriptors) + 6, len(descriptors)) + descriptors


def test_unmap_discards_ranges_and_is_advertised(target, disk_image: Path) -> None:
    lb, _ = target
    capacity16 = command(lb, bytes([0x9E, 0x10] + [0] * 8 + [0, 0, 0, 32, 0, 0]), 32, lun=DISK)
    assert capacity16.data[14] & 0x80  # LBPME
    pages = command(lb, bytes([0x12, 1, 0x00, 0, 255, 0]), 255, lun=DISK).data[4:]
    assert 0xB0 in pages and 0xB2 in pages
    limits = command(lb, bytes([0x12, 1, 0xB0, 0, 255, 0]), 255, lun=DISK).data
    assert struct.unpack_from(">II", limits, 20) == (1 << 22, 32)
    assert command(lb, bytes([0x12, 1, 0xB2, 0, 255, 0]), 255, lun=DISK).data[5] & 0x80  # LBPU
    answer = command(lb, bytes([0x42] + [0] * 6 + [0, 40, 0]), lun=DISK, data_out=unmap_list((8, 8), (100, 16)))
    assert answer.status == 0
    image = disk_image.read_bytes()
    assert image[8 * 512 : 16 * 512] == bytes(8 * 512) and image[100 * 512 : 116 * 512] == bytes(16 * 512)
    assert image[16 * 512 : 17 * 512] != bytes(512)


def test_bad_unmap_lists_fail_before_anything_is_discarded(target, disk_image: Path) -> None:
    lb, _ = target
    before = disk_image.read_bytes()
    cases = [
        (unmap_list((2040, 16)), (0x5, 0x21, 0x00)),  # past the end
        (unmap_list((0, 8), (0, 1 << 23)), (0x5, 0x26, 0x00)),  # one descriptor too big: nothing done
        (struct.pack(">HH4x", 22, 17) + bytes(17), (0x5, 0x26, 0x00)),  # not whole descriptors
        (struct.pack(">HH4x", 38, 32) + bytes(16), (0x5, 0x26, 0x00)),  # says more than it carries
        (bytes(5), (0x5, 0x26, 0x00)),
        (unmap_list(*[(0, 1)] * 33), (0x5, 0x1A, 0x00)),  # past the 32-descriptor limit
    ]
    for data, sense in cases:
        answer = command(lb, bytes([0x42] + [0] * 9), lun=DISK, data_out=data)
        assert answer.status == 2 and answer.sense_triple == sense, data
    assert disk_image.read_bytes() == before


def test_zero_block_transfers_move_nothing(target) -> None:
    lb, _ = target
    assert command(lb, bytes([0x28, 0, 0, 0, 0, 0, 0, 0, 0, 0]), lun=DISK).status == 0
    assert command(lb, bytes([0x2A, 0, 0, 0, 0, 0, 0, 0, 0, 0]), lun=DISK).status == 0
    assert command(lb, bytes([0x28, 0, 0, 0, 0, 0, 0, 0, 0, 0])).status == 0  # the CD-ROM too


def test_every_request_queue_serves(disk_image: Path) -> None:
    units = build_units(DeviceConfig("scsi", "mq", {"disk": [str(disk_image)]}))
    try:
        device = VirtioScsi(units, name="mq", queues=3)
        assert device.num_queues() == 5 and struct.unpack_from("<I", device.config())[0] == 3
        with Loopback(device) as lb:
            for queue in (2, 3, 4):
                header = bytes([1, 0, 0x40, 0, 0, 0, 0, 0]) + struct.pack("<QBBB", queue, 0, 0, 0)
                used = lb.request(queue, [header + bytes([0x25]).ljust(32, b"\0")], [108, 8])
                assert struct.unpack(">II", used.data[108:116]) == (2047, 512)
    finally:
        close_units(units)
