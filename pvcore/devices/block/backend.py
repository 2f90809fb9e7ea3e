"""The block engine every front door shares: requests, priorities, barriers, I/O threads.

:class:`BlockBackend` knows nothing of virtio or NBD. A front door builds a
:class:`BlockRequest` (guest buffers as memoryviews, so reads and writes go
between the backing store and guest memory without a copy) and first offers
it to :meth:`BlockBackend.serve_now`, which does a small read at once when
none of the device's requests waits for a thread (those already running on
one do not count), or a small write on an idle device, when the page cache
can serve it without waiting;
otherwise it calls :meth:`BlockBackend.submit` from its event loop, and the
callback gets a :class:`BlockResult` back on that same loop.

Scheduling: the I/O threads are the process's, shared by every device
(:mod:`~pvcore.devices.block.iopool`: started on demand up to a bound set by the
CPUs, ended when idle, devices served in turns so that none starves another).
A backend keeps its own priority queue and runs at most ``workers`` of its
requests at once; each turn the pool gives it runs the first of its queue. A request's priority is its Linux ioprio counted in steps
(:func:`ioprio_steps`; the value comes from the guest, so :func:`ioprio_rank`
clamps it): RT levels 0-7 are steps 0-7, BE levels 0-7 steps 8-15, IDLE step
16. Fewer steps run first, equal ones first come first served. Priorities age
so that none starves: a queued request's effective rank is
``steps - waited / ageing`` (``ageing`` is :data:`AGEING_QUANTUM`, 50 ms,
unless the backend is given another), so a request runs no later than one
``k`` steps more urgent that was submitted ``k * ageing`` seconds after it.
As ``waited`` is ``now - submitted_at`` for every queued request, that order
is the order of the fixed key ``submitted_at + steps * ageing``, computed once
at submission: the hot path stays one heap push and one pop. Under a constant
BE level 4 load (step 12) an IDLE request thus runs before every BE request
submitted more than ``4 * ageing`` = 0.2 s after it, instead of never; a
FLUSH keeps the guest's priority and ages the same way.

A FLUSH is a barrier: it waits until every request submitted before it has
finished, then ``fdatasync``\\ s; requests submitted after it do not wait for
it. In writethrough mode, and for a write with ``fua``, the data is durable
before the request completes. :meth:`BlockBackend.close` finishes every queued
request and then ``fdatasync``\\ s a writable store, so writes acknowledged
in writeback mode are on stable storage once a daemon has shut down.

Media change: :meth:`BlockBackend.swap_store` puts another store of the same
size in place of the current one with no request in flight at the switch:
new requests are held (not failed), those in flight finish, the old store is
flushed, the new one takes its place and the held requests run against it.

Limits (:mod:`pvcore.throttle`): a backend given a :class:`Throttle` holds a
checked request back until its throttle group lets it go, then queues it as
above; a held-back request counts as in flight, keeps its submission time for
ageing and service time, and is never failed for waiting. Reads are the read
direction; writes, write-zeroes, discards and flushes the write direction, so a
FLUSH keeps its place behind held-back writes. A READ or WRITE counts one
request and its bytes, a WRITE_ZEROES or DISCARD one request, a FLUSH nothing.
:meth:`BlockBackend.serve_now` serves inline only what the group lets go at
once. :meth:`BlockBackend.close` and :meth:`BlockBackend.swap_store` let every
held-back request go first, to the store it was sent for.

Extent maps (:mod:`~pvcore.devices.block.extents`): a :attr:`BlockOp.MAP`
request asks which parts of a range are data and which are holes, and a
``sparse`` READ reads only the data; both answer with the range's extents in
:attr:`BlockResult.extents`. They are checked, limited, counted (``maps``; a
sparse read's ``bytes_read`` is the data it read) and queued like any other
request; a MAP costs its throttle group one read request and no bytes.

Guest-chosen offsets and lengths are checked here before any I/O: a bad one
produces an error result, never an exception in the caller's loop.
"""

from __future__ import annotations

import asyncio
import enum
import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence

import attrs

from pvcore.devices.block.extents import Extent, read_mapped
from pvcore.devices.block.iopool import IOPool, shared_pool
from pvcore.devices.block.store import RawFileStore
from pvcore.service_time import ServiceTimeHistogram, ServiceTimes
from pvcore.throttle import Cost, Throttle

