"""``pvcore serve`` as a subprocess a test can kill and start again with the same command line.

Restart tests (a back end killed with SIGKILL under a running guest, then
started again) need the daemon in a process of its own, its output in a log
file that survives the restarts, and a way to know each start has finished:
:class:`ServeProcess` waits until the log shows one more ``serving N
device(s)`` line than before that start.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

POLL_SECONDS = 0.05
READY = re.compile(r"serving \d+ device\(s\)")


class ServeProcess:
    """One ``pvcore serve`` command line (any launcher in front of it), startable again after a kill."""

    def __init__(self, command: Sequence[str], log: Path, *, env: Mapping[str, str] | None = None,
                 start_timeout: float = 60.0) -> None:
        self.command = list(command)
        self.log = log
        self.env = dict(os.environ if env is None else env)
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen[bytes] | None = None

    def text(self) -> str:
        """Everything every start of the daemon has printed so far."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def starts(self) -> int:
        """How many starts have said they serve their devices."""
        return len(READY.findall(self.text()))

    def start(self) -> None:
        """Start the command and wait until it says it serves; AssertionError with its log if it does not."""
        before = self.starts()
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.command, stdout=out, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + self.start_timeout
        while self.starts() == before:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"pvcore serve did not come up:\n{self.text()[-5000:]}")
            time.sleep(POLL_SECONDS)

    def stop(self, signal_number: int, timeout: float = 30.0) -> int:
        """Send ``signal_number`` and return the exit status (negative: the signal that ended it)."""
        assert self.proc is not None, "not started"
        self.proc.send_signal(signal_number)
        return self.proc.wait(timeout)

    def terminate(self, timeout: float = 30.0) -> None:
        """Stop it as its service manager would (SIGTERM) if it still runs; kill it if that takes too long."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        """End it at once if it still runs (cleanup)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
