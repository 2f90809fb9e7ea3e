"""Run ``pvcore`` with writes to one byte range of every disk held back: a test peer for crash windows.

Restart tests need a daemon killed while it has completed later requests but
not an earlier one (out-of-order completion, the normal case with several I/O
threads). This launcher makes that window as long as a test wants::

    python -m pvcore.testing.stalled_writes --hold-while FLAG --range START:END -- serve DEVICE...

runs ``pvcore serve DEVICE...`` (any pvcore command line after ``--``) with
one change: a write to a raw file store that overlaps bytes ``[START, END)``
waits in its I/O thread while the file ``FLAG`` exists, printing
``stalled-writes: holding write at OFFSET`` once on standard error when it
starts waiting. Every other request is served as usual, so the requests the
guest issues after the held one complete before it. Without ``FLAG`` (a
restarted daemon, once the test removed it) nothing is held. Nothing in
pvcore's serving code knows of this module.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

from pvcore import cli
from pvcore.devices.block.store import RawFileStore

POLL_SECONDS = 0.05


def _hold(flag: str, start: int, end: int) -> None:
    writev = RawFileStore.writev
    transfer_nowait = RawFileStore.transfer_nowait

    def overlaps(buffers: Sequence[memoryview], offset: int) -> bool:
        length = sum(len(b) for b in buffers)
        return offset < end and offset + length > start and os.path.exists(flag)

    def held_writev(self: RawFileStore, buffers: Sequence[memoryview], offset: int, *, durable: bool = False) -> int:
        if overlaps(buffers, offset):
            print(f"stalled-writes: holding write at {offset}", file=sys.stderr, flush=True)
            while os.path.exists(flag):
                time.sleep(POLL_SECONDS)
        return writev(self, buffers, offset, durable=durable)

    def no_inline_write(self: RawFileStore, buffers: Sequence[memoryview], offset: int, *, write: bool) -> bool:
        if write and overlaps(buffers, offset):
            return False  # to an I/O thread, where it can be held without holding the event loop
        return transfer_nowait(self, buffers, offset, write=write)

    RawFileStore.writev = held_writev  # type: ignore[method-assign]
    RawFileStore.transfer_nowait = no_inline_write  # type: ignore[method-assign]


def main(argv: list[str] | None = None) -> int:
    """Parse the launcher's options, install the hold, run the pvcore command line after ``--``."""
    parser = argparse.ArgumentParser(prog="python -m pvcore.testing.stalled_writes")
    parser.add_argument("--hold-while", required=True, metavar="FLAG", help="hold writes while this file exists")
    parser.add_argument("--range", required=True, metavar="START:END", help="byte range whose writes are held")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then a pvcore command line")
    args = parser.parse_args(argv)
    start, _, end = args.range.partition(":")
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("a pvcore command line is needed after --")
    _hold(args.hold_while, int(start), int(end))
    return cli.main(command)


if __name__ == "__main__":
    sys.exit(main())
