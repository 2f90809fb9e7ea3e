"""The I/O threads of a process: one pool shared by every block device, sized by cores and queued work.

A device with requests for the threads (a :class:`Tenant`, such as
:class:`~pvcore.devices.block.backend.BlockBackend`) asks :meth:`IOPool.schedule`
for a turn. The pool keeps one run queue of devices, first come first served:
a thread takes the device at its head and calls :meth:`Tenant.pool_turn`,
which runs one of that device's requests (the device chooses which: its own
priorities and barriers); a device with more ready takes another turn at
the tail. So devices take turns request by
request: a device with a thousand requests queued holds one place in the run
queue, and another device's request waits behind at most one request of each
busy device, never behind the busy device's whole queue.

Sizing: threads start on demand and end when idle. A turn asked for when no
thread is idle starts a thread unless :attr:`IOPool.max_threads` run already;
that bound is ``min(MAX_THREADS, max(MIN_THREADS, THREADS_PER_CPU * cpus))``
(8 on 1 or 2 CPUs, 16 on 4, 64 from 16), with ``cpus`` the CPUs this process
may run on, divided among the processes that share them
(:func:`share_cpus`: each of ``pvcore serve --workers N``'s workers counts
its share). ``pvcore serve --io-threads N`` sets the bound instead
(:func:`set_thread_bound`; with workers, each worker's). I/O threads spend most of their time in a system call with the GIL
released, so a few per core keep the storage busy; more only contend for the
GIL. A turn asked for while a thread is ending its turn (its I/O done), was
just woken or just started, and has no turn yet, starts no thread: that one
takes it. The threads running thus follow the queued work
(one per request waiting, up to the bound), and a thread idle for :data:`IDLE_TIMEOUT`
seconds ends. An idle daemon has no I/O threads at all, whatever the number of
its devices, and its threads sleep in the kernel: no CPU while idle.

Stuck threads: a request whose system call does not return (a hung NFS
server) holds its thread, and a device runs at most its own ``workers``
requests at once, so a hung device holds at most that many threads. So that
enough hung devices to hold every thread do not stall the others, while
turns wait and every thread is busy a watcher thread looks once every
:data:`STALL_SECONDS`: if no thread took a turn meanwhile, it starts one more
thread beyond the bound, up to :attr:`IOPool.hard_max_threads`
(``STUCK_FACTOR`` times the bound). The extra threads end when idle like the
others. The watcher exists only while turns wait.

:meth:`IOPool.stats` reads what the pool does now (threads, busy ones,
turns waiting, and counts since it was made) for the metrics.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from typing import Protocol

import attrs

log = logging.getLogger("pvcore.block")

MIN_THREADS = 8
THREADS_PER_CPU = 4
MAX_THREADS = 64
MAX_THREAD_BOUND = 1024
"""The largest bound :func:`set_thread_bound` takes (``--io-threads``)."""
IDLE_TIMEOUT = 10.0
"""Seconds an I/O thread waits for work before it ends."""
STALL_SECONDS = 1.0
"""Seconds with turns waiting and none taken after which the pool starts a thread beyond its bound."""
STUCK_FACTOR = 4


class Tenant(Protocol):
    """A device served by an :class:`IOPool`."""

    def pool_turn(self) -> bool:
        """Run at most one queued request, on the calling pool thread; True to take another turn.

        The pool queues the next turn at the tail (behind the other devices'
        turns), and the calling thread takes the turn at the head: a device
        that still has work when its request ends starts no thread. A tenant
        that wants a turn before this one ends (to run requests in parallel)
        asks :meth:`IOPool.schedule`. Once its request's I/O is done, it
        calls :meth:`IOPool.turn_ending`. Must not raise: a request's failure
        is that request's result.
        """


_processes = 1
_thread_bound: int | None = None


def share_cpus(processes: int) -> None:
    """This process is one of ``processes`` that serve devices on the same CPUs (a worker of
    ``pvcore serve --workers N``): pools made from now on are bounded by its share of the CPUs."""
    global _processes
    _processes = max(1, processes)


def set_thread_bound(threads: int | None) -> None:
    """``pvcore serve --io-threads N``: bound this process's pools by ``threads`` (None: by the CPUs).

    Applies to the pools made from now on and to the shared pool if it is
    made already. A ``ValueError`` if ``threads`` is not from 1 to :data:`MAX_THREAD_BOUND`.
    """
    global _thread_bound
    if threads is not None and not 1 <= threads <= MAX_THREAD_BOUND:
        raise ValueError(f"io-threads={threads} must be from 1 to {MAX_THREAD_BOUND}")
    _thread_bound = threads
    with _shared_lock:
        if _shared is not None:
            _shared.set_max_threads(thread_bound())


def thread_bound_setting() -> int | None:
    """The bound :func:`set_thread_bound` set in this process (None: none, the CPUs decide)."""
    return _thread_bound


def thread_bound() -> int:
    """The bound of a pool made now without one: :func:`set_thread_bound`'s, else :func:`default_max_threads`."""
    return default_max_threads() if _thread_bound is None else _thread_bound


