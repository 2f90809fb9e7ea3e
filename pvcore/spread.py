"""A disk spread over the worker processes (``spread=on``): every worker serves it, the parent hands
out its connections (an NBD export's), or each connection with queue channels (a vhost-user disk's).

Under ``pvcore serve --workers N`` a device lives in one worker, so one disk
gets one core however many connections its client opens. A block device
exported over NBD with ``spread=on`` is started in every worker instead, each
with its own block engine on the same file, and its connections are spread
over them:

* the parent holds the export's listening socket, as it holds every socket,
  but accepts its connections itself (:class:`SpreadExports`) and passes each
  with SCM_RIGHTS, in turn, to the workers whose export is up, over a
  seqpacket channel of each worker's own; with no worker up, connections wait
  in the socket's backlog;
* a worker's listener for that path (:class:`~pvcore.streams.unix.UnixListener`)
  asks its parent (:meth:`~pvcore.streams.unix.ListenerSource.hand_over`)
  instead of listening, and serves each connection handed to it
  (:class:`HandedConnections`) as if it had accepted it.

Every connection sees one disk: the engines read and write the one file
through the one page cache, and a FLUSH (or FUA) is an ``fdatasync`` of that
file, which covers the writes every process completed before it. So
``NBD_FLAG_CAN_MULTI_CONN`` stays true, and a client such as nbdcopy
(``--connections``) or fio with several jobs drives several cores. What
lives in one process cannot be shared this way: a spread disk takes no I/O
limits and no throttle group (refused when the device is created), and its
counters and metrics are per worker (``pvcore ctl list`` and ``/metrics``
add them up). ``spread=on`` needs ``socket=``.

A vhost-user disk has one connection per guest: the connection is handed to
one worker as above, and with it one queue channel (a SOCK_SEQPACKET pair
the parent makes) to each other worker whose disk is up, whose other end
goes to that worker first (``{"path": ..., "host": true}``); the leader's
message names the workers in the order that places the queues
(``{"path": ..., "peers": [...]}``). What goes over a queue channel is
:mod:`pvcore.transports.vhost_user.queue_spread`'s. Any other front door
asking for a spread socket is refused with a message that says so.
"""

from __future__ import annotations

import array
import asyncio
import errno
import fcntl
import json
import logging
import os
import socket
import termios
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

log = logging.getLogger("pvcore.spread")

MAX_HAND_MESSAGE = 4096
"""The longest message on a worker's channel of handed connections (a JSON object naming the path)."""
MAX_HANDED_FDS = 64
"""The most descriptors one hand-over carries: a connection and a queue channel to each other worker."""
MAX_ACCEPTS_PER_WAKEUP = 64
"""Connections accepted at one wake-up of the parent's loop (the rest wait in the backlog for the next)."""
ACCEPT_RETRY_SECONDS = 1.0
"""How long the parent leaves the backlog alone after accept failed for want of resources, or no worker
could take a connection."""
STALLED_SECONDS = 0.5
"""A worker that has left a handed connection unread this long gets no new one while another can take it."""
WARNING_INTERVAL = 10.0
"""Seconds between two warnings of the same kind for one export (a flood of connections is one warning)."""


def is_spread(options: dict[str, str]) -> bool:
    """Whether a device's options ask for ``spread=on`` (its value checked where the device is created)."""
    return options.get("spread", "off").strip().lower() in ("on", "true", "yes", "1")


def check_spread(name: str, options: dict[str, str]) -> None:
    """A ``ValueError`` naming the fix if a device asks for ``spread=on`` without the ``socket=`` whose
    connections the parent would hand out."""
    if is_spread(options) and not options.get("socket"):
        raise ValueError(f"{name}: spread=on needs socket=PATH (the daemon accepts that socket's connections and "
                         "hands them to its workers); add socket= or remove spread=on")


@attrs.define
class _Export:
    """One spread export in the parent: its listening socket and the workers that take its connections."""

    path: Path
    sock: socket.socket | None = None
    takers: list[Any] = attrs.field(factory=list)
    """Workers (:class:`~pvcore.workers.Worker`) whose export is up, in the order they came up."""
    turn: int = 0
    accepting: bool = False
    resting: bool = False
    """Accepting waits for :data:`ACCEPT_RETRY_SECONDS` (accept failed for want of resources, or no worker
    took a connection)."""
    warned: dict[str, float] = attrs.field(factory=dict)
    """By kind of warning: when it was last logged (see :meth:`SpreadExports._warn`)."""
    unread_since: dict[Any, float] = attrs.field(factory=dict)
    """By worker: since when what it was handed has been waiting unread on its channel."""
    queues: bool = False
    """A vhost-user disk's socket: each connection goes with a queue channel to every other worker
    (:mod:`pvcore.transports.vhost_user.queue_spread`)."""


