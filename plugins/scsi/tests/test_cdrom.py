"""A CD-ROM unit over the real ring engine: the MMC commands Linux's sr, cdrom_id and eject send."""

from __future__ import annotations

import struct
from pathlib import Path

from scsi_driver import DISC_BLOCKS, command

from pvcore_scsi.media import MediaControl

GOOD, CHECK_CONDITION = 0, 2


def test_inquiry_standard_and_vpd_pages(target) -> None:
    lb, _ = target
    answer = command(lb, bytes([0x12, 0, 0, 0, 96, 0]), 96)
    assert answer.response == 0 and answer.status == GOOD
    assert answer.data[0] == 0x05 and answer.data[1] & 0x80  # CD/DVD, removable
    assert answer.data[8:16] == b"PVCORE  " and answer.data[16:29] == b"VIRTUAL CDROM"
    assert answer.residual == 96 - len(answer.data)
    pages = command(lb, bytes([0x12, 1, 0x00, 0, 255, 0]), 255)
    assert pages.data[4:] == bytes([0x00, 0x80, 0x83])
    serial = command(lb, bytes([0x12, 1, 0x80, 0, 255, 0]), 255)
    assert serial.data[1] == 0x80 and serial.data[4:] == b"t0-0"
    refused = command(lb, bytes([0x12, 1, 0xB0, 0, 255, 0]), 255)
    assert refused.status == CHECK_CONDITION and refused.sense_triple == (0x5, 0x24, 0x00)


def test_read_capacity_and_reads_return_the_image(target, disc: Path) -> None:
    lb, _ = target
    image = disc.read_bytes()
    assert command(lb, bytes([0x00] + [0] * 5)).status == GOOD
    capacity = command(lb, bytes([0x25] + [0] * 9), 8)
    assert struct.unpack(">II", capacity.data) == (DISC_BLOCKS - 1, 2048)
    read10 = command(lb, bytes([0x28, 0, 0, 0, 0, 3, 0, 0, 4, 0]), 4 * 2048)
    assert read10.status == GOOD and read10.data == image[3 * 2048 : 7 * 2048]
    read12 = command(lb, bytes([0xA8, 0, 0, 0, 0, 60, 0, 0, 0, 4, 0, 0]), 4 * 2048)
    assert read12.data == image[60 * 2048 :]
    past = command(lb, bytes([0xA8, 0, 0, 0, 0, 61, 0, 0, 0, 4, 0, 0]), 4 * 2048)
    assert past.status == CHECK_CONDITION and past.sense_triple == (0x5, 0x21, 0x00)


def test_read_toc_formats_0_and_1(target) -> None:
    lb, _ = target
    toc = command(lb, bytes([0x43, 0, 0, 0, 0, 0, 0, 0x03, 0x24, 0]), 0x324)
    assert toc.data[:4] == struct.pack(">HBB", 18, 1, 1)
    assert toc.data[4:12] == bytes([0, 0x14, 1, 0, 0, 0, 0, 0])
    assert toc.data[12:20] == bytes([0, 0x14, 0xAA, 0]) + struct.pack(">I", DISC_BLOCKS)
    msf = command(lb, bytes([0x43, 0x02, 0, 0, 0, 0, 0, 0, 0xFF, 0]), 0xFF)
    assert msf.data[8:12] == bytes([0, 0, 2, 0])  # track 1 at 00:02:00 (the pregap)
    session = command(lb, bytes([0x43, 0, 1, 0, 0, 0, 0, 0, 12, 0]), 12)
    assert session.data == struct.pack(">HBB", 10, 1, 1) + bytes([0, 0x14, 1, 0, 0, 0, 0, 0])
    bad = command(lb, bytes([0x43, 0, 5, 0, 0, 0, 0, 0, 12, 0]), 12)
    assert bad.sense_triple == (0x5, 0x24, 0x00)


def test_get_configuration_reports_the_cd_rom_profile(target) -> None:
    lb, _ = target
    answer = command(lb, bytes([0x46, 0, 0, 0, 0, 0, 0, 0x01, 0x00, 0]), 256)
    length, profile = struct.unpack_from(">I2xH", answer.data)
    assert profile == 0x0008 and length == len(answer.data) - 4
    assert answer.data[8:10] == b"\x00\x00" and answer.data[12:14] == b"\x00\x08"  # profile list: CD-ROM
    only_core = command(lb, bytes([0x46, 2, 0, 1, 0, 0, 0, 0, 64, 0]), 64)
    assert only_core.data[8:10] == b"\x00\x01" and len(only_core.data) == 8 + 4 + 8


