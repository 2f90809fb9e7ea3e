"""One worker process of ``pvcore serve --workers N``: serves its share of the devices for its parent.

:class:`~pvcore.workers.WorkerPool` starts ``python -m pvcore.worker
CONTROL_FD LISTEN_FD HAND_FD PARENT_PID`` with three sockets inherited from it:

* CONTROL_FD (a stream): first the parent's pickled
  :class:`~pvcore.workers.WorkerSpec` (8-byte length, then the bytes); then
  the worker's one line ``{"ready": true, "devices": N, "failed": {NAME:
  ERROR}}`` (or ``{"ready": false, "error": ...}`` if a device cannot start
  at the daemon's start; a worker started again serves what it can and names
  the rest in ``failed``); then, one line each way per request, the control
  protocol (:mod:`pvcore.control`) plus two requests of the parent only:
  ``{"command": "metrics"}``, answered with the worker's metric families, and
  ``{"command": "add-config", "config": BASE64}``, a pickled
  :class:`~pvcore.contract.DeviceConfig` to serve (``pvcore daemon`` adds
  devices already parsed and adapted to the domain's XML); each answer
  carries its request's ``id``;
* LISTEN_FD (a seqpacket socket): every listening socket a device's front
  door asks for (:func:`~pvcore.streams.unix.bind_private_socket`) is asked
  of the parent, which creates it (or hands back the one it already holds for
  that path, after a restart) and passes it with SCM_RIGHTS. The parent keeps
  every socket, so a path stays connectable while a worker restarts; a
  device removed says ``{"release": PATH}`` and the parent removes its socket.
  A stream listener first asks ``{"hand": PATH, "what": ...}``: the answer's
  ``handed`` says whether the parent accepts that path's connections itself
  (an export spread over the workers, :mod:`pvcore.spread`);
* HAND_FD (a seqpacket socket): the connections of spread exports the parent
  hands this worker, one per message ``{"path": PATH}`` with its descriptor
  (:class:`~pvcore.spread.HandedConnections`).

A worker dies with its parent (PR_SET_PDEATHSIG): a daemon killed with
SIGKILL leaves no worker behind. SIGTERM stops it cleanly (in-flight
requests finish, block devices are flushed); SIGHUP reopens its log files;
SIGINT is ignored, as the parent decides when to stop. A control channel
that closes stops it too. The connections, guest memory and eventfds a front
end passes arrive at the worker itself, on the connections it accepts.
"""

from __future__ import annotations

import asyncio
import base64
import ctypes
import json
import logging
import os
import pickle
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pvcore.contract import DeviceConfig
from pvcore.control import ControlError, ControlServer
from pvcore.daemon import Daemon
from pvcore.registry import default_registry
from pvcore.spread import HandedConnections
from pvcore.streams.unix import ListenerError, set_listener_source
from pvcore.devices.block.iopool import set_thread_bound, share_cpus
from pvcore.workers import MAX_CHANNEL_LINE, PAYLOAD_LENGTH, WorkerSpec

log = logging.getLogger("pvcore.worker")

PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
MAX_LISTEN_ANSWER = 4096
LISTEN_TIMEOUT = 30.0
"""Seconds a worker waits for its parent to answer a request for a listening socket."""


