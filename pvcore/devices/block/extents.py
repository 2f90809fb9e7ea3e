"""Where a backing file's data and holes are: its extent map, from ``lseek(2)`` ``SEEK_DATA``/``SEEK_HOLE``.

A stream door uses it twice (through the block engine, which checks the
range first): to answer a client's question about a range's allocation
(:attr:`~pvcore.devices.block.backend.BlockOp.MAP`), and to read only the
data of a range, so that a hole costs no read and no bytes on the wire
(a ``sparse`` :attr:`~pvcore.devices.block.backend.BlockOp.READ`, see
:func:`read_mapped`).

A hole reads as zeros. A file system without ``SEEK_DATA`` support, and any
host block device, report everything as data, which is always a safe answer.
At most :data:`MAX_EXTENTS` extents are looked up per call: a map stops
there (shorter than asked, which the caller reports as such), a read counts
the rest of its range as data.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from typing import NamedTuple, Protocol

MAX_EXTENTS = 1024
"""The most extents one call looks up (two ``lseek`` each at most)."""
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


class Extent(NamedTuple):
    """``length`` bytes from ``offset`` that are all data, or all hole (read as zeros)."""

    offset: int
    length: int
    hole: bool


class MappedStore(Protocol):
    """What :func:`read_mapped` needs of a store."""

    def extents(self, offset: int, length: int) -> list[Extent]: ...

    def readv(self, buffers: Sequence[memoryview], offset: int) -> int: ...

    def splice_to(self, pipe: int, offset: int, length: int) -> int: ...


def map_extents(fd: int, offset: int, length: int, limit: int = MAX_EXTENTS) -> list[Extent]:
    """The data and hole extents of ``fd`` from ``offset`` on, covering ``length`` bytes or ending after ``limit``.

    Consecutive extents alternate between data and hole. A file system that
    cannot say (``lseek`` fails with ``EINVAL`` or ``EOPNOTSUPP``) gets one
    data extent. Past the end of the file is a hole. Raises :class:`OSError`
    on any other failure.
    """
    end = offset + length
    extents: list[Extent] = []
    position = offset
    while position < end and len(extents) < limit:
        try:
            data = os.lseek(fd, position, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data from here to the end of the file
                extents.append(Extent(position, end - position, True))
                break
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP) and not extents:
                return [Extent(offset, length, False)]
            raise
        if data > position:
            extents.append(Extent(position, min(data, end) - position, True))
            position = min(data, end)
            if position == end or len(extents) == limit:
                break
        hole = os.lseek(fd, position, os.SEEK_HOLE)
        stop = min(max(hole, position + 1), end)  # SEEK_HOLE never returns less than position; guard anyway
        extents.append(Extent(position, stop - position, False))
        position = stop
    return extents


def _views(buffers: Sequence[memoryview], start: int, length: int) -> list[memoryview]:
    """The parts of ``buffers`` (taken as one run of bytes) from ``start`` for ``length`` bytes."""
    views = []
    for buffer in buffers:
        size = len(buffer)
        if start >= size:
            start -= size
            continue
        piece = buffer[start : start + length]
        views.append(piece)
        length -= len(piece)
        start = 0
        if not length:
            break
    return views


def page_holes(extents: Sequence[Extent], offset: int, length: int) -> list[Extent]:
    """``extents`` of ``offset``..+``length`` with every hole shrunk to the whole pages it covers, the rest data.

    A hole's ends move inward to page boundaries, except at the ends of the
    range; a hole left empty becomes data. Neighbours of one kind are
    merged, and whatever ``extents`` leave uncovered at the end is data.
    """
    end = offset + length
    if len(extents) == 1 and not extents[0].hole and extents[0].length == length:
        return list(extents)  # all data, the common case: nothing to shrink
    merged: list[Extent] = []

    def add(start: int, stop: int, hole: bool) -> None:
        if stop <= start:
            return
        if merged and merged[-1].hole == hole:
            last = merged.pop()
            start = last.offset
        merged.append(Extent(start, stop - start, hole))

    position = offset
    for extent in extents:
        start, stop = extent.offset, extent.offset + extent.length
        if extent.hole:
            inner_start = start if start == offset else -(-start // PAGE_SIZE) * PAGE_SIZE
            inner_stop = stop if stop == end else stop // PAGE_SIZE * PAGE_SIZE
            if inner_start < inner_stop:
                add(position, inner_start, False)
                add(inner_start, inner_stop, True)
                position = inner_stop
            continue
        add(position, stop, False)
        position = stop
    add(position, end, False)
    return merged


def read_mapped(
    store: MappedStore, buffers: Sequence[memoryview], pipe: int, offset: int, length: int
) -> tuple[int, list[Extent]]:
    """Read the data extents of ``offset``..+``length`` only; returns the bytes read and the range's extents.

    Into ``buffers`` (their bytes over a hole are left as they are: the
    caller knows from the extents that they read as zeros), or with ``pipe``
    >= 0 spliced into that pipe one data extent after the other (a hole puts
    nothing in it). The extents cover the whole range: beyond
    :data:`MAX_EXTENTS` the rest counts as data, and so does the part of a
    hole that shares a page with data (:func:`page_holes`), so no two data
    extents share a page and a pipe needs no more page slots than the whole
    range would. A data extent that reads short (the file shrank) raises
    ``OSError(EIO)``.
    """
    extents = page_holes(store.extents(offset, length), offset, length)
    done = 0
    for extent in extents:
        if extent.hole:
            continue
        if pipe >= 0:
            count = store.splice_to(pipe, extent.offset, extent.length)
        else:
            count = store.readv(_views(buffers, extent.offset - offset, extent.length), extent.offset)
        done += count
        if count < extent.length:
            raise OSError(errno.EIO, f"end of file after {extent.offset - offset + count} of {length} bytes")
    return done, extents