class SpreadExports:
    """The parent's side: the spread exports by path, each accepted here and handed out in turn.

    ``listening_socket(path, what)`` makes or returns the listening socket the
    parent holds for a path (its :class:`~pvcore.workers.ListenerBroker`).
    """

    def __init__(self, listening_socket: Callable[[Path, str], socket.socket]) -> None:
        self._listening_socket = listening_socket
        self._exports: dict[Path, _Export] = {}

    def declare(self, path: Path) -> None:
        """The device at ``path`` is spread: its connections will be handed out."""
        self._exports.setdefault(path, _Export(path))

    def forget(self, path: Path) -> None:
        """The device at ``path`` is gone: stop accepting for it (its socket is the broker's to release)."""
        export = self._exports.pop(path, None)
        if export is not None:
            self._set_accepting(export, False)

    def spread(self, path: Path) -> bool:
        """Whether connections to ``path`` are handed out."""
        return path in self._exports

    def spreads_queues(self, path: Path) -> bool:
        """Whether ``path``'s connections go with queue channels (a vhost-user disk's queues are spread)."""
        export = self._exports.get(path)
        return export is not None and export.queues

    def take(self, path: Path, what: str, worker: Any, *, queues: bool = False) -> None:
        """``worker``'s export at ``path`` is up: hand it connections (a :class:`ListenerError` if the
        socket cannot be made); with ``queues``, each with queue channels to the other workers."""
        export = self._exports[path]
        export.queues = queues
        if export.sock is None or export.sock.fileno() == -1:
            export.sock = self._listening_socket(path, what)
        if worker not in export.takers:
            export.takers.append(worker)
        self._set_accepting(export, True)

    def drop(self, worker: Any, path: Path | None = None) -> None:
        """``worker`` takes no more connections of ``path`` (its export stopped), or of any (it died)."""
        for export in self._exports.values():
            if (path is None or export.path == path) and worker in export.takers:
                export.takers.remove(worker)
                export.unread_since.pop(worker, None)
                if not export.takers:
                    self._set_accepting(export, False)  # connections wait in the backlog for a worker

    def close(self) -> None:
        """Stop accepting for every export (the sockets are the broker's)."""
        for export in self._exports.values():
            self._set_accepting(export, False)
        self._exports.clear()

    def _set_accepting(self, export: _Export, accepting: bool) -> None:
        reading = accepting and not export.resting
        if export.sock is None or export.sock.fileno() == -1:
            export.accepting = False
            return
        if reading != export.accepting:
            loop = asyncio.get_running_loop()
            if reading:
                loop.add_reader(export.sock.fileno(), self._accept, export)
            else:
                loop.remove_reader(export.sock.fileno())
        export.accepting = reading

    def _rest(self, export: _Export) -> None:
        """Leave the backlog alone for :data:`ACCEPT_RETRY_SECONDS`, then accept again if a worker takes."""
        export.resting = True
        self._set_accepting(export, False)

        def wake() -> None:
            export.resting = False
            if self._exports.get(export.path) is export:
                self._set_accepting(export, bool(export.takers))

        asyncio.get_running_loop().call_later(ACCEPT_RETRY_SECONDS, wake)

    def _warn(self, export: _Export, kind: str, message: str, *args: object) -> None:
        """Log ``message``, but one of each ``kind`` per export every :data:`WARNING_INTERVAL` at most."""
        now = time.monotonic()
        if now - export.warned.get(kind, -WARNING_INTERVAL) >= WARNING_INTERVAL:
            export.warned[kind] = now
            log.warning("spread export %s: " + message, export.path, *args)

    def _accept(self, export: _Export) -> None:
        """Accept the waiting connections (a bounded number) and hand each to the next worker in turn."""
        assert export.sock is not None
        for _ in range(MAX_ACCEPTS_PER_WAKEUP):
            if not export.takers or export.resting:
                return
            try:
                connection, _ = export.sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:  # out of descriptors or memory: the backlog waits, as asyncio's servers do
                self._warn(export, "accept", "accept failed: %s; trying again in %g s", exc.strerror or exc,
                           ACCEPT_RETRY_SECONDS)
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._rest(export)
                return
            with connection:
                if not self._hand(export, connection):
                    self._warn(export, "full", "no worker took a connection (closed); accepting again in %g s",
                               ACCEPT_RETRY_SECONDS)
                    self._rest(export)

    def _hand(self, export: _Export, connection: socket.socket) -> bool:
        """Pass ``connection`` to the next worker in turn, passing over one that has left what it was handed
        unread for :data:`STALLED_SECONDS` (stopped, or hung) while another can take it; whether one took it."""
        message = json.dumps({"path": os.fspath(export.path)}).encode()
        count = len(export.takers)
        takers = export.takers[export.turn % count:] + export.takers[: export.turn % count]
        export.turn += 1
        now = time.monotonic()
        for worker in takers:
            if worker.hand_channel is None or not _unread(worker.hand_channel):
                export.unread_since.pop(worker, None)
        fresh = [w for w in takers if now - export.unread_since.get(w, now) < STALLED_SECONDS]
        for worker in fresh + [worker for worker in takers if worker not in fresh]:
            channel = worker.hand_channel
            if channel is None:
                continue
            peers = self._queue_channels(export, worker, fresh) if export.queues else []
            try:
                if export.queues:
                    names = [name for name, _ in peers]
                    leader = json.dumps({"path": os.fspath(export.path), "peers": names}).encode()
                    socket.send_fds(channel, [leader], [connection.fileno(), *(end.fileno() for _, end in peers)])
                else:
                    socket.send_fds(channel, [message], [connection.fileno()])
            except OSError as exc:  # gone, or its channel is full: the next worker takes it
                self._warn(export, f"hand {worker.name}", "worker %s did not take a connection: %s", worker.name,
                           exc.strerror or exc)
                continue
            finally:
                for _, end in peers:
                    end.close()
            export.unread_since.setdefault(worker, now)
            return True
        return False

    def _queue_channels(self, export: _Export, leader: Any, takers: list[Any]) -> list[tuple[str, socket.socket]]:
        """A queue channel from ``leader`` to every other worker in ``takers`` that took its end: each
        worker's name and the leader's end, in the order that places the queues."""
        ends = []
        message = json.dumps({"path": os.fspath(export.path), "host": True}).encode()
        for worker in takers:
            if worker is leader or worker.hand_channel is None:
                continue
            if len(ends) == MAX_HANDED_FDS - 1:
                break  # with the connection, all one hand-over carries (more workers than a disk has queues)
            mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                socket.send_fds(worker.hand_channel, [message], [theirs.fileno()])
            except OSError as exc:
                self._warn(export, f"host {worker.name}", "worker %s did not take a queue channel: %s", worker.name,
                           exc.strerror or exc)
                mine.close()
                continue
            finally:
                theirs.close()
            export.unread_since.setdefault(worker, time.monotonic())  # a hung host is passed over too
            ends.append((worker.name, mine))
        return ends


