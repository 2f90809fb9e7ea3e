"""The rng device engine: private host entropy for each domain, rate limited.

An :class:`EntropySource` belongs to one domain: every rng device of that
domain (two virtio-rng devices, an EGD socket beside them...) is served by
the same source, taken from the daemon's :data:`entropy_sources` registry, so
the rate limit is the domain's, not each device's. Every request is served by
a fresh call to :func:`os.getrandom` whose result goes straight to that
request's consumer (the guest buffer of a virtio-rng request, later an EGD
reply or a FIFO write); no buffer is ever kept or shared between requests or
domains, and entropy bytes are never logged, not even at debug level.

Rate limit (QEMU's ``rng`` ``max-bytes``/``period``): a *fixed window*, as
QEMU does it. The first request after an idle spell opens a window of
``period`` seconds in which at most ``max_bytes`` are handed out; a request
that finds the window's quota spent is held (not answered with zero bytes)
until the next window opens, which happens when the current one ends. A
consumer therefore receives at most ``max_bytes`` in any window, and at most
``(ceil(T / period) + 1) * max_bytes`` in any interval of ``T`` seconds. A
request larger than what is left of the quota is served partially at once
(as virtio-rng allows: the device reports how many bytes it wrote).

Everything runs on the daemon's asyncio event loop; :meth:`EntropySource.request`,
:meth:`EntropySource.read` and the registry must be called from that loop's thread.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import os
import re
from collections.abc import Callable, Mapping

import attrs

from pvcore.ring.memory import GuestMemoryError
from pvcore.ring.session import RunningQueue
from pvcore.ring.virtqueue import DescriptorChain
from pvcore.virtio import VIRTIO_ID_RNG, DeviceError, VirtioDevice

log = logging.getLogger("pvcore.rng")

MAX_REQUEST_BYTES = 64 * 1024
"""The most entropy one request receives, whatever buffer size the consumer offered."""

OPTIONS = {
    "rate": (
        "at most BYTES per PERIOD (ms or s) for the whole domain, e.g. 4096/1s or 1024/100ms (default unlimited); "
        "the rng devices of one domain share the limit and must give the same rate"
    )
}
"""Every option :func:`create_rng_device` accepts, with what it means."""

MAX_RATE_BYTES = 1 << 32
MAX_RATE_PERIOD = 3600.0

_RATE_SYNTAX = re.compile(r"(?P<bytes>[0-9]+)/(?P<number>[0-9]+(?:\.[0-9]+)?)(?P<unit>[a-z]*)")
_PERIOD_UNITS = {"ms": 0.001, "s": 1.0}


@attrs.frozen
class RateLimit:
    """At most ``max_bytes`` of entropy per fixed window of ``period`` seconds."""

    max_bytes: int = attrs.field(validator=[attrs.validators.ge(1), attrs.validators.le(MAX_RATE_BYTES)])
    period: float = attrs.field(validator=[attrs.validators.gt(0.0), attrs.validators.le(MAX_RATE_PERIOD)])

    @classmethod
    def parse(cls, text: str) -> RateLimit:
        """Parse ``BYTES/PERIOD`` such as ``4096/1s`` or ``1024/100ms``; bad syntax is a :class:`DeviceError`."""
        match = _RATE_SYNTAX.fullmatch(text.strip())
        if match is None:
            raise DeviceError(
                f"rate {text!r}: expected BYTES/PERIOD with a period unit of ms or s, e.g. rate=4096/1s or rate=1024/100ms"
            )
        unit = match["unit"]
        if unit not in _PERIOD_UNITS:
            what = "has no unit" if not unit else f"has unit {unit!r}"
            raise DeviceError(f"rate {text!r}: the period {what}; write it in ms or s, e.g. rate=1024/100ms")
        max_bytes = int(match["bytes"])
        period = float(match["number"]) * _PERIOD_UNITS[unit]
        if not 1 <= max_bytes <= MAX_RATE_BYTES:
            raise DeviceError(f"rate {text!r}: the byte count must be between 1 and {MAX_RATE_BYTES}")
        if not 0 < period <= MAX_RATE_PERIOD:
            raise DeviceError(f"rate {text!r}: the period must be more than 0 and at most {MAX_RATE_PERIOD:g}s")
        return cls(max_bytes, period)

    def __str__(self) -> str:
        return f"{self.max_bytes}/{self.period * 1000:g}ms"


@attrs.define(eq=False)
class EntropyRequest:
    """One consumer's request for up to ``size`` bytes, possibly held by the rate limit.

    ``deliver`` receives the bytes exactly once, unless the request is
    cancelled first. The request never stores the bytes.
    """

    size: int
    deliver: Callable[[bytes], None] = attrs.field(repr=False)
    done: bool = False
    cancelled: bool = False

    def cancel(self) -> None:
        """Give up the request: ``deliver`` will not be called (no-op once done)."""
        if not self.done:
            self.cancelled = True


class EntropySource:
    """One domain's entropy: fresh :func:`os.getrandom` bytes per request, rate limited.

    ``rate`` None means unlimited. Counters (``bytes_delivered``,
    ``requests``) are kept; the bytes themselves never are.
    """

    def __init__(self, name: str, rate: RateLimit | None = None) -> None:
        self.name = name
        self.rate = rate
        self.bytes_delivered = 0
        self.requests = 0
        self._held: collections.deque[EntropyRequest] = collections.deque()
        self._window_end = 0.0
        self._quota = 0
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def __repr__(self) -> str:
        return f"EntropySource({self.name!r}, rate={self.rate!s})"

    @property
    def held(self) -> int:
        """How many requests are waiting for the next rate window."""
        return sum(1 for request in self._held if not request.cancelled)

    def request(self, size: int, deliver: Callable[[bytes], None]) -> EntropyRequest:
        """Ask for up to ``size`` bytes (capped at :data:`MAX_REQUEST_BYTES`); ``deliver`` gets them.

        ``deliver`` is called before this returns when the rate allows it,
        otherwise from a timer on the event loop when the next window opens.
        It receives between 1 and ``size`` bytes.
        """
        if size < 1:
            raise ValueError(f"{self.name}: entropy request of {size} bytes (must be at least 1)")
        request = EntropyRequest(min(size, MAX_REQUEST_BYTES), deliver)
        self.requests += 1
        if not self._held:
            self._serve(request)
        if not request.done:
            self._held.append(request)
            self._arm_timer()
        return request

    async def read(self, size: int) -> bytes:
        """At most ``size`` fresh bytes, waiting for the rate limit if needed."""
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

        def deliver(data: bytes) -> None:
            if not future.done():
                future.set_result(data)

        request = self.request(size, deliver)
        try:
            return await future
        finally:
            request.cancel()

    def set_rate(self, rate: RateLimit | None) -> None:
        """Change the limit (None: unlimited); a new window opens at once and held requests are served under it."""
        self.rate = rate
        self._window_end = 0.0
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._held:
            self._next_window()

    def close(self) -> None:
        """Cancel every held request and the window timer."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for request in self._held:
            request.cancel()
        self._held.clear()

    def _allowance(self) -> int:
        if self.rate is None:
            return MAX_REQUEST_BYTES
        now = self._event_loop().time()
        if now >= self._window_end:
            self._window_end = now + self.rate.period
            self._quota = self.rate.max_bytes
        return self._quota

    def _serve(self, request: EntropyRequest) -> None:
        granted = min(request.size, self._allowance())
        if granted <= 0:
            return
        data = _getrandom(granted)
        if self.rate is not None:
            self._quota -= len(data)
        self.bytes_delivered += len(data)
        request.done = True
        try:
            request.deliver(data)
        except Exception:
            log.exception("%s: entropy consumer failed", self.name)

    def _arm_timer(self) -> None:
        if self._timer is not None or self.rate is None:
            return
        loop = self._event_loop()
        self._timer = loop.call_later(max(self._window_end - loop.time(), 0.0), self._next_window)

    def _next_window(self) -> None:
        self._timer = None
        while self._held:
            request = self._held[0]
            if not request.cancelled:
                self._serve(request)
                if not request.done:
                    break
            self._held.popleft()
        if self._held:
            self._arm_timer()

    def _event_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop


