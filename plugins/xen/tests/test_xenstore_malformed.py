"""The xenstore client against a raw fake server that misbehaves: errors, never hangs."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from helpers import run
from pvcore_xen.xenstore import XenstoreClient
from pvcore_xen.xs_wire import HEADER, PAYLOAD_MAX, MessageType, XenstoreError, XenstoreProtocolError

Answer = Callable[[int, int, int, bytes], bytes]
"""Given a request's type, req_id, tx_id and payload, the raw bytes the fake server sends back."""


async def ask_fake_server(tmp_path, answer: Answer, timeout: float = 2.0) -> bytes:
    """Start a raw server that answers one READ with ``answer(...)``; return the client's result."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        msg_type, req_id, tx_id, length = HEADER.unpack(await reader.readexactly(HEADER.size))
        payload = await reader.readexactly(length)
        writer.write(answer(msg_type, req_id, tx_id, payload))
        await writer.drain()
        await reader.read()
        writer.close()

    socket_path = tmp_path / "fake-xenstored.sock"
    server = await asyncio.start_unix_server(serve, path=socket_path)
    client = await XenstoreClient.connect(socket_path, timeout=timeout)
    try:
        return await client.read("/local/domain/0/name")
    finally:
        await client.close()
        server.close()
        await server.wait_closed()


def reply(msg_type: int, req_id: int, payload: bytes, length: int | None = None) -> bytes:
    """One raw message; ``length`` overrides the header's length field."""
    return HEADER.pack(msg_type, req_id, 0, len(payload) if length is None else length) + payload


def test_well_formed_reply_is_accepted(tmp_path):
    value = run(lambda: ask_fake_server(tmp_path, lambda t, r, x, p: reply(t, r, b"Domain-0")))
    assert value == b"Domain-0"


def test_oversized_reply_is_an_error(tmp_path):
    def oversized(msg_type: int, req_id: int, tx_id: int, payload: bytes) -> bytes:
        return reply(msg_type, req_id, b"x" * (PAYLOAD_MAX + 1))

    with pytest.raises(XenstoreProtocolError, match="4097-byte message"):
        run(lambda: ask_fake_server(tmp_path, oversized))


def test_length_field_beyond_the_limit_is_an_error_without_reading_on(tmp_path):
    with pytest.raises(XenstoreProtocolError, match="limit 4096"):
        run(lambda: ask_fake_server(tmp_path, lambda t, r, x, p: reply(t, r, b"", length=0xFFFFFFFF)))


def test_truncated_reply_is_an_error(tmp_path):
    async def body():
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            msg_type, req_id, _tx, length = HEADER.unpack(await reader.readexactly(HEADER.size))
            await reader.readexactly(length)
            writer.write(reply(msg_type, req_id, b"short", length=100))
            writer.close()

        socket_path = tmp_path / "truncating.sock"
        server = await asyncio.start_unix_server(serve, path=socket_path)
        client = await XenstoreClient.connect(socket_path, timeout=2.0)
        try:
            with pytest.raises(XenstoreProtocolError, match="mid-message"):
                await client.read("/x")
            with pytest.raises(XenstoreProtocolError, match="unusable"):
                await client.read("/x")
        finally:
            await client.close()
            server.close()

    run(body)


def test_reply_of_the_wrong_type_is_an_error(tmp_path):
    with pytest.raises(XenstoreProtocolError, match="reply of type 11"):
        run(lambda: ask_fake_server(tmp_path, lambda t, r, x, p: reply(MessageType.WRITE, r, b"OK\0")))


def test_reply_to_an_unknown_request_is_an_error(tmp_path):
    with pytest.raises(XenstoreProtocolError, match="unknown request id"):
        run(lambda: ask_fake_server(tmp_path, lambda t, r, x, p: reply(t, r + 1000, b"v")))


@pytest.mark.parametrize("payload", [b"ENOENT", b"NOT_AN_ERRNO\0", b"ENOENT\0EIO\0", b"\xff\0"])
def test_malformed_error_reply_is_an_error(tmp_path, payload):
    with pytest.raises(XenstoreProtocolError):
        run(lambda: ask_fake_server(tmp_path, lambda t, r, x, p: reply(MessageType.ERROR, r, payload)))


def test_error_reply_is_an_errno(tmp_path):
    with pytest.raises(XenstoreError) as error:
        run(lambda: ask_fake_server(tmp_path, lambda t, r, x, p: reply(MessageType.ERROR, r, b"EACCES\0")))
    assert error.value.name == "EACCES"


def test_malformed_watch_event_is_an_error(tmp_path):
    def bad_event(msg_type: int, req_id: int, tx_id: int, payload: bytes) -> bytes:
        return reply(MessageType.WATCH_EVENT, 0, b"only-a-path\0")

    with pytest.raises(XenstoreProtocolError, match="WATCH_EVENT"):
        run(lambda: ask_fake_server(tmp_path, bad_event))


def test_silent_server_times_out(tmp_path):
    with pytest.raises(TimeoutError, match="no reply"):
        run(lambda: ask_fake_server(tmp_path, lambda t, r, x, p: b"", timeout=0.2))


def test_late_reply_after_a_timeout_is_dropped(tmp_path):
    async def body():
        replies: asyncio.Queue[tuple[int, int]] = asyncio.Queue()

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while True:
                msg_type, req_id, _tx, length = HEADER.unpack(await reader.readexactly(HEADER.size))
                await reader.readexactly(length)
                if req_id == 1:
                    await replies.get()
                writer.write(reply(msg_type, req_id, b"v%d" % req_id))

        socket_path = tmp_path / "slow.sock"
        server = await asyncio.start_unix_server(serve, path=socket_path)
        client = await XenstoreClient.connect(socket_path, timeout=0.2)
        try:
            with pytest.raises(TimeoutError):
                await client.read("/slow")
            replies.put_nowait((1, 1))
            assert await client.read("/fast") == b"v2"
        finally:
            await client.close()
            server.close()

    run(body)
