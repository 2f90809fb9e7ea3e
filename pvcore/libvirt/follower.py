"""``pvcore daemon --connect URI``: serve every domain's devices from metadata, following lifecycles.

The host daemon reads pvcore's metadata of every domain on the connection
and serves each recorded device through a
:class:`~pvcore.libvirt.hosting.DeviceHost`: with ``workers`` 1 in its own
process (one :class:`~pvcore.daemon.Daemon` per device, so adding or removing
one never touches the others), with more in that many worker processes
(:class:`~pvcore.workers.WorkerPool`; libvirt, the sockets, the logs and the
signals stay in this process, and a worker that dies is started again with
its devices while the follower goes on). It follows
libvirt's events (lifecycle and metadata changes) on a thread running
libvirt's default event loop and handles them one at a time on the asyncio
loop:

* a defined domain with devices has its backends up, so they are ready
  before the domain starts (libvirt has no event before QEMU starts, and
  QEMU's vhost-user disk waits for its socket at start);
* when a persistent domain stops, its backends are released (connections
  closed, guest memory unmapped, files closed) and fresh ones are started
  for its next run; when it is undefined (or a transient domain stops),
  or its metadata no longer names a device, that device is released for good
  and its socket removed;
* a running domain is served from its live metadata and its persistent
  one (devices added for the next start are ready too);
* on SIGTERM every device stops and its socket goes; a daemon started again
  serves the same sockets and QEMU reconnects (every chardev pvcore deploys
  says ``<reconnect>``); if the connection to libvirtd drops, the devices
  keep running and the daemon reconnects and catches up.

The metadata is as trusted as the domain definition (anyone who may edit
the domain may edit it), but this daemon usually runs as root, so a spec from
metadata is refused (logged, that device skipped) when its ``socket=`` is not
inside the run directory or its ``path=`` is not a regular file or a block
device (:func:`check_metadata_paths`).

A control socket (:mod:`pvcore.control`, mode 0600, its user and root
only) serves ``RUN_DIR/control.sock`` (a one-domain server:
``RUN_DIR/control-UUID12.sock``, see :func:`~pvcore.control.control_socket_path`). Its ``list`` names each device's domain and
state (``served``, or ``not served`` with the reason). ``swap-media``
changes a served disk's file and records the new ``path=`` in the domain's
metadata (live and persistent, wherever the spec is), so that a restarted
daemon serves the medium the guest has: the device is re-keyed to its new
spec before the metadata is written, and the change of metadata then finds
it served. ``set-rate`` and ``set-limits`` change a running device only
(the record keeps what deploy wrote, which applies again when the device is
next started).
``add`` and ``remove`` are refused: what this daemon serves is what the
metadata records, which ``pvcore deploy`` and ``pvcore undeploy`` change.

With ``only_domain`` the same code is the one-domain server that
``pvcore deploy`` starts when no host daemon runs: it serves that domain
until the domain has stopped (or is undefined, or has no pvcore devices
left), then releases everything and exits; ``pvcore daemon --domain`` serves
in its own process unless ``--workers`` says otherwise (one domain's devices,
for one run, do not pay for a worker's process).

Device names are unique on a host: a device whose name another domain's
device already has is not served (``list`` says why).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import stat
import threading
from pathlib import Path
from typing import Any

import attrs

from pvcore.config import ConfigError, parse_devices, split_spec
from pvcore.contract import ContractError, DeviceConfig, LibvirtXml
from pvcore.control import ControlError, ControlServer, control_socket_path
from pvcore.daemon import DaemonError
from pvcore.libvirt import LibvirtError, runlock
from pvcore.libvirt.connection import choose_hypervisor, import_libvirt, is_local_uri, lookup_domain, open_connection
from pvcore.libvirt.devicexml import plugin_xml
from pvcore.libvirt.hosting import DeviceHost, LocalDevices
from pvcore.libvirt.metadata import NAMESPACE, format_spec, read_specs, write_specs
from pvcore.metrics import MetricsAddress
from pvcore.registry import Registry
from pvcore.streams.unix import ListenerError
from pvcore.systemd_notify import ready, reloading, stopping
from pvcore.virtio import DeviceError

log = logging.getLogger("pvcore.libvirt")

RECONNECT_SECONDS = 2.0
RETRY_SECONDS = 2.0
KEEPALIVE_INTERVAL = 5
KEEPALIVE_COUNT = 3

_event_loop_lock = threading.Lock()
_event_loop_running = False


def ensure_event_loop(libvirt: Any) -> None:
    """Register libvirt's default event implementation and run it on a thread (once per process).

    Must happen before a connection is opened for that connection to deliver events.
    """
    global _event_loop_running
    with _event_loop_lock:
        if _event_loop_running:
            return
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        threading.Thread(target=run, name="libvirt-events", daemon=True).start()
        _event_loop_running = True


def check_metadata_paths(config: DeviceConfig, run_dir: Path) -> None:
    """Refuse a device from domain metadata whose socket is outside ``run_dir`` or whose
    ``path=`` is not a regular file or block device (a :class:`~pvcore.config.ConfigError` naming it)."""
    socket_path = config.get("socket")
    if socket_path:
        resolved, inside = Path(os.path.abspath(socket_path)).resolve(), run_dir.resolve()
        if resolved == inside or not resolved.is_relative_to(inside):
            raise ConfigError(
                f"{config.name}: socket={socket_path} is not inside the run directory {run_dir} "
                "(a socket named in domain metadata must be; pvcore deploy puts it there by default)"
            )
    image = config.get("path")
    if image:
        try:
            mode = os.stat(image).st_mode
        except OSError as exc:
            raise ConfigError(f"{config.name}: path={image}: {exc.strerror or exc}") from None
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            raise ConfigError(f"{config.name}: path={image} is not a regular file or block device")


@attrs.define(eq=False)
class ServedDomain:
    """The devices served for one domain: spec -> the names of the devices it made, and the domain lock held
    for them."""

    uuid: str
    name: str
    lock_fd: int
    devices: dict[str, tuple[str, ...]] = attrs.field(factory=dict)


@attrs.define(eq=False)
class Unserved:
    """The specs of one domain that could not be served, each with why (the control ``list`` shows them)."""

    name: str
    errors: dict[str, str] = attrs.field(factory=dict)


@attrs.frozen
class Wanted:
    """What a domain's definition asks for now."""

    name: str
    active: bool
    persistent: bool
    specs: tuple[str, ...]


