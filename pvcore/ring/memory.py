"""Guest memory: a set of regions, each a guest-physical range mapped to a buffer.

Every access a backend makes to guest memory goes through :class:`GuestMemory`,
which checks it against the regions before touching a byte. An address or a
length the guest chose is therefore never trusted: a range that is not wholly
covered by regions raises :class:`GuestMemoryError`, which the ring engine turns
into a failed request or a broken device, never into an out-of-bounds access.

A range may span two adjacent regions (guests are free to place a buffer across
a region boundary); :meth:`GuestMemory.views` returns one memoryview per region
piece so that block I/O can read and write guest pages without a copy.
"""

from __future__ import annotations

import bisect
import struct
from collections.abc import Iterable, Sequence

import attrs

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")

ADDRESS_LIMIT = 1 << 64


class GuestMemoryError(Exception):
    """A guest-supplied address or length does not lie inside guest memory."""


@attrs.define(eq=False)
class MemoryRegion:
    """One guest-physical range backed by host memory.

    ``user_addr`` is where the frontend (e.g. QEMU) has this region mapped in
    its own address space; vhost-user names ring addresses that way.
    """

    guest_addr: int = attrs.field(validator=attrs.validators.ge(0))
    view: memoryview
    user_addr: int = 0
    readonly: bool = False

    def __attrs_post_init__(self) -> None:
        if self.view.ndim != 1 or self.view.itemsize != 1:
            self.view = self.view.cast("B")
        if self.view.readonly:
            self.readonly = True
        if self.guest_addr + len(self.view) > ADDRESS_LIMIT:
            raise GuestMemoryError(f"region at {self.guest_addr:#x} wraps the address space")

    @property
    def size(self) -> int:
        """Length of the region in bytes."""
        return len(self.view)

    @property
    def end(self) -> int:
        """First guest address past the region."""
        return self.guest_addr + len(self.view)


