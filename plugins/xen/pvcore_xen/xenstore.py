"""An asyncio xenstore client speaking xenstored's wire protocol.

One :class:`XenstoreClient` is one connection — to xenstored's Unix socket or
to the kernel's ``/dev/xen/xenbus`` — over which many requests may be in
flight at once; replies are matched to requests by ``req_id``. Watch events
are delivered to a :class:`Watch` (a queue, or a callback). Transactions are
:class:`Transaction` objects; :meth:`XenstoreClient.transaction` runs a
function in a transaction and retries it when xenstored answers ``EAGAIN``
(another writer changed what the transaction touched).

Everything a peer sends is checked: a message larger than
:data:`~pvcore_xen.xs_wire.PAYLOAD_MAX`, a reply of the wrong type, a reply to
a request never sent, or a malformed payload raises
:class:`~pvcore_xen.xs_wire.XenstoreProtocolError` on every waiting request
and closes the connection; a request that gets no answer raises
``TimeoutError`` after ``timeout`` seconds.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import itertools
import logging
import os
import stat
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import TypeVar

import attrs

from pvcore_xen.xs_wire import (
    ERROR_NAMES,
    HEADER,
    OK,
    PAYLOAD_MAX,
    MessageType,
    Permission,
    XenstoreError,
    XenstoreProtocolError,
    check_path,
    join_strings,
    split_strings,
)

log = logging.getLogger("pvcore.xen.xenstore")

SOCKET_PATHS = ("/var/run/xenstored/socket", "/run/xenstored/socket", "/dev/xen/xenbus")
"""Where xenstore is looked for when no path is given (after ``$XENSTORED_PATH``)."""

DEFAULT_TIMEOUT = 10.0
"""Seconds a request waits for its reply before ``TimeoutError``."""

T = TypeVar("T")


@attrs.frozen
class WatchEvent:
    """One watch firing: the node ``path`` that changed and the watch's ``token``."""

    path: str
    token: str


class Watch:
    """A registered watch on ``path`` (and everything below it).

    Events go to ``callback`` when one was given, else into a queue read with
    :meth:`get`. xenstored fires every watch once when it is registered.
    """

    def __init__(self, path: str, token: str, callback: Callable[[WatchEvent], None] | None) -> None:
        self.path = path
        self.token = token
        self.callback = callback
        self.events: asyncio.Queue[WatchEvent] = asyncio.Queue()

    def __repr__(self) -> str:
        return f"Watch(path={self.path!r}, token={self.token!r})"

    def deliver(self, event: WatchEvent) -> None:
        """Hand one event to the callback or the queue."""
        if self.callback is None:
            self.events.put_nowait(event)
            return
        try:
            self.callback(event)
        except Exception:
            log.exception("xenstore watch %s: callback failed on %s", self.path, event.path)

    async def get(self, timeout: float = DEFAULT_TIMEOUT) -> WatchEvent:
        """The next event; ``TimeoutError`` if none arrives within ``timeout`` seconds."""
        return await asyncio.wait_for(self.events.get(), timeout)


def _node_path(path: str) -> str:
    check_path(path)
    return path


def _ok(payload: bytes, request: str) -> None:
    if payload != OK:
        raise XenstoreProtocolError(f"xenstore {request}: expected OK, got {payload[:64]!r}")


def _strings(payload: bytes, request: str) -> list[str]:
    try:
        return split_strings(payload)
    except ValueError as exc:
        raise XenstoreProtocolError(f"xenstore {request}: malformed reply: {exc}") from None


