"""Grant copy: the Linux ioctl's encoding and the SIMULATED host's checks, piece by piece."""

from __future__ import annotations

import pytest
from pvcore_xen import host
from pvcore_xen.host import GNTST_OKAY, PAGE_SIZE, GrantCopy, LinuxXenHost
from pvcore_xen.testing.host import SimulatedXenHost


def test_ioctl_and_segment_layouts_match_the_kernel_header():
    """include/uapi/xen/gntdev.h: _IOC(_IOC_NONE, 'G', 8, 16); a segment is 24 bytes, status at byte 20."""
    assert host.IOCTL_GNTDEV_GRANT_COPY == 0x00104708
    for layout in (host._COPY_FROM_GUEST, host._COPY_TO_GUEST):
        assert layout.size == 24
        packed = layout.pack(*([0] * 6), -3)
        assert packed[20:22] == (-3).to_bytes(2, "little", signed=True)


def test_linux_host_names_the_missing_device(tmp_path):
    linux = LinuxXenHost(gntdev_path=str(tmp_path / "gntdev"))
    with pytest.raises(FileNotFoundError):
        linux.grant_copy([GrantCopy(1, 8, 0, 16)], bytearray(16), to_guest=False)


@pytest.fixture
def guest():
    simulated = SimulatedXenHost()
    domain = simulated.add_domain(1, memory_size=4 * PAGE_SIZE)
    yield simulated, domain
    simulated.close()


def test_copy_both_ways_and_each_piece_is_checked(guest):
    simulated, domain = guest
    domain.memory[PAGE_SIZE + 100 : PAGE_SIZE + 110] = b"0123456789"
    ref = domain.grant(1, to_domid=0)
    readonly = domain.grant(2, to_domid=0, readonly=True)
    other = domain.grant(3, to_domid=5)
    buffer = bytearray(10 + 4 + 4 + 4 + 8)
    pieces = [
        GrantCopy(1, ref, 100, 10),
        GrantCopy(1, 0x7777, 0, 4),  # never granted
        GrantCopy(1, other, 0, 4),  # granted to another domain
        GrantCopy(1, ref, PAGE_SIZE - 2, 4),  # crosses the page
        GrantCopy(1, readonly, 0, 8),
    ]
    statuses = simulated.grant_copy(pieces, buffer, to_guest=False)
    assert statuses[0] == GNTST_OKAY and buffer[:10] == b"0123456789"
    assert all(status < 0 for status in statuses[1:4]) and statuses[4] == GNTST_OKAY
    statuses = simulated.grant_copy([GrantCopy(1, ref, 0, 5), GrantCopy(1, readonly, 0, 5)], bytearray(b"helloworld"), to_guest=True)
    assert statuses[0] == GNTST_OKAY and statuses[1] < 0
    assert bytes(domain.memory[PAGE_SIZE : PAGE_SIZE + 5]) == b"hello"
    assert bytes(domain.memory[2 * PAGE_SIZE : 2 * PAGE_SIZE + 5]) == bytes(5)