def _unread(channel: socket.socket) -> bool:
    """Whether the worker has not yet read everything handed to it on ``channel``."""
    pending = array.array("i", [0])
    try:
        fcntl.ioctl(channel.fileno(), termios.TIOCOUTQ, pending)
    except OSError:
        return False
    return pending[0] > 0


class HandedConnections:
    """A worker's side: connections its parent hands it on ``channel``, each given to the listener that
    registered its path (:meth:`register`); one for no listener is closed. A vhost-user door that spreads
    its queues registers a ``host`` too: it gets each queue channel another worker's connection opens to
    it, and its ``take`` gets each connection with the channels to the other workers."""

    def __init__(self, channel: socket.socket) -> None:
        self.channel = channel
        self.channel.setblocking(False)
        self._takers: dict[Path, Callable[..., None]] = {}
        self._hosts: dict[Path, Callable[[socket.socket], None]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        """Read the channel on the running loop."""
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.channel.fileno(), self._receive)

    def stop(self) -> None:
        """Read it no more."""
        if self._loop is not None and self.channel.fileno() != -1:
            self._loop.remove_reader(self.channel.fileno())
        self.channel.close()

    def register(self, path: Path, take: Callable[..., None],
                 host: Callable[[socket.socket], None] | None = None) -> None:
        """Give each connection handed for ``path`` to ``take``; with ``host``, ``take(connection, peers)``
        gets the connection's queue channels too, and ``host`` each queue channel opened to this worker."""
        self._takers[path] = take
        if host is not None:
            self._hosts[path] = host

    def unregister(self, path: Path) -> None:
        """Connections handed for ``path`` from now on are closed."""
        self._takers.pop(path, None)
        self._hosts.pop(path, None)

    def _receive(self) -> None:
        try:
            data, fds, _flags, _address = socket.recv_fds(self.channel, MAX_HAND_MESSAGE, MAX_HANDED_FDS)
        except BlockingIOError:
            return
        except OSError as exc:
            log.warning("handed connections: the parent's channel failed: %s", exc.strerror or exc)
            data, fds = b"", []
        if not data:
            for fd in fds:
                os.close(fd)
            if self._loop is not None:
                self._loop.remove_reader(self.channel.fileno())
            return
        connections = [socket.socket(fileno=fd) for fd in fds]
        try:
            message = json.loads(data)
            path = Path(message["path"])
            peers = [str(name) for name in message.get("peers", [])]
            hosting = bool(message.get("host"))
        except (ValueError, KeyError, TypeError):
            path, peers, hosting = None, [], False
        take = self._takers.get(path) if path is not None else None
        host = self._hosts.get(path) if path is not None else None
        if (take is None or (peers or hosting) and host is None or len(connections) != 1 + len(peers)
                or any(connection.family != socket.AF_UNIX for connection in connections)):
            log.warning("handed connections: a connection for %s, which is not served here; closed", path)
            for connection in connections:
                connection.close()
            return
        for connection in connections:
            connection.setblocking(False)
        if hosting and host is not None:
            for channel in connections:
                host(channel)
        elif host is not None:
            take(connections[0], list(zip(peers, connections[1:])))
        else:
            for connection in connections:
                take(connection)
