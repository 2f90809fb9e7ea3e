"""The console device engine.

* :mod:`~pvcore.devices.console.stream`: :class:`ConsoleStream`, a guest's
  console as a byte stream (log, scrollback, attached person), transport
  independent.
* :mod:`~pvcore.devices.console.logfile`: :class:`ConsoleLog`, the log file,
  written by a thread of its own through a bounded buffer.
* :mod:`~pvcore.devices.console.attach`: :class:`ConsoleAttachPoint`, the
  per-console Unix socket a person attaches through.
* :mod:`~pvcore.devices.console.client`: :func:`attach_console` and
  :func:`console_exchange`, the person's side.
* :mod:`~pvcore.devices.console.virtio`: :class:`VirtioConsole`, the
  virtio-console front door.

:func:`create_console_device` builds all of it for one console from its
configuration options.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

from pvcore.devices.console.attach import ConsoleAttachPoint, SocketPeer
from pvcore.devices.console.client import (
    DETACH_KEY,
    ConsoleAttachError,
    DetachReason,
    attach_console,
    connect_console,
    console_exchange,
)
from pvcore.devices.console.logfile import ConsoleLog
from pvcore.devices.console.stream import DEFAULT_LOG_MAX, DEFAULT_SCROLLBACK, ConsolePeer, ConsoleStream, Scrollback
from pvcore.devices.console.virtio import VirtioConsole
from pvcore.virtio import DeviceError

__all__ = [
    "DEFAULT_SCROLLBACK",
    "DETACH_KEY",
    "OPTIONS",
    "ConsoleAttachError",
    "ConsoleAttachPoint",
    "ConsoleLog",
    "ConsolePeer",
    "ConsoleStream",
    "DetachReason",
    "Scrollback",
    "SocketPeer",
    "VirtioConsole",
    "attach_console",
    "connect_console",
    "console_exchange",
    "console_socket_path",
    "create_console_device",
]

MAX_SCROLLBACK = 16 * 1024 * 1024

OPTIONS = {
    "log": "log file that receives all guest output (appended to, created 0600; relative to where pvcore starts)",
    "scrollback": (
        f"bytes of recent output shown to a person on attach, K/M suffixes allowed (default {DEFAULT_SCROLLBACK // 1024}K)"
    ),
    "log-max": (
        f"size at which the log is rotated to LOG.1, K/M/G suffixes allowed (default {DEFAULT_LOG_MAX // 1024 // 1024}M)"
    ),
}
"""Every option :func:`create_console_device` accepts, with what it means."""

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*")
_SIZE = re.compile(r"([0-9]+)([kKmMgG]?)")
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024 * 1024, "g": 1024 * 1024 * 1024}


def console_socket_path(run_dir: str | os.PathLike[str], name: str) -> Path:
    """Where the attach socket of console ``name`` lives: ``<run_dir>/console-<name>.sock``."""
    return Path(run_dir) / f"console-{name}.sock"


def _parse_size(name: str, key: str, text: str) -> int:
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise DeviceError(f"console {name}: {key}={text!r} is not a size; write bytes, e.g. {key}=65536 or 64K")
    return int(match[1]) * _SIZE_UNITS[match[2].lower()]


def _parse_scrollback(name: str, text: str) -> int:
    size = _parse_size(name, "scrollback", text)
    if not 1 <= size <= MAX_SCROLLBACK:
        raise DeviceError(f"console {name}: scrollback={text!r} must be between 1 byte and {MAX_SCROLLBACK // 1024 // 1024}M")
    return size


def create_console_device(
    options: Mapping[str, str], *, name: str, run_dir: str | os.PathLike[str]
) -> VirtioConsole:
    """A :class:`VirtioConsole` for console ``name``, with its stream and attach point.

    Options: ``log=PATH`` (appended to, created 0600; a relative path is taken from
    the current directory, as ``pvcore serve``'s other paths are) and
    ``scrollback=BYTES`` (``K``/``M`` suffixes allowed; default 64K). The
    attach socket is :func:`console_socket_path`; the caller starts it with
    ``await device.attach_point.start()``. Bad options are a :class:`DeviceError`.
    """
    if not _NAME.fullmatch(name):
        raise DeviceError(
            f"console name {name!r}: use letters, digits and _ . + - (it becomes part of a socket file name)"
        )
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise DeviceError(
            f"console {name}: unknown option(s) {', '.join(unknown)}; the console accepts {', '.join(OPTIONS)}"
        )
    run_dir = os.fspath(run_dir)
    if not os.path.isdir(run_dir):
        raise DeviceError(f"console {name}: run directory {run_dir} does not exist; create it (mode 0700) first")
    log_path = options.get("log")
    if log_path is not None:
        log_path = os.path.abspath(log_path)  # SIGHUP reopens it by name, whatever the cwd is then
    scrollback = _parse_scrollback(name, options["scrollback"]) if "scrollback" in options else DEFAULT_SCROLLBACK
    log_max = _parse_size(name, "log-max", options["log-max"]) if "log-max" in options else DEFAULT_LOG_MAX
    if log_max < 4096:
        raise DeviceError(f"console {name}: log-max={options['log-max']!r} must be at least 4K")
    stream = ConsoleStream(name, log_path=log_path, scrollback=scrollback, log_max=log_max)
    try:
        attach_point = ConsoleAttachPoint(stream, console_socket_path(run_dir, name))
    except DeviceError:
        stream.close()
        raise
    return VirtioConsole(stream, attach_point=attach_point)