def _getrandom(size: int) -> bytes:
    """Exactly ``size`` fresh bytes from the kernel (getrandom may return fewer per call)."""
    data = os.getrandom(size)
    while len(data) < size:
        data += os.getrandom(size - len(data))
    return data


class EntropySources:
    """The daemon's entropy sources, one per domain, shared by every rng device of that domain.

    :meth:`acquire` hands out the domain's source (creating it on first use)
    and counts the device as a user; :meth:`release` drops that count, and the
    last release closes the source and forgets the domain. All the devices of
    a domain must ask for the same rate, since they share one limit.
    """

    def __init__(self) -> None:
        self._sources: dict[str, EntropySource] = {}
        self._users: dict[str, int] = {}

    def users(self, domain: str) -> int:
        """How many devices use ``domain``'s source now (0 when it has none)."""
        return self._users.get(domain, 0)

    def acquire(self, domain: str, rate: RateLimit | None) -> EntropySource:
        """Domain ``domain``'s source, counting one more user; :class:`DeviceError` if ``rate`` differs from its rate."""
        source = self._sources.get(domain)
        if source is None:
            source = self._sources[domain] = EntropySource(domain, rate)
            self._users[domain] = 0
        elif source.rate != rate:
            raise DeviceError(
                f"domain {domain} already has an rng with {_rate_option(source.rate)}, and all the rng devices "
                f"of a domain share one rate limit: give this one the same ({_rate_option(rate)} was asked for)"
            )
        self._users[domain] += 1
        return source

    def release(self, source: EntropySource) -> None:
        """One user of ``source`` is gone; the last one closes it (no-op for a source not in the registry)."""
        domain = source.name
        if self._sources.get(domain) is not source:
            return
        self._users[domain] -= 1
        if self._users[domain] == 0:
            del self._sources[domain], self._users[domain]
            source.close()