def test_mode_sense_capabilities_page_and_unknown_page(target) -> None:
    lb, _ = target
    answer = command(lb, bytes([0x5A, 0, 0x2A, 0, 0, 0, 0, 0, 128, 0]), 128)
    assert struct.unpack_from(">H", answer.data)[0] == len(answer.data) - 2
    page = answer.data[8:]
    assert page[0] == 0x2A and page[6] & 0x08 and page[6] >> 5 == 1  # eject, tray loader
    six = command(lb, bytes([0x1A, 0, 0x3F, 0, 255, 0]), 255)
    assert six.data[0] == len(six.data) - 1 and six.data[4] == 0x01
    unknown = command(lb, bytes([0x1A, 0, 0x05, 0, 255, 0]), 255)
    assert unknown.sense_triple == (0x5, 0x24, 0x00)


def test_unknown_opcode_is_invalid_command_operation_code(target) -> None:
    lb, _ = target
    for opcode in (0x2A, 0x04, 0xFF, 0x7F, 0xA1):
        answer = command(lb, bytes([opcode] + [0] * 11), 0)
        assert answer.response == 0 and answer.status == CHECK_CONDITION
        assert answer.sense_triple == (0x5, 0x20, 0x00)


def test_locked_tray_refuses_eject_then_eject_gives_medium_not_present(target) -> None:
    lb, _ = target
    assert command(lb, bytes([0x1E, 0, 0, 0, 1, 0])).status == GOOD  # prevent removal
    locked = command(lb, bytes([0x1B, 0, 0, 0, 0x02, 0]))
    assert locked.sense_triple == (0x5, 0x53, 0x02)
    assert command(lb, bytes([0x1E, 0, 0, 0, 0, 0])).status == GOOD  # allow
    assert command(lb, bytes([0x1B, 0, 0, 0, 0x02, 0])).status == GOOD  # eject
    after = command(lb, bytes([0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0]), 2048)
    assert after.status == CHECK_CONDITION and after.sense_triple == (0x2, 0x3A, 0x02)
    assert command(lb, bytes([0x00] * 6)).sense_triple == (0x2, 0x3A, 0x02)
    mechanism = command(lb, bytes([0xBD, 0, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0]), 8)
    assert mechanism.data[1] & 0x10  # door open
    events = command(lb, bytes([0x4A, 1, 0, 0, 0x10, 0, 0, 0, 8, 0]), 8)
    assert events.data[4] == 3 and events.data[5] == 0x01  # media removal; tray open, no medium
    assert command(lb, bytes([0x1B, 0, 0, 0, 0x03, 0])).status == GOOD  # load
    attention = command(lb, bytes([0x00] * 6))
    assert attention.sense_triple == (0x6, 0x28, 0x00)
    assert command(lb, bytes([0x00] * 6)).status == GOOD


def test_host_media_change_is_seen_by_the_guest(target, tmp_path: Path) -> None:
    lb, device = target
    second = tmp_path / "second.iso"
    second.write_bytes(b"\x42" * 2048 * 8)
    control = MediaControl(tmp_path / "t0.media", {0: device.units[0]}, device.media_changed, name="t0")
    assert lb.run_in_loop(control.apply, "eject 0").startswith("ok")
    assert command(lb, bytes([0x00] * 6)).sense_triple == (0x2, 0x3A, 0x01)
    assert lb.run_in_loop(control.apply, f"insert 0 {second}").startswith("ok")
    events = command(lb, bytes([0x4A, 1, 0, 0, 0x10, 0, 0, 0, 8, 0]), 8)
    assert events.data[4] == 2 and events.data[5] == 0x02  # new media, present
    assert command(lb, bytes([0x00] * 6)).sense_triple == (0x6, 0x28, 0x00)
    capacity = command(lb, bytes([0x25] + [0] * 9), 8)
    assert struct.unpack(">II", capacity.data) == (7, 2048)
    assert command(lb, bytes([0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0]), 2048).data == b"\x42" * 2048
    assert command(lb, bytes([0x1E, 0, 0, 0, 1, 0])).status == GOOD
    assert "locked" in lb.run_in_loop(control.apply, "eject 0")
    assert lb.run_in_loop(control.apply, "force-eject 0").startswith("ok")
    assert lb.run_in_loop(control.apply, "insert 0 /nonexistent.iso").startswith("error")
    assert lb.run_in_loop(control.apply, "eject 7").startswith("error")


def test_read_disc_information_and_request_sense(target) -> None:
    lb, _ = target
    info = command(lb, bytes([0x51, 0, 0, 0, 0, 0, 0, 0, 34, 0]), 34)
    assert info.data[0:2] == b"\x00\x20" and info.data[2] & 0x03 == 0x02
    sense = command(lb, bytes([0x03, 0, 0, 0, 18, 0]), 18)
    assert sense.status == GOOD and sense.data[0] == 0x70 and sense.data[2] == 0
