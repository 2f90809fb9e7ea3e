"""``pvcore serve --workers N`` and ``pvcore daemon --workers N``: devices spread over N worker processes.

One Python process is one core, whatever the host has. With ``--workers N``
the daemon's process becomes a parent that serves no device itself: it
starts N worker processes (:mod:`pvcore.worker`), each a
:class:`~pvcore.daemon.Daemon` over its share of the devices, and keeps what
must outlive any one of them (``pvcore daemon`` also keeps libvirt: it
follows the domains in the parent and asks the pool to :meth:`~WorkerPool.add`
and :meth:`~WorkerPool.remove` their devices, see
:mod:`pvcore.libvirt.follower`):

* the sockets: every listening socket a worker's front doors ask for is
  created and held by the parent (:class:`ListenerBroker`) and passed to the
  worker with SCM_RIGHTS, so a socket path stays connectable (its connections
  wait in the backlog) while a worker restarts; the connections, guest memory
  and eventfds a front end passes then arrive at the worker itself;
* signals: SIGTERM and SIGINT stop every worker cleanly (in-flight requests
  finish, disks are flushed) and then the parent removes the sockets; SIGHUP
  is passed on (log files reopen);
* the control socket and the metrics endpoint: a ``pvcore ctl`` request goes
  to the worker serving its device, ``list`` asks them all; a scrape merges
  every worker's families (:class:`~pvcore.metrics.MergedCollector`);
* the logs: workers write to the parent's standard error, each line marked
  ``pvcore[wN]``.

Devices that share state in one process stay together (:func:`partition`):
every NIC of a switch, every disk of a throttle group, every rng device of a
domain; a device added later goes to the worker holding what it shares, else
to the one serving the fewest devices (:meth:`WorkerPool.place`). A worker that dies is started again with the same devices (plus
those added and minus those removed since, and with swapped media) after a
delay that doubles while it keeps dying young; the other workers and their
guests never notice. A device the restarted worker cannot start is listed as
not served until ``ctl remove`` or ``swap-media`` fixes it; the others serve.
Live limit changes (``set-limits``, ``set-rate``) are not kept across a
worker's restart.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import logging
import os
import pickle
import signal
import socket
import struct
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

from pvcore.contract import DeviceConfig
from pvcore.daemon import DaemonError, serve_until_stopped, start_metrics
from pvcore.devices.block.iopool import thread_bound_setting
from pvcore.registry import Registry
from pvcore.spread import SpreadExports, check_spread, is_spread
from pvcore.streams.unix import ListenerError, bind_private_socket, remove_socket_file
from pvcore.systemd_notify import ready, reloading

log = logging.getLogger("pvcore.workers")

PAYLOAD_LENGTH = struct.Struct("!Q")
"""The length of the pickled :class:`WorkerSpec` that opens a worker's control channel."""
MAX_LISTEN_REQUEST = 8192
STOP_TIMEOUT = 60.0
"""Seconds a worker has to stop after SIGTERM before it is killed."""
FIRST_RESTART_DELAY = 0.5
MAX_RESTART_DELAY = 30.0
HEALTHY_SECONDS = 10.0
"""A worker that ran this long before dying is restarted after the first delay again."""
ASK_TIMEOUT = 30.0
"""Seconds the parent waits for a worker's answer to a control or metrics request."""
START_TIMEOUT = 120.0
"""Seconds a worker has to start its devices and say it serves."""
MAX_CHANNEL_LINE = 256 << 20
"""The longest line either end of a control channel reads (a ``list`` or ``metrics`` answer of
thousands of devices is megabytes)."""


def default_worker_count() -> int:
    """The CPUs this process may run on: the default of ``--workers``."""
    return len(os.sched_getaffinity(0))


def _shared_state(config: DeviceConfig) -> list[tuple[str, str]]:
    """What ``config`` shares with other devices of a process: its switch, throttle group or rng domain."""
    keys = []
    if config.device_class == "net":
        keys.append(("switch", str(config.get("switch", "default"))))
    if config.get("group") is not None:
        keys.append(("group", str(config.get("group"))))
    if config.device_class == "rng":
        keys.append(("rng-domain", str(config.get("domain") or config.name).partition("/")[0]))
    return keys


