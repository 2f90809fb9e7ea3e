"""Listening Unix sockets for the stream front doors.

:class:`UnixListener` puts a listening socket at a path with mode 0600 from
the moment it appears there: the socket is bound inside a private temporary
directory beside the target, given its mode, and then renamed into place, so
no other user can ever connect to it, and a stale socket file left by a
process that died is replaced atomically. A path that holds something other
than a socket, or a socket someone still listens on, is refused with an error
that names the path. On :meth:`UnixListener.stop` the socket file is removed,
but only if it is still the one this listener created.

In a worker process of ``pvcore serve --workers N`` the parent holds every
listening socket, so that a socket outlives a worker that dies:
:func:`set_listener_source` routes :func:`bind_private_socket` to it. For an
export spread over the workers the parent accepts the connections itself and
hands them out (:mod:`pvcore.spread`): the listener then serves the ones
handed to it (:meth:`UnixListener.adopt`) instead of listening.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import stat
import struct
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger("pvcore.streams")

SOCKET_MODE = 0o600
LISTEN_BACKLOG = 16

StreamHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

_PEERCRED = struct.Struct("3i")

class ListenerSource(Protocol):
    """Where a process gets its listening sockets when it does not own them (a worker process)."""

    def get(self, path: Path, what: str, kind: int) -> socket.socket:
        """A listening non-blocking socket at ``path``, or a :class:`ListenerError`."""

    def release(self, path: Path) -> None:
        """The socket at ``path`` is no longer listened on here (its device is gone)."""

    def hand_over(self, path: Path, what: str, take: Callable[..., None],
                  host: Callable[[socket.socket], None] | None = None) -> bool:
        """True if the connections of ``path`` are accepted elsewhere and handed to this process one by
        one (a device spread over workers, :mod:`pvcore.spread`): each then goes to ``take``, until
        :meth:`release`. False: listen on the socket :meth:`get` gives. With ``host`` (a vhost-user disk
        whose queues are spread) ``take(connection, peers)`` also gets the connection's queue channels to
        the other workers, and ``host(channel)`` each queue channel another worker's connection opens here."""


_listener_source: ListenerSource | None = None


def set_listener_source(source: ListenerSource | None) -> None:
    """Take every listening socket of this process from ``source`` (a worker: its parent holds
    them, :mod:`pvcore.worker`); None binds them here again."""
    global _listener_source
    _listener_source = source


def remove_socket_file(path: Path, inode: tuple[int, int] | None) -> None:
    """A listener at ``path`` stops: unlink the file if it is still the socket of ``inode``; in a
    process whose sockets come from a :class:`ListenerSource`, tell it instead (it owns the file)."""
    if _listener_source is not None:
        _listener_source.release(path)
        return
    if inode is None:
        return
    with contextlib.suppress(FileNotFoundError):
        info = path.lstat()
        if (info.st_dev, info.st_ino) == inode:
            path.unlink()


class ListenerError(Exception):
    """A socket could not be created at the requested path; the message names the path and the fix."""


def peer_description(writer: asyncio.StreamWriter) -> str:
    """Who is on the other end of a Unix stream: ``pid N uid U``, or ``unknown peer``."""
    sock = writer.get_extra_info("socket")
    if sock is None or sock.family != socket.AF_UNIX:
        return "unknown peer"
    try:
        pid, uid, _gid = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    except OSError:
        return "unknown peer"
    return f"pid {pid} uid {uid}"


def _socket_in_use(path: Path) -> bool:
    """Whether a process accepts connections on the socket at ``path``."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(os.fspath(path))
    except OSError:
        return False
    finally:
        probe.close()
    return True


def _check_target(path: Path, what: str) -> None:
    """Refuse a target path that holds a file we must not replace."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise ListenerError(f"{what}: {path} exists and is not a socket; remove it or choose another path")
    if _socket_in_use(path):
        raise ListenerError(f"{what}: {path} is in use by another server; stop it or choose another path")
    log.info("%s: replacing stale socket %s", what, path)


def handed_over(path: Path, what: str, take: Callable[..., None],
                host: Callable[[socket.socket], None] | None = None) -> bool:
    """Whether this process gets the connections of ``path`` handed to it instead of listening (see
    :meth:`ListenerSource.hand_over`; never without a :func:`set_listener_source`)."""
    return _listener_source is not None and _listener_source.hand_over(path, what, take, host)


