"""The host interface: ioctl encodings of the Linux side, and the SIMULATED host's grants and event channels."""

from __future__ import annotations

import select

import pytest

from pvcore.ring.notify import Notifier
from pvcore_xen import host
from pvcore_xen.host import PAGE_SIZE, EventChannel, GrantPage, LinuxXenHost, XenHost
from pvcore_xen.testing.host import SimulatedXenHost


def test_linux_ioctl_numbers_match_the_kernel_headers():
    """_IOC(_IOC_NONE, type, nr, sizeof(struct)) as include/uapi/xen/{evtchn,gntdev}.h define them."""
    assert host.IOCTL_EVTCHN_BIND_INTERDOMAIN == 0x00084501
    assert host.IOCTL_EVTCHN_UNBIND == 0x00044503
    assert host.IOCTL_EVTCHN_NOTIFY == 0x00044504
    assert host.IOCTL_GNTDEV_MAP_GRANT_REF == 0x00184700
    assert host.IOCTL_GNTDEV_UNMAP_GRANT_REF == 0x00104701


def test_both_hosts_implement_the_interface():
    assert isinstance(SimulatedXenHost(), XenHost)
    assert isinstance(LinuxXenHost(), XenHost)


def test_linux_host_names_the_missing_device(tmp_path):
    linux = LinuxXenHost(evtchn_path=str(tmp_path / "evtchn"), gntdev_path=str(tmp_path / "gntdev"))
    with pytest.raises(FileNotFoundError):
        linux.bind_interdomain(1, 5)
    with pytest.raises(FileNotFoundError):
        linux.map_grants(1, [8])


@pytest.fixture
def simulated_host():
    simulated = SimulatedXenHost()
    yield simulated
    simulated.close()


def test_granted_page_is_shared_memory(simulated_host):
    guest = simulated_host.add_domain(1, memory_size=4 * PAGE_SIZE)
    guest.memory[2 * PAGE_SIZE:2 * PAGE_SIZE + 5] = b"hello"
    ref = guest.grant(2, to_domid=0)
    page = simulated_host.map_grants(1, [ref])
    assert isinstance(page, GrantPage)
    assert page.buffer[:5] == b"hello"
    page.buffer[5:10] = b"world"
    assert guest.memory[2 * PAGE_SIZE + 5:2 * PAGE_SIZE + 10] == b"world"
    page.close()


def test_grant_checks(simulated_host):
    guest = simulated_host.add_domain(1)
    readonly_ref = guest.grant(0, to_domid=0, readonly=True)
    other_ref = guest.grant(1, to_domid=7)
    with pytest.raises(OSError, match="not granted to domain 0"):
        simulated_host.map_grants(1, [999])
    with pytest.raises(OSError, match="not granted to domain 0"):
        simulated_host.map_grants(1, [other_ref])
    with pytest.raises(OSError, match="read-only"):
        simulated_host.map_grants(1, [readonly_ref], writable=True)
    page = simulated_host.map_grants(1, [readonly_ref], writable=False)
    with pytest.raises(TypeError):
        page.buffer[0:1] = b"x"
    page.close()
    guest.revoke(readonly_ref)
    with pytest.raises(OSError):
        simulated_host.map_grants(1, [readonly_ref], writable=False)
    with pytest.raises(OSError, match="no simulated domain 4"):
        simulated_host.map_grants(4, [8])
    with pytest.raises(ValueError):
        guest.grant(1000, to_domid=0)


def test_event_channel_signals_both_ways(simulated_host):
    guest = simulated_host.add_domain(1)
    port = guest.alloc_unbound(remote_domid=0)
    backend_end = simulated_host.bind_interdomain(1, port)
    guest_end = guest.event_channel(port)
    assert isinstance(backend_end, EventChannel)
    assert isinstance(backend_end, Notifier)
    assert backend_end.consume() == 0
    guest_end.signal()
    guest_end.signal()
    assert select.select([backend_end], [], [], 1)[0] == [backend_end]
    assert backend_end.consume() == 2
    assert guest_end.consume() == 0
    backend_end.signal()
    assert guest_end.consume() == 1
    with pytest.raises(OSError, match="already bound"):
        simulated_host.bind_interdomain(1, port)
    with pytest.raises(OSError, match="not allocated"):
        simulated_host.bind_interdomain(1, 42)
    foreign_port = guest.alloc_unbound(remote_domid=5)
    with pytest.raises(OSError, match="not allocated for domain 0"):
        simulated_host.bind_interdomain(1, foreign_port)
