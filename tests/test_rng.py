"""The rng engine: private entropy per domain, the rate limit, and virtio-rng over the loopback."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable

import pytest

from pvcore.devices.rng import (
    MAX_REQUEST_BYTES,
    EntropySource,
    RateLimit,
    create_rng_device,
)
from pvcore.testing.loopback import Loopback
from pvcore.virtio import VIRTIO_ID_RNG, DeviceError

TIMEOUT = 30.0
"""Generous: only a broken limiter takes this long; a loaded host only makes windows later."""


def wait_until(condition: Callable[[], bool]) -> None:
    """Poll ``condition`` until it holds (TimeoutError after :data:`TIMEOUT`)."""
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(0.005)


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


def windows_opened(elapsed: float, rate: RateLimit) -> int:
    """The most rate windows that can open within ``elapsed`` seconds, with one to spare
    for rounding: the first opens at the first request, each next one a period later at least."""
    return math.floor(elapsed / rate.period) + 2


def test_rate_limit_holds_reads_until_the_next_window() -> None:
    rate = RateLimit(1024, 0.1)

    async def scenario() -> tuple[int, float]:
        loop = asyncio.get_running_loop()
        source = EntropySource("dom", rate)
        start = loop.time()
        total = 0
        while total < 4 * rate.max_bytes:
            data = await asyncio.wait_for(source.read(256), TIMEOUT)
            assert data, "an over-limit request must wait, not get 0 bytes"
            total += len(data)
            assert source.bytes_delivered <= windows_opened(loop.time() - start, rate) * rate.max_bytes
        return total, loop.time() - start

    total, elapsed = asyncio.run(scenario())
    assert total == 4 * 1024
    # four windows' worth: the fourth window opens three periods after the first, however loaded the host
    assert elapsed >= 3 * rate.period


def test_a_read_given_up_leaves_no_held_request() -> None:
    async def scenario() -> tuple[int, int]:
        source = EntropySource("dom", RateLimit(16, 60.0))
        assert len(await source.read(16)) == 16
        reader = asyncio.ensure_future(source.read(16))
        await asyncio.sleep(0)  # the reader runs until it waits for the next window
        held_while_waiting = source.held
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
        return held_while_waiting, source.held

    assert asyncio.run(scenario()) == (1, 0)


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


def test_virtio_rng_rate_limit_paces_requests_over_many_windows() -> None:
    rate = RateLimit(1024, 0.1)
    with Loopback(create_rng_device({"rate": "1024/100ms"}, name="dom")) as lb:
        start = time.monotonic()
        heads = [lb.submit(0, [], [256]) for _ in range(40)]  # ten windows' worth
        got = []
        while len(got) < len(heads):
            got.extend(lb.wait_used(0, 1, timeout=TIMEOUT))
            seen = time.monotonic() - start  # no earlier than the completions it saw
            assert sum(used.written for used in got) <= windows_opened(seen, rate) * rate.max_bytes
        elapsed = time.monotonic() - start
    assert sorted(used.head for used in got) == sorted(heads)
    assert all(used.written == 256 for used in got), "a held request was answered short or with 0 bytes"
    assert elapsed >= 9 * rate.period  # the tenth window opens nine periods after the first


def test_virtio_rng_holds_what_the_window_cannot_give() -> None:
    with Loopback(create_rng_device({"rate": "1024/60s"}, name="dom")) as lb:
        heads = [lb.submit(0, [], [256]) for _ in range(8)]
        used = lb.wait_used(0, 4, timeout=TIMEOUT)
        assert [u.head for u in used] == heads[:4]
        assert all(u.written == 256 for u in used)
        wait_until(lambda: lb.run_in_loop(lambda: lb.device.source.held) == 4)
        assert lb.run_in_loop(lambda: lb.device.source.bytes_delivered) == 1024


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


