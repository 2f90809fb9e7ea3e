"""The xenstore wire client reading a hostile xenstored: replies, errors and watch events.

The input is what "xenstored" sends back over a socketpair to a real
:class:`~pvcore_xen.xenstore.XenstoreClient` that has a read, a directory
listing, a permission read and a watch outstanding. Whatever it sends, each
call must end with a value or a clean xenstore error (never hang, never
another exception), the client must close without leaking a task or fd,
and the permission strings it returns must parse or be refused cleanly.
"""

from __future__ import annotations

import asyncio
import socket
import struct

from fuzz.harness import Baseline, InvariantError, loop_thread
from pvcore_xen.xenstore import XenstoreClient
from pvcore_xen.xs_wire import HEADER, MessageType, XenstoreError, XenstoreProtocolError, join_strings

_state: dict[str, Baseline] = {}
_CLEAN = (XenstoreError, XenstoreProtocolError, ValueError, asyncio.TimeoutError, ConnectionError)


async def _exchange(data: bytes) -> None:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    reader, writer = await asyncio.open_unix_connection(sock=ours)
    client = XenstoreClient(reader, writer.write, writer.close, "fuzz", timeout=0.5)
    try:
        calls = [
            asyncio.ensure_future(client.read("/local/domain/1/name")),
            asyncio.ensure_future(client.directory("/local/domain/1/device")),
            asyncio.ensure_future(client.get_perms("/local/domain/1/device/vbd/51712")),
            asyncio.ensure_future(client.watch("/local/domain/1/device")),
        ]
        await asyncio.sleep(0)
        theirs.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(theirs, data)
        theirs.shutdown(socket.SHUT_WR)
        done, pending = await asyncio.wait(calls, timeout=5)
        if pending:
            raise InvariantError(f"hang: {len(pending)} xenstore call(s) neither answered nor failed")
        for call in done:
            exc = call.exception()
            if exc is not None and not isinstance(exc, _CLEAN):
                raise exc
            result = None if exc else call.result()
            if isinstance(result, list):
                for item in result:
                    str(item)
    finally:
        await client.close()
        theirs.close()


def setup() -> None:
    """Start the loop and take the resource baseline after one warm-up exchange."""
    loop_thread().run(_exchange(b""))
    _state["baseline"] = Baseline()


def one_input(data: bytes) -> None:
    """Play xenstored for one input."""
    loop_thread().run(_exchange(data), timeout=30)
    _state["baseline"].check()


def _message(msg_type: MessageType, req_id: int, payload: bytes) -> bytes:
    return HEADER.pack(msg_type, req_id, 0, len(payload)) + payload


def seeds() -> dict[str, bytes]:
    """Replies as oxenstored/xenstored send them (xenstore-utils' wire format), in request order."""
    return {
        "replies": b"".join([
            _message(MessageType.READ, 1, b"guest1"),
            _message(MessageType.DIRECTORY, 2, join_strings("vbd", "vif", "console")),
            _message(MessageType.GET_PERMS, 3, join_strings("n0", "r1")),
            _message(MessageType.WATCH, 4, b"OK\0"),
            _message(MessageType.WATCH_EVENT, 0, join_strings("/local/domain/1/device", "pvcore-1")),
        ]),
        "errors": b"".join([
            _message(MessageType.ERROR, 1, b"ENOENT\0"),
            _message(MessageType.ERROR, 2, b"EACCES\0"),
            _message(MessageType.ERROR, 3, b"E2BIG\0"),
            _message(MessageType.ERROR, 4, b"EINVAL\0"),
        ]),
        "truncated": _message(MessageType.READ, 1, b"guest1")[:-3] + struct.pack("<I", 7),
    }
