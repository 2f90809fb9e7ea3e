"""The control socket of a running daemon: list, add and remove devices, change rates, limits and media.

``RUN_DIR/control.sock`` (mode 0600) speaks one JSON object per line each
way. A request names a ``command``; the answer is ``{"ok": true, ...}`` or
``{"ok": false, "error": "..."}``, and a refused request changes nothing:

* ``{"command": "list"}`` -> ``{"ok": true, "devices": [{"name", "class",
  "domain", "hypervisor", "door", "counters": {...}, "limits", "group"}, ...]}``
  (``limits`` and ``group`` as ``set-limits`` answers them)
* ``{"command": "add", "device": "CLASS:key=value,..."}`` -> ``{"ok": true,
  "device": NAME}``: the device is built, checked and started as
  ``pvcore serve`` would;
* ``{"command": "remove", "device": NAME}`` -> ``{"ok": true}``: its front
  door stops (in-flight requests finish first), then its engine closes
  (a block device is flushed) and its socket goes;
* ``{"command": "set-rate", "device": NAME, "rate": "BYTES/PERIOD"}``: the
  rng device's domain gets that rate limit (every rng device of the domain
  shares it);
* ``{"command": "swap-media", "device": NAME, "path": FILE}`` -> ``{"ok":
  true, "old": OLD_FILE}``: block device NAME serves FILE from now on (a media
  change): new requests wait, those in flight finish, the old file is
  flushed and closed, FILE takes its place. FILE must exist, be a regular
  file or block device of the device's size, and open as the device needs
  (read-only for ``readonly=on``); otherwise the device keeps its old file;
* ``{"command": "set-limits", "device": NAME, "limits": "iops=500,bps=50M"}``
  -> ``{"ok": true, "limits": ..., "group": GROUP_OR_NULL}``: a block device's
  I/O limits (``off``: none), its throttle group's if it is in one, or a
  NIC's ``rate=BITS`` (:mod:`pvcore.device_limits`).

``pvcore daemon`` (:class:`~pvcore.libvirt.follower.HostDaemon`) answers the
same protocol on the same path (a one-domain server on
``RUN_DIR/control-UUID12.sock``): its ``list`` adds each device's ``state``
(``served``/``not served``, with ``error``), ``swap-media`` also rewrites the
domain's metadata, and ``add``/``remove`` are refused (deploy and undeploy
change what it serves). ``pvcore serve --workers N``
(:class:`~pvcore.workers.WorkerPool`) passes each request to the worker
process serving the device (``list`` asks them all and adds each device's
``worker``). Anything that answers is a :class:`Controlled`.

Only the daemon's own user (and root) may connect: the peer's uid, from
SO_PEERCRED, is checked before a request is read. A line longer than
:data:`MAX_REQUEST_BYTES` or not a JSON object ends the answer with one error.
:func:`request` is the client side (``pvcore ctl``).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from pvcore.streams.unix import UnixListener

log = logging.getLogger("pvcore.control")

SOCKET_NAME = "control.sock"
MAX_REQUEST_BYTES = 64 * 1024
COMMANDS = ("list", "add", "remove", "set-rate", "swap-media", "set-limits")


class ControlError(Exception):
    """A control request cannot be done; the message is the answer's ``error``."""


def control_socket_path(run_dir: Path, domain_uuid: str | None = None) -> Path:
    """Where the daemon serving ``run_dir`` listens for control requests (with ``domain_uuid``: the
    one-domain server of that libvirt domain, ``control-`` and the UUID's first 12 hex digits, as a
    socket's path must stay short)."""
    return run_dir / (f"control-{domain_uuid.replace('-', '')[:12]}.sock" if domain_uuid else SOCKET_NAME)


class Controlled(Protocol):
    """What a control socket controls: ``pvcore serve``'s :class:`~pvcore.daemon.Daemon`, or
    ``pvcore daemon``'s :class:`~pvcore.libvirt.follower.HostDaemon`, or the parent of
    ``pvcore serve``'s worker processes (:class:`~pvcore.workers.WorkerPool`); the last two's
    ``describe_devices``, ``set_rng_rate`` and ``set_limits`` are coroutines."""

    run_dir: Path

    def describe_devices(self) -> list[dict[str, object]]:
        """The ``devices`` of a ``list`` answer."""

    async def add_device(self, spec: str) -> str:
        """Serve one more device; its name."""

    async def remove_device(self, name: str) -> None:
        """Drain and remove a device."""

    def set_rng_rate(self, name: str, rate: str) -> str:
        """Change an rng device's domain's rate; the limit as it reads now."""

    async def swap_media(self, name: str, path: str) -> str:
        """Change a block device's backing file; the old file's path."""

    def set_limits(self, name: str, limits: str) -> dict[str, object]:
        """Change a block device's or NIC's I/O limits; ``limits`` and ``group`` as they read now."""


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of a Unix socket (SO_PEERCRED)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


