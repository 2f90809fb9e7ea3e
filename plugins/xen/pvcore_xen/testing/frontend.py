"""SIMULATED Xen frontends and toolstack: a guest's side of xenbus, for tests.

:func:`add_device` writes a device's backend and frontend directories the way
libxl does (as dom0, with the same ownership). :class:`SimulatedFrontend` is
the xenbus half every simulated frontend shares (its nodes, the state
handshake); :class:`SimulatedConsoleFrontend` is Linux's hvc_xen: one granted
``xencons_interface`` page, ``ring-ref`` and ``port`` (the netfront is in
:mod:`pvcore_xen.testing.netfront`). None talks to a real hypervisor.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time

from pvcore_xen.console import (
    IN_CONS,
    IN_OFFSET,
    IN_PROD,
    IN_SIZE,
    INTERFACE_SIZE,
    OUT_CONS,
    OUT_OFFSET,
    OUT_PROD,
    OUT_SIZE,
)
from pvcore_xen.host import PAGE_SIZE
from pvcore_xen.testing.host import DMA_FIRST_REF, SimulatedDomain
from pvcore_xen.xenbus import XenbusState, backend_path, frontend_path
from pvcore_xen.xenstore import XenstoreClient
from pvcore_xen.xs_wire import Access, Permission

RECHECK_INTERVAL = 0.05
"""Longest sleep on an event channel before looking at the ring again."""


async def add_device(
    dom0: XenstoreClient, *, backend_domid: int, domid: int, kind: str, devid: int, nodes: dict[str, str] | None = None
) -> None:
    """Create a device's backend and frontend directories as libxl does (both Initialising)."""
    back, front = backend_path(backend_domid, kind, domid, devid), frontend_path(kind, domid, devid)
    backend_nodes = {"frontend": front, "frontend-id": str(domid), "online": "1", "state": "1", **(nodes or {})}
    frontend_nodes = {"backend": back, "backend-id": str(backend_domid), "state": "1"}
    for path, values, owner, reader in ((back, backend_nodes, backend_domid, domid), (front, frontend_nodes, domid, backend_domid)):
        await dom0.mkdir(path)
        await dom0.set_perms(path, [Permission(owner, Access.NONE), Permission(reader, Access.READ)])
        for node, value in values.items():
            await dom0.write(f"{path}/{node}", value)


async def remove_device(dom0: XenstoreClient, *, backend_domid: int, domid: int, kind: str, devid: int) -> None:
    """Remove both directories of a device (the toolstack destroying it)."""
    await dom0.rm(frontend_path(kind, domid, devid))
    await dom0.rm(backend_path(backend_domid, kind, domid, devid))


async def wait_readable(fd: int, timeout: float) -> None:
    """Return when ``fd`` polls readable or ``timeout`` seconds passed."""
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    loop.add_reader(fd, lambda: ready.done() or ready.set_result(None))
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ready, timeout)
    finally:
        loop.remove_reader(fd)


class SimulatedFrontend:
    """The xenbus half of a simulated frontend: its nodes and the state handshake."""

    kind = ""

    def __init__(self, domain: SimulatedDomain, client: XenstoreClient, devid: int = 0, backend_domid: int = 0) -> None:
        self.domain = domain
        self.client = client
        self.devid = devid
        self.backend_domid = backend_domid
        self.path = frontend_path(self.kind, domain.domid, devid)
        self.backend_path = backend_path(backend_domid, self.kind, domain.domid, devid)

    async def set_state(self, state: XenbusState) -> None:
        """Write the frontend's state node."""
        await self.client.write(f"{self.path}/state", str(int(state)))

    async def backend_state(self) -> XenbusState | None:
        """The backend's state now (None if it has no state node)."""
        with contextlib.suppress(OSError):
            return XenbusState(int(await self.client.read(f"{self.backend_path}/state")))
        return None

    async def wait_backend(self, *states: XenbusState, timeout: float = 5.0) -> XenbusState:
        """Wait until the backend is in one of ``states``; return it (``TimeoutError`` otherwise)."""
        watch = await self.client.watch(f"{self.backend_path}/state")
        deadline = time.monotonic() + timeout
        try:
            while (state := await self.backend_state()) not in states:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"{self.backend_path}: backend is {state!r}, not one of {[s.name for s in states]}")
                with contextlib.suppress(TimeoutError):
                    await watch.get(remaining)
        finally:
            await self.client.unwatch(watch)
        assert state is not None
        return state

    async def close(self) -> None:
        """Close as Linux's xenbus does: Closing, wait for the backend, Closed."""
        await self.set_state(XenbusState.CLOSING)
        await self.wait_backend(XenbusState.CLOSING, XenbusState.CLOSED)
        await self.set_state(XenbusState.CLOSED)
        await self.wait_backend(XenbusState.CLOSED)