class NodeOperations(abc.ABC):
    """The node operations, shared by the connection itself and its transactions."""

    tx_id = 0

    @abc.abstractmethod
    async def _call(self, msg_type: MessageType, payload: bytes, request: str) -> bytes:
        """Send one request in this object's transaction (or none) and return the reply payload."""

    async def read(self, path: str) -> bytes:
        """The value of node ``path`` (``XenstoreError`` ENOENT if there is none)."""
        return await self._call(MessageType.READ, join_strings(_node_path(path)), f"READ {path}")

    async def write(self, path: str, value: bytes | str) -> None:
        """Set node ``path`` to ``value``, creating it and any missing parents."""
        data = value.encode() if isinstance(value, str) else value
        request = f"WRITE {path}"
        _ok(await self._call(MessageType.WRITE, join_strings(_node_path(path)) + data, request), request)

    async def mkdir(self, path: str) -> None:
        """Create node ``path`` with an empty value (no error if it exists)."""
        request = f"MKDIR {path}"
        _ok(await self._call(MessageType.MKDIR, join_strings(_node_path(path)), request), request)

    async def rm(self, path: str) -> None:
        """Remove node ``path`` and everything below it."""
        request = f"RM {path}"
        _ok(await self._call(MessageType.RM, join_strings(_node_path(path)), request), request)

    async def exists(self, path: str) -> bool:
        """Whether node ``path`` exists."""
        try:
            await self.read(path)
        except XenstoreError as exc:
            if exc.name == "ENOENT":
                return False
            raise
        return True

    async def directory(self, path: str) -> list[str]:
        """The names of the children of ``path``.

        A directory too large for one reply (``E2BIG``) is read in parts with
        ``DIRECTORY_PART``, restarting if it changes meanwhile.
        """
        request = f"DIRECTORY {path}"
        try:
            payload = await self._call(MessageType.DIRECTORY, join_strings(_node_path(path)), request)
        except XenstoreError as exc:
            if exc.name != "E2BIG":
                raise
            return await self._directory_in_parts(path)
        return [] if not payload else _strings(payload, request)

    async def _directory_in_parts(self, path: str) -> list[str]:
        children: list[str] = []
        generation: str | None = None
        offset = 0
        while True:
            request = f"DIRECTORY_PART {path} {offset}"
            payload = await self._call(MessageType.DIRECTORY_PART, join_strings(path, str(offset)), request)
            parts = _strings(payload, request)
            if generation is not None and parts[0] != generation:
                children, offset = [], 0
                generation = None
                continue
            generation = parts[0]
            names = parts[1:]
            done = bool(names) and names[-1] == ""
            if done:
                names = names[:-1]
            children += names
            offset += sum(len(name) + 1 for name in names)
            if done:
                return children
            if not names:
                raise XenstoreProtocolError(f"xenstore {request}: part made no progress")

    async def get_perms(self, path: str) -> list[Permission]:
        """The permission list of ``path`` (owner first)."""
        request = f"GET_PERMS {path}"
        payload = await self._call(MessageType.GET_PERMS, join_strings(_node_path(path)), request)
        try:
            return [Permission.parse(text) for text in _strings(payload, request)]
        except ValueError as exc:
            raise XenstoreProtocolError(f"xenstore {request}: {exc}") from None

    async def set_perms(self, path: str, perms: Iterable[Permission]) -> None:
        """Replace the permission list of ``path``; the first entry names the owner."""
        texts = [str(perm) for perm in perms]
        if not texts:
            raise ValueError("a xenstore permission list needs at least the owner entry")
        request = f"SET_PERMS {path}"
        _ok(await self._call(MessageType.SET_PERMS, join_strings(_node_path(path), *texts), request), request)


class Transaction(NodeOperations):
    """An open xenstore transaction: node operations on a private snapshot.

    :meth:`commit` applies them atomically, or raises ``XenstoreError`` EAGAIN
    when another writer changed something the transaction touched.
    """

    def __init__(self, client: XenstoreClient, tx_id: int) -> None:
        self.client = client
        self.tx_id = tx_id

    def __repr__(self) -> str:
        return f"Transaction({self.tx_id})"

    async def _call(self, msg_type: MessageType, payload: bytes, request: str) -> bytes:
        return await self.client.request(msg_type, payload, request, tx_id=self.tx_id)

    async def commit(self) -> None:
        """End the transaction, applying its changes (EAGAIN on conflict)."""
        request = f"TRANSACTION_END {self.tx_id} commit"
        _ok(await self._call(MessageType.TRANSACTION_END, b"T\0", request), request)

    async def abort(self) -> None:
        """End the transaction, discarding its changes."""
        request = f"TRANSACTION_END {self.tx_id} abort"
        _ok(await self._call(MessageType.TRANSACTION_END, b"F\0", request), request)


@attrs.define
class _Pending:
    future: asyncio.Future[bytes]
    msg_type: MessageType
    request: str


