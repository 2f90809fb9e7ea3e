"""Per-device I/O limits: leaky buckets shared by a throttle group, with the semantics of QEMU's throttle groups.

A :class:`ThrottleLimits` is a set of rates: ``iops``, ``iops-read``,
``iops-write`` (requests per second), ``bps``, ``bps-read``, ``bps-write``
(bytes per second), optionally a burst for the two totals (``iops-burst``,
``bps-burst``: the rate a device that was idle may run at for
``burst-length`` seconds, default 1). Each rate is a :class:`LeakyBucket`:
every request that goes pours its units (1 for an iops bucket, its bytes for a
bps bucket) into the bucket, which drains at the rate. A request may go while
the level of every bucket it pours into is at most the bucket's capacity, so a
request may overshoot and the ones after it wait for the overshoot to drain
(the long-run rate is exact, a big request is never refused). Without a burst
the capacity is a tenth of a second of the rate (``iops=500`` lets 50 requests
go at once after an idle spell); with one it is ``(burst - rate) *
burst-length``, and a second bucket draining at the burst rate (capacity a
tenth of a second of it) keeps the momentary rate at the burst rate.

A :class:`ThrottleGroup` owns one set of buckets; every device of the group
(a :class:`Throttle` each) spends from it, and a device without ``group=`` has
a group of its own. A request that may not go now waits in its device's queue
(one per direction, first come first served) and never fails. When the
buckets allow, queued requests go in round-robin order between the group's
devices, one request per turn, so a device that floods its queue gets its turn
like any other and cannot starve the rest of the group. A timer on the event
loop wakes the group when the first waiting request may go.

``pvcore_throttled_seconds_total`` (see docs/operations.md) is each device's
:meth:`Throttle.throttled_seconds`: wall-clock seconds during which at least
one of its requests was held back.
"""

from __future__ import annotations

import asyncio
import collections
import math
import threading
import time
from collections.abc import Callable, Mapping

import attrs

SLICE = 0.1
"""Seconds of a rate a bucket without a burst holds (and the burst bucket's capacity, in seconds of the burst rate)."""
MAX_RATE = 10**15
"""The highest rate any key takes (per second)."""
MAX_BURST_LENGTH = 3600.0
DEFAULT_BURST_LENGTH = 1.0

RATE_KEYS = ("iops", "iops-read", "iops-write", "bps", "bps-read", "bps-write")
BURST_KEYS = ("iops-burst", "bps-burst", "burst-length")
LIMIT_KEYS = RATE_KEYS + BURST_KEYS
"""Every key of a :class:`ThrottleLimits` (``group=`` is the device's, not the limits')."""

OPTIONS = {
    "iops": "requests per second, reads and writes together (default: no limit)",
    "iops-read": "read requests per second (default: no limit)",
    "iops-write": "write requests per second (writes, write-zeroes, discards; default: no limit)",
    "bps": "bytes per second, read and written together (default: no limit)",
    "bps-read": "bytes read per second (default: no limit)",
    "bps-write": "bytes written per second (default: no limit)",
    "iops-burst": "requests per second an idle device may reach for burst-length seconds (needs iops=, above it)",
    "bps-burst": "bytes per second an idle device may reach for burst-length seconds (needs bps=, above it)",
    "burst-length": f"seconds a burst may last (default {DEFAULT_BURST_LENGTH:g}; needs iops-burst= or bps-burst=)",
    "group": "throttle group name: devices naming one group share one budget, in turn (default: the device's own)",
}
"""Every throttle key a block device takes, with what it means."""

