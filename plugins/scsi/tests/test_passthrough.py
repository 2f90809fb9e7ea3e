"""Passthrough at the ioctl boundary: everything above SG_IO is real, the ioctl is a stand-in.

:class:`sg_double.FakeSg` replaces the ``SG_IO`` call alone. The allow-list,
the CDB length, data in both directions, sense, timeouts and the data limit
are checked through the ring.
"""

from __future__ import annotations

from pathlib import Path

from scsi_driver import command
from sg_double import INQUIRY_DATA, FakeSg, passthrough_target

from pvcore_scsi.passthrough import SG_DXFER_FROM_DEV, SG_DXFER_TO_DEV
from pvcore_scsi.sense import CHECK_CONDITION


def _device_file(tmp_path: Path) -> Path:
    path = tmp_path / "sg0"
    path.write_bytes(b"")
    return path


def test_inquiry_goes_through_sg_io_with_its_cdb_length_and_timeout(tmp_path: Path) -> None:
    fake = FakeSg()
    with passthrough_target(_device_file(tmp_path), fake, timeout=7.5) as (lb, _):
        answer = command(lb, bytes([0x12, 0, 0, 0, 96, 0]), 96)
    assert answer.status == 0 and answer.data == INQUIRY_DATA and answer.residual == 96 - len(INQUIRY_DATA)
    (call,) = fake.calls
    assert call == {"cdb": bytes([0x12, 0, 0, 0, 96, 0]), "direction": SG_DXFER_FROM_DEV, "size": 96, "timeout": 7500}


def test_device_sense_reaches_the_guest(tmp_path: Path) -> None:
    with passthrough_target(_device_file(tmp_path), FakeSg()) as (lb, _):
        answer = command(lb, bytes(6))
    assert answer.status == CHECK_CONDITION and answer.sense_triple == (0x2, 0x3A, 0x01)


def test_opcodes_off_the_allow_list_never_reach_the_device(tmp_path: Path) -> None:
    fake = FakeSg()
    with passthrough_target(_device_file(tmp_path), fake) as (lb, _):
        for cdb in (bytes([0x2A, 0, 0, 0, 0, 0, 0, 0, 1, 0]), bytes([0xA1] + [0] * 11), bytes([0x7F] + [0] * 31),
                    bytes([0xC5] + [0] * 11)):
            answer = command(lb, cdb, data_out=b"w" * 2048 if cdb[0] == 0x2A else b"")
            assert answer.status == CHECK_CONDITION and answer.sense_triple == (0x5, 0x20, 0x00)
    assert fake.calls == []


def test_allow_write_passes_a_write_with_its_data_out(tmp_path: Path) -> None:
    fake = FakeSg()
    with passthrough_target(_device_file(tmp_path), fake, allow="write") as (lb, _):
        answer = command(lb, bytes([0x2A, 0, 0, 0, 0, 9, 0, 0, 1, 0]), data_out=b"burn" * 512)
    assert answer.status == 0
    assert fake.calls[0]["direction"] == SG_DXFER_TO_DEV and fake.written == b"burn" * 512


def test_a_timed_out_command_is_aborted_command(tmp_path: Path) -> None:
    with passthrough_target(_device_file(tmp_path), FakeSg(timeout=True)) as (lb, _):
        answer = command(lb, bytes([0x12, 0, 0, 0, 36, 0]), 36)
    assert answer.status == CHECK_CONDITION and answer.sense_triple == (0xB, 0x2E, 0x02)


def test_a_failing_ioctl_is_a_target_failure_not_a_crash(tmp_path: Path) -> None:
    def broken(fd: int, request: int, header: bytearray) -> int:
        raise OSError(5, "Input/output error")

    fake = FakeSg()
    with passthrough_target(_device_file(tmp_path), fake) as (lb, device):
        device.units[0]._ioctl = broken
        answer = command(lb, bytes([0x12, 0, 0, 0, 36, 0]), 36)
        assert answer.status == CHECK_CONDITION and answer.sense_triple == (0x4, 0x44, 0x00)
        device.units[0]._ioctl = fake
        assert command(lb, bytes([0x12, 0, 0, 0, 36, 0]), 36).data == INQUIRY_DATA[:36]


def test_a_buffer_past_the_data_limit_never_reaches_the_device(tmp_path: Path) -> None:
    fake = FakeSg()
    with passthrough_target(_device_file(tmp_path), fake) as (lb, _):
        answer = command(lb, bytes([0x28, 0, 0, 0, 0, 0, 0, 0x04, 0x00, 0]), 2 << 20)
    assert answer.status == CHECK_CONDITION and answer.sense_triple == (0x5, 0x24, 0x00)
    assert fake.calls == []
