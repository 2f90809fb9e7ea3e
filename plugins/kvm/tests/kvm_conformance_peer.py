"""The kvm plugin's conformance peer: the Python vhost-user frontend as the guest, a fake libvirt for probe.

Used by test_kvm_conformance.py (``pytest --pvcore-plugin=kvm
--pvcore-peer=kvm_conformance_peer:conformance_peer`` with this directory on the path).
"""

from __future__ import annotations

import os
from pathlib import Path

import attrs

from pvcore.contract import EventFdChannel, FdMemoryLayout, FdRegion, HostContext
from pvcore.testing.conformance import ConformancePeer, EventFdChannelEnd, RingGuest
from pvcore.testing.driver import GuestRam
from pvcore.testing.vhost_user_frontend import VhostUserFrontend
from pvcore.transports.vhost_user import VhostUserFrontDoor

DOMAIN_XML = """<domain type='kvm'><name>vm1</name><devices>
  <disk type='vhostuser' device='disk'><source type='unix' path='/run/pvcore/vm1-vda.sock'/><target dev='vda'/></disk>
  <serial type='unix'><source mode='connect' path='/run/pvcore/vm1-con.sock'/></serial>
</devices></domain>"""


@attrs.define
class FakeDomain:
    """A libvirt domain: a name and its XML."""

    domain_name: str
    xml: str

    def name(self) -> str:
        """libvirt's virDomainGetName."""
        return self.domain_name

    def XMLDesc(self, flags: int) -> str:  # noqa: N802 - libvirt's name
        """libvirt's virDomainGetXMLDesc."""
        return self.xml


@attrs.define
class FakeLibvirt:
    """A libvirt connection of type QEMU holding some domains."""

    domains: list[FakeDomain]

    def getType(self) -> str:  # noqa: N802 - libvirt's name
        """libvirt's virConnectGetType."""
        return "QEMU"

    def listAllDomains(self, flags: int) -> list[FakeDomain]:  # noqa: N802 - libvirt's name
        """libvirt's virConnectListAllDomains."""
        return self.domains


def frontend_guest(socket_path: Path) -> RingGuest:
    """A vhost-user frontend (QEMU's side) connected and started, as a ring guest."""
    frontend = VhostUserFrontend.connect(socket_path)
    try:
        frontend.start(queue_size=64)
    except BaseException:
        frontend.close()
        raise
    indexes = sorted(frontend.queues)
    return RingGuest(
        [frontend.queues[index] for index in indexes],
        kick=lambda index: os.eventfd_write(frontend.kicks[index], 1),
        interrupts=[EventFdChannelEnd(frontend.calls[index]) for index in indexes],
        failed=lambda: any(frontend.error_signalled(index) for index in indexes),
        close=frontend.close,
    )


class KvmPeer(ConformancePeer):
    """What the kit needs from kvm: /dev/kvm, libvirt domains, vhost-user guests, eventfds, memfd RAM."""

    def present_host(self, root: Path) -> HostContext:
        """A host with /dev/kvm."""
        (root / "dev").mkdir(exist_ok=True)
        (root / "dev" / "kvm").touch()
        return HostContext(root=root, environ={})

    def probe_host(self, root: Path) -> HostContext:
        """A libvirt connection with one domain that has a vhost-user disk and a unix serial console."""
        return HostContext(root=root, libvirt=FakeLibvirt([FakeDomain("vm1", DOMAIN_XML)]), environ={})

    def hostile_probe_host(self, root: Path) -> HostContext:
        """A domain whose XML is cut off."""
        return HostContext(root=root, libvirt=FakeLibvirt([FakeDomain("bad", DOMAIN_XML[:60])]), environ={})

    def device_options(self, device_class: str, name: str) -> dict[str, str]:
        """Each device listens on a socket in the kit's directory."""
        return {"socket": str(self.directory / f"{name}.sock")}

    def open_guest(self, device: object, door: object) -> RingGuest | None:
        """The Python vhost-user frontend for vhost-user doors; the kit reaches the chardev door itself."""
        return frontend_guest(door.socket_path) if isinstance(door, VhostUserFrontDoor) else None

    def notification_channel(self) -> tuple[EventFdChannel, EventFdChannelEnd]:
        """An eventfd as SET_VRING_KICK/CALL pass it; the guest keeps a duplicate."""
        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        return EventFdChannel(fd), EventFdChannelEnd(os.dup(fd), owned=True)

    def hostile_channel(self) -> EventFdChannel:
        """A pipe passed where an eventfd belongs."""
        read_end, write_end = os.pipe()
        self.leftovers += [read_end, write_end]
        return EventFdChannel(read_end)

    def memory_layout(self) -> tuple[FdMemoryLayout, GuestRam]:
        """Guest RAM as one SET_MEM_TABLE region."""
        ram = GuestRam(1 << 20, guest_addr=0x10000)
        self.rams.append(ram)
        return FdMemoryLayout((FdRegion(ram.fd, ram.guest_addr, ram.size, ram.user_addr, 0),)), ram


conformance_peer = KvmPeer()
"""The kvm plugin's peer."""
