"""pvcore.ring.fdmemory: fd memory tables mapped into GuestMemory (the core's default memory primitive, vhost-user's SET_MEM_TABLE)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from pvcore.contract import FdMemoryLayout, FdRegion
from pvcore.ring.fdmemory import UnsealedMemoryError, map_fd_layout, sealed_memfd
from pvcore.ring.memory import GuestMemoryError

SIZE = 1 << 20


@pytest.fixture
def memfd() -> Iterator[int]:
    fd = sealed_memfd("fdmemory-test", SIZE)
    yield fd
    os.close(fd)


def test_regions_map_the_file_at_their_offsets(memfd):
    layout = FdMemoryLayout(
        (
            FdRegion(memfd, guest_addr=0, size=0x10000, user_addr=0x5000_0000, offset=0),
            FdRegion(memfd, guest_addr=0x100000, size=0x1000, user_addr=0x6000_0000, offset=0x20000 + 100),
        )
    )
    with map_fd_layout(layout) as memory:
        assert memory.size == 0x11000
        memory.write(0x100000, b"second region")
        assert os.pread(memfd, 13, 0x20000 + 100) == b"second region"
        os.pwrite(memfd, b"from the file", 0x200)
        assert memory.read(0x200, 13) == b"from the file"
        assert memory.user_to_guest(0x6000_0010, 16) == 0x100010
        with pytest.raises(GuestMemoryError):
            memory.read(0x10000, 1)


def test_fds_may_be_closed_after_mapping():
    fd = sealed_memfd("closed", 4096)
    memory = map_fd_layout(FdMemoryLayout((FdRegion(fd, 0, 4096, 0x1000, 0),)))
    os.close(fd)
    memory.write(10, b"still mapped")
    assert memory.read(10, 12) == b"still mapped"
    memory.close()


def test_close_unmaps_and_later_access_fails_cleanly(memfd):
    memory = map_fd_layout(FdMemoryLayout((FdRegion(memfd, 0, SIZE, 0x1000, 0),)))
    held = memory.view(0, 16, write=True)
    memory.close()
    memory.close()
    with pytest.raises(GuestMemoryError):
        memory.read(0, 1)
    held[:4] = b"live"  # a view someone still held keeps its pages until released
    assert os.pread(memfd, 4, 0) == b"live"
    held.release()


@pytest.mark.parametrize(
    ("regions", "message"),
    [
        ([(0, 0, 0x1000, 0)], "size 0x0"),
        ([(0, SIZE * 2, 0x1000, 0)], "past the end of the file"),
        ([(0, 0x1000, 0x1000, SIZE)], "past the end of the file"),
        ([(0, 0x1000, 0x1000, -1)], "mmap offset"),
        ([((1 << 64) - 0x800, 0x1000, 0x1000, 0)], "wraps"),
        ([(0, 0x1000, (1 << 64) - 0x800, 0)], "wraps"),
        ([(0, 0x2000, 0x10000, 0), (0x1000, 0x1000, 0x90000, 0)], "guest address ranges overlap"),
        ([(0, 0x1000, 0x10000, 0), (0x8000, 0x1000, 0x10800, 0)], "user address ranges overlap"),
    ],
)
def test_bad_layouts_are_refused(memfd, regions, message):
    layout = FdMemoryLayout(tuple(FdRegion(memfd, *region) for region in regions))
    with pytest.raises(ValueError, match=message):
        map_fd_layout(layout)


def test_closed_fd_is_refused():
    fd = os.memfd_create("gone", os.MFD_CLOEXEC)
    os.close(fd)
    with pytest.raises(ValueError, match="not an open file descriptor"):
        map_fd_layout(FdMemoryLayout((FdRegion(fd, 0, 4096, 0, 0),)))


def test_a_pipe_is_refused_naming_the_region():
    read_end, write_end = os.pipe()
    try:
        with pytest.raises(ValueError, match="memory region 0.*not a regular file"):
            map_fd_layout(FdMemoryLayout((FdRegion(read_end, 0, 4096, 0, 0),)))
    finally:
        os.close(read_end)
        os.close(write_end)


def test_memory_the_frontend_could_shrink_is_refused(tmp_path):
    unsealed = os.memfd_create("unsealed", os.MFD_CLOEXEC)
    plain_file = os.open(tmp_path / "ram", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        for fd in (unsealed, plain_file):
            os.ftruncate(fd, 4096)
            with pytest.raises(UnsealedMemoryError, match="memory region 0.*not sealed against shrinking"):
                map_fd_layout(FdMemoryLayout((FdRegion(fd, 0, 4096, 0, 0),)))
    finally:
        os.close(unsealed)
        os.close(plain_file)


def test_sealed_guest_ram_cannot_shrink_under_a_mapping(memfd):
    with map_fd_layout(FdMemoryLayout((FdRegion(memfd, 0, SIZE, 0x1000, 0),))) as memory:
        with pytest.raises(PermissionError):
            os.ftruncate(memfd, 0)
        memory.write(SIZE - 4, b"last")
        assert memory.read(SIZE - 4, 4) == b"last"
