"""The probe primitive on Xen: xenstore device trees and the XenbusState handshake.

A device served by backend domain ``B`` for guest ``D`` lives in two places
of xenstore, both written by the toolstack (libxl):

* ``/local/domain/B/backend/<type>/D/<devid>`` — the backend's nodes (owned by
  ``B``, readable by ``D``), with ``state``;
* ``/local/domain/D/device/<type>/<devid>`` — the frontend's nodes (owned by
  ``D``, readable by ``B``), with ``state`` and whatever the frontend publishes.

:class:`XenbusBackend` is the front door's common half: it watches both
directories and runs the handshake of Xen's ``io/xenbus.h`` on the two
``state`` nodes, the way Linux's backends do: announce (InitWait); when the
frontend is Initialised or Connected, connect (read its nodes, map, bind) and
go Connected; when it is Closing, disconnect and close; when it is Closed or
gone, Closed; when it starts again (Initialising after Closed), InitWait
again. A frontend that breaks the contract (a missing or bad node, a bad
state, a ring the engine rejects) fails the device: one logged line with the
reason, the device disconnected and the backend Closing, until the frontend
closes and starts over. Subclasses supply :meth:`~XenbusBackend.announce`,
:meth:`~XenbusBackend.connect` and :meth:`~XenbusBackend.disconnect`.

Restart without the frontend noticing, as Xen's own backends do: stopping
(the daemon's SIGTERM, an upgrade) finishes in-flight requests and releases
the mappings and event channels but leaves both ``state`` nodes as they are;
a new backend that finds its own ``state`` Connected and the frontend
Initialised or Connected *picks the device up*: it reads the frontend's nodes
again, maps the rings, binds the event channels and carries on from the ring
indexes in shared memory (``connect(..., resume=True)``), writing nothing to
xenstore. A pick-up the nodes no longer allow (garbage ring refs, a port
that cannot be bound) fails that device as a connect would. A backend that
finds itself Closing or Closed stays there until the frontend starts over.
Taking a device away from a guest is the toolstack's job (it drives the
frontend to Closing), not a side effect of a daemon stopping.

With ``attach`` the backend plays the toolstack's part first: if the
device's backend directory does not exist, :meth:`XenbusBackend.start`
writes both directories (:mod:`pvcore_xen.toolstack`, with the class's own
nodes from :meth:`XenbusBackend.toolstack_nodes`), so the guest's xenbus
finds a new device.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import enum
import logging
from pvcore.contract import Primitives

from pvcore_xen.grants import EventChannelSpec, GrantLayout, GrantMemory
from pvcore_xen.host import EventChannel, XenHost
from pvcore_xen.toolstack import attach as attach_nodes
from pvcore_xen.xenstore import Watch, WatchEvent, XenstoreClient
from pvcore_xen.xs_wire import XenstoreError, XenstoreProtocolError

log = logging.getLogger("pvcore.xen")

HYPERVISOR = "xen"


class XenbusState(enum.IntEnum):
    """``enum xenbus_state`` of Xen's ``io/xenbus.h``."""

    UNKNOWN = 0
    INITIALISING = 1
    INIT_WAIT = 2
    INITIALISED = 3
    CONNECTED = 4
    CLOSING = 5
    CLOSED = 6
    RECONFIGURING = 7
    RECONFIGURED = 8


class XenDeviceError(Exception):
    """The frontend broke the device's contract; the message says how."""


def backend_path(backend_domid: int, kind: str, domid: int, devid: int) -> str:
    """``/local/domain/<backend>/backend/<kind>/<domid>/<devid>``."""
    return f"/local/domain/{backend_domid}/backend/{kind}/{domid}/{devid}"


def frontend_path(kind: str, domid: int, devid: int) -> str:
    """``/local/domain/<domid>/device/<kind>/<devid>``."""
    return f"/local/domain/{domid}/device/{kind}/{devid}"


async def read_number(client: XenstoreClient, path: str, *, limit: int, base: int = 10) -> int | None:
    """The integer in node ``path`` (decimal, or hex with ``base=16``), None if there is no such node.

    A value that is not a number in ``0..limit`` is a :class:`XenDeviceError` naming the node.
    """
    try:
        raw = await client.read(path)
    except XenstoreError as exc:
        if exc.name == "ENOENT":
            return None
        raise
    text = raw.decode("ascii", "replace").strip()
    try:
        value = int(text, base)
    except ValueError:
        value = -1
    if not 0 <= value <= limit:
        raise XenDeviceError(f"{path} = {text[:32]!r} is not a number in 0..{limit:#x}")
    return value


async def require_number(client: XenstoreClient, path: str, *, limit: int, base: int = 10) -> int:
    """Like :func:`read_number`, but a missing node is a :class:`XenDeviceError` too."""
    value = await read_number(client, path, limit=limit, base=base)
    if value is None:
        raise XenDeviceError(f"{path} is missing")
    return value