def _rate_option(rate: RateLimit | None) -> str:
    return "no rate= option" if rate is None else f"rate={rate}"


entropy_sources = EntropySources()
"""The daemon's per-domain entropy sources (the rng device class takes its sources from here)."""


class VirtioRng(VirtioDevice):
    """virtio-rng (device id 4): one requestq whose writable buffers are filled with entropy.

    A request is answered with as many bytes as the source's rate allows
    (at most :data:`MAX_REQUEST_BYTES`), or held until the next rate window.
    Held requests are completed with 0 bytes when their queue stops.
    """

    device_id = VIRTIO_ID_RNG

    def __init__(self, source: EntropySource) -> None:
        self.source = source
        self._held: dict[int, tuple[RunningQueue, DescriptorChain, EntropyRequest]] = {}

    def num_queues(self) -> int:
        """virtio-rng has the single requestq."""
        return 1

    def handle(self, queue: RunningQueue, chain: DescriptorChain) -> None:
        """Fill the chain's writable buffers with entropy (now or when the rate allows)."""
        size = chain.writable_len
        if size == 0:
            log.warning("%s: rng request %d has no writable buffer; completing it empty", self.source.name, chain.head)
            queue.complete(chain, 0)
            return
        request = self.source.request(size, functools.partial(self._deliver, queue, chain))
        if not request.done:
            self._held[chain.head] = (queue, chain, request)

    def _deliver(self, queue: RunningQueue, chain: DescriptorChain, data: bytes) -> None:
        self._held.pop(chain.head, None)
        if queue.session.broken:  # no guest buffer to fill: the bytes are dropped unseen
            return
        try:
            written = queue.write(chain, data)
        except GuestMemoryError as exc:
            queue.session.fail(f"rng request {chain.head}: {exc}")
            return
        queue.complete(chain, written)

    def queue_stopping(self, queue: RunningQueue) -> None:
        """Complete every held request of ``queue`` with 0 bytes."""
        for head, (held_queue, chain, request) in list(self._held.items()):
            if held_queue is queue:
                request.cancel()
                del self._held[head]
                queue.complete(chain, 0)

    def reset(self) -> None:
        """Forget held requests (their session is gone)."""
        for _, _, request in self._held.values():
            request.cancel()
        self._held.clear()


def create_rng_device(
    options: Mapping[str, str], *, name: str, domain: str | None = None, sources: EntropySources | None = None
) -> VirtioRng:
    """A :class:`VirtioRng` called ``name`` from ``options`` (``rate=BYTES/PERIOD``, optional).

    With ``sources`` the device is served by the source of ``domain`` (default
    ``name``) in that registry, shared with the domain's other rng devices; the
    caller gives it back with ``sources.release(device.source)`` once the
    device is closed. Without, the device gets a source of its own.
    """
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise DeviceError(f"rng {name}: unknown option(s) {', '.join(unknown)}; the rng device accepts rate=BYTES/PERIOD")
    rate_text = options.get("rate")
    try:
        rate = RateLimit.parse(rate_text) if rate_text else None
    except DeviceError as exc:
        raise DeviceError(f"rng {name}: {exc}") from None
    if sources is None:
        return VirtioRng(EntropySource(name, rate))
    try:
        return VirtioRng(sources.acquire(domain or name, rate))
    except DeviceError as exc:
        raise DeviceError(f"rng {name}: {exc}") from None
