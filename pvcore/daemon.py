"""The daemon: one event loop that runs many devices for many guests.

For each configured device the daemon asks the device class's factory for the
engine, asks the chosen hypervisor plugin (``pvcore_front_door``) for the front
door that reaches it, and starts that door. Network devices that name the same
switch share one :class:`~pvcore.devices.net.Switch`, whatever their
hypervisor. SIGTERM (and SIGINT) stop every door — finishing in-flight
requests — then close the engines, which flushes block devices, and remove
the sockets; SIGHUP reopens log files. With ``metrics``, a Prometheus endpoint
(:mod:`pvcore.metrics`) listens before any device starts and stops last.
Under systemd (``Type=notify``), :meth:`Daemon.serve_forever` sends READY=1
once every device is up, RELOADING=1 around SIGHUP and STOPPING=1 on stop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from pvcore.build import log_build
from pvcore.contract import DaemonContext, DeviceClass, DeviceConfig, DeviceInstance, FrontDoor
from pvcore.registry import Registry
from pvcore.systemd_notify import ready, reloading, stopping

if TYPE_CHECKING:
    from prometheus_client.registry import Collector

    from pvcore.metrics import MetricsAddress, MetricsServer, ServedEntry

log = logging.getLogger("pvcore.daemon")


class DaemonError(Exception):
    """The daemon cannot serve what it was asked to; the message says why."""


def start_metrics(address: MetricsAddress, collector: Collector) -> MetricsServer:
    """Serve what ``collector`` yields at ``address`` (``--metrics``); a port in use is a :class:`DaemonError`."""
    from pvcore.metrics import MetricsError, MetricsServer

    server = MetricsServer(address, collector)
    try:
        server.start()
    except MetricsError as exc:
        raise DaemonError(str(exc)) from None
    return server


def default_run_dir() -> Path:
    """``$PVCORE_RUN_DIR``, else /run/pvcore for root, else a per-user runtime directory."""
    configured = os.environ.get("PVCORE_RUN_DIR")
    if configured:
        return Path(configured)
    if os.geteuid() == 0:
        return Path("/run/pvcore")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return Path(runtime) / "pvcore" if runtime else Path(f"/tmp/pvcore-{os.getuid()}")


class Daemon:
    """Serves a set of devices through hypervisor plugins' front doors.

    ``hypervisor`` is the default; a device's ``hypervisor=`` option picks
    another, so one daemon serves kvm and lpar guests on one switch.
    ``metrics`` is where this daemon serves Prometheus metrics (None: nowhere);
    ``measure_service_time`` keeps the block service-time histogram without
    an endpoint of its own (for a daemon whose owner serves the metrics).
    """

    def __init__(
        self,
        registry: Registry,
        hypervisor: str,
        configs: Sequence[DeviceConfig],
        *,
        run_dir: Path,
        metrics: MetricsAddress | None = None,
        measure_service_time: bool = False,
    ) -> None:
        self.registry = registry
        self.hypervisor = hypervisor
        self.configs = list(configs)
        self.run_dir = run_dir
        self.metrics = metrics
        self.measure_service_time = measure_service_time or metrics is not None
        self.served: list[tuple[DeviceInstance, FrontDoor]] = []
        self._adding: list[DeviceConfig] = []
        """Devices a control ``add`` is starting: their names and sockets are taken already."""
        self._metrics_server: MetricsServer | None = None
        self._stop = asyncio.Event()

    def served_entries(self) -> list[ServedEntry]:
        """The devices served now, each with the hypervisor serving it (what the metrics collector reads)."""
        from pvcore.metrics import ServedEntry

        return [
            ServedEntry(instance, door, instance.config.get("hypervisor") or self.hypervisor)
            for instance, door in list(self.served)
        ]

    async def start(self, *, keep_going: bool = False) -> dict[str, str]:
        """Build and start every device; on any failure stop those already started.

        With ``keep_going`` (a worker process started again), a device that
        cannot start is logged and left out instead; the answer maps each such
        device's name to its error (empty otherwise).
        """
        for hypervisor in {self.hypervisor, *(c.get("hypervisor") for c in self.configs)} - {None}:
            if hypervisor not in self.registry.hypervisors():
                available = ", ".join(sorted(self.registry.hypervisors())) or "none installed"
                raise DaemonError(f"no plugin serves hypervisor {hypervisor!r} (available: {available})")
        self.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self.metrics is not None:
            from pvcore.metrics import DeviceCollector

            self._metrics_server = start_metrics(self.metrics, DeviceCollector(self.served_entries))
        from pvcore.devices.net import get_switch

        loop = asyncio.get_running_loop()
        classes = self.registry.device_classes()
        failed: dict[str, str] = {}
        try:
            for config in self.configs:
                hypervisor = config.get("hypervisor") or self.hypervisor
                context = DaemonContext(
                    primitives=self.registry.primitives(hypervisor), run_dir=self.run_dir, loop=loop, switch=get_switch
                )
                try:
                    await self._start_device(classes[config.device_class], config, context)
                except Exception as exc:
                    if not keep_going:
                        raise
                    log.error("device %s (%s) not served: %s", config.name, config.device_class, exc)
                    failed[config.name] = str(exc)
        except BaseException:
            await self.stop()
            raise
        return failed

    async def _start_device(self, device_class: DeviceClass, config: DeviceConfig, context: DaemonContext) -> None:
        instance = device_class.create(config, context)
        if self.measure_service_time:
            from pvcore.metrics import measure_service_times

            measure_service_times(instance)
        try:
            await instance.start()
            hypervisor = config.get("hypervisor") or self.hypervisor
            try:
                door = self.registry.call(hypervisor, "pvcore_front_door", device=instance, context=context)
            except ValueError as exc:  # the contract: a device the plugin cannot serve, with the reason
                raise DaemonError(f"{config.name}: {exc}") from None
            if door is None:
                raise DaemonError(f"{config.name}: plugin {hypervisor} has no front door for {config.device_class}")
            await door.start()
        except BaseException:
            await instance.close()
            raise
        self.served.append((instance, door))
        log.info("device %s (%s) up: %s", config.name, config.device_class, door.description)

    async def stop(self) -> None:
        """Stop every front door, then close every engine (flushing block devices)."""
        while self.served:
            instance, door = self.served.pop()
            name = instance.config.name
            try:
                await door.stop()
            except Exception:  # one device's failure must not leave the others running
                log.exception("device %s: stopping its front door failed", name)
            try:
                await instance.close()
            except Exception:
                log.exception("device %s: closing its engine failed", name)
            log.info("device %s (%s) down", name, instance.config.device_class)
        if self._metrics_server is not None:
            self._metrics_server.stop()
            self._metrics_server = None

    def reopen_logs(self) -> None:
        """SIGHUP: reopen every log file a device writes (after log rotation)."""
        for instance, _ in self.served:
            reopen = getattr(instance.engine, "reopen_log", None)
            if reopen is not None:
                reopen()  # queued behind the output before it; a failure is logged by the log's writer
        log.info("log files reopened")

    def describe_devices(self) -> list[dict[str, object]]:
        """Every served device: name, class, domain, hypervisor, front door, counters and limits (the control ``list``)."""
        from pvcore.device_counters import device_counters
        from pvcore.device_limits import describe_limits

        return [
            {
                "name": instance.config.name,
                "class": instance.config.device_class,
                "domain": instance.config.get("domain"),
                "hypervisor": instance.config.get("hypervisor") or self.hypervisor,
                "door": door.description,
                "counters": device_counters(instance, door),
                **describe_limits(instance),
            }
            for instance, door in list(self.served)
        ]

    async def add_device(self, spec: str) -> str:
        """Build and start one more device from ``CLASS:key=value,...``; its name. A ``ControlError`` changes nothing."""
        from pvcore.config import ConfigError, parse_devices
        from pvcore.control import ControlError

        try:
            (config,) = parse_devices([spec], self.registry.device_classes(), self.registry.plugin_options(self.hypervisor))
        except (ConfigError, ValueError) as exc:
            raise ControlError(str(exc)) from None
        return await self.add_config(config)

    async def add_config(self, config: DeviceConfig) -> str:
        """Build and start one more device from its parsed ``config``; its name. A ``ControlError`` changes nothing."""
        from pvcore.config import ConfigError, check_unique
        from pvcore.control import ControlError

        try:
            check_unique([instance.config for instance, _ in self.served] + self._adding + [config])
        except ConfigError as exc:
            raise ControlError(str(exc)) from None
        self._adding.append(config)
        try:
            return await self._add_config(config)
        finally:
            self._adding.remove(config)

    async def _add_config(self, config: DeviceConfig) -> str:
        """:meth:`add_config` once the name and socket of ``config`` are taken."""
        from pvcore.config import ConfigError
        from pvcore.control import ControlError
        from pvcore.devices.net import get_switch
        from pvcore.streams.unix import ListenerError
        from pvcore.virtio import DeviceError

        hypervisor = config.get("hypervisor") or self.hypervisor
        if hypervisor not in self.registry.hypervisors():
            raise ControlError(f"{config.name}: no plugin serves hypervisor {hypervisor!r}")
        context = DaemonContext(
            primitives=self.registry.primitives(hypervisor), run_dir=self.run_dir, loop=asyncio.get_running_loop(),
            switch=get_switch,
        )
        try:
            await self._start_device(self.registry.device_classes()[config.device_class], config, context)
        except (DaemonError, DeviceError, ConfigError, ListenerError, ValueError, OSError) as exc:
            raise ControlError(f"{config.name}: {exc}") from None
        self.configs.append(config)
        return config.name

    async def remove_device(self, name: str) -> None:
        """Stop one device's front door (in-flight requests finish), then close its engine."""
        from pvcore.control import ControlError

        found = next(((i, d) for i, d in self.served if i.config.name == name), None)
        if found is None:
            raise ControlError(f"no device named {name!r}; devices: {', '.join(i.config.name for i, _ in self.served) or 'none'}")
        instance, door = found
        self.served.remove(found)
        self.configs = [c for c in self.configs if c.name != name]
        try:
            await door.stop()
        finally:
            await instance.close()
        log.info("device %s (%s) removed", name, instance.config.device_class)

    def set_rng_rate(self, name: str, rate: str) -> str:
        """Give the domain of rng device ``name`` the limit ``rate`` (``BYTES/PERIOD``); the limit as it reads now."""
        from pvcore.control import ControlError
        from pvcore.devices.rng import EntropySource, RateLimit
        from pvcore.virtio import DeviceError

        instance = next((i for i, _ in self.served if i.config.name == name), None)
        if instance is None or not isinstance(instance.engine, EntropySource):
            raise ControlError(f"no rng device named {name!r}")
        try:
            limit = RateLimit.parse(rate)
        except DeviceError as exc:
            raise ControlError(str(exc)) from None
        instance.engine.set_rate(limit)
        return str(limit)

    def set_limits(self, name: str, limits: str) -> dict[str, object]:
        """Give device ``name`` the I/O limits ``limits`` (``iops=500,...``, a NIC's ``rate=...``, or ``off``).

        A device in a throttle group changes the whole group's. The answer's
        ``limits`` and ``group`` as they read now; bad limits change nothing.
        """
        from pvcore.control import ControlError
        from pvcore.device_limits import set_limits
        from pvcore.throttle import ThrottleError

        instance = next((i for i, _ in self.served if i.config.name == name), None)
        if instance is None:
            raise ControlError(f"no device named {name!r}; devices: {', '.join(i.config.name for i, _ in self.served) or 'none'}")
        try:
            return set_limits(instance, limits)
        except ThrottleError as exc:
            raise ControlError(str(exc)) from None

    async def swap_media(self, name: str, path: str) -> str:
        """Serve ``path`` as block device ``name``'s backing file from now on (a media change); the old file's path.

        No request is in flight at the switch: new ones wait, those in flight
        finish, the old file is flushed (:func:`~pvcore.devices.block.media.change_medium`).
        A ``ControlError`` leaves the device serving its old file.
        """
        from pvcore.control import ControlError
        from pvcore.devices.block.backend import BlockBackend
        from pvcore.devices.block.media import MediaError, change_medium

        instance = next((i for i, _ in self.served if i.config.name == name), None)
        if instance is None or not isinstance(instance.engine, BlockBackend):
            raise ControlError(f"no block device named {name!r}")
        try:
            old = await asyncio.to_thread(change_medium, instance.engine, path)
        except MediaError as exc:
            raise ControlError(str(exc)) from None
        config = instance.config
        instance.config = DeviceConfig(config.device_class, config.name, {**config.options, "path": path})
        self.configs = [instance.config if c is config else c for c in self.configs]
        return old

    def status(self) -> str:
        """What the daemon does now, for systemd's STATUS= and the log."""
        return f"serving {len(self.served)} device(s)"

    def reload(self) -> None:
        """SIGHUP: tell systemd a reload runs, reopen the logs, say ready again."""
        reloading()
        self.reopen_logs()
        ready(self.status())

    def request_stop(self) -> None:
        """Ask :meth:`serve_forever` to return (as SIGTERM does)."""
        self._stop.set()

    async def wait_for_stop(self) -> None:
        """Return once :meth:`request_stop` was called."""
        await self._stop.wait()

    async def serve_forever(self) -> None:
        """Start, serve until SIGTERM/SIGINT, then stop cleanly (:func:`serve_until_stopped`)."""
        await serve_until_stopped(self)


