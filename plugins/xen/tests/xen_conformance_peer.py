"""The xen plugin's conformance peer, on the SIMULATED Xen host (no hypervisor runs here).

A simulated xenstored and host with guests 1 and 2 run on the kit's loop;
each device the kit asks for is created in xenstore as libxl would, and its
guest is the simulated Linux frontend (xen-blkfront's blkif ring,
xen-netfront's netif rings, or hvc_xen's console ring). Xen's PV protocols are not virtio rings, so the
kit's ring tests (suppression, hostile ring input) do not apply: netif's own
are in test_netif.py and test_netif_hostile.py. Used by test_xen_conformance.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pvcore_xen.console import XenConsoleBackend
from pvcore_xen.grants import EventChannelSpec, GrantLayout
from pvcore_xen.host import PAGE_SIZE
from pvcore_xen.plugin import FRONT_DOORS, XenPlugin
from pvcore_xen.blkback import XenBlockBackend
from pvcore_xen.testing.blkfront import SimulatedBlkFrontend
from pvcore_xen.testing.frontend import SimulatedConsoleFrontend, add_device
from pvcore_xen.testing.host import GrantedRam, SimulatedEventChannel, SimulatedXenHost
from pvcore_xen.testing.netfront import SimulatedNetFrontend
from pvcore_xen.testing.xenstored import SimulatedXenstored
from pvcore_xen.xenstore import XenstoreClient

from pvcore.contract import DeviceInstance, FrontDoor, HostContext
from pvcore.testing.conformance import ConformancePeer, KitContext
from pvcore.testing.loopthread import LoopThread

GUESTS = (1, 2)
GUEST_MEMORY = 1024 * PAGE_SIZE
CORRUPT_NODE = "/local/domain/0/backend/console/not-a-domid"


class XenConsoleGuest:
    """A simulated hvc_xen frontend, driven from the test thread."""

    def __init__(self, front: SimulatedConsoleFrontend, loop: LoopThread) -> None:
        self.front = front
        self.loop = loop

    def send(self, data: bytes) -> None:
        """Guest output into the ``out`` ring."""
        self.loop.run(self.front.write(data))

    def receive(self, size: int, timeout: float) -> bytes:
        """Guest input from the ``in`` ring."""
        return self.loop.run(self.front.read(size, timeout), timeout + 5)

    def close(self) -> None:
        """Close as Linux's xenbus does."""
        self.loop.run(self.front.close())


class XenBlockGuest:
    """A simulated xen-blkfront, driven from the test thread."""

    def __init__(self, front: SimulatedBlkFrontend, loop: LoopThread) -> None:
        self.front = front
        self.loop = loop
        self.next_id = 0

    def _id(self) -> int:
        self.next_id += 1
        return self.next_id

    def read(self, sector: int, count: int) -> bytes:
        """``count`` sectors from ``sector``."""
        status, data = self.loop.run(self.front.read(self._id(), sector, count * 512))
        assert status == 0, f"blkif read answered {status}"
        return data

    def write(self, sector: int, data: bytes) -> None:
        """``data`` at ``sector``."""
        assert self.loop.run(self.front.write(self._id(), sector, data)) == 0

    def flush(self) -> None:
        """A cache flush."""
        assert self.loop.run(self.front.flush(self._id())) == 0

    def close(self) -> None:
        """Close as Linux's xenbus does."""
        self.loop.run(self.front.close())


class XenNetGuest:
    """A simulated xen-netfront, driven from the test thread; it keeps receive buffers posted."""

    RECEIVE_BUFFERS = 16

    def __init__(self, front: SimulatedNetFrontend, loop: LoopThread) -> None:
        self.front = front
        self.loop = loop
        self.next_id = self.RECEIVE_BUFFERS
        self.sent = 0
        loop.call(lambda: front.post_rx(self.RECEIVE_BUFFERS))

    def send(self, frame: bytes) -> None:
        """Transmit ``frame`` and wait for the backend to take it."""
        self.loop.call(lambda: self.front.send(frame, first_id=self.sent & 0xFFFF))
        self.sent += 1
        self.loop.run(self.front.wait_tx(1))

    def receive(self, timeout: float) -> bytes:
        """The next received frame; its buffer is posted again."""
        frame = self.loop.run(self.front.receive(timeout), timeout + 5)
        self.loop.call(lambda: self.front.post_rx(1, first_id=self.next_id & 0xFFFF))
        self.next_id += 1
        return frame

    def close(self) -> None:
        """Close as Linux's xenbus does."""
        self.loop.run(self.front.close())