def bind_private_socket(path: Path, what: str, *, kind: int = socket.SOCK_STREAM) -> socket.socket:
    """A listening, non-blocking ``AF_UNIX`` socket (stream, or ``kind``) at ``path``, mode 0600 from the
    start (bound in a private directory, then moved into place), replacing a stale socket; from the
    :func:`set_listener_source` if one is set."""
    if _listener_source is not None:
        return _listener_source.get(path, what, kind)
    if len(os.fsencode(path)) >= 108:
        raise ListenerError(f"{what}: socket path {path} is too long for a Unix socket (at most 107 bytes)")
    directory = path.parent
    if not directory.is_dir():
        raise ListenerError(f"{what}: directory {directory} does not exist; create it first")
    _check_target(path, what)
    sock = socket.socket(socket.AF_UNIX, kind)
    try:
        with tempfile.TemporaryDirectory(prefix=".pvcore-", dir=directory) as private:
            staging = Path(private) / "s"
            sock.bind(os.fspath(staging))
            os.chmod(staging, SOCKET_MODE)
            sock.listen(LISTEN_BACKLOG)  # before the path appears: a client that sees it can connect
            os.rename(staging, path)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        hint = "; check the directory's permissions" if exc.errno in (errno.EACCES, errno.EPERM) else ""
        raise ListenerError(f"{what}: cannot listen on {path}: {exc.strerror or exc}{hint}") from None
    return sock


class UnixListener:
    """A listening Unix socket at ``path`` whose connections go to ``handler``.

    ``handler(reader, writer)`` runs as its own task for each connection;
    the listener closes the writer when the handler returns. :meth:`stop`
    stops accepting, cancels every connection's task and waits for each to
    finish its clean-up (a handler sees :class:`asyncio.CancelledError` and
    may still await in its ``finally``). ``what`` names the listener in
    messages (e.g. ``nbd disk0``).
    """

    def __init__(self, path: Path | str, handler: StreamHandler, *, what: str, limit: int = 2**16) -> None:
        self.path = Path(path)
        self.what = what
        self._handler = handler
        self._limit = limit
        self._server: asyncio.AbstractServer | None = None
        self._inode: tuple[int, int] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._handed = False

    @property
    def connection_count(self) -> int:
        """How many connections are being served now."""
        return len(self._tasks)

    async def start(self) -> None:
        """Create the socket and begin accepting connections (or taking those handed to this process)."""
        if self._server is not None or self._handed:
            return
        if _listener_source is not None and _listener_source.hand_over(self.path, self.what, self.adopt):
            self._handed = True
            return
        sock = bind_private_socket(self.path, self.what)
        info = self.path.stat()
        self._inode = (info.st_dev, info.st_ino)
        try:
            self._server = await asyncio.start_unix_server(self._serve, sock=sock, limit=self._limit)
        except BaseException:
            sock.close()
            self._remove_socket_file()
            raise

    async def stop(self) -> None:
        """Stop accepting, remove the socket file, end every connection and wait for their clean-up."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
            self._remove_socket_file()
        if self._handed:
            self._handed = False
            remove_socket_file(self.path, None)  # the source hands no more connections here
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def adopt(self, connection: socket.socket) -> None:
        """Serve ``connection``, accepted by another process and handed to this one, as if accepted here."""
        task = asyncio.get_running_loop().create_task(self._serve_adopted(connection))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve_adopted(self, connection: socket.socket) -> None:
        try:
            reader, writer = await asyncio.open_unix_connection(sock=connection, limit=self._limit)
        except OSError as exc:
            connection.close()
            log.info("%s: a handed connection could not be served: %s", self.what, exc.strerror or exc)
            return
        await self._serve(reader, writer)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            await self._handler(reader, writer)
        except asyncio.CancelledError:
            # Only stop() cancels a connection; its handler has cleaned up.
            pass
        except ConnectionError as exc:
            log.info("%s: client went away: %s", self.what, exc.strerror or exc)
        except Exception:
            log.exception("%s: connection handler failed", self.what)
        finally:
            if task is not None:
                self._tasks.discard(task)
            writer.close()

    def _remove_socket_file(self) -> None:
        """Unlink the socket file if it is still the one this listener created."""
        inode, self._inode = self._inode, None
        if inode is not None:
            remove_socket_file(self.path, inode)