log = logging.getLogger("pvcore.block")

SECTOR_SIZE = 512
MAX_WORKERS = 64
INLINE_MAX_BYTES = 128 * 1024
"""Largest read or write served on the event-loop thread (page-cache hits while no request of the device waits)."""

IOPRIO_CLASS_NONE = 0
IOPRIO_CLASS_RT = 1
IOPRIO_CLASS_BE = 2
IOPRIO_CLASS_IDLE = 3
IOPRIO_CLASS_SHIFT = 13
IOPRIO_LEVEL_MASK = (1 << IOPRIO_CLASS_SHIFT) - 1
IOPRIO_BE_DEFAULT_LEVEL = 4
IOPRIO_LOWEST_LEVEL = 7
AGEING_QUANTUM = 0.05
"""Seconds of waiting that raise a queued request's priority by one step (see the module docstring)."""


class BlockOp(enum.Enum):
    """What a request does."""

    __hash__ = object.__hash__  # members are singletons; Enum's own hash runs Python code per request

    READ = "read"
    WRITE = "write"
    FLUSH = "flush"
    DISCARD = "discard"
    WRITE_ZEROES = "write-zeroes"
    MAP = "map"


class CacheMode(enum.Enum):
    """Whether a completed write is durable at once (writethrough) or after a FLUSH (writeback)."""

    WRITEBACK = "writeback"
    WRITETHROUGH = "writethrough"


class BlockStatus(enum.Enum):
    """How a request ended; front doors map these to their wire codes."""

    OK = "ok"
    IO_ERROR = "I/O error"
    UNSUPPORTED = "unsupported"
    READ_ONLY = "read-only"
    OUT_OF_RANGE = "out of range"
    INVALID = "invalid"


def ioprio(klass: int, level: int = 0) -> int:
    """The Linux ioprio value ``class << 13 | level``."""
    return (klass << IOPRIO_CLASS_SHIFT) | (level & IOPRIO_LEVEL_MASK)


def ioprio_rank(value: int) -> tuple[int, int]:
    """Sort key of a Linux ioprio value: smaller runs first.

    RT levels 0-7 come first, then BE levels 0-7, then IDLE. Class NONE (0) is
    BE level 4, as in Linux; an unknown class is treated as NONE and a level
    above 7 as 7, because the value comes from the guest.
    """
    klass = (value >> IOPRIO_CLASS_SHIFT) & 0x7
    level = min(value & IOPRIO_LEVEL_MASK, IOPRIO_LOWEST_LEVEL)
    if klass == IOPRIO_CLASS_RT:
        return (0, level)
    if klass == IOPRIO_CLASS_BE:
        return (1, level)
    if klass == IOPRIO_CLASS_IDLE:
        return (2, 0)
    return (1, IOPRIO_BE_DEFAULT_LEVEL)


def ioprio_steps(value: int) -> int:
    """A Linux ioprio value as priority steps, 0 (RT level 0) to 16 (IDLE); fewer runs first.

    The flat form of :func:`ioprio_rank`, for ageing: RT levels are steps
    0-7, BE levels steps 8-15, IDLE step 16.
    """
    klass, level = ioprio_rank(value)
    return klass * (IOPRIO_LOWEST_LEVEL + 1) + level


@attrs.frozen(eq=False)
class BlockRequest:
    """One I/O request.

    ``buffers`` are filled (READ) or written out (WRITE) in order; their total
    length must equal ``length``. A READ may instead name ``pipe``, the
    write end of a pipe with room for ``length`` bytes, and no buffers: the
    data is spliced into it from the page cache (see
    :meth:`~pvcore.devices.block.store.RawFileStore.splice_to`; a stream door
    then splices it on to its socket). ``priority`` is a Linux ioprio value.
    ``fua`` makes a write durable before completion; ``may_unmap`` lets
    WRITE_ZEROES deallocate the range. A ``sparse`` READ reads only the
    data extents of its range (into the buffers at their places, or one after
    the other into the pipe) and leaves the buffers over holes as they are;
    its result lists the extents, except when :meth:`BlockBackend.serve_now`
    served it whole.
    """

    op: BlockOp
    offset: int = 0
    length: int = 0
    buffers: Sequence[memoryview] = ()
    priority: int = 0
    fua: bool = False
    may_unmap: bool = False
    pipe: int = -1
    sparse: bool = False


