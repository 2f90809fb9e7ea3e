"""The guest side of loophv and its conformance peer (``pytest --pvcore-plugin=loophv``)."""

from __future__ import annotations

import json
import os
import select
import socket
from pathlib import Path

from pvcore.contract import EventFdChannel, FdMemoryLayout, FdRegion, HostContext
from pvcore.testing.conformance import ConformancePeer, EventFdChannelEnd, RingGuest
from pvcore.testing.driver import DriverQueue, GuestRam
from pvcore.virtio import VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC, bit
from pvcore_loophv.transport import LoopFrontDoor

GUEST_RAM = 4 << 20
QUEUE_SIZE = 64


def eventfd() -> int:
    """A non-blocking eventfd."""
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def connect_guest(socket_path: Path | str, *, timeout: float = 5.0) -> RingGuest:
    """Connect to a loophv device as a guest: RAM, rings and eventfds, the setup message, its answer."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.settimeout(timeout)
    sock.connect(os.fspath(socket_path))
    hello = json.loads(sock.recv(65536))
    ram = GuestRam(GUEST_RAM)
    features = hello["features"]
    queues = [
        DriverQueue(ram, QUEUE_SIZE, event_idx=bool(features & bit(VIRTIO_RING_F_EVENT_IDX)),
                    indirect=bool(features & bit(VIRTIO_RING_F_INDIRECT_DESC)))
        for _ in range(hello["queues"])
    ]
    error, kicks, calls = eventfd(), [eventfd() for _ in queues], [eventfd() for _ in queues]
    setup = {
        "features": features,
        "memory": ram.size,
        "queues": [{"size": q.size, "desc": q.desc_addr, "avail": q.avail_addr, "used": q.used_addr} for q in queues],
    }
    descriptors = [ram.fd, error] + [fd for pair in zip(kicks, calls) for fd in pair]
    socket.send_fds(sock, [json.dumps(setup).encode()], descriptors)
    answer = json.loads(sock.recv(65536))
    if not answer.get("ok"):
        raise ConnectionError(f"loophv {socket_path}: setup refused: {answer.get('error')}")

    def close() -> None:
        sock.close()
        for fd in (error, *kicks, *calls):
            os.close(fd)
        ram.close()

    return RingGuest(
        queues,
        kick=lambda index: os.eventfd_write(kicks[index], 1),
        interrupts=[EventFdChannelEnd(fd) for fd in calls],
        failed=lambda: bool(select.select([error], [], [], 0)[0]),
        close=close,
    )


class LoopHvPeer(ConformancePeer):
    """What the conformance kit needs from loophv: fake hosts, socket paths, guests, channels, RAM."""

    def present_host(self, root: Path) -> HostContext:
        """A host with the loophv directory."""
        (root / "run" / "loophv").mkdir(parents=True, exist_ok=True)
        return HostContext(root=root, environ={})

    def probe_host(self, root: Path) -> HostContext:
        """A host listing two devices."""
        host = self.present_host(root)
        (root / "run" / "loophv" / "devices").write_text("vm1 block /run/loophv/vm1-disk.sock\nvm1 rng /run/x.sock\n")
        return host

    def hostile_probe_host(self, root: Path) -> HostContext:
        """A device list with a line that is not ``DOMAIN CLASS SOCKET``."""
        host = self.present_host(root)
        (root / "run" / "loophv" / "devices").write_bytes(b"vm1 gpu /x.sock\n\xff\x00 junk\n")
        return host

    def device_options(self, device_class: str, name: str) -> dict[str, str]:
        """Each device listens on a socket in the kit's directory."""
        return {"socket": str(self.directory / f"{name}.sock")}

    def open_guest(self, device: object, door: object) -> RingGuest | None:
        """A guest on the device's loophv socket."""
        return connect_guest(door.socket_path) if isinstance(door, LoopFrontDoor) else None

    def notification_channel(self) -> tuple[EventFdChannel, EventFdChannelEnd]:
        """An eventfd: the plugin adopts it, the guest keeps a duplicate."""
        fd = eventfd()
        return EventFdChannel(fd), EventFdChannelEnd(os.dup(fd), owned=True)

    def hostile_channel(self) -> EventFdChannel:
        """A pipe where an eventfd belongs."""
        read_end, write_end = os.pipe()
        self.leftovers += [read_end, write_end]
        return EventFdChannel(read_end)

    def memory_layout(self) -> tuple[FdMemoryLayout, GuestRam]:
        """One memfd region at guest address 0."""
        ram = GuestRam(1 << 20)
        self.rams.append(ram)
        return FdMemoryLayout((FdRegion(ram.fd, 0, ram.size, 0, 0),)), ram


conformance_peer = LoopHvPeer()
"""The peer the kit finds by convention (``pvcore_loophv.testing:conformance_peer``)."""