def partition(configs: Sequence[DeviceConfig], count: int) -> list[list[DeviceConfig]]:
    """At most ``count`` non-empty shares of ``configs``; devices that share state are in one share.

    Sets of devices bound together are placed largest first, each in the
    share with the fewest devices so far; the order of devices within a share
    is their order in ``configs``. A device with ``spread=on``
    (:mod:`pvcore.spread`) is in every share, after the others, and makes
    ``count`` shares.
    """
    if count < 1:
        raise ValueError(f"workers={count} must be at least 1")
    spread = [config for config in configs if is_spread(config.options)]
    configs = [config for config in configs if not is_spread(config.options)]
    owner: dict[tuple[str, str], int] = {}
    parent = list(range(len(configs)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, config in enumerate(configs):
        for key in _shared_state(config):
            if key in owner:
                parent[root(i)] = root(owner[key])
            else:
                owner[key] = i
    sets: dict[int, list[int]] = {}
    for i in range(len(configs)):
        sets.setdefault(root(i), []).append(i)
    shares: list[list[int]] = [[] for _ in range(count if spread else min(count, len(sets)))]
    for members in sorted(sets.values(), key=len, reverse=True):
        min(shares, key=len).extend(members)
    return [[configs[i] for i in sorted(share)] + spread for share in shares if share or spread]


@attrs.frozen
class WorkerSpec:
    """What a worker serves: its number, its devices and how (sent pickled to :mod:`pvcore.worker`)."""

    index: int
    hypervisor: str
    configs: tuple[DeviceConfig, ...]
    run_dir: Path
    measure_service_time: bool
    log_level: int
    processes: int
    """How many workers share the CPUs (the I/O thread bound counts this one's share)."""
    io_threads: int | None
    """The bound on this worker's I/O threads (``--io-threads``); None: its share of the CPUs decides."""
    restart: bool
    """Started again after it died: serve what can start, name the rest."""


class ListenerBroker:
    """The listening sockets the parent holds for its workers, by path.

    A worker asking again for a path (after a restart) gets the socket the
    parent holds, if the file at the path is still that socket; otherwise (a
    device removed, its file gone) a new one is made as
    :func:`~pvcore.streams.unix.bind_private_socket` makes it.
    """

    def __init__(self) -> None:
        self._held: dict[Path, tuple[socket.socket, tuple[int, int]]] = {}
        self.spread = SpreadExports(lambda path, what: self.socket_for(path, what, socket.SOCK_STREAM))
        """The paths whose connections the parent accepts and hands out (:mod:`pvcore.spread`)."""

    def socket_for(self, path: Path, what: str, kind: int) -> socket.socket:
        """The listening socket at ``path`` (a :class:`ListenerError` if none can be made there)."""
        held = self._held.get(path)
        if held is not None:
            if _inode(path) == held[1] and held[0].type == kind:
                return held[0]
            self._forget(path)
        sock = bind_private_socket(path, what, kind=kind)
        inode = _inode(path)
        assert inode is not None, path
        self._held[path] = (sock, inode)
        return sock

    def release(self, path: Path) -> None:
        """The device at ``path`` is gone: close its socket and remove the file if it is still that socket."""
        held = self._held.pop(path, None)
        if held is not None:
            remove_socket_file(path, held[1])
            held[0].close()

    def close(self) -> None:
        """Close every socket and remove its file if the file is still that socket."""
        self.spread.close()
        for path, (sock, inode) in list(self._held.items()):
            remove_socket_file(path, inode)
            sock.close()
        self._held.clear()

    def _forget(self, path: Path) -> None:
        sock, _ = self._held.pop(path)
        sock.close()


def _inode(path: Path) -> tuple[int, int] | None:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    return (info.st_dev, info.st_ino)


def _add_config_request(config: DeviceConfig) -> dict[str, str]:
    """The control request that has a worker serve ``config`` (pickled: the worker is this program)."""
    return {"command": "add-config", "config": base64.b64encode(pickle.dumps(config)).decode()}


def _merge_spread(devices: list[dict[str, Any]], spread: set[str]) -> list[dict[str, Any]]:
    """``devices`` with each spread device once: described as a worker serving it describes it (if any
    does), its workers joined (``w0,w1``), its counters (and service-time histogram) added up."""
    groups: dict[str, list[dict[str, Any]]] = {}
    listed: list[dict[str, Any] | str] = []
    for device in devices:
        if device["name"] not in spread:
            listed.append(device)
        elif device["name"] not in groups:
            groups[device["name"]] = [device]
            listed.append(device["name"])
        else:
            groups[device["name"]].append(device)
    merged = []
    for item in listed:
        if not isinstance(item, str):
            merged.append(item)
            continue
        entries = groups[item]
        serving = [entry for entry in entries if entry.get("state", "served") == "served"]
        base = dict((serving or entries)[0])
        base["worker"] = ",".join(str(entry["worker"]) for entry in entries)
        counters: dict[str, Any] = {}
        for entry in serving:
            for key, value in (entry.get("counters") or {}).items():
                if isinstance(value, (int, float)) and isinstance(counters.get(key, 0), (int, float)):
                    counters[key] = counters.get(key, 0) + value
                elif key == "service_time" and isinstance(value, dict):
                    mine = counters.get(key)
                    if mine is None:
                        counters[key] = {**value, "counts": list(value.get("counts") or [])}
                    elif len(mine["counts"]) == len(value.get("counts") or []):
                        mine["counts"] = [a + b for a, b in zip(mine["counts"], value["counts"])]
                elif key not in counters:
                    counters[key] = value
        base["counters"] = counters
        merged.append(base)
    return merged


class WorkerDown(Exception):
    """The worker serving a device is not running now (it is being started again)."""


class Worker:
    """One worker process of a :class:`WorkerPool`: its devices, its process and its two channels."""

    def __init__(self, index: int, configs: list[DeviceConfig]) -> None:
        self.index = index
        self.configs = configs
        self.restarts = 0
        self.failed: dict[str, str] = {}
        """Devices the running process could not start (after a restart), with their errors."""
        self.proc: asyncio.subprocess.Process | None = None
        self.serving = False
        self.starting = False
        self._settled = asyncio.Event()
        self._settled.set()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._listen: socket.socket | None = None
        self.hand_channel: socket.socket | None = None
        """The parent's end of the channel of handed connections (:mod:`pvcore.spread`)."""
        self._spread: SpreadExports | None = None
        self._lock = asyncio.Lock()
        self._ids = itertools.count(1)

    @property
    def name(self) -> str:
        """``wN``, as its log lines are marked."""
        return f"w{self.index}"

    def owns(self, name: str) -> bool:
        """Whether device ``name`` is this worker's."""
        return any(config.name == name for config in self.configs)

    async def start(self, spec: WorkerSpec, broker: ListenerBroker) -> None:
        """Start the process, hand it ``spec`` and wait until it serves (a :class:`DaemonError` if it cannot;
        nothing of it is left then)."""
        self.starting = True
        self._settled.clear()
        try:
            await self._start(spec, broker)
        except BaseException as exc:
            await self.kill()
            if isinstance(exc, (OSError, ValueError, asyncio.TimeoutError)):
                raise DaemonError(f"worker {self.name} did not start: {exc or 'timed out'}") from None
            raise
        finally:
            self.starting = False
            self._settled.set()

    async def settled(self) -> None:
        """Return once the worker is not starting (it serves, or its start failed and it is down)."""
        await self._settled.wait()

    async def _start(self, spec: WorkerSpec, broker: ListenerBroker) -> None:
        loop = asyncio.get_running_loop()
        control, control_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        listen, listen_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        hand, hand_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        children = (control_child, listen_child, hand_child)
        try:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "pvcore.worker", *(str(child.fileno()) for child in children),
                str(os.getpid()), pass_fds=tuple(child.fileno() for child in children),
                env={key: value for key, value in os.environ.items() if key != "NOTIFY_SOCKET"},  # the parent notifies
            )
        except BaseException:
            control.close()
            listen.close()
            hand.close()
            raise
        finally:
            for child in children:
                child.close()
        hand.setblocking(False)
        self.hand_channel = hand
        self._spread = broker.spread
        listen.setblocking(False)
        self._listen = listen
        loop.add_reader(listen.fileno(), self._give_listener, listen, broker)
        try:
            self._reader, self._writer = await asyncio.open_unix_connection(sock=control, limit=MAX_CHANNEL_LINE)
        except BaseException:
            control.close()
            raise
        payload = pickle.dumps(spec)
        self._writer.write(PAYLOAD_LENGTH.pack(len(payload)) + payload)
        await self._writer.drain()
        line = await asyncio.wait_for(self._reader.readline(), START_TIMEOUT)
        answer = json.loads(line) if line else {"error": f"worker {self.name} exited before serving (see its log above)"}
        if not answer.get("ready"):
            raise DaemonError(answer.get("error") or f"worker {self.name} did not start")
        self.failed = dict(answer.get("failed") or {})
        self.serving = True

    def _give_listener(self, listen: socket.socket, broker: ListenerBroker) -> None:
        """Answer one message of the worker on ``listen`` (on the parent's loop): a request for a
        listening socket, answered always, or the release of one."""
        try:
            data = listen.recv(MAX_LISTEN_REQUEST)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._close_listen(listen)
            return
        try:
            request = json.loads(data)
            if "release" in request:
                path = Path(request["release"])
                if broker.spread.spread(path):
                    broker.spread.drop(self, path)  # the others go on serving it
                else:
                    broker.release(path)
                return
            if "hand" in request:
                self._hand_over(listen, broker, Path(request["hand"]), str(request["what"]),
                                bool(request.get("queues")))
                return
            path, what, kind = Path(request["path"]), str(request["what"]), int(request["kind"])
            if broker.spread.spread(path):
                raise ListenerError(f"{what}: {path} is spread over the workers (spread=on), which only an NBD "
                                    "export or a vhost-user disk can be; remove spread=on")
            sock = broker.socket_for(path, what, kind)
        except Exception as exc:  # every request gets an answer: the worker waits for one
            error = str(exc) if isinstance(exc, ListenerError) else f"no listening socket: {type(exc).__name__}: {exc}"
            with contextlib.suppress(OSError):
                listen.send(json.dumps({"ok": False, "error": error}).encode())
            return
        try:
            socket.send_fds(listen, [json.dumps({"ok": True}).encode()], [sock.fileno()])
        except OSError as exc:  # the worker went away while asking: its watcher starts it again
            log.warning("worker %s: could not answer its request for %s: %s", self.name, path, exc)

    def _hand_over(self, listen: socket.socket, broker: ListenerBroker, path: Path, what: str, queues: bool) -> None:
        """Answer whether the parent hands this worker the connections of ``path`` (and from now on do);
        ``queues``: with queue channels (a vhost-user disk)."""
        handed = broker.spread.spread(path)
        if handed:
            broker.spread.take(path, what, self, queues=queues)
        listen.send(json.dumps({"ok": True, "handed": handed}).encode())

    def _close_listen(self, listen: socket.socket | None = None) -> None:
        listen = listen or self._listen
        if listen is None or listen.fileno() == -1:
            return
        asyncio.get_running_loop().remove_reader(listen.fileno())
        listen.close()
        if listen is self._listen:
            self._listen = None

    async def ask(self, body: dict[str, Any]) -> dict[str, Any]:
        """The worker's answer to one request; :class:`WorkerDown` if it is not running or does not answer.

        Each request carries an id and the worker's answer echoes it, so a
        late answer to an earlier request that timed out is skipped.
        """
        async with self._lock:
            reader, writer = self._reader, self._writer
            if not self.serving or reader is None or writer is None:
                raise WorkerDown(f"worker {self.name} is not running (it is being started again)")
            ident = next(self._ids)
            try:
                writer.write(json.dumps({**body, "id": ident}).encode() + b"\n")
                await writer.drain()
                async with asyncio.timeout(ASK_TIMEOUT):
                    while True:
                        line = await reader.readline()
                        if not line:
                            raise WorkerDown(f"worker {self.name} is not running (it is being started again)")
                        answer = json.loads(line)
                        if answer.get("id") == ident:
                            return answer
            except (OSError, ValueError, asyncio.TimeoutError) as exc:
                raise WorkerDown(f"worker {self.name} did not answer: {exc or 'timed out'}") from None

    async def stop(self) -> None:
        """SIGTERM, then wait (SIGKILL after :data:`STOP_TIMEOUT`); channels closed."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), STOP_TIMEOUT)
            except asyncio.TimeoutError:
                log.error("worker %s did not stop in %.0f s; killing it", self.name, STOP_TIMEOUT)
                await self.kill()
        self.close_channels()

    async def kill(self) -> None:
        """SIGKILL and reap; channels closed."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        self.close_channels()

    def close_channels(self) -> None:
        """Drop the channels to the process."""
        self.serving = False
        self._close_listen()
        if self._spread is not None:
            self._spread.drop(self)  # its connections wait for the other workers, or in the backlog
        if self.hand_channel is not None:
            self.hand_channel.close()
            self.hand_channel = None
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None


class WorkerPool:
    """The parent of ``pvcore serve --workers N``: starts, watches and controls the workers (a
    :class:`~pvcore.control.Controlled`); see the module docstring.

    ``shares`` are the devices each worker starts with; ``pvcore daemon``
    starts N empty ones and adds the domains' devices as libvirt names them
    (:meth:`add`, :meth:`remove`: the :class:`~pvcore.libvirt.hosting.DeviceHost`
    of its follower). Each worker's I/O threads are bounded by this process's
    :func:`~pvcore.devices.block.iopool.set_thread_bound` (``--io-threads``), if set.
    """

    def __init__(
        self,
        registry: Registry,
        hypervisor: str,
        shares: Sequence[Sequence[DeviceConfig]],
        *,
        run_dir: Path,
        metrics: Any = None,
    ) -> None:
        self.registry = registry
        self.hypervisor = hypervisor
        self.run_dir = run_dir
        self.metrics = metrics
        self.workers = [Worker(index, list(share)) for index, share in enumerate(shares)]
        self.broker = ListenerBroker()
        self._adding: list[DeviceConfig] = []
        """Devices an ``add`` is starting: their names and sockets are taken already."""
        for config in self._all_configs():
            self._declare_spread(config)
        self._stop = asyncio.Event()
        self._stopping = False
        self._watchers: list[asyncio.Task[None]] = []
        self._metrics_server: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _spec(self, worker: Worker, *, restart: bool = False) -> WorkerSpec:
        return WorkerSpec(worker.index, self.hypervisor, tuple(worker.configs), self.run_dir,
                          self.metrics is not None, logging.getLogger().getEffectiveLevel(), len(self.workers),
                          thread_bound_setting(), restart)

    @property
    def device_count(self) -> int:
        """How many devices the workers serve."""
        return len(self._all_configs())

    def _all_configs(self) -> list[DeviceConfig]:
        """Every device once (a spread one is in every worker)."""
        return list({config.name: config for worker in self.workers for config in worker.configs}.values())

    def _declare_spread(self, config: DeviceConfig) -> None:
        if is_spread(config.options) and config.get("socket"):
            self.broker.spread.declare(Path(config.get("socket")))

    async def start(self) -> None:
        """Start every worker (in parallel) and wait until each serves; on any failure stop them all."""
        self._loop = asyncio.get_running_loop()
        self.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self.metrics is not None:
            from pvcore.metrics import MergedCollector

            self._metrics_server = start_metrics(self.metrics, MergedCollector(self._fetch_metrics))
        results = await asyncio.gather(
            *(worker.start(self._spec(worker), self.broker) for worker in self.workers), return_exceptions=True
        )
        failed = [result for result in results if isinstance(result, BaseException)]
        if failed:
            await self.stop()
            raise failed[0]
        self._watchers = [asyncio.get_running_loop().create_task(self._watch(worker)) for worker in self.workers]

    async def _watch(self, worker: Worker) -> None:
        """Start ``worker`` again whenever it dies, until the pool stops."""
        loop = asyncio.get_running_loop()
        delay = FIRST_RESTART_DELAY
        while True:
            started = loop.time()
            assert worker.proc is not None
            status = await worker.proc.wait()
            if self._stopping:
                return
            worker.close_channels()
            how = f"signal {-status}" if status < 0 else f"status {status}"
            if loop.time() - started >= HEALTHY_SECONDS:
                delay = FIRST_RESTART_DELAY
            names = ", ".join(config.name for config in worker.configs)
            log.error("worker %s (%s) ended with %s; starting it again in %.1f s", worker.name, names, how, delay)
            while True:
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_RESTART_DELAY)
                if self._stopping:
                    return
                try:
                    await worker.start(self._spec(worker, restart=True), self.broker)
                except DaemonError as exc:
                    log.error("worker %s did not start again: %s; next try in %.1f s", worker.name, exc, delay)
                    continue
                break
            worker.restarts += 1
            log.info("worker %s serves again (%d restart(s))", worker.name, worker.restarts)
            for name, error in worker.failed.items():
                log.error("worker %s: device %s not served: %s (ctl remove or swap-media it)", worker.name, name, error)

    async def stop(self) -> None:
        """Stop every worker cleanly, then close the sockets and the metrics endpoint."""
        self._stopping = True
        for watcher in self._watchers:
            watcher.cancel()
        await asyncio.gather(*(worker.stop() for worker in self.workers), return_exceptions=True)
        self.broker.close()
        if self._metrics_server is not None:
            self._metrics_server.stop()
            self._metrics_server = None

    def _fetch_metrics(self) -> list[tuple[str, list[dict[str, Any]]]]:
        """Every running worker's name and families (called on the metrics server's thread)."""
        assert self._loop is not None
        future = asyncio.run_coroutine_threadsafe(self._gather_metrics(), self._loop)
        return future.result(ASK_TIMEOUT + 5)

    async def _gather_metrics(self) -> list[tuple[str, list[dict[str, Any]]]]:
        families = []
        for worker in self.workers:
            try:
                answer = await worker.ask({"command": "metrics"})
            except WorkerDown as exc:
                log.warning("metrics: %s", exc)
                continue
            if answer.get("ok"):
                families.append((worker.name, answer["families"]))
        return families

    def _owner(self, name: str) -> Worker:
        return self._owners(name)[0]

    def _owners(self, name: str) -> list[Worker]:
        """The workers serving device ``name``: one, or every worker for a spread device."""
        from pvcore.control import ControlError

        owners = [worker for worker in self.workers if worker.owns(name)]
        if owners:
            return owners
        known = ", ".join(config.name for config in self._all_configs()) or "none"
        raise ControlError(f"no device named {name!r}; devices: {known}")

    async def _forward(self, worker: Worker, body: dict[str, Any], *, when_down: Any = None) -> dict[str, Any]:
        """``body`` answered by ``worker``; its error as a ``ControlError``. If the worker does not answer:
        a ``ControlError``, or with ``when_down``, ``await when_down(worker)`` and the :class:`WorkerDown`."""
        from pvcore.control import ControlError

        try:
            answer = await worker.ask(body)
        except WorkerDown as exc:
            if when_down is not None:
                await when_down(worker)
                raise
            raise ControlError(str(exc)) from None
        if not answer.get("ok"):
            raise ControlError(answer.get("error") or "the worker refused")
        return answer

    async def describe_devices(self) -> list[dict[str, object]]:
        """Every device, asked of its worker, with ``worker`` added; a worker that is down lists its
        devices with ``state`` ``restarting`` and no counters."""
        devices: list[dict[str, object]] = []
        for worker in self.workers:
            try:
                answer = await self._forward(worker, {"command": "list"})
            except Exception as exc:
                log.warning("list: %s", exc)
                devices.extend(
                    {"name": config.name, "class": config.device_class, "domain": config.get("domain"),
                     "hypervisor": config.get("hypervisor") or self.hypervisor, "door": f"worker {worker.name} restarting",
                     "counters": {}, "worker": worker.name, "state": "restarting"}
                    for config in worker.configs
                )
                continue
            pid = worker.proc.pid if worker.proc is not None else None
            devices.extend({**device, "worker": worker.name, "worker_pid": pid, "worker_restarts": worker.restarts}
                           for device in answer["devices"])
            devices.extend(
                {"name": config.name, "class": config.device_class, "domain": config.get("domain"),
                 "hypervisor": config.get("hypervisor") or self.hypervisor, "door": "not served", "counters": {},
                 "worker": worker.name, "state": "not served", "error": worker.failed[config.name]}
                for config in worker.configs if config.name in worker.failed
            )
        return _merge_spread(devices, {c.name for c in self._all_configs() if is_spread(c.options)})

    async def add_device(self, spec: str) -> str:
        """Serve one more device from ``CLASS:key=value,...`` (:meth:`add`); its name."""
        from pvcore.config import ConfigError, parse_devices
        from pvcore.control import ControlError

        try:
            (config,) = parse_devices([spec], self.registry.device_classes(), self.registry.plugin_options(self.hypervisor))
        except (ConfigError, ValueError) as exc:
            raise ControlError(str(exc)) from None
        await self.add([config])
        return config.name

    def place(self, configs: Sequence[DeviceConfig]) -> Worker:
        """The worker for ``configs``: the one holding state they share (a switch, a throttle group, an rng
        domain), else the serving one with the fewest devices."""
        keys = {key for config in configs for key in _shared_state(config)}
        bound = next((w for w in self.workers if keys & {k for c in w.configs for k in _shared_state(c)}), None)
        if bound is not None:
            return bound
        return min([w for w in self.workers if w.serving] or self.workers, key=lambda w: len(w.configs))

    async def add(self, configs: Sequence[DeviceConfig]) -> None:
        """Serve ``configs`` together in the worker :meth:`place` picks; a ``ControlError`` leaves none of them.

        A worker that is starting is waited for; one that is down (its
        restart pending) takes them into what it serves when it starts again.
        """
        from pvcore.config import ConfigError, check_unique
        from pvcore.control import ControlError

        try:
            check_unique(self._all_configs() + self._adding + list(configs))
        except ConfigError as exc:
            raise ControlError(str(exc)) from None
        self._adding.extend(configs)
        try:
            await self._add(configs)
        finally:
            for config in configs:
                self._adding.remove(config)

    async def _add(self, configs: Sequence[DeviceConfig]) -> None:
        """:meth:`add` once the names and sockets of ``configs`` are taken."""
        from pvcore.control import ControlError

        spread = [config for config in configs if is_spread(config.options)]
        if spread and len(configs) > 1:
            raise ControlError(f"{spread[0].name}: a device spread over the workers (spread=on) is added on its own")
        for config in spread:
            try:
                check_spread(config.name, config.options)
            except ValueError as exc:
                raise ControlError(str(exc)) from None
        for config in spread:
            self._declare_spread(config)
        added: list[DeviceConfig] = []
        try:
            for worker in self.workers if spread else [self.place(configs)]:
                await worker.settled()
                if not worker.serving:
                    worker.configs.extend(configs)
                    added.extend(config for config in configs if config not in added)
                    continue
                for config in configs:
                    try:
                        await self._forward(worker, _add_config_request(config), when_down=self._lost)
                    except WorkerDown as exc:  # it starts again with this device among its own
                        log.warning("add %s: %s; it serves it when it starts again", config.name, exc)
                    worker.configs.append(config)
                    if config not in added:
                        added.append(config)
        except Exception:
            for config in added:
                with contextlib.suppress(Exception):  # the first error is the answer
                    await self.remove_device(config.name)
            for config in spread:
                self._forget_spread(config)
            raise

    async def remove(self, names: Sequence[str]) -> None:
        """Stop and remove the devices ``names`` (:meth:`remove_device` each, once its worker is not starting)."""
        for name in names:
            for worker in self._owners(name):
                await worker.settled()
            await self.remove_device(name)

    async def remove_device(self, name: str) -> None:
        """Remove a device from its worker (its socket goes), or from every worker if it is spread; from a
        worker that is down, or that could not start it, from what the worker serves when it starts."""
        owners = self._owners(name)
        config = next(c for c in owners[0].configs if c.name == name)
        spread = len(owners) > 1
        for worker in owners:
            if spread:
                await worker.settled()
            down = not worker.serving or name in worker.failed
            if not down:
                try:
                    await self._forward(worker, {"command": "remove", "device": name}, when_down=self._lost)
                except WorkerDown as exc:
                    log.warning("remove %s: %s; it is gone from what the worker serves when it starts again", name, exc)
                    down = True
                except Exception as exc:
                    if not spread:
                        raise
                    log.error("remove %s: worker %s refused (%s); starting it again without it", name, worker.name, exc)
                    await self._lost(worker)
                    down = True
            if down:
                self._not_starting(worker)
                if config.get("socket") and not is_spread(config.options):
                    self.broker.release(Path(config.get("socket")))
            worker.failed.pop(name, None)
            worker.configs = [c for c in worker.configs if c.name != name]
        self._forget_spread(config)

    async def _lost(self, worker: Worker) -> None:
        """``worker`` did not answer (it died, or hangs), or could not do for a spread device what its peers
        did: make sure it is down, so that its watcher starts it again with the devices it should serve
        (what the caller changes now included)."""
        if worker.proc is not None and worker.proc.returncode is None:
            log.error("worker %s: killing it so that it starts again as it should serve", worker.name)
            await worker.kill()
        worker.close_channels()

    def _forget_spread(self, config: DeviceConfig) -> None:
        """A spread device is gone: stop handing out its connections and remove its socket."""
        if is_spread(config.options) and config.get("socket"):
            path = Path(config.get("socket"))
            self.broker.spread.forget(path)
            self.broker.release(path)

    @staticmethod
    def _not_starting(worker: Worker) -> None:
        from pvcore.control import ControlError

        if worker.starting:
            raise ControlError(f"worker {worker.name} is starting; try again when it serves")

    async def set_rng_rate(self, name: str, rate: str) -> str:
        """Change an rng device's domain's rate, in its worker."""
        answer = await self._forward(self._owner(name), {"command": "set-rate", "device": name, "rate": rate})
        return str(answer["rate"])

    async def set_limits(self, name: str, limits: str) -> dict[str, object]:
        """Change a device's I/O limits, in its worker (not of a spread device: each worker would apply them)."""
        from pvcore.control import ControlError

        owners = self._owners(name)
        if len(owners) > 1:
            raise ControlError(f"{name} is spread over the workers (spread=on) and takes no I/O limits: each "
                               "worker would apply them to its own connections")
        answer = await self._forward(owners[0], {"command": "set-limits", "device": name, "limits": limits})
        return {key: value for key, value in answer.items() if key != "ok"}

    async def swap_media(self, name: str, path: str) -> str:
        """Change a block device's backing file, in its worker (every worker, if it is spread); a restarted
        worker serves the new one. For a worker that is down, the file it serves when it starts; a worker
        that could not start the device starts it again with the new file.

        A refusal by the first worker that answers changes nothing anywhere (a ``ControlError``). For a
        spread export, a worker that does not answer, or refuses after another worker swapped, is started
        again (it may have swapped, or not: it restarts with the new file, as the others serve it), so
        that one export is never two files.
        """
        from pvcore.control import ControlError

        owners = self._owners(name)
        spread = len(owners) > 1
        config = next(c for c in owners[0].configs if c.name == name)
        if config.get("socket") and self.broker.spread.spreads_queues(Path(config.get("socket"))):
            raise ControlError(f"{name}: its queues are spread over the workers (spread=on), which cannot change "
                               "the file of every queue at one instant; remove the disk and add it with the new file")
        old = str(config.get("path"))
        swapped = False
        retry: list[Worker] = []
        for worker in owners:
            if spread:
                await worker.settled()
            if not worker.serving:
                self._not_starting(worker)
                continue
            if name in worker.failed:
                retry.append(worker)
                continue
            body = {"command": "swap-media", "device": name, "path": path}
            try:
                answer = await self._forward(worker, body, when_down=self._lost if spread else None)
            except WorkerDown:
                continue  # killed: it starts again with the path given below
            except Exception as exc:
                if not swapped:
                    raise  # refused before any worker swapped: nothing changed (a lost one restarts as it was)
                log.error("swap-media %s: worker %s refused (%s); starting it again with %s", name, worker.name,
                          exc, path)
                await self._lost(worker)
                continue
            if not swapped:
                old = str(answer["old"])
            swapped = True
        for worker in owners:
            worker.configs = [
                DeviceConfig(c.device_class, c.name, {**c.options, "path": path}) if c.name == name else c
                for c in worker.configs
            ]
        for worker in retry:
            await self._start_failed(worker, name)
        return old

    async def _start_failed(self, worker: Worker, name: str) -> None:
        """Ask ``worker`` (serving) to start device ``name`` again, as its config now says; listed as not
        served, with the new error, if it still cannot."""
        config = next(c for c in worker.configs if c.name == name)
        try:
            await self._forward(worker, _add_config_request(config))
        except Exception as exc:
            worker.failed[name] = str(exc)
            log.error("worker %s: device %s still not served: %s", worker.name, name, exc)
            return
        worker.failed.pop(name, None)
        log.info("worker %s: device %s served again", worker.name, name)

    def request_stop(self) -> None:
        """Ask :meth:`serve_forever` to return (as SIGTERM does)."""
        self._stop.set()

    def reopen_logs(self) -> None:
        """Every serving worker reopens its log files (SIGHUP to it)."""
        for worker in self.workers:
            if worker.serving and worker.proc is not None and worker.proc.returncode is None:
                worker.proc.send_signal(signal.SIGHUP)
        log.info("log files reopened")

    def reload(self) -> None:
        """SIGHUP: tell systemd a reload runs, have every worker reopen its log files, say ready again."""
        reloading()
        self.reopen_logs()
        ready(self.status())

    def status(self) -> str:
        """What the workers do now, for systemd's STATUS= and the log."""
        return f"serving {self.device_count} device(s) in {len(self.workers)} worker processes"

    async def wait_for_stop(self) -> None:
        """Return once :meth:`request_stop` was called."""
        await self._stop.wait()

    async def serve_forever(self) -> None:
        """Start the workers, serve until SIGTERM/SIGINT, then stop them cleanly (:func:`serve_until_stopped`)."""
        await serve_until_stopped(self)
