"""Which guest pages a live migration failed to carry: source RAM against destination RAM at the switch-over.

When a migration completes, the source is stopped and a destination started
with ``-S`` has loaded every page but not run: both hold the same guest, byte
for byte, if every page written after the VMM copied it was logged and copied
again. A page that differs was written and never reached the destination.
Whose write it was shows in what the source holds there: a 4 KiB piece of
data that only a device back end puts into guest memory (a disk region the
guest reads) was written by the back end, so a mark is missing from the dirty
log it keeps; anything else was written by the guest's CPU or by the VMM,
whose dirty tracking is the VMM's own.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path

import attrs

from pvcore.testing.guest.errors import GuestError
from pvcore.testing.guest.qmp import Qmp

PAGE = 4096


@attrs.frozen
class LostPages:
    """Guest-physical addresses of the pages that differ, by who wrote them."""

    backend: tuple[int, ...]
    """Pages holding back-end data on the source: the back end's dirty log missed them."""
    other: tuple[int, ...]
    """Any other differing page: the guest's CPU or the VMM wrote it (the VMM's dirty tracking)."""

    def __bool__(self) -> bool:
        return bool(self.backend or self.other)

    def __str__(self) -> str:
        first = ", ".join(f"{addr:#x}" for addr in sorted(self.backend + self.other)[:6])
        return (f"{len(self.backend) + len(self.other)} pages differ ({len(self.backend)} of back-end data, "
                f"{len(self.other)} others){': ' + first if first else ''}")


def compare_ram(source: Qmp, destination: Qmp, size: int, work: Path, backend_data: Iterable[bytes],
                timeout: float = 60.0) -> LostPages:
    """Compare ``size`` bytes of guest RAM from guest-physical 0 on the stopped source and the paused destination.

    ``destination`` must have been started with ``-S`` (it stays paused once
    the migration is loaded; this waits up to ``timeout`` seconds for that).
    ``backend_data`` are 4 KiB pieces only a back end writes into guest memory.
    Both dumps (QMP ``pmemsave``) go to ``work`` and are removed afterwards.
    """
    deadline = time.monotonic() + timeout
    while (status := destination.command("query-status")["status"]) != "paused":
        if time.monotonic() > deadline:
            raise GuestError(f"the destination is {status!r}, not paused: was it started with -S?")
        time.sleep(0.1)
    pieces = set(backend_data)
    dumps = [work / "source.ram", work / "destination.ram"]
    backend: list[int] = []
    other: list[int] = []
    try:
        for qmp, dump in zip((source, destination), dumps):
            qmp.command("pmemsave", val=0, size=size, filename=str(dump))
        with open(dumps[0], "rb") as ours, open(dumps[1], "rb") as theirs:
            base = 0
            while chunk := ours.read(1 << 20):
                other_chunk = theirs.read(len(chunk))
                if chunk != other_chunk:
                    for offset in range(0, len(chunk), PAGE):
                        page = chunk[offset : offset + PAGE]
                        if page != other_chunk[offset : offset + PAGE]:
                            (backend if page in pieces else other).append(base + offset)
                base += len(chunk)
    finally:
        for dump in dumps:
            dump.unlink(missing_ok=True)
    return LostPages(tuple(backend), tuple(other))


def pieces(data: bytes) -> set[bytes]:
    """``data`` cut into the 4 KiB pieces a page-aligned read of it puts into guest pages."""
    return {data[n : n + PAGE] for n in range(0, len(data) - PAGE + 1, PAGE)}
