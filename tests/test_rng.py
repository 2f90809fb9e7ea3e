"""The rng engine: private entropy per domain, the rate limit, and virtio-rng over the loopback."""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
import types
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pvcore.contract import DeviceClass, DeviceConfig
from pvcore.devices import classes
from pvcore.devices.rng import (
    MAX_REQUEST_BYTES,
    EntropySource,
    EntropySources,
    RateLimit,
    create_rng_device,
    entropy_sources,
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



# --- one rate limit per domain ------------------------------------------------------------


def rng_class() -> DeviceClass:
    """The rng device class exactly as the daemon builds devices with it."""
    (device_class,) = classes.rng.pvcore_device_classes()
    return device_class


def rng_config(name: str, domain: str, rate: str | None = None) -> DeviceConfig:
    options = {"domain": domain, **({"rate": rate} if rate else {})}
    return DeviceConfig("rng", name, options)


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """An event loop on a thread of its own, shared by every device of a test, as in the daemon."""
    running = asyncio.new_event_loop()
    thread = threading.Thread(target=running.run_forever, name="rng-test-loop", daemon=True)
    thread.start()
    yield running
    running.call_soon_threadsafe(running.stop)
    thread.join()
    running.close()


@pytest.fixture
def context(tmp_path: Path, loop: asyncio.AbstractEventLoop) -> Any:
    """What of a DaemonContext the rng class uses: the loop its devices run on (and a run dir)."""
    return types.SimpleNamespace(run_dir=tmp_path, loop=loop)


def in_loop(loop: asyncio.AbstractEventLoop, fn: Callable[[], Any]) -> Any:
    """``fn()`` run on ``loop``'s thread (awaited when it is a coroutine function)."""

    async def call() -> Any:
        result = fn()
        return await result if asyncio.iscoroutine(result) else result

    return asyncio.run_coroutine_threadsafe(call(), loop).result(TIMEOUT)


def test_two_rng_devices_of_one_domain_share_its_rate_limit(context: Any) -> None:
    domain = f"vm-{uuid.uuid4().hex[:8]}"
    rng = rng_class()
    first = rng.create(rng_config(f"{domain}-rng0", domain, "1024/60s"), context)
    second = rng.create(rng_config(f"{domain}-rng1", domain, "1024/60s"), context)
    other = rng.create(rng_config("other-rng0", f"{domain}-other", "1024/60s"), context)
    assert first.engine is second.engine
    assert entropy_sources.users(domain) == 2
    with Loopback(first.virtio, name="rng0", loop=context.loop) as lb_first, Loopback(
        second.virtio, name="rng1", loop=context.loop
    ) as lb_second, Loopback(other.virtio, name="other", loop=context.loop) as lb_other:
        assert lb_first.request(0, [], [1024]).written == 1024  # the domain's whole window
        lb_second.submit(0, [], [64])
        wait_until(lambda: in_loop(context.loop, lambda: second.engine.held) == 1)
        assert lb_other.request(0, [], [1024]).written == 1024  # another domain has its own window
    for device in (first, second, other):
        in_loop(context.loop, device.close)
    assert entropy_sources.users(domain) == 0
    renewed = rng.create(rng_config(f"{domain}-rng0", domain, "64/1s"), context)
    assert renewed.engine is not first.engine and renewed.engine.rate == RateLimit(64, 1.0)
    in_loop(context.loop, renewed.close)


def test_the_source_outlives_all_but_the_last_of_its_devices(context: Any) -> None:
    domain = f"vm-{uuid.uuid4().hex[:8]}"
    rng = rng_class()
    first = rng.create(rng_config(f"{domain}-rng0", domain, "64/60s"), context)
    second = rng.create(rng_config(f"{domain}-rng1", domain, "64/60s"), context)
    source = first.engine
    with Loopback(second.virtio, name="rng1", loop=context.loop) as lb_second:
        with Loopback(first.virtio, name="rng0", loop=context.loop) as lb_first:
            assert lb_first.request(0, [], [64]).written == 64
            lb_first.submit(0, [], [16])
            lb_second.submit(0, [], [16])
            wait_until(lambda: in_loop(context.loop, lambda: source.held) == 2)
        in_loop(context.loop, first.close)  # as the daemon does: the front door stops, then the device closes
        assert entropy_sources.users(domain) == 1
        assert in_loop(context.loop, lambda: source.held) == 1  # the other device's request still waits
    in_loop(context.loop, second.close)
    assert entropy_sources.users(domain) == 0
    assert source.held == 0


def test_rng_devices_of_one_domain_must_ask_for_the_same_rate(context: Any) -> None:
    domain = f"vm-{uuid.uuid4().hex[:8]}"
    rng = rng_class()
    first = rng.create(rng_config(f"{domain}-rng0", domain, "4096/1s"), context)
    try:
        with pytest.raises(DeviceError, match=rf"rng {domain}-rng1: domain {domain} already has an rng with "
                                              r"rate=4096/1000ms.*give this one the same"):
            rng.create(rng_config(f"{domain}-rng1", domain, "1024/1s"), context)
        with pytest.raises(DeviceError, match="no rate= option was asked for"):
            rng.create(rng_config(f"{domain}-rng2", domain), context)
        assert entropy_sources.users(domain) == 1
    finally:
        in_loop(context.loop, first.close)
    assert entropy_sources.users(domain) == 0


def test_a_private_registry_counts_its_users() -> None:
    sources = EntropySources()
    first = create_rng_device({}, name="a0", domain="a", sources=sources)
    second = create_rng_device({}, name="a1", domain="a", sources=sources)
    alone = create_rng_device({}, name="b0", domain="b")
    assert first.source is second.source and alone.source is not first.source
    assert (sources.users("a"), sources.users("b")) == (2, 0)
    sources.release(alone.source)  # not from this registry: nothing happens
    sources.release(first.source)
    sources.release(second.source)
    assert sources.users("a") == 0
    assert create_rng_device({}, name="a0", domain="a", sources=sources).source is not first.source


def test_xen_rng_devices_of_one_domid_share_its_source(context: Any) -> None:
    domid = str(uuid.uuid4().int % 30000 + 1000)
    rng = rng_class()
    first = rng.create(rng_config("rng0", f"{domid}/2", "1024/1s"), context)  # xen: domain=DOMID/DEVID
    second = rng.create(rng_config("rng1", f"{domid}/3", "1024/1s"), context)
    assert first.engine is second.engine and entropy_sources.users(domid) == 2
    for device in (first, second):
        in_loop(context.loop, device.close)
    assert entropy_sources.users(domid) == 0