class HostDaemon:
    """Serves the pvcore devices recorded in the metadata of the domains on ``uri``.

    ``hypervisor`` forces a plugin (default: detected from the connection);
    ``only_domain`` makes this the one-domain server described above;
    ``metrics`` is where the devices of every domain are served as Prometheus
    metrics (None: nowhere); ``workers`` is how many worker processes serve
    the devices (1: this process, as :class:`~pvcore.libvirt.hosting.LocalDevices`).
    """

    def __init__(
        self,
        registry: Registry,
        uri: str,
        *,
        run_dir: Path,
        hypervisor: str | None = None,
        only_domain: str | None = None,
        metrics: MetricsAddress | None = None,
        workers: int = 1,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers={workers} must be at least 1")
        self.registry = registry
        self.metrics = metrics
        self.workers = workers
        self.devices: DeviceHost | None = None
        """What serves the devices, made once the connection names the hypervisor."""
        self.uri = uri
        self.run_dir = run_dir
        self.requested_hypervisor = hypervisor
        self.hypervisor = ""
        self.xml: LibvirtXml | None = None
        self.only_domain = only_domain
        self.served: dict[str, ServedDomain] = {}
        self._libvirt = import_libvirt()
        self._conn: Any = None
        self._callbacks: list[int] = []
        self._events: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        self._stop = asyncio.Event()
        self._daemon_lock: int | None = None
        self._only_uuid: str | None = None
        self._waiting: set[str] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._control: ControlServer | None = None
        self._unserved: dict[str, Unserved] = {}
        self._changing = asyncio.Lock()
        """Held while an event is handled and while a control request rewrites metadata."""

    @property
    def device_count(self) -> int:
        """How many devices are served now."""
        return sum(len(served.devices) for served in self.served.values())

    def request_stop(self) -> None:
        """Ask :meth:`run` to release everything and return (as SIGTERM does)."""
        self._stop.set()

    async def run(self, *, handle_signals: bool = True) -> None:
        """Connect, serve every domain's devices and follow events until stopped."""
        self._loop = asyncio.get_running_loop()
        self.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self.only_domain is None:
            self._daemon_lock = runlock.try_lock(self.run_dir / runlock.DAEMON_LOCK)
            if self._daemon_lock is None:
                path = self.run_dir / runlock.DAEMON_LOCK
                raise DaemonError(f"another pvcore daemon ({runlock.holder(path)}) serves run dir {self.run_dir}")
        ensure_event_loop(self._libvirt)
        if handle_signals:
            self._loop.add_signal_handler(signal.SIGTERM, self.request_stop)
            self._loop.add_signal_handler(signal.SIGINT, self.request_stop)
            self._loop.add_signal_handler(signal.SIGHUP, self._reload)
        try:
            await self._connect()
            self.devices = self._device_host()
            await self.devices.start()
            if self.only_domain is not None:
                domain = await asyncio.to_thread(lookup_domain, self._conn, self.only_domain)
                self._only_uuid = domain.UUIDString()
                lock = runlock.domain_lock_path(self.run_dir, self._only_uuid)
                if runlock.is_held(lock):
                    raise DaemonError(f"domain {self.only_domain} is already served ({runlock.holder(lock)})")
            await self._sync_all()
            await self._start_control()
            log.info(
                "following %s through plugin %s: %d device(s) of %d domain(s) served; run dir %s",
                self.uri, self.hypervisor, self.device_count, len(self.served), self.run_dir,
            )
            ready(self._status())
            await self._follow()
        finally:
            if handle_signals:
                for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                    self._loop.remove_signal_handler(signum)
            log.info("stopping: releasing %d device(s)", self.device_count)
            stopping()
            if self._control is not None:
                await self._control.stop()
                self._control = None
            for uuid in list(self.served):
                await self._release_domain(uuid, "the daemon stops")
            if self.devices is not None:
                await self.devices.stop()
            await asyncio.to_thread(self._disconnect)
            if self._daemon_lock is not None:
                runlock.release(self._daemon_lock)
                self._daemon_lock = None

    def _device_host(self) -> DeviceHost:
        """In this process (``workers`` 1), or a pool of that many empty workers the devices are added to."""
        if self.workers == 1:
            return LocalDevices(self.registry, self.hypervisor, run_dir=self.run_dir, metrics=self.metrics)
        from pvcore.workers import WorkerPool

        return WorkerPool(
            self.registry, self.hypervisor, [[] for _ in range(self.workers)], run_dir=self.run_dir, metrics=self.metrics
        )

    def _status(self) -> str:
        where = f" in {self.workers} worker processes" if self.workers > 1 else ""
        return f"serving {self.device_count} device(s) of {len(self.served)} domain(s){where}"

    async def _start_control(self) -> None:
        """Listen on the control socket; if that fails the devices are served all the same (logged)."""
        control = ControlServer(self, control_socket_path(self.run_dir, self._only_uuid))
        try:
            await control.start()
        except OSError as exc:
            log.error("control socket %s: cannot listen (%s); serving without it", control.path, exc.strerror or exc)
            return
        self._control = control

    def _reload(self) -> None:
        """SIGHUP: tell systemd a reload runs, reopen the logs, say ready again."""
        reloading()
        self.reopen_logs()
        ready(self._status())

    def reopen_logs(self) -> None:
        """SIGHUP: every device reopens the log files it writes."""
        if self.devices is not None:
            self.devices.reopen_logs()

    # -- the control socket ------------------------------------------------

    async def describe_devices(self) -> list[dict[str, object]]:
        """Every device of every domain: those served (``state`` served, or as a worker pool says: ``restarting``,
        ``not served``), then those that could not be (``state`` not served, ``error`` why); ``domain`` is the
        libvirt domain's name."""
        domains = {
            name: served.name for served in list(self.served.values()) for names in served.devices.values() for name in names
        }
        entries = await self.devices.describe_devices() if self.devices is not None else []
        devices: list[dict[str, object]] = [
            {**entry, "domain": domains.get(str(entry["name"]), entry.get("domain")), "state": entry.get("state", "served")}
            for entry in entries
        ]
        for unserved in list(self._unserved.values()):
            for spec, error in list(unserved.errors.items()):
                try:
                    device_class, raw = split_spec(spec)
                except ConfigError:
                    device_class, raw = "?", {}
                devices.append({
                    "name": raw.get("name", spec), "class": device_class, "domain": unserved.name,
                    "hypervisor": self.hypervisor, "door": f"not served: {error}", "state": "not served",
                    "error": error, "counters": {},
                })
        return devices

    async def add_device(self, spec: str) -> str:
        """Refused: this daemon serves what the domains' metadata records (``pvcore deploy`` adds there)."""
        raise ControlError(
            "pvcore daemon serves what the domains' metadata records: "
            "add a device with `pvcore deploy --connect URI DOMAIN DEVICE`, which records it there"
        )

    async def remove_device(self, name: str) -> None:
        """Refused: this daemon serves what the domains' metadata records (``pvcore undeploy`` removes it)."""
        raise ControlError(
            "pvcore daemon serves what the domains' metadata records: "
            "remove a device with `pvcore undeploy --connect URI DOMAIN NAME`, which detaches it and updates the record"
        )

    def _find(self, name: str) -> tuple[ServedDomain, str, DeviceHost]:
        for served in self.served.values():
            for spec, names in served.devices.items():
                if name in names and self.devices is not None:
                    return served, spec, self.devices
        names = sorted(n for s in self.served.values() for device in s.devices.values() for n in device)
        raise ControlError(f"no device named {name!r} is served; devices: {', '.join(names) or 'none'}")

    async def set_rng_rate(self, name: str, rate: str) -> str:
        """Change the rate of rng device ``name``'s domain now (not recorded in the metadata)."""
        _, _, devices = self._find(name)
        return await devices.set_rng_rate(name, rate)

    async def set_limits(self, name: str, limits: str) -> dict[str, object]:
        """Change device ``name``'s I/O limits now (see :meth:`Daemon.set_limits`; not recorded in the metadata)."""
        _, _, devices = self._find(name)
        return await devices.set_limits(name, limits)

    async def swap_media(self, name: str, path: str) -> str:
        """Change block device ``name``'s backing file (see :meth:`Daemon.swap_media`) and record the
        new ``path=`` in the domain's metadata; if the record cannot be written, the old file is put back."""
        async with self._changing:
            served, spec, devices = self._find(name)
            try:
                check_metadata_paths(DeviceConfig("block", name, {"path": path}), self.run_dir)
            except ConfigError as exc:
                raise ControlError(str(exc)) from None
            old = await devices.swap_media(name, path)
            try:
                await self._record(served, spec, {"path": path})
            except ControlError as exc:
                try:
                    await devices.swap_media(name, old)
                except ControlError as back:
                    raise ControlError(
                        f"{exc}; putting {old} back failed too ({back}): the device serves {path}, which the "
                        "domain's metadata does not record"
                    ) from None
                raise
            return old

    async def _record(self, served: ServedDomain, spec: str, changes: dict[str, str]) -> None:
        """Rewrite ``spec`` with ``changes`` wherever the domain's metadata holds it (caller holds ``_changing``).

        The device is re-keyed to the new spec first, so the metadata change finds it served.
        """
        device_class, raw = split_spec(spec)
        new = format_spec(device_class, {**raw, **changes})
        served.devices[new] = served.devices.pop(spec)
        try:
            await asyncio.to_thread(self._rewrite_metadata, served.uuid, spec, new)
        except (self._libvirt.libvirtError, LibvirtError) as exc:
            served.devices[spec] = served.devices.pop(new)
            message = exc.get_error_message() if isinstance(exc, self._libvirt.libvirtError) else str(exc)
            raise ControlError(f"domain {served.name}: the change could not be recorded in its metadata: {message}") from None

    def _rewrite_metadata(self, uuid: str, old: str, new: str) -> None:
        """Replace spec ``old`` by ``new`` in the live and persistent metadata; on a failure, put back what was written."""
        libvirt = self._libvirt
        if self._conn is None:
            raise LibvirtError(f"not connected to {self.uri}")
        domain = self._conn.lookupByUUIDString(uuid)
        flags = [libvirt.VIR_DOMAIN_AFFECT_LIVE] if domain.isActive() else []
        flags += [libvirt.VIR_DOMAIN_AFFECT_CONFIG] if domain.isPersistent() else []
        written: list[tuple[int, list[str]]] = []
        try:
            for flag in flags:
                specs = read_specs(domain, flag, libvirt)
                if old in specs:
                    write_specs(domain, [new if s == old else s for s in specs], flag, libvirt)
                    written.append((flag, specs))
        except (libvirt.libvirtError, LibvirtError):
            for flag, specs in written:
                try:
                    write_specs(domain, specs, flag, libvirt)
                except libvirt.libvirtError as exc:
                    log.error("domain %s: could not put back its metadata: %s", domain.name(), exc.get_error_message())
            raise

    # -- the connection and its events ------------------------------------

    async def _connect(self) -> None:
        self._conn = await asyncio.to_thread(open_connection, self.uri)
        libvirt = self._libvirt
        self.hypervisor = choose_hypervisor(self.registry, self._conn, self.uri, self.requested_hypervisor)
        self.xml = plugin_xml(self.registry, self.hypervisor)
        if self.xml is None:
            log.warning(
                "plugin %s has no libvirt device XML (pvcore_libvirt_xml): its devices are served as their specs say",
                self.registry.serving(self.hypervisor).name,
            )
        if not is_local_uri(self.uri):
            self._conn.setKeepAlive(KEEPALIVE_INTERVAL, KEEPALIVE_COUNT)
        self._callbacks = [
            self._conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, None),
            self._conn.domainEventRegisterAny(
                None, libvirt.VIR_DOMAIN_EVENT_ID_METADATA_CHANGE, self._on_metadata, None
            ),
        ]
        self._conn.registerCloseCallback(self._on_close, None)

    def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        for callback in self._callbacks:
            try:
                conn.domainEventDeregisterAny(callback)
            except self._libvirt.libvirtError:
                pass
        self._callbacks = []
        try:
            conn.unregisterCloseCallback()
            conn.close()
        except self._libvirt.libvirtError:
            pass

    def _post(self, uuid: str, what: str) -> None:
        """From libvirt's event thread: queue an event for the asyncio loop."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._events.put_nowait, (uuid, what))

    def _on_lifecycle(self, _conn: Any, domain: Any, event: int, _detail: int, _opaque: Any) -> None:
        libvirt = self._libvirt
        names = {
            libvirt.VIR_DOMAIN_EVENT_DEFINED: "defined",
            libvirt.VIR_DOMAIN_EVENT_UNDEFINED: "undefined",
            libvirt.VIR_DOMAIN_EVENT_STARTED: "started",
            libvirt.VIR_DOMAIN_EVENT_STOPPED: "stopped",
        }
        if event in names:
            self._post(domain.UUIDString(), names[event])

    def _on_metadata(self, _conn: Any, domain: Any, _kind: int, uri: str | None, _opaque: Any) -> None:
        if uri in (None, NAMESPACE):
            self._post(domain.UUIDString(), "metadata")

    def _on_close(self, _conn: Any, reason: int, _opaque: Any) -> None:
        self._post("", f"connection closed (reason {reason})")

    async def _follow(self) -> None:
        stop = asyncio.create_task(self._stop.wait())
        try:
            while not self._stop.is_set():
                get = asyncio.create_task(self._events.get())
                done, _ = await asyncio.wait({get, stop}, timeout=RETRY_SECONDS, return_when=asyncio.FIRST_COMPLETED)
                if get not in done:
                    get.cancel()
                    if stop not in done:
                        async with self._changing:
                            await self._retry_waiting()
                    continue
                uuid, what = get.result()
                if not uuid:
                    await self._reconnect(what)
                    continue
                if self._only_uuid is not None and uuid != self._only_uuid:
                    continue
                async with self._changing:
                    await self._sync_domain(uuid, what)
        finally:
            stop.cancel()

    async def _reconnect(self, why: str) -> None:
        log.warning("libvirt %s: %s; devices keep running, reconnecting", self.uri, why)
        await asyncio.to_thread(self._disconnect)
        while not self._stop.is_set():
            try:
                await self._connect()
            except LibvirtError as exc:
                log.warning("%s; retrying in %.0f s", exc, RECONNECT_SECONDS)
                try:
                    await asyncio.wait_for(self._stop.wait(), RECONNECT_SECONDS)
                except TimeoutError:
                    continue
                return
            log.info("reconnected to %s", self.uri)
            async with self._changing:
                await self._sync_all()
            return

    # -- what each domain wants, and serving it ---------------------------

    def _wanted(self, domain: Any) -> Wanted:
        libvirt = self._libvirt
        active, persistent = bool(domain.isActive()), bool(domain.isPersistent())
        live = read_specs(domain, libvirt.VIR_DOMAIN_AFFECT_LIVE, libvirt) if active else []
        config = read_specs(domain, libvirt.VIR_DOMAIN_AFFECT_CONFIG, libvirt) if persistent else []
        return Wanted(domain.name(), active, persistent, tuple(dict.fromkeys([*live, *config])))

    def _wanted_by_uuid(self, uuid: str) -> Wanted | None:
        libvirt = self._libvirt
        try:
            domain = self._conn.lookupByUUIDString(uuid)
            return self._wanted(domain)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise

    async def _sync_all(self) -> None:
        if self._only_uuid is not None:
            uuids = [self._only_uuid]
        else:
            domains = await asyncio.to_thread(self._conn.listAllDomains, 0)
            uuids = [domain.UUIDString() for domain in domains]
        for uuid in [*uuids, *(u for u in self.served if u not in uuids)]:
            await self._sync_domain(uuid, "catching up")

    async def _sync_domain(self, uuid: str, what: str) -> None:
        try:
            wanted = await asyncio.to_thread(self._wanted_by_uuid, uuid)
        except (self._libvirt.libvirtError, LibvirtError) as exc:
            log.error("domain %s (%s): cannot read its definition: %s", uuid, what, exc)
            return
        if self._only_uuid is not None and self._one_domain_finished(wanted, what):
            await self._release_domain(uuid, what)
            self._stop.set()
            return
        if wanted is None or not wanted.specs:
            self._unserved.pop(uuid, None)
            await self._release_domain(uuid, what)
            return
        unserved = self._unserved.get(uuid)
        if unserved is not None:
            unserved.name = wanted.name
            for spec in [s for s in unserved.errors if s not in wanted.specs]:
                del unserved.errors[spec]
        if what == "stopped" and not wanted.active and uuid in self.served:
            await self._release_domain(uuid, "it stopped (fresh backends follow for its next start)")
        await self._serve(uuid, wanted)

    def _one_domain_finished(self, wanted: Wanted | None, what: str) -> bool:
        if wanted is None or not wanted.specs:
            return True
        return what == "stopped" and not wanted.active

    async def _serve(self, uuid: str, wanted: Wanted) -> None:
        served = self.served.get(uuid)
        if served is None:
            lock = runlock.try_lock(runlock.domain_lock_path(self.run_dir, uuid))
            if lock is None:
                if uuid not in self._waiting:
                    path = runlock.domain_lock_path(self.run_dir, uuid)
                    log.info("domain %s is served by another pvcore process (%s); taking over when it ends",
                             wanted.name, runlock.holder(path))
                self._waiting.add(uuid)
                return
            self._waiting.discard(uuid)
            served = self.served[uuid] = ServedDomain(uuid, wanted.name, lock)
        for spec in [s for s in served.devices if s not in wanted.specs]:
            await self._stop_device(served, spec, "its spec left the metadata")

        for spec in wanted.specs:
            if spec not in served.devices:
                await self._start_device(served, spec)
        if not served.devices:
            await self._release_domain(uuid, "no device could be served")

    async def _retry_waiting(self) -> None:
        for uuid in list(self._waiting):
            await self._sync_domain(uuid, "retry")

    async def _start_device(self, served: ServedDomain, spec: str) -> None:
        assert self.devices is not None
        try:
            configs = parse_devices([spec], self.registry.device_classes(), self.registry.plugin_options(self.hypervisor))
            for config in configs:
                check_metadata_paths(config, self.run_dir)
            as_served = [self.xml.served(c) for c in configs] if self.xml is not None else configs
            await self.devices.add(as_served)
        except (
            ConfigError, ControlError, DaemonError, DeviceError, ContractError, ListenerError, ValueError, OSError
        ) as exc:
            unserved = self._unserved.setdefault(served.uuid, Unserved(served.name))
            if unserved.errors.get(spec) != str(exc):
                log.error("domain %s: device %s not served: %s", served.name, spec, exc)
            unserved.errors[spec] = str(exc)
            return
        self._unserved.get(served.uuid, Unserved(served.name)).errors.pop(spec, None)
        served.devices[spec] = tuple(config.name for config in as_served)
        log.info("domain %s: serving %s", served.name, spec)

    async def _stop_device(self, served: ServedDomain, spec: str, why: str) -> None:
        names = served.devices.pop(spec)
        try:
            assert self.devices is not None
            await self.devices.remove(names)
        except Exception as exc:  # one device's failing clean-up must not keep the others up
            log.error("domain %s: device %s did not stop cleanly: %s", served.name, spec, exc)
        log.info("domain %s: released %s: %s", served.name, spec, why)

    async def _release_domain(self, uuid: str, why: str) -> None:
        self._waiting.discard(uuid)
        served = self.served.pop(uuid, None)
        if served is None:
            return
        for spec in list(served.devices):
            await self._stop_device(served, spec, why)
        runlock.release(served.lock_fd)