class ParentListeners:
    """The listening sockets of a worker, asked of its parent over the seqpacket ``channel``
    (a :class:`~pvcore.streams.unix.ListenerSource`)."""

    def __init__(self, channel: socket.socket, handed: HandedConnections) -> None:
        self.channel = channel
        self.channel.settimeout(LISTEN_TIMEOUT)
        self.handed = handed
        self.exiting = False

    def _ask(self, request: dict[str, Any], what: str, path: Path) -> tuple[dict[str, Any], list[int]]:
        """The parent's answer to ``request`` and the descriptors that came with it."""
        try:
            self.channel.send(json.dumps(request).encode())
            data, fds, _flags, _address = socket.recv_fds(self.channel, MAX_LISTEN_ANSWER, 1)
        except OSError as exc:  # a timeout included: the parent did not answer
            raise ListenerError(f"{what}: no socket for {path} from the parent process: {exc}") from None
        if not data:
            raise ListenerError(f"{what}: the parent process is gone")
        return json.loads(data), fds

    def get(self, path: Path, what: str, kind: int) -> socket.socket:
        """A listening socket at ``path`` from the parent; a :class:`ListenerError` with its reason if none."""
        answer, fds = self._ask({"path": os.fspath(path), "what": what, "kind": int(kind)}, what, path)
        if not answer.get("ok") or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise ListenerError(answer.get("error") or f"{what}: the parent sent no socket for {path}")
        sock = socket.socket(fileno=fds[0])
        sock.setblocking(False)
        return sock

    def hand_over(self, path: Path, what: str, take: Callable[..., None],
                  host: Callable[[socket.socket], None] | None = None) -> bool:
        """Whether the parent hands this worker the connections of ``path`` (then each goes to ``take``;
        with ``host``, with queue channels, see :class:`~pvcore.spread.HandedConnections`)."""
        request = {"hand": os.fspath(path), "what": what, "queues": host is not None}
        answer, fds = self._ask(request, what, path)
        for fd in fds:
            os.close(fd)
        if not answer.get("ok"):
            raise ListenerError(answer.get("error") or f"{what}: the parent refused {path}")
        if not answer.get("handed"):
            return False
        self.handed.register(path, take, host)
        return True

    def release(self, path: Path) -> None:
        """Tell the parent the device listening at ``path`` is gone (not when the whole worker stops:
        the parent keeps its sockets then)."""
        self.handed.unregister(path)
        if not self.exiting:
            try:
                self.channel.send(json.dumps({"release": os.fspath(path)}).encode())
            except OSError as exc:
                log.warning("could not tell the parent that %s is released: %s", path, exc)


def _die_with_parent(parent: int) -> None:
    """Ask the kernel for SIGKILL when the parent exits; exit now if it already has."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        log.warning("worker: PR_SET_PDEATHSIG failed (errno %d); it may outlive a killed parent", ctypes.get_errno())
    if os.getppid() != parent:
        sys.exit(1)


def _name_process(index: int) -> None:
    """Name the process ``pvcore-wN`` (``/proc/PID/comm``, what ps and top show), as the logs name it."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_NAME, ctypes.c_char_p(f"pvcore-w{index}".encode()), 0, 0, 0)


def _receive_exactly(sock: socket.socket, size: int) -> bytes:
    """``size`` bytes from a blocking socket; fewer only at end of stream."""
    chunks, left = [], size
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _read_spec(control: socket.socket) -> WorkerSpec:
    """The parent's :class:`WorkerSpec`, read before the event loop starts."""
    header = _receive_exactly(control, PAYLOAD_LENGTH.size)
    if len(header) != PAYLOAD_LENGTH.size:
        raise SystemExit("pvcore worker: the parent sent no work")
    (length,) = PAYLOAD_LENGTH.unpack(header)
    spec = pickle.loads(_receive_exactly(control, length))  # from the parent process, which started this one
    if not isinstance(spec, WorkerSpec):
        raise SystemExit("pvcore worker: the parent sent something other than a WorkerSpec")
    return spec


async def _add_config(daemon: Daemon, payload: str) -> dict[str, Any]:
    """``add-config``: serve the pickled :class:`DeviceConfig` the parent sent (a refused one changes nothing)."""
    config = pickle.loads(base64.b64decode(payload))  # from the parent process, which started this one
    if not isinstance(config, DeviceConfig):
        return {"ok": False, "error": "add-config: the parent sent something other than a DeviceConfig"}
    try:
        return {"ok": True, "device": await daemon.add_config(config)}
    except ControlError as exc:
        return {"ok": False, "error": str(exc)}
    except Exception as exc:  # a plugin's own error (a ContractError, say) refuses that device only
        log.exception("worker: device %s did not start", config.name)
        return {"ok": False, "error": f"{config.name}: {type(exc).__name__}: {exc}"}


