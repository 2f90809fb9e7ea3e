"""Media change: a running block device's backing file replaced, as a drive's medium is.

:func:`change_medium` opens the new file the way the device opened its first
one (read-only for a ``readonly=on`` device), checks it (a regular file or a
block device, readable, the device's size), then has the backend swap it in
with no request in flight (:meth:`~pvcore.devices.block.backend.BlockBackend.swap_store`:
new requests wait, those in flight finish, the old file is flushed) and closes
the old file. Any refusal leaves the device serving its old file, untouched.
"""

from __future__ import annotations

import os
import stat

from pvcore.devices.block.backend import BlockBackend, SwapError
from pvcore.devices.block.store import RawFileStore, StoreError

DRAIN_SECONDS = 30.0
"""How long a media change waits for the requests in flight to finish before it gives up."""


class MediaError(Exception):
    """The medium could not be changed; the device serves its old file, and the message says why."""


def change_medium(backend: BlockBackend, path: str, *, timeout: float = DRAIN_SECONDS) -> str:
    """Serve ``path`` on ``backend`` from now on (blocking: call it on a thread); the old file's path.

    Raises :class:`MediaError` for a file that does not exist, is not a
    regular file or block device, cannot be opened as the device needs
    (read-only or read-write), or has another size; or when the swap itself
    fails (see :meth:`~pvcore.devices.block.backend.BlockBackend.swap_store`).
    """
    name = backend.name
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise MediaError(f"{name}: path={path}: {exc.strerror or exc}") from None
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
        raise MediaError(f"{name}: path={path} is not a regular file or block device")
    try:
        store = RawFileStore(path, readonly=backend.readonly)
    except StoreError as exc:
        raise MediaError(f"{name}: {exc}") from None
    try:
        old = backend.swap_store(store, timeout=timeout)
    except SwapError as exc:
        store.close()
        raise MediaError(str(exc)) from None
    old.close()
    return old.path
