"""The person's side of a console attach point (``pvcore console NAME``).

:func:`attach_console` connects a terminal (or any pair of file descriptors)
to a console socket: the terminal is put in raw mode when it is a tty, every
key goes to the guest, guest output goes to the terminal, and Ctrl-] detaches.
:func:`console_exchange` is the non-interactive form for scripts and tests:
send some bytes, collect the output for a while, return it.

Both are plain blocking functions (a CLI process runs one at a time); they must
not be called from the thread that runs the daemon's event loop.
"""

from __future__ import annotations

import enum
import os
import select
import selectors
import socket
import termios
import time
import tty
from typing import IO

DETACH_KEY = b"\x1d"
"""Ctrl-]: typed by the person, it ends the session instead of reaching the guest."""

RECV_CHUNK = 65536


class ConsoleAttachError(Exception):
    """The console socket cannot be reached; the message says why and what to do."""


class DetachReason(enum.Enum):
    """Why :func:`attach_console` returned."""

    DETACHED = "detached"
    """The person typed the detach key."""
    HANGUP = "hangup"
    """The daemon closed the connection (console refused, closed or shut down)."""
    END_OF_INPUT = "end of input"
    """Standard input reached its end."""


def connect_console(socket_path: str | os.PathLike[str]) -> socket.socket:
    """A connected socket to the console at ``socket_path``, or a :class:`ConsoleAttachError`."""
    path = os.fspath(socket_path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except FileNotFoundError:
        sock.close()
        raise ConsoleAttachError(
            f"console socket {path}: no such file; is the pvcore daemon running with this console configured?"
        ) from None
    except ConnectionRefusedError:
        sock.close()
        raise ConsoleAttachError(
            f"console socket {path}: nobody is listening (a stale socket); is the pvcore daemon running?"
        ) from None
    except PermissionError:
        sock.close()
        raise ConsoleAttachError(
            f"console socket {path}: permission denied; the socket is private (0600) to the daemon's user"
        ) from None
    except OSError as exc:
        sock.close()
        raise ConsoleAttachError(f"console socket {path}: {exc.strerror}") from None
    return sock


def _fileno(stream: int | IO[bytes] | IO[str]) -> int:
    return stream if isinstance(stream, int) else stream.fileno()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def attach_console(
    socket_path: str | os.PathLike[str],
    stdin: int | IO[bytes] | IO[str],
    stdout: int | IO[bytes] | IO[str],
) -> DetachReason:
    """Connect ``stdin``/``stdout`` (file objects or descriptors) to a console until detach or hangup.

    A tty ``stdin`` is switched to raw mode for the session and restored
    afterwards. The scrollback arrives first, then live output.
    """
    sock = connect_console(socket_path)
    in_fd, out_fd = _fileno(stdin), _fileno(stdout)
    saved_mode = None
    if os.isatty(in_fd):
        saved_mode = termios.tcgetattr(in_fd)
        tty.setraw(in_fd)
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(in_fd, selectors.EVENT_READ, "person")
            selector.register(sock, selectors.EVENT_READ, "console")
            while True:
                for key, _ in selector.select():
                    if key.data == "console":
                        try:
                            data = sock.recv(RECV_CHUNK)
                        except ConnectionError:
                            data = b""
                        if not data:
                            return DetachReason.HANGUP
                        _write_all(out_fd, data)
                        continue
                    data = os.read(in_fd, RECV_CHUNK)
                    if not data:
                        return DetachReason.END_OF_INPUT
                    cut = data.find(DETACH_KEY)
                    try:
                        sock.sendall(data if cut < 0 else data[:cut])
                    except ConnectionError:
                        return DetachReason.HANGUP
                    if cut >= 0:
                        return DetachReason.DETACHED
    finally:
        if saved_mode is not None:
            termios.tcsetattr(in_fd, termios.TCSADRAIN, saved_mode)
        sock.close()


def console_exchange(
    socket_path: str | os.PathLike[str],
    data: bytes = b"",
    *,
    duration: float,
    until: bytes | None = None,
) -> bytes:
    """Attach, send ``data``, and return the output received within ``duration`` seconds.

    The output includes the scrollback. With ``until``, return as soon as the
    output contains it; return early too if the daemon hangs up.
    """
    deadline = time.monotonic() + duration
    received = bytearray()
    with connect_console(socket_path) as sock:
        if data:
            sock.sendall(data)
        while (left := deadline - time.monotonic()) > 0:
            readable, _, _ = select.select([sock], [], [], left)
            if not readable:
                break
            try:
                chunk = sock.recv(RECV_CHUNK)
            except ConnectionError:
                break
            if not chunk:
                break
            searched_from = max(len(received) - len(until) + 1, 0) if until else 0
            received += chunk
            if until and received.find(until, searched_from) >= 0:
                break
    return bytes(received)
