"""Hostile virtio-scsi requests fail that request with the right response; the device keeps serving.

Each case is followed by a good READ CAPACITY on the same queue, and the
session must never be broken (DEVICE_NEEDS_RESET is for broken rings, not
for bad requests).
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scsi_driver import REQUEST_QUEUE, RESPONSE_SIZE, command, lun_address, parse_answer, request_header, tmf
from sg_double import FakeSg, passthrough_target

from pvcore_scsi.virtio_scsi import (
    S_BAD_TARGET,
    S_FAILURE,
    S_FUNCTION_COMPLETE,
    S_FUNCTION_REJECTED,
    S_FUNCTION_SUCCEEDED,
    S_INCORRECT_LUN,
    S_OVERRUN,
    TMF_ABORT_TASK,
    TMF_CLEAR_ACA,
    TMF_LOGICAL_UNIT_RESET,
    TMF_QUERY_TASK,
)

READ_CAPACITY = bytes([0x25] + [0] * 9)


def still_serving(lb) -> None:
    answer = command(lb, READ_CAPACITY, 8)
    assert answer.response == 0 and answer.status == 0 and len(answer.data) == 8
    assert lb.session.broken is None


def raw(lb, readable: list[bytes], writable: list[int]):
    used = lb.request(REQUEST_QUEUE, readable, writable)
    return used


@pytest.mark.parametrize("length", [1, 8, 18, 19, 30, 50])
def test_short_header_is_failure(target, length: int) -> None:
    lb, _ = target
    used = raw(lb, [request_header(READ_CAPACITY)[:length]], [RESPONSE_SIZE, 8])
    assert parse_answer(used.data, used.written).response == S_FAILURE
    still_serving(lb)


def test_header_split_across_descriptors_is_understood(target) -> None:
    lb, _ = target
    header = request_header(READ_CAPACITY)
    used = raw(lb, [header[:5], header[5:20], header[20:]], [7, RESPONSE_SIZE - 7, 8])
    answer = parse_answer(used.data, used.written)
    assert answer.response == 0 and answer.status == 0 and len(answer.data) == 8


@pytest.mark.parametrize("writable", [[], [1], [RESPONSE_SIZE - 1]])
def test_no_room_for_the_response_is_returned_unanswered(target, writable: list[int]) -> None:
    lb, _ = target
    used = raw(lb, [request_header(READ_CAPACITY)], writable)
    assert used.written == 0
    still_serving(lb)


def test_cdb_longer_than_its_field_is_refused(target) -> None:
    lb, _ = target
    variable = bytes([0x7F, 0, 0, 0, 0, 0, 0, 200]) + bytes(24)  # says 208 bytes, the field holds 32
    answer = command(lb, variable, 512)
    assert answer.status == 2 and answer.sense_triple == (0x5, 0x20, 0x00)
    still_serving(lb)


@pytest.mark.parametrize("lun_field", [
    lun_address(0, target=1), lun_address(0, target=255), bytes([2, 0, 0x40, 0, 0, 0, 0, 0]),
    bytes([1, 0, 0x40, 0, 0, 0, 0, 1]), bytes([1, 0, 0x80, 0, 0, 0, 0, 0]),
])
def test_lun_address_of_another_target_or_format_is_bad_target(target, lun_field: bytes) -> None:
    lb, _ = target
    header = lun_field + request_header(READ_CAPACITY)[8:]
    used = raw(lb, [header], [RESPONSE_SIZE, 8])
    assert parse_answer(used.data, used.written).response == S_BAD_TARGET
    still_serving(lb)


def test_lun_without_a_unit_answers_as_spc_says(target) -> None:
    lb, _ = target
    inquiry = command(lb, bytes([0x12, 0, 0, 0, 36, 0]), 36, lun=5)
    assert inquiry.status == 0 and inquiry.data[0] == 0x7F  # qualifier 3: no unit here
    read = command(lb, bytes([0x28] + [0] * 7 + [1, 0]), 2048, lun=5)
    assert read.status == 2 and read.sense_triple == (0x5, 0x25, 0x00)
    luns = command(lb, bytes([0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]), 256, lun=5)
    assert luns.data[:4] == struct.pack(">I", 16) and luns.data[8:10] == b"\x00\x00" and luns.data[16:18] == b"\x00\x01"
    assert command(lb, bytes([0x12, 0, 0, 0, 36, 0]), 36, lun=16383).data[0] == 0x7F
    still_serving(lb)


def test_data_in_smaller_than_the_transfer_is_overrun(target) -> None:
    lb, _ = target
    read = command(lb, bytes([0x28, 0, 0, 0, 0, 0, 0, 0, 4, 0]), 3 * 2048)
    assert read.response == S_OVERRUN and read.written == RESPONSE_SIZE
    inquiry = command(lb, bytes([0x12, 0, 0, 0, 96, 0]), 10)
    assert inquiry.response == S_OVERRUN
    disk_read = command(lb, bytes([0x28, 0, 0, 0, 0, 0, 0, 0, 8, 0]), 512, lun=1)
    assert disk_read.response == S_OVERRUN
    disk_write = command(lb, bytes([0x2A, 0, 0, 0, 0, 0, 0, 0, 8, 0]), lun=1, data_out=b"x" * 512)
    assert disk_write.response == S_OVERRUN
    still_serving(lb)


def test_data_both_ways_is_failure(target) -> None:
    lb, _ = target
    used = raw(lb, [request_header(READ_CAPACITY), b"out"], [RESPONSE_SIZE, 8])
    assert parse_answer(used.data, used.written).response == S_FAILURE
    still_serving(lb)


def test_task_management_for_unknown_tags_luns_and_functions(target) -> None:
    lb, _ = target
    assert tmf(lb, TMF_ABORT_TASK, tag=0xDEAD) == S_FUNCTION_COMPLETE
    assert tmf(lb, TMF_QUERY_TASK, tag=0xDEAD) == S_FUNCTION_COMPLETE
    assert tmf(lb, TMF_LOGICAL_UNIT_RESET) == S_FUNCTION_COMPLETE
    assert tmf(lb, TMF_CLEAR_ACA) == S_FUNCTION_REJECTED
    assert tmf(lb, 99) == S_FUNCTION_REJECTED
    assert tmf(lb, TMF_ABORT_TASK, target=3) == S_BAD_TARGET
    assert tmf(lb, TMF_ABORT_TASK, lun=9) == S_INCORRECT_LUN
    short = lb.request(0, [struct.pack("<II", 0, 0)], [1])
    assert short.data[:1] == bytes([S_FAILURE])
    unknown_type = lb.request(0, [struct.pack("<I", 77) + bytes(20)], [1])
    assert unknown_type.written == 0
    no_room = lb.request(0, [struct.pack("<II", 0, 0) + bytes(16)], [])
    assert no_room.written == 0
    assert lb.request(0, [struct.pack("<I", 1) + lun_address(0) + bytes(4)], [5]).data == bytes(4) + b"\0"
    still_serving(lb)


def test_event_buffer_too_small_is_returned(target) -> None:
    lb, _ = target
    assert lb.request(1, [], [8]).written == 0
    still_serving(lb)


def test_media_change_reaches_the_event_queue(target, tmp_path) -> None:
    lb, device = target
    lb.submit(1, [], [16])
    second = tmp_path / "second.iso"
    second.write_bytes(bytes(2048))
    lb.run_in_loop(device.units[0].host_insert, str(second))
    lb.run_in_loop(device.media_changed, 0)
    (event,) = lb.wait_used(1, 1)
    kind, lun, reason = struct.unpack("<I8sI", event.data)
    assert kind == 3 and lun == lun_address(0) and reason == 0x28


def test_config_space_and_driver_sizes(target) -> None:
    lb, device = target
    fields = struct.unpack("<IIIIIIIHHI", device.config())
    assert fields[0] == 1 and fields[5] == 96 and fields[6] == 32 and fields[9] == 1
    lb.run_in_loop(device.write_config, 24, struct.pack("<I", 100000))
    assert device.cdb_size == 32
    lb.run_in_loop(device.write_config, 24, struct.pack("<I", 16))
    assert device.cdb_size == 16
    assert command(lb, READ_CAPACITY[:10], 8).response == S_FAILURE  # a 51-byte header now leaves 16 bytes of data-out
    lb.run_in_loop(device.write_config, 24, struct.pack("<I", 32))
    still_serving(lb)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=st.binary(max_size=80), data_out=st.binary(max_size=40),
       writable=st.lists(st.integers(min_value=1, max_value=4096), max_size=3))
def test_random_requests_never_break_the_device(target, header: bytes, data_out: bytes, writable: list[int]) -> None:
    lb, _ = target
    readable = [header] + ([data_out] if data_out else [])
    readable = [part for part in readable if part] or [b"\0"]
    used = lb.request(REQUEST_QUEUE, readable, writable)
    assert used.written <= sum(writable)
    assert lb.session.broken is None


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cdb=st.binary(min_size=1, max_size=32), lun=st.sampled_from([0, 1, 5]),
       data_in=st.integers(min_value=0, max_value=8192))
def test_random_cdbs_are_answered_and_never_break_the_device(target, cdb: bytes, lun: int, data_in: int) -> None:
    lb, _ = target
    answer = command(lb, cdb, data_in, lun=lun)
    assert answer.response in (0, S_OVERRUN) and answer.status in (0, 2)
    if answer.status == 2:  # not ready, illegal request, unit attention, write protect: never a unit's own error
        assert answer.sense_triple[0] in (0x2, 0x5, 0x6, 0x7), answer.sense_triple
    assert lb.session.broken is None


@pytest.mark.parametrize("fill", [0x00, 0xFF, 0x01])
def test_every_opcode_with_extreme_fields_is_answered(target, fill: int) -> None:
    lb, _ = target
    for lun in (0, 1, 5):
        for opcode in range(256):
            answer = command(lb, bytes([opcode]) + bytes([fill]) * 31, 4096, lun=lun)
            assert answer.response in (0, S_OVERRUN), (lun, opcode)
            if answer.status == 2:
                assert answer.sense_triple[0] in (0x2, 0x5, 0x6, 0x7), (lun, hex(opcode), answer.sense_triple)
    assert lb.session.broken is None


def test_a_driver_that_shrinks_the_cdb_field_still_gets_answers(target) -> None:
    lb, device = target
    lb.run_in_loop(device.write_config, 24, struct.pack("<I", 1))
    header = request_header(b"")[:19] + bytes([0x43])  # READ TOC with a 1-byte CDB field
    used = raw(lb, [header], [RESPONSE_SIZE, 12])
    assert parse_answer(used.data, used.written).response == 0
    lb.run_in_loop(device.write_config, 24, struct.pack("<I", 32))
    still_serving(lb)


def test_an_aborted_request_is_answered_before_its_tmf(tmp_path) -> None:
    device_file = tmp_path / "sg9"
    device_file.write_bytes(b"")
    fake = FakeSg(block=True)
    with passthrough_target(device_file, fake) as (lb, _device):
        lb.submit(REQUEST_QUEUE, [request_header(bytes([0x00] * 6), tag=42)], [RESPONSE_SIZE])
        assert fake.started.wait(10)
        assert tmf(lb, TMF_QUERY_TASK, tag=42) == S_FUNCTION_SUCCEEDED
        tmf_head = lb.queues[0].add([struct.pack("<II", 0, TMF_ABORT_TASK) + lun_address(0) + struct.pack("<Q", 42)],
                                    [1])
        lb.kick(0)
        with pytest.raises(TimeoutError):
            lb.wait_used(0, 1, timeout=0.5)  # the TMF waits for the request it aborts
        fake.release.set()
        (aborted,) = lb.wait_used(REQUEST_QUEUE, 1)
        assert parse_answer(aborted.data, aborted.written).response == 2  # ABORTED
        (answer,) = lb.wait_used(0, 1)
        assert answer.head == tmf_head and answer.data == bytes([S_FUNCTION_COMPLETE])