@attrs.frozen
class BlockResult:
    """A request's outcome: status, bytes moved, a reason when it failed, a MAP's or sparse READ's extents."""

    status: BlockStatus
    transferred: int = 0
    message: str = ""
    errno: int = 0
    extents: Sequence[Extent] = ()

    @property
    def ok(self) -> bool:
        """Whether the request succeeded."""
        return self.status is BlockStatus.OK


Callback = Callable[[BlockResult], None]


@attrs.define
class BlockCounters:
    """Totals since the backend was created; ``in_flight`` is submitted but not yet completed."""

    requests: int = 0
    reads: int = 0
    writes: int = 0
    flushes: int = 0
    discards: int = 0
    write_zeroes: int = 0
    maps: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    errors: int = 0
    in_flight: int = 0


_OP_COUNTER = {
    BlockOp.READ: "reads",
    BlockOp.WRITE: "writes",
    BlockOp.FLUSH: "flushes",
    BlockOp.DISCARD: "discards",
    BlockOp.WRITE_ZEROES: "write_zeroes",
    BlockOp.MAP: "maps",
}


def request_cost(request: BlockRequest) -> Cost:
    """What ``request`` spends from its throttle group (see the module docstring)."""
    op = request.op
    if op is BlockOp.READ:
        return Cost(False, 1, request.length)
    if op is BlockOp.MAP:
        return Cost(False, 1, 0)
    if op is BlockOp.WRITE:
        return Cost(True, 1, request.length)
    if op is BlockOp.FLUSH:
        return Cost(True, 0, 0)
    return Cost(True, 1, 0)


@attrs.define(eq=False)
class _Job:
    request: BlockRequest
    callback: Callback
    loop: asyncio.AbstractEventLoop
    seq: int
    key: float
    started: float


class SwapError(Exception):
    """A store could not be swapped in; nothing changed and the old store serves on."""


