"""Grant-addressed guest memory over the SIMULATED host: lazy mapping, page crossing, refusals."""

from __future__ import annotations

import pytest
from pvcore_xen.grants import (
    XEN_GRANT_DMA_ADDR_OFF,
    GrantLayout,
    GrantMemory,
    grant_address,
)
from pvcore_xen.host import PAGE_SIZE
from pvcore_xen.plugin import XenPlugin
from pvcore_xen.testing.host import SimulatedXenHost

from pvcore.ring.memory import GuestMemoryError


@pytest.fixture
def simulated_host():
    simulated = SimulatedXenHost()
    yield simulated
    simulated.close()


def test_linux_grant_dma_address_format():
    assert grant_address(5, 0x10) == (1 << 63) | 0x5010
    assert XEN_GRANT_DMA_ADDR_OFF == 0x8000000000000000


def test_pages_map_lazily_and_buffers_cross_consecutive_refs(simulated_host):
    guest = simulated_host.add_domain(1)
    first = guest.grant(3, to_domid=0, ref=100)
    guest.grant(4, to_domid=0, ref=101)
    guest.memory[4 * PAGE_SIZE - 2 : 4 * PAGE_SIZE + 2] = b"abcd"
    memory = XenPlugin(simulated_host).pvcore_map_memory(layout=GrantLayout(1, simulated_host))
    assert isinstance(memory, GrantMemory) and memory.size == 0
    assert memory.read(grant_address(first, PAGE_SIZE - 2), 4) == b"abcd"
    assert memory.size == 2 * PAGE_SIZE
    memory.write(grant_address(101, 0), b"XY")
    assert guest.memory[4 * PAGE_SIZE : 4 * PAGE_SIZE + 2] == b"XY"
    memory.close()
    assert memory.size == 0


def test_refusals_are_guest_memory_errors(simulated_host):
    guest = simulated_host.add_domain(1)
    readonly = guest.grant(0, to_domid=0, readonly=True)
    memory = GrantMemory(1, simulated_host)
    with pytest.raises(GuestMemoryError, match="not a grant address"):
        memory.read(0x1000, 4)
    with pytest.raises(GuestMemoryError, match="grant ref 999 cannot be mapped"):
        memory.read(grant_address(999), 4)
    with pytest.raises(GuestMemoryError, match=f"grant ref {readonly + 1} cannot be mapped"):
        memory.read(grant_address(readonly, PAGE_SIZE - 2), 4)
    assert memory.read(grant_address(readonly), 4) == bytes(4)
    with pytest.raises(GuestMemoryError, match="read-only"):
        memory.write(grant_address(readonly), b"x")
    memory.close()


def test_hooks_decline_what_is_not_xen(simulated_host):
    plugin = XenPlugin(simulated_host)
    assert plugin.pvcore_map_memory(layout=object()) is None
    assert plugin.pvcore_open_notifier(channel=object()) is None
