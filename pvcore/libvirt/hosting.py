"""Where ``pvcore daemon``'s devices run: in its own process, or in worker processes.

The follower (:mod:`pvcore.libvirt.follower`) decides which devices are
served; a :class:`DeviceHost` serves them. Two implement it:

* :class:`LocalDevices` (``--workers 1``, and the one-domain server that
  ``pvcore deploy`` starts): one :class:`~pvcore.daemon.Daemon` per device
  set in the daemon's own process, so adding or removing one never touches
  the others;
* :class:`~pvcore.workers.WorkerPool` (``--workers N``): the devices run in
  N worker processes, each set in the worker holding what it shares, else in
  the one with the fewest devices; the parent keeps the sockets, the logs,
  the signals and libvirt.

Device names are unique in a host: a set naming a device already served is
refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from pvcore.config import ConfigError
from pvcore.contract import DeviceConfig
from pvcore.control import ControlError
from pvcore.daemon import Daemon, start_metrics
from pvcore.metrics import MetricsAddress, MetricsServer, ServedEntry
from pvcore.registry import Registry


class DeviceHost(Protocol):
    """What serves the host daemon's devices, by name (errors a control request gets are ``ControlError``)."""

    async def start(self) -> None:
        """Be ready to serve (workers started, the metrics endpoint up)."""

    async def stop(self) -> None:
        """Stop every device still served, then whatever :meth:`start` started."""

    async def add(self, configs: Sequence[DeviceConfig]) -> None:
        """Serve ``configs`` together; on an error none of them is served."""

    async def remove(self, names: Sequence[str]) -> None:
        """Stop the devices ``names`` (in-flight requests finish, disks are flushed, sockets go)."""

    async def describe_devices(self) -> list[dict[str, object]]:
        """Every device served, as the control ``list`` gives it."""

    async def set_rng_rate(self, name: str, rate: str) -> str:
        """Change an rng device's domain's rate; the limit as it reads now."""

    async def set_limits(self, name: str, limits: str) -> dict[str, object]:
        """Change a device's I/O limits; ``limits`` and ``group`` as they read now."""

    async def swap_media(self, name: str, path: str) -> str:
        """Change a block device's backing file; the old file's path."""

    def reopen_logs(self) -> None:
        """SIGHUP: every device reopens the log files it writes."""


class LocalDevices:
    """A :class:`DeviceHost` in this process: one :class:`~pvcore.daemon.Daemon` per set of devices added."""

    def __init__(
        self, registry: Registry, hypervisor: str, *, run_dir: Path, metrics: MetricsAddress | None = None
    ) -> None:
        self.registry = registry
        self.hypervisor = hypervisor
        self.run_dir = run_dir
        self.metrics = metrics
        self.daemons: dict[str, Daemon] = {}
        """Each device's name -> the daemon serving it (with the rest of its set)."""
        self._metrics_server: MetricsServer | None = None

    def served_entries(self) -> list[ServedEntry]:
        """Every device served now (what the metrics collector reads)."""
        return [entry for daemon in self._distinct() for entry in daemon.served_entries()]

    def _distinct(self) -> list[Daemon]:
        return list({id(daemon): daemon for daemon in list(self.daemons.values())}.values())

    async def start(self) -> None:
        """Serve the metrics endpoint, if one was asked for."""
        if self.metrics is not None:
            from pvcore.metrics import DeviceCollector

            self._metrics_server = start_metrics(self.metrics, DeviceCollector(self.served_entries))

    async def stop(self) -> None:
        """Stop every device still served, then the metrics endpoint."""
        await self.remove(list(self.daemons))
        if self._metrics_server is not None:
            self._metrics_server.stop()
            self._metrics_server = None

    async def add(self, configs: Sequence[DeviceConfig]) -> None:
        """Start a daemon for ``configs`` (its errors as :class:`~pvcore.daemon.Daemon` raises them)."""
        taken = [config.name for config in configs if config.name in self.daemons]
        if taken:
            raise ConfigError(f"device name {taken[0]} is already served (names must be unique on a host)")
        daemon = Daemon(
            self.registry, self.hypervisor, configs, run_dir=self.run_dir, measure_service_time=self.metrics is not None
        )
        await daemon.start()
        for config in configs:
            self.daemons[config.name] = daemon

    async def remove(self, names: Sequence[str]) -> None:
        """Stop the daemons serving ``names`` (a set goes whole)."""
        for name in names:
            daemon = self.daemons.get(name)
            if daemon is None:
                continue
            for other in [n for n, d in self.daemons.items() if d is daemon]:
                del self.daemons[other]
            await daemon.stop()

    def _daemon(self, name: str) -> Daemon:
        daemon = self.daemons.get(name)
        if daemon is None:
            raise ControlError(f"no device named {name!r} is served; devices: {', '.join(sorted(self.daemons)) or 'none'}")
        return daemon

    async def describe_devices(self) -> list[dict[str, object]]:
        """Every device of every daemon."""
        return [entry for daemon in self._distinct() for entry in daemon.describe_devices()]

    async def set_rng_rate(self, name: str, rate: str) -> str:
        """See :meth:`Daemon.set_rng_rate`."""
        return self._daemon(name).set_rng_rate(name, rate)

    async def set_limits(self, name: str, limits: str) -> dict[str, object]:
        """See :meth:`Daemon.set_limits`."""
        return self._daemon(name).set_limits(name, limits)

    async def swap_media(self, name: str, path: str) -> str:
        """See :meth:`Daemon.swap_media`."""
        return await self._daemon(name).swap_media(name, path)

    def reopen_logs(self) -> None:
        """Every daemon reopens its devices' log files."""
        for daemon in self._distinct():
            daemon.reopen_logs()