class BlockBackend:
    """A backing store served by the shared I/O threads with ageing priorities and flush barriers.

    ``workers`` is the most requests of this device the threads of ``pool``
    (the process's :func:`~pvcore.devices.block.iopool.shared_pool` unless
    given) run at once. ``ageing`` is the seconds of waiting worth one
    priority step, and ``clock`` the monotonic clock that measures it (see the
    module docstring). ``throttle`` (also settable later, :attr:`throttle`)
    limits its requests. ``inline_writes`` False keeps writes off the
    calling thread even on an idle device (:meth:`serve_now`): for a file
    other processes write too (an export spread over workers), whose inode
    lock a write on the event loop could wait for.
    """

    def __init__(
        self,
        store: RawFileStore,
        *,
        cache: CacheMode = CacheMode.WRITEBACK,
        workers: int = 4,
        name: str = "block",
        ageing: float = AGEING_QUANTUM,
        clock: Callable[[], float] = time.monotonic,
        throttle: Throttle | None = None,
        pool: IOPool | None = None,
        inline_writes: bool = True,
    ) -> None:
        if not 1 <= workers <= MAX_WORKERS:
            raise ValueError(f"{name}: workers={workers} must be between 1 and {MAX_WORKERS}")
        if not ageing > 0:
            raise ValueError(f"{name}: ageing={ageing} must be a positive number of seconds")
        self.store = store
        self.cache = cache
        self.name = name
        self.inline_writes = inline_writes
        self._ageing = ageing
        self._clock = clock
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._ready: list[tuple[float, int, _Job]] = []
        self._unfinished: list[int] = []
        self._finished: set[int] = set()
        self._barriers: list[_Job] = []
        self._completed: dict[asyncio.AbstractEventLoop, list[tuple[Callback, BlockResult]]] = {}
        self._seq = itertools.count()
        self._counters = BlockCounters()
        self._service_time: ServiceTimeHistogram | None = None
        self._closing = False
        self.throttle = throttle
        self._paused = False
        self._held: list[_Job] = []
        self._in_throttle = 0
        self._workers = workers
        self._running = 0
        self._scheduled = False
        self._pool = shared_pool() if pool is None else pool

    def __repr__(self) -> str:
        return f"BlockBackend({self.name!r}, {self.store!r}, cache={self.cache.value})"

    @property
    def size(self) -> int:
        """Bytes of the backing store."""
        return self.store.size

    @property
    def readonly(self) -> bool:
        """Whether writes, discards and write-zeroes are refused."""
        return self.store.readonly

    @property
    def splices_reads(self) -> bool:
        """Whether a READ into a pipe (:attr:`BlockRequest.pipe`) is spliced from the page cache without a copy.

        True for a plain :class:`RawFileStore` (opened without ``O_DIRECT``, so its reads go through
        the page cache); any other store (a subclass with its own I/O) copies into the pipe, so a
        front door keeps to buffers for it.
        """
        return type(self.store) is RawFileStore

    def counters(self) -> BlockCounters:
        """A snapshot of the counters."""
        with self._lock:
            return attrs.evolve(self._counters)

    def measure_service_time(self) -> None:
        """From now on, keep a histogram of service times (:meth:`service_times`); off until asked.

        A request's service time runs from :meth:`submit` (or :meth:`serve_now`)
        to its completion on an I/O thread (or on the spot).
        """
        with self._lock:
            if self._service_time is None:
                self._service_time = ServiceTimeHistogram()

    def service_times(self) -> ServiceTimes | None:
        """A copy of the service-time histogram, or None if :meth:`measure_service_time` was not called."""
        with self._lock:
            return None if self._service_time is None else self._service_time.snapshot()

    def serve_now(self, request: BlockRequest) -> bool:
        """Do a READ or WRITE on the calling thread, at once, if the page cache can serve it.

        A READ only while none of the device's requests waits (queued for a
        thread, held by its limits, a flush behind earlier requests, or
        during a swap; requests running on a thread are no reason to wait: a
        read is served from the page cache with ``RWF_NOWAIT`` or not at
        all), a WRITE only on an idle device (where buffered writes cannot
        be asked not to wait, ext4's, a write would wait on the loop thread
        for the inode lock a running discard or write holds), and within
        the limits of :meth:`_try_inline`;
        True when the request is done (and counted). False means nothing was
        done: :meth:`submit` it. A request that fails its checks is never
        served here, so that :meth:`submit` reports it. A ``sparse`` READ
        served here is read whole (it was in the page cache).
        """
        with self._lock:
            service_time = self._service_time
            started = self._clock() if service_time is not None else 0.0
            busy = self._paused or self._ready or self._barriers or self._in_throttle or (
                request.op is not BlockOp.READ and (self._counters.in_flight or not self.inline_writes)
            )
            if busy or self._check(request) is not None:
                return False
            throttle = self.throttle
            if throttle is None:
                if not self._try_inline(request):
                    return False
            else:
                cost = request_cost(request)
                if not throttle.try_go(cost):
                    return False
                if not self._try_inline(request):
                    throttle.refund(cost)  # submit() spends it again
                    return False
            if service_time is not None:
                service_time.observe(self._clock() - started)
            self._count(request)
            self._count_bytes(request.op, request.length)
        return True

    def submit(self, request: BlockRequest, callback: Callback) -> None:
        """Queue ``request`` for the I/O threads; ``callback(result)`` runs later on the calling event loop.

        Must be called from a running event loop. The callback never runs
        before this returns; a request that fails its checks completes in a
        later pass of the loop with an error result. Callers that can take an
        answer at once try :meth:`serve_now` first.
        """
        loop = asyncio.get_running_loop()
        now = self._clock()
        key = now + ioprio_steps(request.priority) * self._ageing
        throttle = self.throttle
        with self._lock:
            self._count(request)
            rejection = self._check(request)
            if rejection is not None:
                self._counters.errors += 1
            else:
                self._counters.in_flight += 1
                job = _Job(request, callback, loop, next(self._seq), key, now)
                if throttle is not None:
                    self._in_throttle += 1
                elif self._paused:  # a swap runs: held until the new store is in
                    self._held.append(job)
                else:
                    self._enqueue(job)
        if rejection is not None:
            log.debug("%s: %s request rejected: %s", self.name, request.op.value, rejection.message)
            loop.call_soon(self._run_callback, callback, rejection)
        elif throttle is not None:
            throttle.go(request_cost(request), lambda: self._admit(job), loop)

    def _admit(self, job: _Job) -> None:
        """Queue a job its throttle group let go (from any thread); during a swap it is held with the others."""
        with self._lock:
            self._in_throttle -= 1
            if self._paused:
                self._held.append(job)
            else:
                self._enqueue(job)

    def _count(self, request: BlockRequest) -> None:
        """Count a request by its kind (caller holds the lock)."""
        counter = _OP_COUNTER[request.op]
        counters = self._counters
        counters.requests += 1
        setattr(counters, counter, getattr(counters, counter) + 1)

    def _count_bytes(self, op: BlockOp, transferred: int) -> None:
        """Count the bytes a READ or WRITE moved (caller holds the lock)."""
        if op is BlockOp.READ:
            self._counters.bytes_read += transferred
        elif op is BlockOp.WRITE:
            self._counters.bytes_written += transferred

    def _check(self, request: BlockRequest) -> BlockResult | None:
        if self._closing:
            return BlockResult(BlockStatus.IO_ERROR, message=f"{self.name}: backend is closed")
        op = request.op
        if op is BlockOp.FLUSH:
            return None
        if op is not BlockOp.READ and op is not BlockOp.MAP and self.store.readonly:
            return BlockResult(BlockStatus.READ_ONLY, message=f"{self.name}: {op.value} on a read-only device")
        offset, length = request.offset, request.length
        if offset < 0 or length < 0:
            return BlockResult(BlockStatus.INVALID, message=f"negative offset {offset} or length {length}")
        if offset + length > self.store.size:
            return BlockResult(
                BlockStatus.OUT_OF_RANGE,
                message=f"range {offset}+{length} ends past the device end ({self.size} bytes)",
            )
        if op is BlockOp.READ and request.pipe >= 0:
            if request.buffers:
                return BlockResult(BlockStatus.INVALID, message="a read into a pipe takes no buffers")
        elif op is BlockOp.READ or op is BlockOp.WRITE:
            buffers = request.buffers
            buffered = sum(map(len, buffers))
            if buffered != length:
                return BlockResult(BlockStatus.INVALID, message=f"buffers hold {buffered} bytes, request is {length}")
            if op is BlockOp.READ and any(b.readonly for b in buffers):
                return BlockResult(BlockStatus.INVALID, message="read into a read-only buffer")
        return None

    def _try_inline(self, request: BlockRequest) -> bool:
        """Serve a checked read or write from the page cache on the spot; True if every byte moved.

        Callers ask only when none of the device's requests waits (so no
        queued request of any priority is overtaken and priorities keep their
        meaning under load; one running on a thread is not overtaken). Never for durable writes or big transfers,
        and only if the store can do it without waiting (see
        :meth:`RawFileStore.transfer_nowait`: RWF_NOWAIT, or a whole-page write
        while host dirty memory is low); otherwise the request takes the
        worker path. Saves two thread hand-offs per request at low queue
        depth. Caller holds the lock.
        """
        if request.op is not BlockOp.READ and request.op is not BlockOp.WRITE:
            return False
        if request.pipe >= 0:  # a splice may wait for the disk: never on the loop thread
            return False
        if request.length > INLINE_MAX_BYTES:  # a big copy on the loop thread would stall every guest
            return False
        if request.op is BlockOp.WRITE and (request.fua or self.cache is CacheMode.WRITETHROUGH):
            return False
        return self.store.transfer_nowait(request.buffers, request.offset, write=request.op is BlockOp.WRITE)

    def _enqueue(self, job: _Job) -> None:
        """Put a checked job where it belongs (caller holds the lock)."""
        if job.request.op is BlockOp.FLUSH:
            if self._oldest_unfinished() < job.seq:
                self._barriers.append(job)
                return
        else:
            heapq.heappush(self._unfinished, job.seq)
        heapq.heappush(self._ready, (job.key, job.seq, job))
        self._kick()

    def _kick(self) -> None:
        """Ask the pool for a turn if a request is ready, fewer than ``workers`` run and no turn is pending.

        Caller holds the lock.
        """
        if not self._scheduled and self._ready and self._running < self._workers:
            self._scheduled = True
            self._pool.schedule(self)

    def _oldest_unfinished(self) -> float:
        while self._unfinished and self._unfinished[0] in self._finished:
            self._finished.discard(heapq.heappop(self._unfinished))
        return self._unfinished[0] if self._unfinished else float("inf")

    def _finish(self, job: _Job, result: BlockResult) -> None:
        """Account for a job that ran and release flushes it held back (caller holds the lock)."""
        counters = self._counters
        counters.in_flight -= 1
        if self._service_time is not None:
            self._service_time.observe(self._clock() - job.started)
        if not result.ok:
            counters.errors += 1
        else:
            self._count_bytes(job.request.op, result.transferred)
        if job.request.op is BlockOp.FLUSH:
            return
        self._finished.add(job.seq)
        oldest = self._oldest_unfinished()
        while self._barriers and self._barriers[0].seq < oldest:
            barrier = self._barriers.pop(0)
            heapq.heappush(self._ready, (barrier.key, barrier.seq, barrier))

    def pool_turn(self) -> bool:
        """Run the first ready request, on a pool thread; True to take another turn (see :class:`IOPool`).

        Before it runs, another turn is asked for if more requests are ready and fewer than ``workers`` run,
        so that up to ``workers`` requests of this device run at once.
        """
        with self._lock:
            self._scheduled = False
            if not self._ready or self._running >= self._workers:
                return False
            _, _, job = heapq.heappop(self._ready)
            self._running += 1
            self._kick()
        try:
            result = self._execute(job.request)
        except BaseException as exc:  # even what would end this thread answers the request, and it serves on
            log.exception("%s: %s request failed unexpectedly", self.name, job.request.op.value)
            result = BlockResult(BlockStatus.IO_ERROR, message=f"internal error: {exc}")
        self._pool.turn_ending()
        with self._lock:
            self._running -= 1
            self._finish(job, result)
            again = not self._scheduled and bool(self._ready)  # one ended: fewer than workers run now
            if again:
                self._scheduled = True
            if self._closing or self._paused:
                self._cond.notify_all()
            batch = self._completed.setdefault(job.loop, [])
            batch.append((job.callback, result))
            wake_loop = len(batch) == 1
        if wake_loop:
            try:
                job.loop.call_soon_threadsafe(self._deliver, job.loop)
            except RuntimeError:
                log.debug("%s: event loop closed; %s result dropped", self.name, job.request.op.value)
        return again

    def _deliver(self, loop: asyncio.AbstractEventLoop) -> None:
        """Run, on ``loop``, the callbacks of every result completed for it since the last wake-up."""
        with self._lock:
            batch = self._completed.pop(loop, [])
        for callback, result in batch:
            self._run_callback(callback, result)

    def _run_callback(self, callback: Callback, result: BlockResult) -> None:
        try:
            callback(result)
        except Exception:
            log.exception("%s: completion callback failed", self.name)

    def _execute(self, request: BlockRequest) -> BlockResult:
        """Do the I/O of one checked request (on a worker thread)."""
        op, offset, length = request.op, request.offset, request.length
        store = self.store
        durable = request.fua or self.cache is CacheMode.WRITETHROUGH
        try:
            if op is BlockOp.READ:
                pipe = request.pipe
                if request.sparse:
                    done, extents = read_mapped(store, request.buffers, pipe, offset, length)
                    return BlockResult(BlockStatus.OK, done, extents=tuple(extents))
                done = store.readv(request.buffers, offset) if pipe < 0 else store.splice_to(pipe, offset, length)
                if done < length:
                    return BlockResult(
                        BlockStatus.IO_ERROR, done, f"read at {offset}: end of file after {done} of {length} bytes"
                    )
                return BlockResult(BlockStatus.OK, done)
            if op is BlockOp.WRITE:
                return BlockResult(BlockStatus.OK, store.writev(request.buffers, offset, durable=durable))
            if op is BlockOp.FLUSH:
                store.sync()
                return BlockResult(BlockStatus.OK)
            if op is BlockOp.MAP:
                return BlockResult(BlockStatus.OK, extents=tuple(store.extents(offset, length)))
            if op is BlockOp.DISCARD:
                store.discard(offset, length)
            else:
                store.write_zeroes(offset, length, may_unmap=request.may_unmap)
            if durable:
                store.sync()
            return BlockResult(BlockStatus.OK, length)
        except OSError as exc:
            log.warning("%s: %s at %d+%d failed: %s", self.name, op.value, offset, length, exc.strerror or exc)
            return BlockResult(
                BlockStatus.IO_ERROR, message=f"{op.value} at {offset}: {exc.strerror or exc}", errno=exc.errno or 0
            )
        except (ValueError, BufferError) as exc:
            log.warning("%s: %s at %d+%d: buffer unusable: %s", self.name, op.value, offset, length, exc)
            return BlockResult(BlockStatus.IO_ERROR, message=f"{op.value} at {offset}: buffer unusable: {exc}")

    def swap_store(self, store: RawFileStore, *, timeout: float) -> RawFileStore:
        """Serve ``store`` in place of the current store from now on; the old store is returned, for the caller to close.

        Blocks (call it on a thread). Requests submitted meanwhile are held,
        not failed; those in flight finish (those its I/O limits hold back
        are let go at once and finish on the current store too); a writable old store is flushed
        (``fdatasync``); ``store`` takes its place; the held requests then run
        against it. ``store`` must have the size of the current one (the
        guest's capacity does not change) and be read-only exactly when it
        is. A :class:`SwapError` (nothing swapped, the held requests run on
        the old store) if not, if the requests in flight have not finished
        within ``timeout`` seconds, or if the flush fails.
        """
        if store.size != self.store.size:
            raise SwapError(f"{self.name}: the new store has {store.size} bytes, the device {self.store.size}")
        if store.readonly != self.store.readonly:
            raise SwapError(f"{self.name}: the new store must be {'read-only' if self.store.readonly else 'writable'}")
        with self._lock:
            if self._closing or self._paused:
                raise SwapError(f"{self.name}: the device is {'closing' if self._closing else 'being swapped already'}")
        if self.throttle is not None:
            self.throttle.release_all()  # what its limits hold back was written for the current store: it goes there
        with self._lock:
            if self._closing or self._paused:
                raise SwapError(f"{self.name}: the device is {'closing' if self._closing else 'being swapped already'}")
            self._paused = True
            drained = self._cond.wait_for(
                lambda: self._counters.in_flight == len(self._held) + self._in_throttle, timeout
            )
        old = self.store
        try:
            if not drained:
                raise SwapError(f"{self.name}: requests still in flight after {timeout:.0f} s; nothing swapped")
            if not old.readonly:
                try:
                    old.sync()
                except OSError as exc:
                    raise SwapError(f"{self.name}: flushing the current store failed: {exc.strerror or exc}") from None
            with self._lock:
                self.store = store
        finally:
            with self._lock:
                self._paused = False
                self._release_held()
                self._cond.notify_all()
        log.info("%s: now serving %s (was %s)", self.name, store.path, old.path)
        return old

    def _release_held(self) -> None:
        """Queue the requests held during a swap (caller holds the lock); a backend closed meanwhile fails them.

        They were checked at submission against the old store, which had the size and the read-only
        state of the new one.
        """
        held, self._held = self._held, []
        for job in held:
            rejection = self._check(job.request)
            if rejection is None:
                self._enqueue(job)
                continue
            self._counters.in_flight -= 1
            self._counters.errors += 1
            try:
                job.loop.call_soon_threadsafe(self._run_callback, job.callback, rejection)
            except RuntimeError:
                log.debug("%s: event loop closed; %s rejection dropped", self.name, job.request.op.value)

    def close(self) -> None:
        """Finish every queued request, flush a writable store and close it.

        Blocks until the last request has run (never call it on a pool thread).

        The flush (``fdatasync``) makes every write acknowledged in writeback
        mode durable; if it fails, that is logged as an error and the store is
        closed all the same.
        """
        with self._lock:
            self._cond.wait_for(lambda: not self._paused)  # a swap in progress ends first (it has a timeout)
            if self._closing:
                return
        if self.throttle is not None:
            self.throttle.leave()  # held-back requests are queued now, before the threads are told to end
        with self._lock:
            if self._closing:
                return
            self._closing = True
            self._cond.wait_for(lambda: not self._ready and not self._barriers and not self._running)
        try:
            if not self.store.readonly:
                self.store.sync()
        except OSError as exc:
            log.error("%s: flush on close failed, acknowledged writes may be lost: %s", self.name, exc.strerror or exc)
        finally:
            self.store.close()