class XenbusBackend(abc.ABC):
    """One device's backend side: watches, the state handshake, failure and teardown.

    It is a :class:`~pvcore.contract.FrontDoor`: :meth:`start` connects to
    xenstore and begins watching (picking up a device a previous backend left
    Connected); :meth:`stop` disconnects and leaves the state nodes as they are.
    """

    kind: str = ""
    """The device type under ``device/`` and, without ``attach_kind``, under ``backend/``."""
    attach_kind: str | None = None
    """The backend type ``attach`` writes instead of :attr:`kind`, one the kernel's own backends leave alone."""
    protocol = "xenbus"
    """What the description calls this backend (``blkif``, ``netif``)."""

    def __init__(
        self,
        *,
        primitives: Primitives,
        host: XenHost,
        xenstore_path: str | None,
        backend_domid: int,
        domid: int,
        devid: int,
        name: str,
        attach: bool = False,
    ) -> None:
        self.attach = attach
        self.primitives = primitives
        self.host = host
        self.xenstore_path = xenstore_path
        self.backend_domid = backend_domid
        self.domid = domid
        self.devid = devid
        self.name = name
        self.frontend_path = frontend_path(self.kind, domid, devid)
        if attach and self.attach_kind:
            self.kind = self.attach_kind
        self.backend_path = backend_path(backend_domid, self.kind, domid, devid)
        self.description = f"{self.protocol} backend {self.backend_path} (frontend {self.frontend_path})"
        self.client: XenstoreClient | None = None
        self.state: XenbusState | None = None
        self.connected = False
        self.failure: str | None = None
        self._pending_failure: str | None = None
        self._xenstore_warning: str | None = None
        self._wake = asyncio.Event()
        self._watches: list[Watch] = []
        self._runner: asyncio.Task[None] | None = None
        self._stopping = False
        self._first_step = True
        self.resumed = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, dom{self.domid} {self.kind} {self.devid})"

    @abc.abstractmethod
    async def announce(self, client: XenstoreClient) -> None:
        """Publish the backend's nodes for the frontend (before InitWait)."""

    @abc.abstractmethod
    async def connect(self, client: XenstoreClient, *, resume: bool = False) -> None:
        """Read the frontend's nodes and start serving; raise :class:`XenDeviceError` if they are wrong.

        ``resume`` is a pick-up after a backend restart: the rings are already
        in use, so serving continues from the indexes in shared memory.
        """

    @abc.abstractmethod
    async def disconnect(self) -> None:
        """Stop serving and release what :meth:`connect` took (only called while connected)."""

    def toolstack_nodes(self) -> tuple[dict[str, str], dict[str, str]]:
        """The class's own backend and frontend nodes that ``attach`` writes besides the common ones."""
        return {}, {}

    def map_memory(self) -> GrantMemory:
        """The guest's grant memory, through the hypervisor's memory primitive."""
        try:
            return self.primitives.map_memory(GrantLayout(self.domid, self.host))
        except ValueError as exc:
            raise XenDeviceError(f"grant memory of dom{self.domid}: {exc}") from None

    def open_channel(self, port: int, what: str) -> EventChannel:
        """Bind event channel ``port`` of the guest, through the hypervisor's notification primitive."""
        try:
            return self.primitives.open_notifier(EventChannelSpec(self.domid, port))
        except (OSError, ValueError) as exc:
            raise XenDeviceError(f"{what}: event channel {port}: {exc}") from None

    async def start(self) -> None:
        """Connect to xenstore (with ``attach``, write the device's nodes), watch both directories, run the handshake."""
        self.client = await XenstoreClient.connect(self.xenstore_path)
        try:
            if self.attach:
                backend_nodes, frontend_nodes = self.toolstack_nodes()
                if await attach_nodes(
                    self.client, backend_path=self.backend_path, frontend_path=self.frontend_path,
                    backend_domid=self.backend_domid, domid=self.domid,
                    backend_nodes=backend_nodes, frontend_nodes=frontend_nodes,
                ):
                    log.info("%s: attached dom%d %s device %d (%s)", self.name, self.domid, self.kind, self.devid, self.backend_path)
            for path in (self.backend_path, self.frontend_path):
                self._watches.append(await self.client.watch(path, self._on_watch))
        except BaseException:
            await self.client.close()
            self.client = None
            self._watches.clear()
            raise
        self._runner = asyncio.get_running_loop().create_task(self._run(), name=f"xenbus {self.name}")

    async def stop(self) -> None:
        """Disconnect the device (finishing in-flight requests), stop watching, close the xenstore connection.

        Both ``state`` nodes stay as they are: a frontend that was Connected
        stays Connected, and the next backend started for this device picks
        it up from there (see the module's docstring).
        """
        if self._runner is not None:
            self._stopping = True
            self._wake.set()  # the runner ends even if asyncio.wait_for swallowed the cancellation (Python 3.11)
            self._runner.cancel()
            try:
                await self._runner
            except asyncio.CancelledError:
                pass
            except Exception:
                log.exception("%s: the xenbus handshake had already failed", self.name)
        await self._disconnect()
        if self.client is not None:
            with contextlib.suppress(XenstoreError, XenstoreProtocolError, TimeoutError, OSError):
                await self.client.close()
            self.client = None

    def fail(self, reason: str) -> None:
        """Fail the device (from the event loop, e.g. when the ring engine broke it)."""
        self._pending_failure = reason
        self._wake.set()

    def _on_watch(self, event: WatchEvent) -> None:
        self._wake.set()

    async def _run(self) -> None:
        while not self._stopping:
            await self._wake.wait()
            self._wake.clear()
            if self._stopping:
                return
            try:
                if self._pending_failure is not None:
                    reason, self._pending_failure = self._pending_failure, None
                    await self._fail(reason)
                await self._step()
                self._xenstore_warning = None
            except XenDeviceError as exc:
                await self._fail(str(exc))
            except XenstoreProtocolError as exc:
                log.error("%s: xenstore connection lost: %s; device disconnected", self.name, exc)
                await self._disconnect()
                return
            except (XenstoreError, TimeoutError) as exc:
                if str(exc) != self._xenstore_warning:  # once per reason, not on every watch event
                    log.warning("%s: xenstore request failed: %s", self.name, exc)
                self._xenstore_warning = str(exc)
            except Exception as exc:  # a bug must fail this device only, never the others
                log.exception("%s: internal error in the xenbus handshake", self.name)
                await self._fail(f"internal error: {exc}")

    async def _fail(self, reason: str) -> None:
        assert self.client is not None
        if reason != self.failure:  # a guest rewriting the same bad node must not flood the log
            log.error("%s: dom%d %s device %d failed: %s", self.name, self.domid, self.kind, self.devid, reason)
        self.failure = reason
        await self._disconnect()
        if self.state not in (None, XenbusState.CLOSING, XenbusState.CLOSED):
            await self._set_state(XenbusState.CLOSING)

    async def _disconnect(self) -> None:
        if self.connected:
            self.connected = False
            await self.disconnect()

    async def _set_state(self, state: XenbusState) -> None:
        assert self.client is not None
        if state == XenbusState.INIT_WAIT:
            await self.announce(self.client)
        await self.client.write(f"{self.backend_path}/state", str(int(state)))
        self.state = state
        log.info("%s: backend %s", self.name, state.name)

    async def _frontend_state(self) -> XenbusState | None:
        assert self.client is not None
        value = await read_number(self.client, f"{self.frontend_path}/state", limit=int(XenbusState.RECONFIGURED))
        return None if value is None else XenbusState(value)

    async def _adopt(self, frontend: XenbusState | None) -> bool:
        """First step after start: take over the state a previous backend left; True if it picked the device up."""
        assert self.client is not None
        with contextlib.suppress(XenDeviceError):  # a state node that holds no state: start over with InitWait
            left = await read_number(self.client, f"{self.backend_path}/state", limit=int(XenbusState.RECONFIGURED))
            if left in (XenbusState.CONNECTED, XenbusState.CLOSING, XenbusState.CLOSED):
                self.state = XenbusState(left)
        if self.state != XenbusState.CONNECTED or frontend not in (XenbusState.INITIALISED, XenbusState.CONNECTED):
            return False
        await self.connect(self.client, resume=True)
        self.connected = self.resumed = True
        log.info("%s: picked up dom%d %s device %d as the last backend left it", self.name, self.domid, self.kind, self.devid)
        return True

    async def _step(self) -> None:
        """Move the backend's state one handshake step on from what the nodes say now."""
        assert self.client is not None
        if not await self.client.exists(f"{self.backend_path}/state"):
            await self._disconnect()
            self.state = None
            return
        if self._first_step:  # until the adoption ran without a xenstore error
            picked_up = await self._adopt(await self._frontend_state())
            self._first_step = False
            if picked_up:
                return
        if self.state is None:
            await self._set_state(XenbusState.INIT_WAIT)
        frontend = await self._frontend_state()
        if frontend in (None, XenbusState.CLOSED):
            await self._disconnect()
            if self.state not in (XenbusState.INIT_WAIT, XenbusState.CLOSED):
                await self._set_state(XenbusState.CLOSED)
        elif frontend == XenbusState.INITIALISING:
            await self._disconnect()
            if self.state in (XenbusState.CLOSED, XenbusState.CONNECTED):
                self.failure = None
                await self._set_state(XenbusState.INIT_WAIT)
        elif frontend in (XenbusState.INITIALISED, XenbusState.CONNECTED):
            if self.state == XenbusState.INIT_WAIT:
                await self.connect(self.client)
                self.connected = True
                await self._set_state(XenbusState.CONNECTED)
        elif frontend == XenbusState.CLOSING:
            await self._disconnect()
            if self.state not in (XenbusState.CLOSING, XenbusState.CLOSED):
                await self._set_state(XenbusState.CLOSING)
        elif frontend != XenbusState.INIT_WAIT:
            raise XenDeviceError(f"frontend state {frontend.name} is not one a frontend may be in")
