"""What every fuzz target shares: a daemon-like loop thread, resource counts and a keep-serving check.

A target module defines ``setup()`` (once per process: build the real
devices and front doors), ``one_input(data)`` (drive the real parser with
one input, then check its invariants, raising :class:`InvariantError`) and
``seeds()`` (the seed inputs, written to ``fuzz/corpus/<target>/`` by
``python -m fuzz.seeds``).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator

from pvcore.devices.block.iopool import shared_pool
from pvcore.testing.loopthread import LoopThread


class InvariantError(AssertionError):
    """An invariant the target checks after an input did not hold (a finding)."""


_loop_thread: LoopThread | None = None


def loop_thread() -> LoopThread:
    """The one asyncio loop thread of this fuzz process (the daemon's loop)."""
    global _loop_thread
    if _loop_thread is None:
        _loop_thread = LoopThread("pvcore-fuzz-loop")
    return _loop_thread


def open_fds() -> int:
    """Open file descriptors of this process."""
    return len(os.listdir("/proc/self/fd"))


def mappings() -> int:
    """Shared-memory mappings of this process: memfd (guest RAM, logs, inflight regions) and deleted files.

    Plain anonymous mappings are left out: the allocator and libFuzzer
    itself make and drop those at will.
    """
    with open("/proc/self/maps", "rb") as maps:
        return sum(1 for line in maps if b"/memfd:" in line or line.rstrip().endswith(b"(deleted)"))


def tasks() -> int:
    """Tasks alive on the loop thread."""
    thread = loop_thread()
    return thread.call(lambda: len(asyncio.all_tasks(thread.loop)))


def resources() -> dict[str, int]:
    """The counts that must come back to their baseline after every input.

    A garbage collection runs first: an fd or mapping held only by a
    reference cycle is released then, which is not a leak.
    """
    gc.collect()
    loop_thread()
    return {"fds": open_fds(), "mappings": mappings(), "threads": threads(), "tasks": tasks()}


def threads() -> int:
    """Threads alive, but for the shared I/O pool's: they start on demand, end after
    :data:`~pvcore.devices.block.iopool.IDLE_TIMEOUT` idle and are bounded by the pool itself
    (an input that starts more than the bound is a finding of :func:`pool_within_bound`)."""
    prefix = shared_pool().name
    return sum(1 for thread in threading.enumerate() if not thread.name.startswith(prefix))


def pool_within_bound() -> None:
    """Raise :class:`InvariantError` if the shared I/O pool runs more threads than its hard bound."""
    pool = shared_pool()
    running = sum(1 for thread in threading.enumerate() if thread.name.startswith(pool.name))
    if running > pool.hard_max_threads:
        raise InvariantError(f"the I/O pool runs {running} threads, over its bound of {pool.hard_max_threads}")


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Poll ``condition`` until true; a timeout is a finding (a hang)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise InvariantError(f"hang: {what} not reached within {timeout}s")
        time.sleep(0.001)


class Baseline:
    """Resource counts taken once setup is warm; :meth:`check` compares after each input.

    Some resources come back asynchronously (a closing connection's clean-up
    runs on the loop), so a difference is re-measured for up to ``settle``
    seconds before it is called a leak.
    """

    def __init__(self, settle: float = 2.0) -> None:
        self.settle = settle
        self.counts = resources()

    def check(self, context: str = "") -> None:
        """Raise :class:`InvariantError` naming every count above its baseline."""
        deadline = time.monotonic() + self.settle
        while True:
            now = resources()
            grown = {key: (self.counts[key], now[key]) for key in now if now[key] > self.counts[key]}
            if not grown:
                pool_within_bound()
                return
            if time.monotonic() > deadline:
                detail = ", ".join(f"{key} {before} -> {after}" for key, (before, after) in grown.items())
                raise InvariantError(f"leak after {context or 'an input'}: {detail}")
            time.sleep(0.005)


@contextlib.contextmanager
def unix_client(path: str | os.PathLike[str], timeout: float = 5.0) -> Iterator[socket.socket]:
    """A blocking client socket connected to ``path``, closed on exit."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    try:
        sock.connect(os.fspath(path))
        yield sock
    finally:
        sock.close()


def send_and_drain(path: str | os.PathLike[str], data: bytes, timeout: float = 5.0) -> bytes:
    """Connect, send ``data``, half-close and read until the server closes; return what it sent.

    A server that neither closes nor answers within ``timeout`` after the
    client's end of stream is a hang (a finding).
    """
    with unix_client(path, timeout) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server refused early and closed: fine, it keeps its reply in the buffer
        received = bytearray()
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            except TimeoutError:
                raise InvariantError(f"hang: server neither answered nor closed {timeout}s after end of input") from None
            if not chunk:
                break
            received += chunk
        return bytes(received)