class Serving(Protocol):
    """What :func:`serve_until_stopped` runs: a :class:`Daemon`, or the parent of worker processes
    (:class:`~pvcore.workers.WorkerPool`); also what its control socket controls."""

    hypervisor: str
    run_dir: Path

    async def start(self) -> Any:
        """Start every device; a failure leaves nothing started."""

    async def stop(self) -> None:
        """Stop every device cleanly."""

    def request_stop(self) -> None:
        """Make :meth:`wait_for_stop` return."""

    async def wait_for_stop(self) -> None:
        """Return once :meth:`request_stop` was called."""

    def reload(self) -> None:
        """SIGHUP: reopen log files."""

    def status(self) -> str:
        """What it does now (``serving N device(s)...``)."""


async def serve_until_stopped(server: Serving) -> None:
    """Start ``server``, answer its control socket until SIGTERM or SIGINT, then stop it cleanly.

    The signal handlers are in place before the start, so a stop asked for
    while starting is done once the start ends; SIGHUP calls ``reload``. The
    log line ``serving N device(s)...`` says the start is over; under systemd
    READY=1 follows it and STOPPING=1 comes before the stop.
    """
    from pvcore.control import ControlServer

    loop = asyncio.get_running_loop()
    handlers = {signal.SIGTERM: server.request_stop, signal.SIGINT: server.request_stop, signal.SIGHUP: server.reload}
    for signum, handler in handlers.items():
        loop.add_signal_handler(signum, handler)
    try:
        await server.start()
        control = ControlServer(server)
        try:
            await control.start()
            log.info("%s; default hypervisor %s; run dir %s", server.status(), server.hypervisor, server.run_dir)
            log_build()
            ready(server.status())
            await server.wait_for_stop()
        finally:
            await control.stop()
            log.info("stopping")
            stopping()
            await server.stop()
    finally:
        for signum in handlers:
            loop.remove_signal_handler(signum)
