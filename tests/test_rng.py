"""The rng engine: private entropy per domain, the rate limit, and virtio-rng over the loopback."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from pvcore.devices.rng import (
    MAX_REQUEST_BYTES,
    EntropySource,
    RateLimit,
    create_rng_device,
)
from pvcore.testing.loopback import Loopback
from pvcore.virtio import VIRTIO_ID_RNG, DeviceError


@pytest.mark.parametrize(
    ("text", "max_bytes", "period"),
    [("4096/1s", 4096, 1.0), ("1024/100ms", 1024, 0.1), ("10/0.5s", 10, 0.5), (" 1/1ms ", 1, 0.001)],
)
def test_rate_parses_bytes_and_period(text: str, max_bytes: int, period: float) -> None:
    rate = RateLimit.parse(text)
    assert rate.max_bytes == max_bytes
    assert rate.period == pytest.approx(period)


@pytest.mark.parametrize(
    "text",
    ["", "fast", "1024", "1024/", "/1s", "1024/100", "1024/100us", "1024/1 s", "0/1s", "-1/1s", "1024/0ms",
     "1e3/1s", "1024/1s/2", "1024/2h", "99999999999/1s", "1024/7200s"],
)
def test_bad_rate_is_rejected(text: str) -> None:
    with pytest.raises(DeviceError, match="rate"):
        RateLimit.parse(text)


def test_period_without_unit_names_the_fix() -> None:
    with pytest.raises(DeviceError, match="ms or s"):
        RateLimit.parse("1024/100")


def test_factory_options() -> None:
    device = create_rng_device({"rate": "1024/100ms"}, name="dom1")
    assert device.device_id == VIRTIO_ID_RNG
    assert device.source.rate == RateLimit(1024, 0.1)
    assert create_rng_device({}, name="dom1").source.rate is None
    with pytest.raises(DeviceError, match="rng dom1: rate 'lots'"):
        create_rng_device({"rate": "lots"}, name="dom1")
    with pytest.raises(DeviceError, match="unknown option.*speed"):
        create_rng_device({"speed": "1"}, name="dom1")


def test_source_delivers_fresh_bytes_of_the_asked_size() -> None:
    async def scenario() -> list[bytes]:
        source = EntropySource("dom")
        return [await source.read(n) for n in (1, 32, 4096, MAX_REQUEST_BYTES + 10)]

    got = asyncio.run(scenario())
    assert [len(data) for data in got] == [1, 32, 4096, MAX_REQUEST_BYTES]
    assert got[1] != got[2][:32]
    assert len(set(got[2])) > 200  # 4096 random bytes cover most byte values


def test_request_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        EntropySource("dom").request(0, lambda data: None)


def test_rate_limit_holds_reads_until_the_next_window() -> None:
    async def scenario() -> tuple[int, int]:
        source = EntropySource("dom", RateLimit(1024, 0.1))
        total = 0
        start = asyncio.get_running_loop().time()
        while True:
            try:
                data = await asyncio.wait_for(source.read(256), start + 0.35 - asyncio.get_running_loop().time())
            except TimeoutError:
                break
            assert data, "an over-limit request must wait, not get 0 bytes"
            total += len(data)
        return total, source.held

    total, held = asyncio.run(scenario())
    assert 2048 <= total <= 4 * 1024
    assert held == 0  # the timed-out read cancelled its request


def test_partial_grant_when_quota_is_nearly_spent() -> None:
    async def scenario() -> list[int]:
        source = EntropySource("dom", RateLimit(100, 10.0))
        first = await source.read(70)
        second = await source.read(70)
        third_waits = source.request(10, lambda data: None)
        assert not third_waits.done and source.held == 1
        source.close()
        return [len(first), len(second)]

    assert asyncio.run(scenario()) == [70, 30]


def test_entropy_is_never_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)

    async def scenario() -> list[bytes]:
        source = EntropySource("dom", RateLimit(64, 0.01))
        return [await source.read(64) for _ in range(5)]

    outputs = asyncio.run(scenario())
    for data in outputs:
        assert data.hex() not in caplog.text
        assert repr(data)[2:-1] not in caplog.text


def test_virtio_rng_fills_the_writable_buffers() -> None:
    with Loopback(create_rng_device({}, name="dom")) as lb:
        used = lb.request(0, [], [64])
        assert used.written == 64 and len(used.data) == 64
        split = lb.request(0, [], [10, 20, 30])
        assert split.written == 60
        big = lb.request(0, [], [MAX_REQUEST_BYTES + 100])
        assert big.written == MAX_REQUEST_BYTES
        assert len({used.data, split.data[:64], big.data[:64]}) == 3


def test_virtio_rng_ignores_readable_part_and_completes_empty_request() -> None:
    with Loopback(create_rng_device({}, name="dom")) as lb:
        assert lb.request(0, [b"junk"], []).written == 0
        assert lb.request(0, [b"junk"], [16]).written == 16


def test_virtio_rng_rate_limit_holds_over_a_short_window() -> None:
    with Loopback(create_rng_device({"rate": "1024/100ms"}, name="dom")) as lb:
        heads = [lb.submit(0, [], [256]) for _ in range(40)]
        start = time.monotonic()
        got = []
        while (left := start + 0.35 - time.monotonic()) > 0:
            try:
                got.extend(lb.wait_used(0, 1, timeout=left))
            except TimeoutError:
                break
        total = sum(used.written for used in got)
        assert all(used.written > 0 for used in got), "a held request was answered with 0 bytes"
        assert 2048 <= total <= 4 * 1024
        assert len(got) < len(heads)
        held = lb.run_in_loop(lambda: lb.device.source.held)
        assert held == len(heads) - len(got)


def test_held_requests_complete_with_zero_when_the_queue_stops() -> None:
    with Loopback(create_rng_device({"rate": "64/10s"}, name="dom")) as lb:
        assert lb.request(0, [], [64]).written == 64
        head = lb.submit(0, [], [64])
        with pytest.raises(TimeoutError):
            lb.wait_used(0, 1, timeout=0.1)
        lb.run_in_loop(lb.session.stop_queue, 0)
        (used,) = lb.wait_used(0, 1, timeout=2)
        assert (used.head, used.written) == (head, 0)
        assert lb.run_in_loop(lambda: lb.device.source.held) == 0


def test_two_domains_never_receive_the_same_bytes() -> None:
    with Loopback(create_rng_device({}, name="dom-a"), name="a") as lb_a, Loopback(
        create_rng_device({}, name="dom-b"), name="b"
    ) as lb_b:
        outputs_a = [lb_a.request(0, [], [32]).data for _ in range(200)]
        outputs_b = [lb_b.request(0, [], [32]).data for _ in range(200)]
    everything = outputs_a + outputs_b
    assert all(len(data) == 32 for data in everything)
    assert len(set(everything)) == len(everything)
    halves = {data[:16] for data in everything} | {data[16:] for data in everything}
    assert len(halves) == 2 * len(everything)


def test_sources_hand_each_request_its_own_buffer() -> None:
    async def scenario() -> list[bytes]:
        first, second = EntropySource("a"), EntropySource("b")
        received: list[bytes] = []
        for _ in range(100):
            first.request(16, received.append)
            second.request(16, received.append)
        return received

    received = asyncio.run(scenario())
    assert len(received) == 200
    assert len({id(data) for data in received}) == 200
    assert len(set(received)) == 200