_U32 = struct.Struct("<I")


class SimulatedConsoleFrontend(SimulatedFrontend):
    """A SIMULATED hvc_xen: one granted ``xencons_interface`` page, ``ring-ref`` and ``port``."""

    kind = "console"

    def __init__(self, *args: object, start_index: int = 0, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        ram = self.domain.ram
        self.page = ram.alloc(PAGE_SIZE, PAGE_SIZE)
        self.offset = ram.frame(self.page) * PAGE_SIZE
        self.ring_ref = DMA_FIRST_REF + ram.frame(self.page)
        self.domain.memory[self.offset : self.offset + INTERFACE_SIZE] = bytes(INTERFACE_SIZE)
        for index in (IN_CONS, IN_PROD, OUT_CONS, OUT_PROD):
            self._put(index, start_index)
        self.port = self.domain.alloc_unbound(self.backend_domid)
        self.channel = self.domain.event_channel(self.port)

    def _get(self, index: int) -> int:
        return _U32.unpack_from(self.domain.memory, self.offset + index)[0]

    def _put(self, index: int, value: int) -> None:
        _U32.pack_into(self.domain.memory, self.offset + index, value & 0xFFFFFFFF)

    async def publish(self, *, ring_ref: int | None = None) -> None:
        """Wait for the backend's InitWait, publish ``ring-ref`` (or another ref) and ``port``, go Initialised."""
        await self.wait_backend(XenbusState.INIT_WAIT)
        await self.client.write(f"{self.path}/ring-ref", str(self.ring_ref if ring_ref is None else ring_ref))
        await self.client.write(f"{self.path}/port", str(self.port))
        await self.set_state(XenbusState.INITIALISED)

    async def connect(self) -> None:
        """:meth:`publish`, wait for the backend's Connected, go Connected."""
        await self.publish()
        await self.wait_backend(XenbusState.CONNECTED)
        await self.set_state(XenbusState.CONNECTED)

    def set_out_prod(self, value: int) -> None:
        """Write the output producer index directly (for hostile tests)."""
        self._put(OUT_PROD, value)

    async def write(self, data: bytes, timeout: float = 5.0) -> None:
        """Guest output: copy ``data`` into ``out`` as room allows, notifying the backend."""
        deadline = time.monotonic() + timeout
        while data:
            cons, prod = self._get(OUT_CONS), self._get(OUT_PROD)
            room = OUT_SIZE - ((prod - cons) & 0xFFFFFFFF)
            for i in range(min(room, len(data))):
                self.domain.memory[self.offset + OUT_OFFSET + ((prod + i) & (OUT_SIZE - 1))] = data[i]
            taken = min(room, len(data))
            self._put(OUT_PROD, prod + taken)
            data = data[taken:]
            self.channel.signal()
            if data:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"dom{self.domain.domid} console: backend does not drain the out ring")
                await wait_readable(self.channel.fileno(), RECHECK_INTERVAL)
                self.channel.consume()

    async def read(self, count: int, timeout: float = 5.0) -> bytes:
        """Guest input: take ``count`` bytes from ``in``, waiting for the backend to put them there."""
        deadline = time.monotonic() + timeout
        data = bytearray()
        while len(data) < count:
            cons, prod = self._get(IN_CONS), self._get(IN_PROD)
            while cons != prod and len(data) < count:
                data.append(self.domain.memory[self.offset + IN_OFFSET + (cons & (IN_SIZE - 1))])
                cons = (cons + 1) & 0xFFFFFFFF
            self._put(IN_CONS, cons)
            self.channel.signal()
            if len(data) < count:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"dom{self.domain.domid} console: {len(data)} of {count} input bytes arrived")
                await wait_readable(self.channel.fileno(), RECHECK_INTERVAL)
                self.channel.consume()
        return bytes(data)