_SUFFIXES = {"": 1, "k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


class ThrottleError(ValueError):
    """Limits that cannot be used; the message names the key and the fix."""


def parse_rate(key: str, text: str) -> int:
    """A positive whole rate, optionally with a decimal suffix (``k``, ``M``, ``G``, ``T``): ``bps=50M``."""
    value = str(text).strip()
    suffix = value[-1:] if value[-1:] in _SUFFIXES else ""
    digits = value[: len(value) - len(suffix)]
    if not digits.isdigit():
        raise ThrottleError(f"{key}={text}: expected a positive whole number, optionally with k, M, G or T (e.g. {key}=500)")
    rate = int(digits) * _SUFFIXES[suffix]
    if not 0 < rate <= MAX_RATE:
        raise ThrottleError(f"{key}={text}: must be more than 0 and at most {MAX_RATE}; leave the key out for no limit")
    return rate


@attrs.frozen
class Cost:
    """What one request pours into the buckets: its direction, requests (0 or 1) and bytes."""

    write: bool
    ios: int = 1
    nbytes: int = 0


@attrs.frozen
class ThrottleLimits:
    """A set of rates (None: no limit on that one); see the module docstring for what each key means."""

    iops: float | None = None
    iops_read: float | None = None
    iops_write: float | None = None
    bps: float | None = None
    bps_read: float | None = None
    bps_write: float | None = None
    iops_burst: float | None = None
    bps_burst: float | None = None
    burst_length: float | None = None

    @classmethod
    def parse(cls, options: Mapping[str, str]) -> ThrottleLimits:
        """Limits from ``key: value`` text (only :data:`LIMIT_KEYS`); a :class:`ThrottleError` names the first bad key."""
        unknown = sorted(set(options) - set(LIMIT_KEYS))
        if unknown:
            raise ThrottleError(f"unknown limit {', '.join(unknown)}; limits: {', '.join(LIMIT_KEYS)}")
        values: dict[str, float] = {}
        for key in RATE_KEYS + BURST_KEYS[:2]:
            if key in options:
                values[key.replace("-", "_")] = parse_rate(key, options[key])
        if "burst-length" in options:
            text = str(options["burst-length"]).strip()
            try:
                length = float(text)
            except ValueError:
                length = math.nan
            if not 0 < length <= MAX_BURST_LENGTH:
                raise ThrottleError(f"burst-length={text}: expected seconds, more than 0 and at most {MAX_BURST_LENGTH:g}")
            values["burst_length"] = length
        limits = cls(**values)  # type: ignore[arg-type]
        limits.check()
        return limits

    @classmethod
    def parse_text(cls, text: str) -> ThrottleLimits:
        """Limits from ``key=value,...`` (``off`` or ``none``: no limits at all), as ``pvcore ctl set-limits`` sends them."""
        text = text.strip()
        if text in ("off", "none"):
            return cls()
        options: dict[str, str] = {}
        for item in text.split(","):
            key, eq, value = item.partition("=")
            key = key.strip()
            if not eq or not key:
                raise ThrottleError(f"limits {text!r}: {item!r} is not key=value (e.g. iops=500,bps=50M, or off)")
            if key in options:
                raise ThrottleError(f"limits {text!r}: {key} given twice")
            options[key] = value
        return cls.parse(options)

    def check(self) -> None:
        """Refuse a burst without its rate, a burst not above its rate, a burst-length without a burst."""
        for burst, rate, name in ((self.iops_burst, self.iops, "iops"), (self.bps_burst, self.bps, "bps")):
            if burst is None:
                continue
            if rate is None:
                raise ThrottleError(f"{name}-burst={burst} needs {name}= (the rate the burst is above)")
            if burst <= rate:
                raise ThrottleError(f"{name}-burst={burst} must be above {name}={rate}")
        if self.burst_length is not None and self.iops_burst is None and self.bps_burst is None:
            raise ThrottleError(f"burst-length={self.burst_length:g} needs iops-burst= or bps-burst=")

    @property
    def empty(self) -> bool:
        """Whether no rate is limited."""
        return all(getattr(self, key.replace("-", "_")) is None for key in RATE_KEYS)

    def as_options(self) -> dict[str, str]:
        """The limits as ``key: value`` text, the keys that are set only."""
        options: dict[str, str] = {}
        for key in LIMIT_KEYS:
            value = getattr(self, key.replace("-", "_"))
            if value is not None:
                options[key] = str(int(value)) if float(value).is_integer() else str(value)
        return options

    def __str__(self) -> str:
        return ",".join(f"{key}={value}" for key, value in self.as_options().items()) or "off"

    def buckets(self) -> list[tuple[LeakyBucket, bool | None, bool]]:
        """One bucket per rate, each with the direction it counts (None: both) and whether it counts bytes."""
        length = self.burst_length or DEFAULT_BURST_LENGTH
        made: list[tuple[LeakyBucket, bool | None, bool]] = []
        for rate, burst, direction, in_bytes in (
            (self.iops, self.iops_burst, None, False),
            (self.iops_read, None, False, False),
            (self.iops_write, None, True, False),
            (self.bps, self.bps_burst, None, True),
            (self.bps_read, None, False, True),
            (self.bps_write, None, True, True),
        ):
            if rate is not None:
                made.append((LeakyBucket(rate, burst, length), direction, in_bytes))
        return made


class LeakyBucket:
    """One rate: a level that requests raise and that drains at ``rate`` units per second.

    ``burst`` (above ``rate``) lets an idle device run at ``burst`` for
    ``burst_length`` seconds: the bucket then holds ``(burst - rate) *
    burst_length`` units, and a second level draining at ``burst`` (holding a
    :data:`SLICE` of it) caps the momentary rate. Without a burst the bucket
    holds a :data:`SLICE` of the rate.
    """

    __slots__ = ("rate", "burst", "capacity", "burst_capacity", "level", "burst_level")

    def __init__(self, rate: float, burst: float | None = None, burst_length: float = DEFAULT_BURST_LENGTH) -> None:
        if not rate > 0 or (burst is not None and not burst > rate) or not burst_length > 0:
            raise ValueError(f"bucket rate {rate}, burst {burst}, burst length {burst_length}: rate > 0, burst > rate")
        self.rate = rate
        self.burst = burst
        self.capacity = (burst - rate) * burst_length if burst is not None else rate * SLICE
        self.burst_capacity = burst * SLICE if burst is not None else 0.0
        self.level = 0.0
        self.burst_level = 0.0

    def __repr__(self) -> str:
        return f"LeakyBucket(rate={self.rate}, burst={self.burst}, level={self.level:.3f}/{self.capacity:.3f})"

    def leak(self, elapsed: float) -> None:
        """Drain for ``elapsed`` seconds."""
        level = self.level - self.rate * elapsed
        self.level = level if level > 0.0 else 0.0
        if self.burst is not None:
            level = self.burst_level - self.burst * elapsed
            self.burst_level = level if level > 0.0 else 0.0

    def wait(self) -> float:
        """Seconds until a request may pour into this bucket (0: now)."""
        wait = (self.level - self.capacity) / self.rate if self.level > self.capacity else 0.0
        if self.burst is not None and self.burst_level > self.burst_capacity:
            wait = max(wait, (self.burst_level - self.burst_capacity) / self.burst)
        return wait

    def pour(self, units: float) -> None:
        """A request that goes adds its ``units``."""
        self.level += units
        self.burst_level += units

    def take_back(self, units: float) -> None:
        """Take back ``units`` a request poured and did not use after all (never below empty)."""
        self.level = max(0.0, self.level - units)
        self.burst_level = max(0.0, self.burst_level - units)


Release = Callable[[], None]


@attrs.define(eq=False)
class _Waiter:
    cost: Cost
    release: Release
    loop: asyncio.AbstractEventLoop | None
    seq: int


class Throttle:
    """One device's share of a :class:`ThrottleGroup`: its queues of held-back requests and its throttled time."""

    def __init__(self, group: ThrottleGroup, name: str) -> None:
        self.group = group
        self.name = name
        self.queues: tuple[collections.deque[_Waiter], collections.deque[_Waiter]] = (
            collections.deque(),
            collections.deque(),
        )
        self._throttled = 0.0
        self._since: float | None = None

    def __repr__(self) -> str:
        return f"Throttle({self.name!r}, group {self.group.name!r})"

    @property
    def waiting(self) -> int:
        """Requests of this device held back now."""
        return len(self.queues[0]) + len(self.queues[1])

    def try_go(self, cost: Cost) -> bool:
        """Spend ``cost`` and say True if a request may go now, without waiting; False spends nothing."""
        return self.group.try_go(self, cost)

    def refund(self, cost: Cost) -> None:
        """Give back what :meth:`try_go` spent for a request that did not go after all."""
        self.group.refund(cost)

    def go(self, cost: Cost, release: Release, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Let a request of ``cost`` go: ``release()`` runs now if it may, else once its turn comes.

        ``loop`` is the event loop whose timer wakes the group (default: the
        running one). ``release`` runs on that loop, or on the calling thread
        of :meth:`release_all`; it must not raise.
        """
        self.group.enqueue(self, cost, release, loop or asyncio.get_running_loop())

    async def turn(self, cost: Cost) -> None:
        """Wait until a request of ``cost`` may go (and count it)."""
        if self.group.try_go(self, cost):
            return
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self.group.enqueue(self, cost, lambda: done.done() or done.set_result(None), loop)
        await done

    def throttled_seconds(self) -> float:
        """Wall-clock seconds during which at least one request of this device was held back."""
        return self.group.throttled_seconds(self)

    def release_all(self) -> None:
        """Let every held-back request of this device go at once (a closing device finishes its requests)."""
        self.group.release_all(self)

    def leave(self) -> None:
        """Leave the group (held-back requests go first); the group ends with its last device."""
        self.release_all()
        self.group.remove(self)


class Pacer:
    """One direction of a device's rate, for a front door that sends its frames in order, one at a time.

    Before each frame the door asks :meth:`may_go`: True spends the frame's
    bytes and lets it go now; False means it waits, and ``retry`` runs (on
    ``loop``) when its turn comes, after which :meth:`may_go` for that frame
    is True without spending again. While a frame waits, every ask is False.
    :meth:`reset` forgets a wait (a disconnect): its turn then retries nothing.
    No ``throttle``: every frame goes.
    """

    def __init__(self, throttle: Throttle | None, *, write: bool) -> None:
        self.throttle = throttle
        self.write = write
        self._paid = False
        self._waiting = False
        self._generation = 0

    def may_go(self, nbytes: int, retry: Release, loop: asyncio.AbstractEventLoop) -> bool:
        """Whether a frame of ``nbytes`` may go now; if not, ``retry()`` runs when it may."""
        if self.throttle is None or self._paid:
            self._paid = False
            return True
        if self._waiting:
            return False
        cost = Cost(self.write, 0, nbytes)
        if self.throttle.try_go(cost):
            return True
        self._waiting = True
        generation = self._generation

        def turn() -> None:
            if generation == self._generation:
                self._waiting, self._paid = False, True
                retry()

        self.throttle.go(cost, turn, loop)
        return False

    def reset(self) -> None:
        """Forget the frame that waits or was paid for; a turn still to come retries nothing."""
        self._generation += 1
        self._paid = self._waiting = False


class ThrottleGroup:
    """One budget of :class:`ThrottleLimits` shared in turn by the devices (:class:`Throttle`) of the group.

    ``clock`` is the monotonic clock the buckets drain by. Thread-safe: the
    block engine asks from its event loop and closes from another thread.
    """

    def __init__(self, name: str, limits: ThrottleLimits, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.limits = limits
        self.members: list[Throttle] = []
        self._clock = clock
        self._lock = threading.Lock()
        self._set_buckets(limits)
        self._last = clock()
        self._turn = 0
        self._seq = 0
        self._waiting = 0
        self._timer: asyncio.TimerHandle | None = None

    def __repr__(self) -> str:
        return f"ThrottleGroup({self.name!r}, {self.limits}, {len(self.members)} device(s))"

    def join(self, name: str) -> Throttle:
        """A new device's share of this group."""
        member = Throttle(self, name)
        with self._lock:
            self.members.append(member)
        return member

    def remove(self, member: Throttle) -> None:
        """Take a device (with nothing held back) out of the group."""
        with self._lock:
            if member in self.members:
                self.members.remove(member)
            self._turn = 0

    def set_limits(self, limits: ThrottleLimits) -> None:
        """Replace the limits of every device of the group; held-back requests are measured by the new ones."""
        with self._lock:
            self.limits = limits
            self._set_buckets(limits)
            self._last = self._clock()
        self.pump()

    def _set_buckets(self, limits: ThrottleLimits) -> None:
        """New empty buckets, and for each direction the ones it pours into (caller holds the lock)."""
        made = limits.buckets()
        self._buckets = [bucket for bucket, _, _ in made]
        self._poured: tuple[list[tuple[LeakyBucket, bool]], list[tuple[LeakyBucket, bool]]] = tuple(  # type: ignore[assignment]
            [(bucket, in_bytes) for bucket, direction, in_bytes in made if direction is None or direction is write]
            for write in (False, True)
        )

    def _drain(self) -> float:
        now = self._clock()
        elapsed = now - self._last
        if elapsed > 0:
            for bucket in self._buckets:
                bucket.leak(elapsed)
            self._last = now
        return now

    def _wait(self, cost: Cost) -> float:
        wait = 0.0
        for bucket, in_bytes in self._poured[cost.write]:
            if (cost.nbytes if in_bytes else cost.ios) and (bucket.level > bucket.capacity or bucket.burst is not None):
                bucket_wait = bucket.wait()
                if bucket_wait > wait:
                    wait = bucket_wait
        return wait

    def _pour(self, cost: Cost) -> None:
        for bucket, in_bytes in self._poured[cost.write]:
            units = cost.nbytes if in_bytes else cost.ios
            if units:
                bucket.pour(units)

    def try_go(self, member: Throttle, cost: Cost) -> bool:
        """Spend ``cost`` and say True if it may go now: nobody in the group is held back and the
        buckets allow it. False spends nothing."""
        with self._lock:
            if self._waiting:
                return False
            if not self._buckets:
                return True
            self._drain()
            if self._wait(cost):
                return False
            self._pour(cost)
            return True

    def refund(self, cost: Cost) -> None:
        """Take back a request :meth:`try_go` let go that did not go after all."""
        with self._lock:
            for bucket, in_bytes in self._poured[cost.write]:
                bucket.take_back(cost.nbytes if in_bytes else cost.ios)

    def enqueue(self, member: Throttle, cost: Cost, release: Release, loop: asyncio.AbstractEventLoop | None) -> None:
        """Hold a request back in ``member``'s queue, then let go what may go now (see :meth:`pump`)."""
        with self._lock:
            self._seq += 1
            queue = member.queues[cost.write]
            queue.append(_Waiter(cost, release, loop, self._seq))
            self._waiting += 1
            if member._since is None:
                member._since = self._clock()
        self.pump()

    def pump(self) -> None:
        """Release, in round-robin order between devices, every held-back request the buckets allow now;
        set the timer for the next one."""
        released: list[_Waiter] = []
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if not self._waiting:
                return
            now = self._drain()
            count = len(self.members)
            while self._waiting:
                for step in range(count):
                    index = (self._turn + step) % count
                    waiter = self._head_that_may_go(self.members[index])
                    if waiter is not None:
                        self._pour(waiter.cost)
                        self._waiting -= 1
                        released.append(waiter)
                        self._turn = (index + 1) % count
                        self._settle(self.members[index], now)
                        break
                else:
                    break
            self._arm()
        for waiter in released:
            waiter.release()

    def _head_that_may_go(self, member: Throttle) -> _Waiter | None:
        """The older of a device's two queue heads that may go now, popped (caller holds the lock)."""
        heads = sorted((queue for queue in member.queues if queue), key=lambda queue: queue[0].seq)
        for queue in heads:
            if self._wait(queue[0].cost) == 0.0:
                return queue.popleft()
        return None

    def _settle(self, member: Throttle, now: float) -> None:
        """Close a device's throttled spell once nothing of it is held back (caller holds the lock)."""
        if member._since is not None and not member.waiting:
            member._throttled += now - member._since
            member._since = None

    def _arm(self) -> None:
        """Wake the group when the first held-back request may go (caller holds the lock)."""
        soonest: float | None = None
        loop: asyncio.AbstractEventLoop | None = None
        for member in self.members:
            for queue in member.queues:
                if queue:
                    wait = self._wait(queue[0].cost)
                    if soonest is None or wait < soonest:
                        soonest, loop = wait, queue[0].loop
        if soonest is not None and loop is not None and not loop.is_closed():
            self._timer = loop.call_later(soonest, self.pump)

    def release_all(self, member: Throttle) -> None:
        """Let every held-back request of ``member`` go now, spending nothing (on the calling thread)."""
        with self._lock:
            released = [*member.queues[0], *member.queues[1]]
            released.sort(key=lambda waiter: waiter.seq)
            member.queues[0].clear()
            member.queues[1].clear()
            self._waiting -= len(released)
            self._settle(member, self._clock())
        for waiter in released:
            waiter.release()

    def throttled_seconds(self, member: Throttle) -> float:
        """``member``'s throttled time so far, the current spell included."""
        with self._lock:
            spell = self._clock() - member._since if member._since is not None else 0.0
            return member._throttled + spell


class ThrottleGroups:
    """The named throttle groups of one daemon; a group ends with its last device."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._groups: dict[str, ThrottleGroup] = {}
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        """The groups that have devices."""
        with self._lock:
            return sorted(self._groups)

    def check(self, group: str | None, limits: ThrottleLimits) -> None:
        """Raise :class:`ThrottleError` if a device could not join ``group`` with ``limits`` (nothing changes)."""
        if group is None:
            return
        with self._lock:
            existing = self._groups.get(group)
        if existing is None:
            if limits.empty:
                raise ThrottleError(f"group={group}: a new group needs its limits on its first device (e.g. iops=500)")
        elif not limits.empty and limits != existing.limits:
            members = ", ".join(member.name for member in existing.members)
            raise ThrottleError(
                f"group={group}: limits {limits} differ from the group's {existing.limits} (devices {members}); "
                "give the same limits, or none to take the group's"
            )

    def join(self, name: str, limits: ThrottleLimits, group: str | None = None) -> Throttle | None:
        """The throttle of device ``name``: in ``group`` if named (checked as :meth:`check` does), else its own.

        None for a device with neither limits nor a group: it is not throttled.
        """
        self.check(group, limits)
        if group is None:
            return ThrottleGroup(name, limits, clock=self._clock).join(name) if not limits.empty else None
        with self._lock:
            existing = self._groups.get(group)
            if existing is None:
                existing = self._groups[group] = _RegisteredGroup(group, limits, clock=self._clock, owner=self)
        return existing.join(name)

    def _forget(self, group: ThrottleGroup) -> None:
        with self._lock:
            if self._groups.get(group.name) is group:
                del self._groups[group.name]


class _RegisteredGroup(ThrottleGroup):
    """A named group that leaves its registry when its last device leaves."""

    def __init__(self, name: str, limits: ThrottleLimits, *, clock: Callable[[], float], owner: ThrottleGroups) -> None:
        super().__init__(name, limits, clock=clock)
        self._owner = owner

    def remove(self, member: Throttle) -> None:
        """Take a device out; forget the group when it was the last."""
        super().remove(member)
        if not self.members:
            self._owner._forget(self)


def limits_from_options(options: Mapping[str, str]) -> tuple[ThrottleLimits, str | None]:
    """The limits and group among a device's options (other keys are ignored)."""
    limits = ThrottleLimits.parse({key: value for key, value in options.items() if key in LIMIT_KEYS})
    group = options.get("group")
    if group is not None:
        group = group.strip()
        if not group or not group.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise ThrottleError(f"group={options['group']!r}: a group name is letters, digits, '_', '.' or '-'")
    return limits, group


throttle_groups = ThrottleGroups()
"""The throttle groups of this process's daemon."""