class XenstoreClient(NodeOperations):
    """One connection to xenstore. Create it with :meth:`connect`; close it with :meth:`close`."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        send: Callable[[bytes], None],
        close: Callable[[], None],
        description: str,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.description = description
        self.timeout = timeout
        self._reader = reader
        self._send = send
        self._close_transport = close
        self._pending: dict[int, _Pending] = {}
        self._abandoned: set[int] = set()
        self._watches: dict[str, Watch] = {}
        self._req_ids = itertools.count(1)
        self._tokens = itertools.count(1)
        self._failure: Exception | None = None
        self._transport_open = True
        self._read_task = asyncio.get_running_loop().create_task(self._read_loop())

    def __repr__(self) -> str:
        return f"XenstoreClient({self.description})"

    @classmethod
    async def connect(cls, path: str | os.PathLike[str] | None = None, timeout: float = DEFAULT_TIMEOUT) -> XenstoreClient:
        """Connect to xenstore at ``path``: a Unix socket, or the ``/dev/xen/xenbus`` device.

        Without ``path``: ``$XENSTORED_PATH``, else the first of
        :data:`SOCKET_PATHS` that exists. Raises ``FileNotFoundError`` naming
        what was tried.
        """
        if path is None:
            candidates = [os.environ["XENSTORED_PATH"]] if os.environ.get("XENSTORED_PATH") else list(SOCKET_PATHS)
            found = [candidate for candidate in candidates if os.path.exists(candidate)]
            if not found:
                raise FileNotFoundError(
                    f"no xenstore found (tried {', '.join(candidates)}); is xenstored running in this domain, "
                    "or set XENSTORED_PATH to its socket"
                )
            path = found[0]
        path = Path(path)
        mode = path.stat().st_mode
        if stat.S_ISCHR(mode):
            return await cls.open_fd(os.open(path, os.O_RDWR | os.O_CLOEXEC), str(path), timeout)
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(path), timeout)
        return cls(reader, writer.write, writer.close, str(path), timeout)

    @classmethod
    async def open_fd(cls, fd: int, description: str, timeout: float = DEFAULT_TIMEOUT) -> XenstoreClient:
        """Speak xenstore over an open descriptor such as ``/dev/xen/xenbus`` (adopts ``fd``).

        The kernel's xenbus device takes each message in one ``write`` and
        never blocks a writer; replies are read as they become readable.
        """
        loop = asyncio.get_running_loop()
        os.set_blocking(fd, False)
        reader = asyncio.StreamReader(limit=2 * PAYLOAD_MAX)

        def on_readable() -> None:
            try:
                data = os.read(fd, 2 * PAYLOAD_MAX)
            except BlockingIOError:
                return
            except OSError as exc:
                loop.remove_reader(fd)
                reader.set_exception(exc)
                return
            if not data:
                loop.remove_reader(fd)
                reader.feed_eof()
                return
            reader.feed_data(data)

        def send(message: bytes) -> None:
            written = os.write(fd, message)
            if written != len(message):
                raise XenstoreProtocolError(f"xenstore {description}: short write ({written} of {len(message)} bytes)")

        def close() -> None:
            loop.remove_reader(fd)
            os.close(fd)

        loop.add_reader(fd, on_readable)
        return cls(reader, send, close, description, timeout)

    def _shut_transport(self) -> None:
        if self._transport_open:
            self._transport_open = False
            self._close_transport()

    async def close(self) -> None:
        """Close the connection; waiting requests fail with ``XenstoreProtocolError``."""
        self._shut_transport()
        self._read_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._read_task
        self._fail_all(XenstoreProtocolError(f"xenstore connection {self.description} closed"))

    async def __aenter__(self) -> XenstoreClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _call(self, msg_type: MessageType, payload: bytes, request: str) -> bytes:
        return await self.request(msg_type, payload, request)

    async def request(self, msg_type: MessageType, payload: bytes, request: str, tx_id: int = 0) -> bytes:
        """Send one message and return its reply's payload.

        Raises ``XenstoreError`` for an ERROR reply, ``XenstoreProtocolError``
        if the connection broke or the reply was malformed, ``TimeoutError``
        after :attr:`timeout` seconds without a reply.
        """
        if len(payload) > PAYLOAD_MAX:
            raise ValueError(f"xenstore {request}: payload of {len(payload)} bytes exceeds {PAYLOAD_MAX}")
        if self._failure is not None:
            raise XenstoreProtocolError(f"xenstore connection {self.description} is unusable: {self._failure}")
        req_id = self._next_req_id()
        self._send(HEADER.pack(msg_type, req_id, tx_id, len(payload)) + payload)
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._pending[req_id] = _Pending(future, msg_type, request)
        try:
            return await asyncio.wait_for(asyncio.shield(future), self.timeout)
        except TimeoutError:
            if self._pending.pop(req_id, None) is not None:
                self._abandoned.add(req_id)
            raise TimeoutError(
                f"xenstore {request}: no reply from {self.description} within {self.timeout} s"
            ) from None

    def _next_req_id(self) -> int:
        while True:
            req_id = next(self._req_ids) & 0xFFFFFFFF
            if req_id and req_id not in self._pending and req_id not in self._abandoned:
                return req_id

    async def _read_loop(self) -> None:
        try:
            while True:
                header = await self._reader.readexactly(HEADER.size)
                msg_type, req_id, tx_id, length = HEADER.unpack(header)
                if length > PAYLOAD_MAX:
                    raise XenstoreProtocolError(
                        f"xenstore {self.description} sent a {length}-byte message (limit {PAYLOAD_MAX})"
                    )
                payload = await self._reader.readexactly(length)
                self._dispatch(msg_type, req_id, payload)
        except asyncio.IncompleteReadError as exc:
            where = "mid-message" if exc.partial else "between messages"
            self._fail_all(XenstoreProtocolError(f"xenstore {self.description} closed the connection {where}"))
        except (XenstoreProtocolError, OSError) as exc:
            self._fail_all(exc if isinstance(exc, XenstoreProtocolError) else XenstoreProtocolError(str(exc)))
            self._shut_transport()

    def _fail_all(self, error: Exception) -> None:
        if self._failure is None:
            self._failure = error
            log.warning("%s", error)
        pending, self._pending = self._pending, {}
        for entry in pending.values():
            if not entry.future.done():
                entry.future.set_exception(error)

    def _dispatch(self, msg_type: int, req_id: int, payload: bytes) -> None:
        if msg_type == MessageType.WATCH_EVENT:
            self._deliver_watch_event(payload)
            return
        entry = self._pending.get(req_id)
        if entry is None:
            if req_id in self._abandoned:
                self._abandoned.discard(req_id)
                return
            raise XenstoreProtocolError(f"xenstore {self.description} replied to unknown request id {req_id}")
        if msg_type == MessageType.ERROR:
            names = _strings(payload, entry.request)
            if len(names) != 1 or names[0] not in ERROR_NAMES:
                raise XenstoreProtocolError(f"xenstore {entry.request}: malformed ERROR reply {payload[:64]!r}")
            del self._pending[req_id]
            entry.future.set_exception(XenstoreError(names[0], entry.request))
        elif msg_type != entry.msg_type:
            raise XenstoreProtocolError(
                f"xenstore {entry.request}: reply of type {msg_type} to a request of type {int(entry.msg_type)}"
            )
        else:
            del self._pending[req_id]
            entry.future.set_result(payload)

    def _deliver_watch_event(self, payload: bytes) -> None:
        strings = _strings(payload, "WATCH_EVENT")
        if len(strings) != 2:
            raise XenstoreProtocolError(f"xenstore WATCH_EVENT: expected path and token, got {payload[:64]!r}")
        path, token = strings
        watch = self._watches.get(token)
        if watch is None:
            log.debug("xenstore watch event for unknown token %r (unwatched meanwhile)", token)
            return
        watch.deliver(WatchEvent(path, token))

    async def watch(self, path: str, callback: Callable[[WatchEvent], None] | None = None) -> Watch:
        """Watch ``path`` and everything below it (or ``@introduceDomain``/``@releaseDomain``).

        Returns the :class:`Watch`; its first event is the one xenstored fires on registration.
        """
        if not path.startswith("@"):
            _node_path(path)
        token = f"pvcore-{next(self._tokens)}"
        watch = Watch(path, token, callback)
        self._watches[token] = watch
        request = f"WATCH {path}"
        try:
            _ok(await self.request(MessageType.WATCH, join_strings(path, token), request), request)
        except BaseException:
            del self._watches[token]
            raise
        return watch

    async def unwatch(self, watch: Watch) -> None:
        """Remove a watch registered with :meth:`watch`."""
        request = f"UNWATCH {watch.path}"
        self._watches.pop(watch.token, None)
        _ok(await self.request(MessageType.UNWATCH, join_strings(watch.path, watch.token), request), request)

    async def reset_watches(self) -> None:
        """Remove every watch of this connection (``RESET_WATCHES``)."""
        self._watches.clear()
        _ok(await self.request(MessageType.RESET_WATCHES, b"", "RESET_WATCHES"), "RESET_WATCHES")

    async def start_transaction(self) -> Transaction:
        """Open a transaction; end it with :meth:`Transaction.commit` or :meth:`Transaction.abort`."""
        request = "TRANSACTION_START"
        strings = _strings(await self.request(MessageType.TRANSACTION_START, b"\0", request), request)
        if len(strings) != 1 or not strings[0].isdigit() or not 0 < int(strings[0]) <= 0xFFFFFFFF:
            raise XenstoreProtocolError(f"xenstore {request}: bad transaction id {strings!r}")
        return Transaction(self, int(strings[0]))

    async def transaction(self, body: Callable[[Transaction], Awaitable[T]], attempts: int = 32) -> T:
        """Run ``body(tx)`` in a transaction and commit it, retrying on ``EAGAIN``.

        ``body`` may run several times, so it must only act through ``tx``.
        Any other error aborts the transaction and propagates. After
        ``attempts`` conflicts, raises ``XenstoreError`` EAGAIN.
        """
        for _ in range(attempts):
            tx = await self.start_transaction()
            try:
                result = await body(tx)
            except XenstoreError as exc:
                with contextlib.suppress(XenstoreError):
                    await tx.abort()
                if exc.name == "EAGAIN":
                    continue
                raise
            except BaseException:
                with contextlib.suppress(XenstoreError, XenstoreProtocolError):
                    await tx.abort()
                raise
            try:
                await tx.commit()
            except XenstoreError as exc:
                if exc.name == "EAGAIN":
                    continue
                raise
            return result
        raise XenstoreError("EAGAIN", f"transaction still conflicting after {attempts} attempts")

    async def get_domain_path(self, domid: int) -> str:
        """The home path of domain ``domid`` (``/local/domain/<domid>``)."""
        request = f"GET_DOMAIN_PATH {domid}"
        strings = _strings(await self.request(MessageType.GET_DOMAIN_PATH, join_strings(str(domid)), request), request)
        if len(strings) != 1 or not strings[0].startswith("/"):
            raise XenstoreProtocolError(f"xenstore {request}: bad reply {strings!r}")
        return strings[0]

    async def introduce(self, domid: int, mfn: int, port: int) -> None:
        """Tell xenstored about a new domain's store page ``mfn`` and event channel ``port``."""
        request = f"INTRODUCE {domid}"
        payload = join_strings(str(domid), str(mfn), str(port))
        _ok(await self.request(MessageType.INTRODUCE, payload, request), request)

    async def release(self, domid: int) -> None:
        """Tell xenstored that domain ``domid`` is gone."""
        request = f"RELEASE {domid}"
        _ok(await self.request(MessageType.RELEASE, join_strings(str(domid)), request), request)

    async def resume(self, domid: int) -> None:
        """Tell xenstored that domain ``domid`` resumed (after suspend)."""
        request = f"RESUME {domid}"
        _ok(await self.request(MessageType.RESUME, join_strings(str(domid)), request), request)

    async def is_domain_introduced(self, domid: int) -> bool:
        """Whether xenstored knows domain ``domid``."""
        request = f"IS_DOMAIN_INTRODUCED {domid}"
        strings = _strings(await self.request(MessageType.IS_DOMAIN_INTRODUCED, join_strings(str(domid)), request), request)
        if strings not in (["T"], ["F"]):
            raise XenstoreProtocolError(f"xenstore {request}: bad reply {strings!r}")
        return strings == ["T"]

    async def set_target(self, domid: int, target: int) -> None:
        """Give domain ``domid`` the xenstore privileges of ``target`` (a device-model domain)."""
        request = f"SET_TARGET {domid} {target}"
        _ok(await self.request(MessageType.SET_TARGET, join_strings(str(domid), str(target)), request), request)

    async def debug(self, *arguments: str) -> bytes:
        """Send a ``DEBUG`` (``XS_CONTROL``) command such as ``("print", "text")``; return the reply."""
        return await self.request(MessageType.DEBUG, join_strings(*arguments), f"DEBUG {' '.join(arguments[:1])}")