class GuestMemory:
    """Bounds-checked access to a guest's memory, made of :class:`MemoryRegion` s.

    Regions must not overlap. All reads and writes are little-endian where a
    width is implied, as VIRTIO 1.x rings are.
    """

    def __init__(self, regions: Iterable[MemoryRegion] = ()) -> None:
        ordered = sorted(regions, key=lambda r: r.guest_addr)
        for before, after in zip(ordered, ordered[1:]):
            if before.end > after.guest_addr:
                raise GuestMemoryError(
                    f"regions overlap: [{before.guest_addr:#x}, {before.end:#x}) and "
                    f"[{after.guest_addr:#x}, {after.end:#x})"
                )
        self.regions: tuple[MemoryRegion, ...] = tuple(ordered)
        self._starts = [r.guest_addr for r in ordered]
        self._spans = tuple((r.guest_addr, r.end, r.view, r.readonly) for r in ordered)

    def __repr__(self) -> str:
        spans = ", ".join(f"[{r.guest_addr:#x}+{r.size:#x}]" for r in self.regions)
        return f"GuestMemory({spans})"

    @property
    def size(self) -> int:
        """Total bytes of guest memory covered by the regions."""
        return sum(r.size for r in self.regions)

    def _region_at(self, addr: int) -> MemoryRegion | None:
        i = bisect.bisect_right(self._starts, addr) - 1
        if i < 0:
            return None
        region = self.regions[i]
        return region if addr < region.end else None

    def _span(self, addr: int, length: int, write: bool) -> tuple[memoryview, int] | None:
        """The region view and offset holding the whole range, or None if no single region does.

        This is the hot path of every ring access (a linear scan: guests have
        a handful of regions); None sends the caller to :meth:`views`, which
        splits a range across regions or raises.
        """
        if length < 0:
            return None
        for start, end, view, readonly in self._spans:
            if start <= addr and addr + length <= end:
                if write and readonly:
                    return None
                return view, addr - start
        return None

    def views(self, addr: int, length: int, *, write: bool = False) -> list[memoryview]:
        """Return memoryviews covering ``[addr, addr+length)``, one per region piece.

        Raises :class:`GuestMemoryError` if any byte of the range is outside
        guest memory, or if ``write`` is asked of a read-only region.
        """
        if length > 0:
            span = self._span(addr, length, write)
            if span is not None:
                view, offset = span
                return [view[offset : offset + length]]
        if addr < 0 or length < 0 or addr + length > ADDRESS_LIMIT:
            raise GuestMemoryError(f"range {addr:#x}+{length:#x} is not a valid guest range")
        pieces: list[memoryview] = []
        cursor, remaining = addr, length
        while remaining:
            region = self._region_at(cursor)
            if region is None:
                raise GuestMemoryError(
                    f"guest range {addr:#x}+{length:#x} is outside guest memory at {cursor:#x}"
                )
            if write and region.readonly:
                raise GuestMemoryError(f"guest address {cursor:#x} is read-only")
            start = cursor - region.guest_addr
            take = min(remaining, region.size - start)
            pieces.append(region.view[start : start + take])
            cursor += take
            remaining -= take
        return pieces

    def check(self, addr: int, length: int, *, write: bool = False) -> None:
        """Raise :class:`GuestMemoryError` unless the whole range is guest memory."""
        if self._span(addr, length, write) is None:
            self.views(addr, length, write=write)

    def contiguous(self, addr: int, length: int, *, write: bool = False) -> memoryview | None:
        """One view of the range if a single region holds all of it, else None (nothing raised).

        For structures checked once and used many times, such as the rings.
        """
        span = self._span(addr, length, write)
        if span is None:
            return None
        view, offset = span
        return view[offset : offset + length]

    def view(self, addr: int, length: int, *, write: bool = False) -> memoryview:
        """One contiguous memoryview of the range; it must lie within one region."""
        pieces = self.views(addr, length, write=write)
        if len(pieces) > 1:
            raise GuestMemoryError(f"guest range {addr:#x}+{length:#x} spans two regions")
        return pieces[0] if pieces else memoryview(b"")

    def read(self, addr: int, length: int) -> bytes:
        """Copy ``length`` bytes out of guest memory."""
        span = self._span(addr, length, False)
        if span is not None:
            view, offset = span
            return view[offset : offset + length].tobytes()
        pieces = self.views(addr, length)
        if len(pieces) == 1:
            return pieces[0].tobytes()
        return b"".join(p.tobytes() for p in pieces)

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        """Copy ``data`` into guest memory at ``addr``."""
        data = memoryview(data).cast("B")
        span = self._span(addr, len(data), True)
        if span is not None:
            view, start = span
            view[start : start + len(data)] = data
            return
        offset = 0
        for piece in self.views(addr, len(data), write=True):
            piece[:] = data[offset : offset + len(piece)]
            offset += len(piece)

    def fill(self, addr: int, length: int, byte: int = 0) -> None:
        """Set ``length`` bytes at ``addr`` to ``byte``."""
        for piece in self.views(addr, length, write=True):
            piece[:] = bytes([byte]) * len(piece)

    def read_u16(self, addr: int) -> int:
        """Read a little-endian 16-bit value."""
        span = self._span(addr, 2, False)
        if span is not None:
            return _U16.unpack_from(span[0], span[1])[0]
        return _U16.unpack(self.read(addr, 2))[0]

    def read_u32(self, addr: int) -> int:
        """Read a little-endian 32-bit value."""
        span = self._span(addr, 4, False)
        if span is not None:
            return _U32.unpack_from(span[0], span[1])[0]
        return _U32.unpack(self.read(addr, 4))[0]

    def read_u64(self, addr: int) -> int:
        """Read a little-endian 64-bit value."""
        span = self._span(addr, 8, False)
        if span is not None:
            return _U64.unpack_from(span[0], span[1])[0]
        return _U64.unpack(self.read(addr, 8))[0]

    def write_u8(self, addr: int, value: int) -> None:
        """Write one byte."""
        span = self._span(addr, 1, True)
        if span is not None:
            span[0][span[1]] = value & 0xFF
        else:
            self.write(addr, bytes((value & 0xFF,)))

    def write_u16(self, addr: int, value: int) -> None:
        """Write a little-endian 16-bit value."""
        self.write(addr, _U16.pack(value & 0xFFFF))

    def write_u32(self, addr: int, value: int) -> None:
        """Write a little-endian 32-bit value."""
        self.write(addr, _U32.pack(value & 0xFFFFFFFF))

    def write_u64(self, addr: int, value: int) -> None:
        """Write a little-endian 64-bit value."""
        self.write(addr, _U64.pack(value & 0xFFFFFFFFFFFFFFFF))

    def user_to_guest(self, user_addr: int, length: int = 1) -> int:
        """Translate a frontend virtual address (vhost-user ring addresses) to a guest address."""
        for region in self.regions:
            if region.user_addr <= user_addr and user_addr + length <= region.user_addr + region.size:
                return region.guest_addr + (user_addr - region.user_addr)
        raise GuestMemoryError(f"frontend address {user_addr:#x}+{length:#x} is in no memory region")


def gather(memory: GuestMemory, buffers: Sequence[tuple[int, int]]) -> bytes:
    """Concatenate the bytes of several (address, length) guest buffers."""
    return b"".join(memory.read(addr, length) for addr, length in buffers)


def scatter(memory: GuestMemory, buffers: Sequence[tuple[int, int]], data: bytes | memoryview) -> int:
    """Write ``data`` across (address, length) guest buffers in order; return bytes written."""
    data = memoryview(data).cast("B")
    offset = 0
    for addr, length in buffers:
        if offset >= len(data):
            break
        chunk = data[offset : offset + length]
        memory.write(addr, chunk)
        offset += len(chunk)
    return offset