async def _answer(daemon: Daemon, answers: ControlServer, line: bytes) -> dict[str, Any]:
    """One request of the parent, answered with its ``id``: ``metrics``, ``add-config``, or a control request."""
    try:
        request = json.loads(line)
        command, ident = request.get("command"), request.get("id")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        command = ident = None
    if command == "metrics":
        from pvcore.metrics import DeviceCollector, families_as_json

        answer = {"ok": True, "families": families_as_json(DeviceCollector(daemon.served_entries))}
    elif command == "add-config":
        answer = await _add_config(daemon, str(request.get("config")))
    else:
        answer = await answers.answer(line)
    return {**answer, "id": ident}


async def serve(spec: WorkerSpec, control: socket.socket, listeners: ParentListeners) -> int:
    """Start the share of devices, say so, then answer the parent until SIGTERM or the channel closes."""
    share_cpus(spec.processes)
    set_thread_bound(spec.io_threads)
    daemon = Daemon(default_registry(), spec.hypervisor, spec.configs, run_dir=spec.run_dir,
                    measure_service_time=spec.measure_service_time)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, daemon.request_stop)
    loop.add_signal_handler(signal.SIGHUP, daemon.reopen_logs)
    reader, writer = await asyncio.open_unix_connection(sock=control, limit=MAX_CHANNEL_LINE)
    listeners.handed.start()
    try:
        failed = await daemon.start(keep_going=spec.restart)
    except Exception as exc:
        log.error("worker w%d: %s", spec.index, exc)
        writer.write(json.dumps({"ready": False, "error": str(exc)}).encode() + b"\n")
        await writer.drain()
        return 2
    writer.write(json.dumps({"ready": True, "devices": len(daemon.served), "failed": failed}).encode() + b"\n")
    await writer.drain()
    log.info("worker w%d up: %d device(s)", spec.index, len(daemon.served))
    answers = ControlServer(daemon)

    async def answer_parent() -> None:
        while line := await reader.readline():
            writer.write(json.dumps(await _answer(daemon, answers, line)).encode() + b"\n")
            await writer.drain()
        log.info("worker w%d: the parent closed its channel", spec.index)
        daemon.request_stop()

    channel = loop.create_task(answer_parent())
    try:
        await daemon.wait_for_stop()
    finally:
        channel.cancel()
        listeners.exiting = True  # the parent keeps the sockets of a worker that stops
        await daemon.stop()
        listeners.handed.stop()
        writer.close()
    return 0


def main(argv: list[str]) -> int:
    """``python -m pvcore.worker CONTROL_FD LISTEN_FD HAND_FD PARENT_PID`` (started by the parent only)."""
    if len(argv) != 4 or not all(arg.isdigit() for arg in argv):
        print("usage: python -m pvcore.worker CONTROL_FD LISTEN_FD HAND_FD PARENT_PID (started by pvcore serve)",
              file=sys.stderr)
        return 2
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until the loop reopens logs on it
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    control_fd, listen_fd, hand_fd, parent = (int(arg) for arg in argv)
    _die_with_parent(parent)
    control = socket.socket(fileno=control_fd)
    spec = _read_spec(control)
    logging.basicConfig(level=spec.log_level, stream=sys.stderr,
                        format=f"%(asctime)s pvcore[w{spec.index}] %(name)s: %(message)s")
    _name_process(spec.index)
    listeners = ParentListeners(socket.socket(fileno=listen_fd), HandedConnections(socket.socket(fileno=hand_fd)))
    set_listener_source(listeners)
    return asyncio.run(serve(spec, control, listeners))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

