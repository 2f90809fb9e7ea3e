"""Memory barriers for rings shared with another CPU.

The ring protocol needs two kinds of ordering:

* store -> store: a used element (or a descriptor, on the driver side) must be
  visible before the index that publishes it, and load -> load on the other
  side: the index must be read before what it publishes;
* store -> load: after publishing the used index (or re-enabling kicks), the
  side must re-read the other side's event index / flags, and that load must
  not be satisfied before the store is visible (the classic lost-wakeup race).

On x86-64 (TSO) stores are never reordered with other stores, so the first
needs only program order, which CPython keeps: every store goes through a
``memoryview`` assignment that completes before the next statement runs. The
second is reordered even by x86 (store buffer forwarding), so we issue a real
``mfence``. Weaker architectures (aarch64, ppc64) reorder both, so there
:func:`write_barrier` is a full barrier too (``dmb ish`` / ``sync``).

The fence is a few bytes of machine code placed in an executable page and
called through ctypes: Python has no fence of its own. Where that cannot be
done (an unknown architecture, or a kernel that refuses executable mappings),
we fall back to acquiring and releasing a lock, whose atomic read-modify-write
is a full barrier on x86-64 and an acquire/release pair elsewhere; the module
attribute :data:`FENCE_KIND` says which one is in use.
"""

from __future__ import annotations

import ctypes
import mmap
import platform
import threading
from collections.abc import Callable

_FENCE_CODE = {
    "x86_64": bytes([0x0F, 0xAE, 0xF0, 0xC3]),  # mfence; ret
    "amd64": bytes([0x0F, 0xAE, 0xF0, 0xC3]),
    "aarch64": bytes.fromhex("bf3b03d5c0035fd6"),  # dmb ish; ret
    "ppc64le": bytes.fromhex("ac04007c2000804e"),  # sync; blr
}

_STRONG_STORE_ORDER = {"x86_64", "amd64"}


def _machine_fence() -> tuple[Callable[[], None], str]:
    machine = platform.machine().lower()
    code = _FENCE_CODE.get(machine)
    if code is None:
        return _lock_fence, "lock"
    try:
        page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    except (OSError, ValueError):
        return _lock_fence, "lock"
    page.write(code)
    address = ctypes.addressof(ctypes.c_char.from_buffer(page))
    function = ctypes.PYFUNCTYPE(None)(address)  # keeps the GIL: no thread hand-off around one instruction
    function._page = page  # keep the mapping alive as long as the function
    return function, machine


_lock = threading.Lock()


def _lock_fence() -> None:
    with _lock:
        pass


full_barrier, FENCE_KIND = _machine_fence()
"""Order every earlier load and store before every later one."""


def _program_order() -> None:
    """Store->store ordering on a TSO machine: program order is enough."""


write_barrier: Callable[[], None] = (
    _program_order if platform.machine().lower() in _STRONG_STORE_ORDER else full_barrier
)
"""Order earlier stores before later stores (publish data, then its index)."""

read_barrier: Callable[[], None] = write_barrier
"""Order earlier loads before later loads (read an index, then what it publishes);
x86-64 never reorders loads with loads."""