class XenPeer(ConformancePeer):
    """What the kit needs from xen, on the simulated host."""

    def __init__(self) -> None:
        self.store = SimulatedXenstored()
        self.host = SimulatedXenHost(backend_domid=0)
        self.clients: dict[int, XenstoreClient] = {}
        self.devices: dict[str, tuple[int, int]] = {}
        self.next_devid = dict.fromkeys(GUESTS, 1)  # device 0 of a console is the primary, xenconsoled's
        self.xen_plugin: XenPlugin | None = None
        self.loop: LoopThread | None = None
        self.corrupt = False

    def run(self, coroutine: Any, timeout: float = 15.0) -> Any:
        """Run a coroutine on the kit's loop, where the simulated xenstored runs."""
        assert self.loop is not None
        return self.loop.run(coroutine, timeout)

    def start(self, kit: KitContext) -> None:
        """Start xenstored with a connection per domain, and the guests."""
        self.loop = kit.loop

        async def begin() -> None:
            for domid in (0, *GUESTS):
                path = kit.directory / f"xenstored-dom{domid}.sock"
                await self.store.listen(path, domid=domid)
                self.clients[domid] = await XenstoreClient.connect(path, timeout=2.0)

        self.run(begin())
        for domid in GUESTS:
            self.host.add_domain(domid, GUEST_MEMORY)
        self.xen_plugin = XenPlugin(self.host, xenstore_path=str(kit.directory / "xenstored-dom0.sock"), backend_domid=0)

    def stop(self) -> None:
        """Close the xenstore connections, xenstored and the host."""

        async def end() -> None:
            for client in self.clients.values():
                await client.close()
            await self.store.close()

        self.run(end())
        self.host.close()

    def plugin(self) -> XenPlugin | None:
        """The xen plugin bound to the simulated host and xenstore."""
        return self.xen_plugin

    def present_host(self, root: Path) -> HostContext:
        """A domain whose /sys/hypervisor/type says xen."""
        (root / "sys" / "hypervisor").mkdir(parents=True, exist_ok=True)
        (root / "sys" / "hypervisor" / "type").write_text("xen\n")
        return HostContext(root=root, environ={})

    def add(self, kind: str, domid: int, nodes: dict[str, str]) -> int:
        """Create a device for guest ``domid`` in xenstore as libxl does; return its devid."""
        devid = self.next_devid[domid]
        self.next_devid[domid] += 1
        self.run(add_device(self.clients[0], backend_domid=0, domid=domid, kind=kind, devid=devid, nodes=nodes))
        return devid

    def probe_host(self, root: Path) -> HostContext:
        """The simulated xenstore, with a console for guest 1 (and whatever the kit served before)."""
        if self.corrupt:
            self.run(self.clients[0].rm(CORRUPT_NODE))
            self.corrupt = False
        self.add("console", 1, {})
        return HostContext(root=root, environ={})

    def hostile_probe_host(self, root: Path) -> HostContext:
        """A backend node whose name is not a domain id."""
        self.run(self.clients[0].write(f"{CORRUPT_NODE}/0/state", "1"))
        self.corrupt = True
        return HostContext(root=root, environ={})

    def device_options(self, device_class: str, name: str) -> dict[str, str]:
        """Create the device in xenstore (guests 1 and 2 in turn) and name it by domain/devid."""
        domid = GUESTS[len(self.devices) % len(GUESTS)]
        devid = self.add(FRONT_DOORS[device_class].kind, domid, {})
        self.devices[name] = (domid, devid)
        return {"domain": f"{domid}/{devid}"}

    def open_guest(self, device: DeviceInstance, door: FrontDoor) -> XenBlockGuest | XenNetGuest | XenConsoleGuest:
        """The simulated frontend of the device's guest, connected through the xenbus handshake."""
        assert self.loop is not None
        domid, devid = self.devices[device.config.name]
        domain, client = self.host.domains[domid], self.clients[domid]
        if isinstance(door, XenConsoleBackend):
            console = SimulatedConsoleFrontend(domain, client, devid=devid)
            self.run(console.connect())
            return XenConsoleGuest(console, self.loop)
        if isinstance(door, XenBlockBackend):
            disk = SimulatedBlkFrontend(domain, client, devid=devid)
            self.run(disk.connect())
            return XenBlockGuest(disk, self.loop)
        front = SimulatedNetFrontend(domain, client, devid=devid)
        self.run(front.connect())
        return XenNetGuest(front, self.loop)

    def notification_channel(self) -> tuple[EventChannelSpec, SimulatedEventChannel]:
        """A port guest 1 allocated for the backend, and the guest's end of it."""
        domain = self.host.domains[GUESTS[0]]
        port = domain.alloc_unbound(0)
        return EventChannelSpec(domain.domid, port), domain.event_channel(port)

    def hostile_channel(self) -> EventChannelSpec:
        """A port guest 1 never allocated."""
        return EventChannelSpec(GUESTS[0], 0xFFFF)

    def memory_layout(self) -> tuple[GrantLayout, GrantedRam]:
        """Guest 1's grant-addressed RAM."""
        return GrantLayout(GUESTS[0], self.host), self.host.domains[GUESTS[0]].ram


conformance_peer = XenPeer()
"""The xen plugin's peer."""
