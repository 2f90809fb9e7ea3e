"""The host's media control socket: eject or change the disc of a CD-ROM unit while the guest runs.

Each scsi device with a CD-ROM unit listens on ``RUN_DIR/NAME.media`` (mode
0600), a Unix stream socket taking one command line per connection and
answering one line, ``ok ...`` or ``error ...``:

* ``status`` — every CD-ROM unit's tray, lock and disc;
* ``eject LUN`` — take the disc out (refused while the guest locked the tray:
  the guest gets an eject-request event instead); ``force-eject LUN`` ignores the lock;
* ``insert LUN PATH`` — put the ISO at PATH in and close the tray (the guest
  sees a new disc); ``force-insert LUN PATH`` ignores the lock.

From a shell: ``python -m pvcore_scsi.media RUN_DIR/NAME.media eject 0``.
This is the stopgap until pvcore has one control socket for live changes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

from pvcore.virtio import DeviceError
from pvcore_scsi.cdrom import CdromUnit
from pvcore_scsi.sense import ScsiError

log = logging.getLogger("pvcore.scsi")

MAX_LINE = 4096


class MediaControl:
    """Listens on ``path`` and applies media commands to ``units``; ``changed(lun)`` tells the ring device."""

    def __init__(self, path: Path, units: Mapping[int, CdromUnit], changed: Callable[[int], None], *,
                 name: str) -> None:
        self.path = Path(path)
        self.units = units
        self.changed = changed
        self.name = name
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        """Listen (replacing a socket a killed daemon left)."""
        if self.path.is_socket():
            self.path.unlink()
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path), limit=MAX_LINE)
        os.chmod(self.path, 0o600)
        log.info("%s: media control on %s", self.name, self.path)

    async def close(self) -> None:
        """Stop listening and remove the socket."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        self.path.unlink(missing_ok=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = (await asyncio.wait_for(reader.readline(), 10)).decode("utf-8", "replace").strip()
            answer = self.apply(line)
        except (asyncio.TimeoutError, ValueError, ConnectionError) as exc:
            answer = f"error {exc or 'no command'}"
        try:
            writer.write(answer.encode() + b"\n")
            await writer.drain()
            writer.close()
        except ConnectionError:
            pass

    def apply(self, line: str) -> str:
        """Run one command line; the answer line (``ok ...`` / ``error ...``)."""
        verb, _, rest = line.partition(" ")
        if verb == "status":
            return "ok " + "; ".join(unit.describe() for _, unit in sorted(self.units.items()))
        lun_text, _, path = rest.strip().partition(" ")
        if verb not in ("eject", "force-eject", "insert", "force-insert") or not lun_text.isdigit():
            return "error expected: status | eject LUN | force-eject LUN | insert LUN PATH | force-insert LUN PATH"
        unit = self.units.get(int(lun_text))
        if unit is None:
            return f"error no CD-ROM unit at lun {lun_text} (units: {', '.join(map(str, sorted(self.units)))})"
        force = verb.startswith("force-")
        try:
            if verb.endswith("eject"):
                described = unit.host_eject(force=force)
            elif not path:
                return "error insert needs a path: insert LUN PATH"
            else:
                described = unit.host_insert(path.strip(), force=force)
        except (ScsiError, DeviceError) as exc:
            return f"error {exc}"
        self.changed(unit.lun)
        return f"ok {described}"


def send(path: str, line: str, timeout: float = 10.0) -> str:
    """Send one command line to a media control socket and return the answer line."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(line.encode() + b"\n")
        answer = b""
        while not answer.endswith(b"\n"):
            chunk = sock.recv(MAX_LINE)
            if not chunk:
                break
            answer += chunk
    return answer.decode("utf-8", "replace").strip()


def main(argv: list[str]) -> int:
    """``python -m pvcore_scsi.media SOCKET COMMAND...``: print the answer; exit 1 on ``error``."""
    if len(argv) < 2:
        print("usage: python -m pvcore_scsi.media SOCKET status|eject LUN|insert LUN PATH", file=sys.stderr)
        return 2
    answer = send(argv[0], " ".join(argv[1:]))
    print(answer)
    return 0 if answer.startswith("ok") else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
