"""Who serves what in a run directory: advisory locks held by the serving processes.

* ``daemon.lock`` is held by the host daemon (``pvcore daemon --connect``):
  ``pvcore deploy`` hands devices to it when it is held, else starts a
  server for the one domain;
* ``domain-<uuid>.lock`` is held by whichever process serves that domain's
  devices, so the host daemon and a one-domain server never both listen on
  a domain's sockets.

Locks are ``flock`` s: the kernel drops them when the process dies, however it
dies, so a stale file never blocks anyone. The file holds the holder's pid,
for messages.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

DAEMON_LOCK = "daemon.lock"


def domain_lock_path(run_dir: Path, uuid: str) -> Path:
    """The lock of the domain with this UUID."""
    return run_dir / f"domain-{uuid}.lock"


def try_lock(path: Path) -> int | None:
    """Take the lock at ``path`` without waiting: the open descriptor that holds it, or None if another holds it."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def release(fd: int) -> None:
    """Give up a lock taken with :func:`try_lock`."""
    os.close(fd)


def is_held(path: Path) -> bool:
    """Whether some process holds the lock at ``path`` now."""
    if not path.exists():
        return False
    fd = try_lock(path)
    if fd is None:
        return True
    release(fd)
    return False


def holder(path: Path) -> str:
    """``pid N`` of the lock's holder as it wrote itself down, or ``unknown pid``."""
    try:
        pid = path.read_text().strip()
    except OSError:
        return "unknown pid"
    return f"pid {pid}" if pid.isdigit() else "unknown pid"
