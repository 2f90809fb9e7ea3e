"""A minimal QMP client (QEMU's JSON control protocol on a Unix socket), for migration tests.

Start QEMU with ``-qmp unix:PATH,server=on,wait=off``; :meth:`Qmp.connect`
waits for the socket, reads the greeting and enters command mode
(``qmp_capabilities``); :meth:`Qmp.command` sends one command and returns its
``return`` value (events that arrive meanwhile are kept in :attr:`events`).
"""

from __future__ import annotations

import json
import socket
import time
from typing import Any

from pvcore.testing.guest.errors import GuestError

__all__ = ["Qmp", "QmpError"]


class QmpError(GuestError):
    """QEMU answered a QMP command with an error, or the QMP socket failed."""


class Qmp:
    """One QMP connection."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.file = sock.makefile("rb")
        self.events: list[dict[str, Any]] = []

    @classmethod
    def connect(cls, path: str, timeout: float = 30.0) -> Qmp:
        """Connect to ``path`` (retrying until QEMU has created it) and negotiate capabilities."""
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(path)
                break
            except OSError as exc:
                sock.close()
                if time.monotonic() > deadline:
                    raise QmpError(f"QMP socket {path}: {exc}; is QEMU started with -qmp unix:{path},server=on?")
                time.sleep(0.1)
        qmp = cls(sock)
        greeting = qmp._read()
        if "QMP" not in greeting:
            raise QmpError(f"QMP socket {path}: no greeting ({greeting})")
        qmp.command("qmp_capabilities")
        return qmp

    def _read(self) -> dict[str, Any]:
        line = self.file.readline()
        if not line:
            raise QmpError("QMP connection closed by QEMU")
        return json.loads(line)

    def command(self, name: str, **arguments: Any) -> Any:
        """Run ``name`` with ``arguments``; return its ``return`` value or raise :class:`QmpError`."""
        message: dict[str, Any] = {"execute": name}
        if arguments:
            message["arguments"] = arguments
        self.sock.sendall(json.dumps(message).encode() + b"\n")
        while True:
            reply = self._read()
            if "event" in reply:
                self.events.append(reply)
                continue
            if "error" in reply:
                raise QmpError(f"QMP {name}: {reply['error'].get('desc', reply['error'])}")
            return reply.get("return")

    def close(self) -> None:
        """Close the connection."""
        self.file.close()
        self.sock.close()
