"""A block store wrapper that injects faults: a model of a failing, full or slow disk, for tests.

:class:`FaultyStore` wraps a :class:`~pvcore.devices.block.store.RawFileStore`
and passes every call through, except while a fault is set:

* ``"eio"``: reads, writes, discards and zeroing fail with ``EIO`` and move no byte;
* ``"enospc"``: writes, discards and zeroing fail with ``ENOSPC`` (the disk is full);
* ``"fdatasync"``: the kernel's ``fdatasync`` of this store's file fails with ``EIO``
  (the store's own sync code runs and sees the failure, as after a lost write-back);
* ``"slow"``: every call first waits :attr:`delay` seconds;
* ``"die"``: the next write raises :class:`IoThreadDeath`, a ``BaseException`` that
  no ``except Exception`` stops, so the I/O thread running it dies unless the
  backend guards against that.

While any fault is set, the inline fast path
(``transfer_nowait``) declines, so every request reaches an I/O thread and the
fault. Install it with ``backend.store = FaultyStore(backend.store)``.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from pvcore.devices.block import store as store_module
from pvcore.devices.block.extents import Extent
from pvcore.devices.block.store import RawFileStore

FAULTS = ("eio", "enospc", "fdatasync", "slow", "die")


class IoThreadDeath(BaseException):
    """Raised inside an I/O thread by the ``"die"`` fault: what kills a thread outright."""


class FaultyStore:
    """``inner`` with the fault :attr:`fault` injected (None: none)."""

    def __init__(self, inner: RawFileStore, *, delay: float = 0.3) -> None:
        self.inner = inner
        self.delay = delay
        self.fault: str | None = None
        self.injected = 0
        """How many calls a fault was injected into."""
        self._lock = threading.Lock()

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    @contextmanager
    def injecting(self, fault: str) -> Iterator[FaultyStore]:
        """Set ``fault`` for the duration of the block, then clear it."""
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; known: {', '.join(FAULTS)}")
        self.fault = fault
        real_fdatasync = store_module.os.fdatasync
        fd = self.inner.fd

        def failing_fdatasync(target: int) -> None:
            if target == fd:
                self._count()
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            real_fdatasync(target)

        if fault == "fdatasync":
            store_module.os.fdatasync = failing_fdatasync
        try:
            yield self
        finally:
            self.fault = None
            store_module.os.fdatasync = real_fdatasync

    def _count(self) -> None:
        with self._lock:
            self.injected += 1

    def _before(self, write: bool) -> None:
        fault = self.fault
        if fault == "slow":
            time.sleep(self.delay)
        elif fault == "eio":
            self._count()
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        elif fault == "enospc" and write:
            self._count()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        elif fault == "die" and write:
            self.fault = None
            self._count()
            raise IoThreadDeath("injected I/O thread death")

    def readv(self, buffers: Sequence[memoryview], offset: int) -> int:
        """The inner read, after the fault."""
        self._before(write=False)
        return self.inner.readv(buffers, offset)

    def extents(self, offset: int, length: int) -> list[Extent]:
        """The inner extent map, after the fault (a failing disk cannot be asked where its data is either)."""
        self._before(write=False)
        return self.inner.extents(offset, length)

    def transfer_nowait(self, buffers: Sequence[memoryview], offset: int, *, write: bool) -> bool:
        """Declined while a fault is set (a slow disk's data is not in the page cache); else the inner fast path."""
        if self.fault is not None:
            return False
        return self.inner.transfer_nowait(buffers, offset, write=write)

    def writev(self, buffers: Sequence[memoryview], offset: int, *, durable: bool = False) -> int:
        """The inner write, after the fault."""
        self._before(write=True)
        return self.inner.writev(buffers, offset, durable=durable)

    def sync(self) -> None:
        """The inner sync (an ``"fdatasync"`` fault fails inside it)."""
        if self.fault == "slow":
            time.sleep(self.delay)
        self.inner.sync()

    def discard(self, offset: int, length: int) -> None:
        """The inner discard, after the fault."""
        self._before(write=True)
        self.inner.discard(offset, length)

    def write_zeroes(self, offset: int, length: int, *, may_unmap: bool = False) -> None:
        """The inner zeroing, after the fault."""
        self._before(write=True)
        self.inner.write_zeroes(offset, length, may_unmap=may_unmap)