async def _settled(answer: Any) -> Any:
    """``answer``, awaited first if it is awaitable (a :class:`Controlled` may answer later: the
    parent of worker processes asks them)."""
    return await answer if inspect.isawaitable(answer) else answer


def _text(body: Mapping[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value:
        raise ControlError(f"{body.get('command')}: {key!r} must be a non-empty string")
    return value


class ControlServer:
    """Answers control requests for ``daemon`` on ``path`` (default: :func:`control_socket_path` of its run directory)."""

    def __init__(self, daemon: Controlled, path: Path | None = None) -> None:
        self.daemon = daemon
        self.path = path or control_socket_path(daemon.run_dir)
        self._listener = UnixListener(self.path, self._serve, what="control socket", limit=MAX_REQUEST_BYTES)
        self._handlers: dict[str, Callable[[Mapping[str, Any]], Awaitable[dict[str, Any]]]] = {
            "list": self._list, "add": self._add, "remove": self._remove, "set-rate": self._set_rate,
            "swap-media": self._swap_media, "set-limits": self._set_limits,
        }
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        """Listen (mode 0600)."""
        await self._listener.start()

    async def stop(self) -> None:
        """Stop listening and remove the socket."""
        await self._listener.stop()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        uid = peer_uid(sock)
        if uid not in (os.geteuid(), 0):
            log.warning("control socket: refused a connection from uid %d (only uid %d and root may control)", uid, os.geteuid())
            writer.write(self._encode({"ok": False, "error": f"uid {uid} may not control this daemon"}))
            await writer.drain()
            return
        while True:
            try:
                line = await reader.readline()
            except (ValueError, asyncio.LimitOverrunError):
                writer.write(self._encode({"ok": False, "error": f"request longer than {MAX_REQUEST_BYTES} bytes"}))
                await writer.drain()
                return
            if not line:
                return
            writer.write(self._encode(await self.answer(line)))
            await writer.drain()

    async def answer(self, line: bytes) -> dict[str, Any]:
        """The answer to one request line (never raises for a bad request)."""
        try:
            body = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return {"ok": False, "error": f"request is not JSON: {exc}"}
        if not isinstance(body, dict):
            return {"ok": False, "error": "request must be a JSON object with a \"command\""}
        handler = self._handlers.get(body.get("command"))  # type: ignore[arg-type]
        if handler is None:
            return {"ok": False, "error": f"unknown command {body.get('command')!r}; commands: {', '.join(COMMANDS)}"}
        async with self._lock:  # one change at a time
            try:
                return {"ok": True, **await handler(body)}
            except ControlError as exc:
                return {"ok": False, "error": str(exc)}
            except Exception as exc:  # a bug answers that request; the daemon and its devices serve on
                log.exception("control socket: %s request failed", body.get("command"))
                return {"ok": False, "error": f"internal error: {type(exc).__name__}: {exc} (see the daemon's log)"}

    @staticmethod
    def _encode(answer: Mapping[str, Any]) -> bytes:
        return json.dumps(answer).encode() + b"\n"

    async def _list(self, body: Mapping[str, Any]) -> dict[str, Any]:
        return {"devices": await _settled(self.daemon.describe_devices())}

    async def _add(self, body: Mapping[str, Any]) -> dict[str, Any]:
        return {"device": await self.daemon.add_device(_text(body, "device"))}

    async def _remove(self, body: Mapping[str, Any]) -> dict[str, Any]:
        await self.daemon.remove_device(_text(body, "device"))
        return {}

    async def _set_rate(self, body: Mapping[str, Any]) -> dict[str, Any]:
        return {"rate": await _settled(self.daemon.set_rng_rate(_text(body, "device"), _text(body, "rate")))}

    async def _set_limits(self, body: Mapping[str, Any]) -> dict[str, Any]:
        return await _settled(self.daemon.set_limits(_text(body, "device"), _text(body, "limits")))

    async def _swap_media(self, body: Mapping[str, Any]) -> dict[str, Any]:
        return {"old": await self.daemon.swap_media(_text(body, "device"), _text(body, "path"))}


def request(run_dir: Path, body: Mapping[str, Any], *, timeout: float = 60.0, path: Path | None = None) -> dict[str, Any]:
    """Send one request to the daemon of ``run_dir`` (listening on ``path``, default :func:`control_socket_path`)
    and return its answer (a :class:`ControlError` if none)."""
    path = path or control_socket_path(run_dir)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(os.fspath(path))
        except FileNotFoundError:
            raise ControlError(f"no control socket at {path}: is `pvcore serve` running with --run-dir {run_dir}?") from None
        except OSError as exc:
            raise ControlError(f"control socket {path}: {exc.strerror or exc}") from None
        sock.sendall(json.dumps(body).encode() + b"\n")
        with sock.makefile("rb") as answers:
            line = answers.readline(MAX_REQUEST_BYTES * 16)
    if not line:
        raise ControlError(f"control socket {path}: the daemon closed the connection without an answer")
    return json.loads(line)