def default_max_threads() -> int:
    """The bound on a pool's threads for this process's share of the CPUs (see the module docstring)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return min(MAX_THREADS, max(MIN_THREADS, THREADS_PER_CPU * max(1, cpus // _processes)))


@attrs.frozen
class PoolStats:
    """What an :class:`IOPool` does at one moment, and its counts since it was made (:meth:`IOPool.stats`)."""

    threads: int
    """Threads alive (idle ones included; those started beyond the bound too)."""
    busy: int
    """Threads running a turn (a request) now."""
    max_threads: int
    """The bound on threads started for waiting turns."""
    queued: int
    """Turns waiting for a thread: one per device with a request ready for one, however deep its own queue."""
    turns: int
    """Turns the threads took since the pool was made."""
    stall_threads: int
    """Threads the watcher started beyond the bound because no thread took a turn for ``stall`` seconds."""


class IOPool:
    """Threads, started on demand up to ``max_threads``, that give devices turns in first-come order.

    ``idle_timeout`` is the seconds an idle thread waits for work before it
    ends, ``stall`` the seconds without a turn taken after which threads
    beyond the bound start (see the module docstring); ``name`` prefixes the
    threads' names.
    """

    def __init__(
        self,
        *,
        max_threads: int | None = None,
        idle_timeout: float = IDLE_TIMEOUT,
        stall: float = STALL_SECONDS,
        name: str = "pvcore-io",
    ) -> None:
        bound = thread_bound() if max_threads is None else max_threads
        if bound < 1:
            raise ValueError(f"{name}: max_threads={bound} must be at least 1")
        if not idle_timeout > 0 or not stall > 0:
            raise ValueError(f"{name}: idle_timeout={idle_timeout} and stall={stall} must be positive seconds")
        self.max_threads = bound
        self.hard_max_threads = STUCK_FACTOR * bound
        """The most threads, counting those started beyond the bound while every thread was stuck."""
        self.idle_timeout = idle_timeout
        self.stall = stall
        self.name = name
        self._numbers = 0
        self._reset()

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._queue: collections.deque[Tenant] = collections.deque()
        self._threads = 0
        self._idle: list[threading.Event] = []
        self._peak = 0
        self._taken = 0
        self._busy = 0
        self._stall_starts = 0
        self._watching = False
        self._ending: set[int] = set()
        self._coming = 0

    def __repr__(self) -> str:
        return f"IOPool({self.name!r}, threads={self._threads}, max_threads={self.max_threads})"

    @property
    def threads(self) -> int:
        """Threads alive now."""
        return self._threads

    @property
    def peak_threads(self) -> int:
        """The most threads alive at once since the pool was made."""
        return self._peak

    def stats(self) -> PoolStats:
        """The pool now (see :class:`PoolStats`); safe from any thread."""
        with self._lock:
            return PoolStats(
                threads=self._threads, busy=self._busy, max_threads=self.max_threads, queued=len(self._queue),
                turns=self._taken, stall_threads=self._stall_starts,
            )

    def set_max_threads(self, bound: int) -> None:
        """Bound the threads by ``bound`` from now on (threads beyond a lowered bound end when idle)."""
        if bound < 1:
            raise ValueError(f"{self.name}: max_threads={bound} must be at least 1")
        with self._lock:
            self.max_threads = bound
            self.hard_max_threads = STUCK_FACTOR * bound
            while self._threads < bound and len(self._queue) > len(self._ending) + self._coming + len(self._idle):
                self._start()

    def schedule(self, tenant: Tenant) -> None:
        """Give ``tenant`` a turn after the turns already asked for; a thread takes it when one is free.

        The caller asks once per turn it wants (a tenant that is waiting for a
        turn does not ask again). Safe from any thread.
        """
        with self._lock:
            self._queue.append(tenant)
            if self._idle:
                self._idle.pop().set()  # the thread idle the shortest time: the others may time out and end
                self._coming += 1
            elif len(self._queue) <= len(self._ending) + self._coming:
                pass  # a thread ending its turn, just woken or just started takes it: another would idle
            elif self._threads < self.max_threads:
                self._start()
            elif not self._watching:
                self._watching = True
                threading.Thread(target=self._watch, name=f"{self.name}-watch", daemon=True).start()

    def turn_ending(self) -> None:
        """Called by a tenant on a pool thread when its request's I/O is done: the thread is free in a moment."""
        with self._lock:
            self._ending.add(threading.get_ident())

    def _watch(self) -> None:
        """While turns wait, start a thread beyond the bound for each ``stall`` seconds in which none was taken."""
        while True:
            with self._lock:
                if not self._queue:
                    self._watching = False
                    return
                taken = self._taken
            time.sleep(self.stall)
            with self._lock:
                if not self._queue:
                    self._watching = False
                    return
                if self._taken == taken and not self._idle and self._threads < self.hard_max_threads:
                    log.warning(
                        "%s: no I/O thread took a request in %.0f s (stuck in the kernel?); starting thread %d",
                        self.name, self.stall, self._threads + 1,
                    )
                    self._stall_starts += 1
                    self._start()

    def _start(self) -> None:
        """Start one thread (caller holds the lock)."""
        self._threads += 1
        self._coming += 1
        self._peak = max(self._peak, self._threads)
        self._numbers += 1
        thread = threading.Thread(target=self._work, name=f"{self.name}{self._numbers}", daemon=True)
        try:
            thread.start()
        except RuntimeError:  # the host is out of threads: those running serve the queue
            self._threads -= 1
            self._coming -= 1
            if not self._threads:
                raise
            log.warning("%s: could not start another I/O thread; %d serve on", self.name, self._threads)

    def _work(self) -> None:
        wake = threading.Event()
        me = threading.get_ident()
        again: Tenant | None = None
        coming = True  # started or woken for a turn: counted in _coming until it takes one
        busy = False  # ran a turn since it last held the lock: counted in _busy
        while True:
            with self._lock:
                if coming:
                    self._coming -= 1
                    coming = False
                if busy:
                    self._busy -= 1
                    busy = False
                self._ending.discard(me)
                if again is not None:
                    self._queue.append(again)  # behind the other devices; this thread goes on to the head
                tenant = self._queue.popleft() if self._queue else None
                if tenant is None:
                    self._idle.append(wake)
                else:
                    self._taken += 1
                    self._busy += 1
                    busy = True
            again = None
            if tenant is None:
                wake.wait(self.idle_timeout)
                with self._lock:
                    if wake in self._idle:  # idle for the whole timeout, and nobody chose it since
                        self._idle.remove(wake)
                        self._threads -= 1
                        return
                wake.clear()
                coming = True
                continue
            try:
                if tenant.pool_turn():
                    again = tenant
            except BaseException:  # a tenant's bug ends neither this thread nor the others' service
                log.exception("%s: a device's turn failed", self.name)
            del tenant

    def after_fork(self) -> None:
        """Forget the parent's threads in a forked child (they do not exist there); queued turns are served anew."""
        queued = list(self._queue)
        self._reset()
        for tenant in queued:
            self.schedule(tenant)


_shared: IOPool | None = None
_shared_lock = threading.Lock()


def shared_pool() -> IOPool:
    """The process's pool, made (with no threads) on first use; every block device uses it unless given another."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = IOPool()
        return _shared


def _after_fork_in_child() -> None:
    global _shared_lock
    _shared_lock = threading.Lock()
    if _shared is not None:
        _shared.after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)
