"""A SIMULATED xenstored: Xen's store daemon reimplemented for tests.

It serves the real xenstore wire protocol (:mod:`pvcore_xen.xs_wire`) on Unix
sockets, so that both pvcore's client and Xen's own C tools
(``XENSTORED_PATH=S xenstore-read ...``) can talk to it. It keeps a node tree
with permissions, watches and transactions, and answers errors with errno
names, following the behaviour of Xen's C xenstored:

* every connection belongs to a domain (dom0 unless the socket was opened
  with another ``domid``); dom0 may do anything, other domains are checked
  against each node's permission list (owner first; ``n``/``r``/``w``/``b``);
* a node created by an unprivileged domain is owned by it; new nodes inherit
  their parent's permissions;
* a watch fires once on registration, then for every change at or below its
  path (a removal also fires the watches below the removed node);
* a transaction works on a private snapshot; its commit fails with ``EAGAIN``
  if any node it touched was changed meanwhile.

It is a simulation: there is no hypervisor, no shared ring page and no quota.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from collections.abc import Callable
from pathlib import Path

import attrs

from pvcore_xen.xs_wire import (
    HEADER,
    OK,
    PAYLOAD_MAX,
    Access,
    MessageType,
    Permission,
    check_path,
    join_strings,
    split_strings,
)

log = logging.getLogger("pvcore.xen.testing.xenstored")

SPECIAL_WATCHES = ("@introduceDomain", "@releaseDomain")
"""The watch names that are not nodes: fired when a domain is introduced or released."""


class _RequestError(Exception):
    """Answer the current request with ERROR ``name``."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


@attrs.define
class Node:
    """One node of the simulated store."""

    value: bytes
    perms: list[Permission]
    generation: int
    children: list[str] = attrs.field(factory=list)

    def copy(self) -> Node:
        """A copy that shares nothing mutable with this node."""
        return Node(self.value, list(self.perms), self.generation, list(self.children))


@attrs.define
class _Transaction:
    tx_id: int
    nodes: dict[str, Node]
    seen: dict[str, int | None] = attrs.field(factory=dict)
    changed: dict[str, None] = attrs.field(factory=dict)
    events: list[tuple[str, list[Permission], bool]] = attrs.field(factory=list)


@attrs.define(eq=False)
class _Watch:
    path: str
    token: str
    absolute: str


@attrs.define(eq=False)
class _Connection:
    domid: int
    send: Callable[[bytes], None]
    close: Callable[[], None]
    watches: list[_Watch] = attrs.field(factory=list)
    transactions: dict[int, _Transaction] = attrs.field(factory=dict)
    tx_ids: itertools.count = attrs.field(factory=lambda: itertools.count(1))

    def home(self) -> str:
        return f"/local/domain/{self.domid}"


def _below_or_at(path: str, ancestor: str) -> bool:
    return ancestor == "/" or path == ancestor or path.startswith(ancestor + "/")


def _parent(path: str) -> str:
    head = path.rsplit("/", 1)[0]
    return head or "/"


def _domid(text: str) -> int:
    if not text.isascii() or not text.isdigit() or int(text) > 0xFFFF:
        raise _RequestError("EINVAL")
    return int(text)


class SimulatedXenstored:
    """A SIMULATED xenstored serving the xenstore wire protocol on Unix sockets.

    :meth:`listen` opens a socket whose connections act as a given domain;
    :meth:`close` stops everything. The tree is :attr:`nodes` (absolute path
    to :class:`Node`); :meth:`read_value` is a test's direct look at it.
    """

    def __init__(self) -> None:
        self._generations = itertools.count(1)
        self.nodes: dict[str, Node] = {"/": Node(b"", [Permission(0, Access.NONE)], next(self._generations))}
        self.introduced: dict[int, tuple[int, int]] = {}
        self.targets: dict[int, int] = {}
        self._connections: set[_Connection] = set()
        self._servers: list[asyncio.AbstractServer] = []
        self._tasks: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return f"SimulatedXenstored({len(self.nodes)} nodes, {len(self._connections)} connections)"

    async def listen(self, path: str | os.PathLike[str], domid: int = 0) -> None:
        """Serve on a new Unix socket at ``path``; its connections act as domain ``domid``."""
        server = await asyncio.start_unix_server(
            lambda reader, writer: self._serve(reader, writer, domid), path=Path(path)
        )
        self._servers.append(server)

    async def close(self) -> None:
        """Stop listening and drop every connection."""
        for server in self._servers:
            server.close()
        for connection in list(self._connections):
            connection.close()
        await asyncio.gather(*self._tasks)
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()

    def read_value(self, path: str) -> bytes | None:
        """The value of absolute node ``path``, or None (for tests to inspect the store)."""
        node = self.nodes.get(path)
        return None if node is None else node.value

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, domid: int) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        connection = _Connection(domid, writer.write, writer.close)
        self._connections.add(connection)
        try:
            while True:
                header = await reader.readexactly(HEADER.size)
                msg_type, req_id, tx_id, length = HEADER.unpack(header)
                if length > PAYLOAD_MAX:
                    log.warning("simulated xenstored: dom%d sent a %d-byte message; closing it", domid, length)
                    return
                payload = await reader.readexactly(length)
                self._handle(connection, msg_type, req_id, tx_id, payload)
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            self._connections.discard(connection)
            self._tasks.discard(task)
            writer.close()

    def _handle(self, connection: _Connection, msg_type: int, req_id: int, tx_id: int, payload: bytes) -> None:
        after: list[Callable[[], None]] = []
        try:
            kind = MessageType(msg_type)
            handler = self._handlers()[kind]
        except (ValueError, KeyError):
            self._reply(connection, MessageType.ERROR, req_id, tx_id, join_strings("EINVAL"))
            return
        try:
            reply = handler(connection, tx_id, payload, after)
        except _RequestError as error:
            log.debug("simulated xenstored: dom%d %s -> %s", connection.domid, kind.name, error.name)
            self._reply(connection, MessageType.ERROR, req_id, tx_id, join_strings(error.name))
            return
        self._reply(connection, kind, req_id, tx_id, reply)
        for action in after:
            action()

    def _handlers(self) -> dict[MessageType, Callable[[_Connection, int, bytes, list[Callable[[], None]]], bytes]]:
        return {
            MessageType.DEBUG: self._do_debug,
            MessageType.DIRECTORY: self._do_directory,
            MessageType.DIRECTORY_PART: self._do_directory_part,
            MessageType.READ: self._do_read,
            MessageType.GET_PERMS: self._do_get_perms,
            MessageType.WATCH: self._do_watch,
            MessageType.UNWATCH: self._do_unwatch,
            MessageType.TRANSACTION_START: self._do_transaction_start,
            MessageType.TRANSACTION_END: self._do_transaction_end,
            MessageType.INTRODUCE: self._do_introduce,
            MessageType.RELEASE: self._do_release,
            MessageType.GET_DOMAIN_PATH: self._do_get_domain_path,
            MessageType.WRITE: self._do_write,
            MessageType.MKDIR: self._do_mkdir,
            MessageType.RM: self._do_rm,
            MessageType.SET_PERMS: self._do_set_perms,
            MessageType.IS_DOMAIN_INTRODUCED: self._do_is_domain_introduced,
            MessageType.RESUME: self._do_resume,
            MessageType.SET_TARGET: self._do_set_target,
            MessageType.RESET_WATCHES: self._do_reset_watches,
        }

    @staticmethod
    def _reply(connection: _Connection, kind: MessageType, req_id: int, tx_id: int, payload: bytes) -> None:
        connection.send(HEADER.pack(kind, req_id, tx_id, len(payload)) + payload)

    # -- arguments, paths, permissions ---------------------------------------

    @staticmethod
    def _arguments(payload: bytes, count: int | None = None) -> list[str]:
        try:
            strings = split_strings(payload)
        except ValueError:
            raise _RequestError("EINVAL") from None
        if count is not None and len(strings) != count:
            raise _RequestError("EINVAL")
        return strings

    @staticmethod
    def _absolute(connection: _Connection, path: str) -> str:
        try:
            check_path(path)
        except ValueError:
            raise _RequestError("EINVAL") from None
        return path if path.startswith("/") else f"{connection.home()}/{path}"

    def _access(self, domid: int, node: Node) -> Access:
        if domid == 0:
            return Access.BOTH
        identities = {domid, self.targets.get(domid, domid)}
        owner = node.perms[0]
        if owner.domid in identities:
            return Access.BOTH
        for perm in node.perms[1:]:
            if perm.domid in identities:
                return perm.access
        return owner.access

    def _require(self, domid: int, node: Node, write: bool) -> None:
        access = self._access(domid, node)
        if not (access.can_write if write else access.can_read):
            raise _RequestError("EACCES")

    def _bump(self) -> int:
        return next(self._generations)

    # -- the tree a request acts on -------------------------------------------

    def _view(self, connection: _Connection, tx_id: int) -> tuple[dict[str, Node], _Transaction | None]:
        if tx_id == 0:
            return self.nodes, None
        transaction = connection.transactions.get(tx_id)
        if transaction is None:
            raise _RequestError("ENOENT")
        return transaction.nodes, transaction

    @staticmethod
    def _get(nodes: dict[str, Node], tx: _Transaction | None, path: str) -> Node | None:
        node = nodes.get(path)
        if tx is not None and path not in tx.seen:
            tx.seen[path] = None if node is None else node.generation
        return node

    def _modified(self, nodes: dict[str, Node], tx: _Transaction | None, path: str) -> None:
        if tx is not None:
            tx.changed[path] = None
        elif path in nodes:
            nodes[path].generation = self._bump()

    def _existing(self, connection: _Connection, tx_id: int, payload: bytes, write: bool) -> tuple[str, Node]:
        nodes, tx = self._view(connection, tx_id)
        path = self._absolute(connection, self._arguments(payload, 1)[0])
        node = self._get(nodes, tx, path)
        if node is None:
            raise _RequestError("ENOENT")
        self._require(connection.domid, node, write)
        return path, node

    def _create(self, connection: _Connection, nodes: dict[str, Node], tx: _Transaction | None, path: str) -> Node:
        missing = [path]
        ancestor = _parent(path)
        while self._get(nodes, tx, ancestor) is None:
            missing.append(ancestor)
            ancestor = _parent(ancestor)
        self._require(connection.domid, nodes[ancestor], write=True)
        for new_path in reversed(missing):
            parent_path = _parent(new_path)
            parent = nodes[parent_path]
            perms = list(parent.perms)
            if connection.domid != 0:
                perms[0] = Permission(connection.domid, perms[0].access)
            nodes[new_path] = Node(b"", perms, self._bump())
            if tx is not None:
                tx.changed[new_path] = None
            parent.children.append(new_path.rsplit("/", 1)[1])
            self._modified(nodes, tx, parent_path)
        return nodes[path]

    def _changed(self, tx: _Transaction | None, after: list[Callable[[], None]], path: str, node: Node, removed: bool) -> None:
        if tx is not None:
            tx.events.append((path, list(node.perms), removed))
        else:
            perms = list(node.perms)
            after.append(lambda: self._fire(path, perms, removed))

    # -- watches ---------------------------------------------------------------

    def _fire(self, path: str, perms: list[Permission], removed: bool) -> None:
        probe = Node(b"", perms, 0)
        for connection in list(self._connections):
            for watch in connection.watches:
                if watch.absolute in SPECIAL_WATCHES:
                    continue
                if _below_or_at(path, watch.absolute):
                    reported = path
                elif removed and _below_or_at(watch.absolute, path):
                    reported = watch.absolute
                else:
                    continue
                if not self._access(connection.domid, probe).can_read:
                    continue
                if not watch.path.startswith("/"):
                    reported = reported[len(connection.home()) + 1:]
                self._send_event(connection, reported, watch.token)

    def _fire_special(self, name: str) -> None:
        for connection in list(self._connections):
            for watch in connection.watches:
                if watch.absolute == name:
                    self._send_event(connection, name, watch.token)

    def _send_event(self, connection: _Connection, path: str, token: str) -> None:
        self._reply(connection, MessageType.WATCH_EVENT, 0, 0, join_strings(path, token))

    # -- message handlers ------------------------------------------------------

    def _do_debug(self, connection: _Connection, tx_id: int, payload: bytes, after: list[Callable[[], None]]) -> bytes:
        if connection.domid != 0:
            raise _RequestError("EACCES")
        arguments = self._arguments(payload)
        if arguments[0] == "print":
            log.info("simulated xenstored: %s", " ".join(arguments[1:]))
            return OK
        if arguments[0] == "check":
            return OK
        raise _RequestError("EINVAL")

    def _do_read(self, connection: _Connection, tx_id: int, payload: bytes, after: list[Callable[[], None]]) -> bytes:
        return self._existing(connection, tx_id, payload, write=False)[1].value

    def _do_directory(self, connection: _Connection, tx_id: int, payload: bytes, after: list[Callable[[], None]]) -> bytes:
        node = self._existing(connection, tx_id, payload, write=False)[1]
        listing = join_strings(*node.children) if node.children else b""
        if len(listing) > PAYLOAD_MAX:
            raise _RequestError("E2BIG")
        return listing

    def _do_directory_part(self, connection: _Connection, tx_id: int, payload: bytes, after: list[Callable[[], None]]) -> bytes:
        path, offset_text = self._arguments(payload, 2)
        if not offset_text.isascii() or not offset_text.isdigit():
            raise _RequestError("EINVAL")
        node = self._existing(connection, tx_id, join_strings(path), write=False)[1]
        listing = join_strings(*node.children) if node.children else b""
        offset = int(offset_text)
        if offset > len(listing) or (offset and listing[offset - 1] != 0):
            raise _RequestError("EINVAL")
        head = join_strings(str(node.generation))
        room = PAYLOAD_MAX - len(head) - 1
        end = offset
        while end < len(listing):
            next_end = listing.index(b"\0", end) + 1
            if next_end - offset > room:
                break
            end = next_end
        if end == offset and end < len(listing):
            raise _RequestError("E2BIG")
        return head + listing[offset:end] + (b"\0" if end == len(listing) else b"")

    def _do_get_perms(self, connection: _Connection, tx_id: int, payload: bytes, after: list[Callable[[], None]]) -> bytes:
        node = self._existing(connection, tx_id, payload, write=False)[1]
        return join_strings(*(str(perm) for perm in node.perms))

    def _do_write(self, connection: _Connection, tx_id: int, payload: bytes, after: list[Callable[[], None]]) -> bytes:
        if b"\0" not in payload:
            raise _RequestError("EINVAL")
        raw_path, value = payload.split(b"\0", 1)
        nodes, tx = self._view(connection, tx_id)
        path = self._absolute(connection, self._arguments(raw_path + b"\0", 1)[0])
        node = self._get(nodes, tx, path)
        if node is None:
            node = self._create(connection, nodes, tx, path)
        else:
            self._require(connection.domid, node, write=True)
        node.value = value
        self._modified(nodes, tx, path)
        self._changed(tx, after, path, node, removed=False)
        return OK

    def _do_mkdir(self, connection: _Connection, tx_id: int, payload: bytes, after: list[Callable[[], None]]) -> bytes:
        nodes, tx = self._view(connection, tx_id)
        path = self._absolute(connection, self._arguments(payload, 1)[0])
        if self._get(nodes, tx, path) is None:
            node = self._create(connection, nodes, tx, path)
            self._changed(tx, after, path, node, removed=False)
        return OK

    def _do_rm(self, connection: _Connection, tx_id: int, payload: bytes, after: list[Callable[[], None]]) -> bytes:
        nodes, tx = self._view(connection, tx_id)
        path = self._absolute(connection, self._arguments(payload, 1)[0])
        if path == "/":
            raise _RequestError("EINVAL")
        node = self._get(nodes, tx, path)
        if node is None:
            if self._get(nodes, tx, _parent(path)) is None:
                raise _RequestError("ENOENT")
            return OK
        self._require(connection.domid, node, write=True)
        doomed = [path]
        for doomed_path in doomed:
            doomed += [f"{doomed_path}/{child}" for child in nodes[doomed_path].children]
        for doomed_path in doomed:
            self._get(nodes, tx, doomed_path)
            del nodes[doomed_path]
            if tx is not None:
                tx.changed[doomed_path] = None
        parent_path = _parent(path)
        self._get(nodes, tx, parent_path)
        nodes[parent_path].children.remove(path.rsplit("/", 1)[1])
        self._modified(nodes, tx, parent_path)
        self._changed(tx, after, path, node, removed=True)
        return OK

    def _do_set_perms(self, connection: _Connection, tx_id: int, payload: bytes, after: list[Callable[[], None]]) -> bytes:
        arguments = self._arguments(payload)
        if len(arguments) < 2:
            raise _RequestError("EINVAL")
        try:
            perms = [Permission.parse(text) for text in arguments[1:]]
        except ValueError:
            raise _RequestError("EINVAL") from None
        nodes, tx = self._view(connection, tx_id)
        path, node = self._existing(connection, tx_id, join_strings(arguments[0]), write=True)
        if connection.domid != 0:
            if node.perms[0].domid not in (connection.domid, self.targets.get(connection.domid)):
                raise _RequestError("EACCES")
            if perms[0].domid != node.perms[0].domid:
                raise _RequestError("EPERM")
        node.perms = perms
        self._modified(nodes, tx, path)
        self._changed(tx, after, path, node, removed=False)
        return OK

    def _do_watch(self, connection: _Connection, tx_id: int, payload: bytes, after: list[Callable[[], None]]) -> bytes:
        path, token = self._arguments(payload, 2)
        if path.startswith("@"):
            if path not in SPECIAL_WATCHES:
                raise _RequestError("EINVAL")
            absolute = path
        else:
            absolute = self._absolute(connection, path)
        if any(watch.path == path and watch.token == token for watch in connection.watches):
            raise _RequestError("EEXIST")
        connection.watches.append(_Watch(path, token, absolute))
        after.append(lambda: self._send_event(connection, path, token))
        return OK

    def _do_unwatch(self, connection: _Connection, tx_id: int, payload: bytes, after: list[Callable[[], None]]) -> bytes:
        path, token = self._arguments(payload, 2)
        for watch in connection.watches:
            if watch.path == path and watch.token == token:
                connection.watches.remove(watch)
                return OK
        raise _RequestError("ENOENT")

    def _do_reset_watches(self, connection: _Connection, tx_id: int, payload: bytes, after: list[Callable[[], None]]) -> bytes:
        connection.watches.clear()
        connection.transactions.clear()
        return OK

    def _do_transaction_start(self, connection: _Connection, tx_id: int, payload: bytes, after: list[Callable[[], None]]) -> bytes:
        if tx_id != 0:
            raise _RequestError("EBUSY")
        self._arguments(payload, 1)
        new_id = next(connection.tx_ids)
        connection.transactions[new_id] = _Transaction(new_id, {path: node.copy() for path, node in self.nodes.items()})
        return join_strings(str(new_id))

    def _do_transaction_end(self, connection: _Connection, tx_id: int, payload: bytes, after: list[Callable[[], None]]) -> bytes:
        (verdict,) = self._arguments(payload, 1)
        if verdict not in ("T", "F"):
            raise _RequestError("EINVAL")
        transaction = connection.transactions.pop(tx_id, None)
        if transaction is None:
            raise _RequestError("ENOENT")
        if verdict == "F":
            return OK
        for path, generation in transaction.seen.items():
            live = self.nodes.get(path)
            if (None if live is None else live.generation) != generation:
                log.debug("simulated xenstored: dom%d transaction %d conflicts on %s", connection.domid, tx_id, path)
                raise _RequestError("EAGAIN")
        for path in transaction.changed:
            node = transaction.nodes.get(path)
            if node is None:
                self.nodes.pop(path, None)
            else:
                node.generation = self._bump()
                self.nodes[path] = node
        for path, perms, removed in transaction.events:
            after.append(lambda path=path, perms=perms, removed=removed: self._fire(path, perms, removed))
        return OK

    def _privileged(self, connection: _Connection) -> None:
        if connection.domid != 0:
            raise _RequestError("EACCES")

    def _do_introduce(self, connection: _Connection, tx_id: int, payload: bytes, after: list[Callable[[], None]]) -> bytes:
        self._privileged(connection)
        domid_text, mfn_text, port_text = self._arguments(payload, 3)
        if not all(text.isascii() and text.isdigit() for text in (mfn_text, port_text)):
            raise _RequestError("EINVAL")
        domid = _domid(domid_text)
        if domid == 0:
            raise _RequestError("EINVAL")
        self.introduced[domid] = (int(mfn_text), int(port_text))
        after.append(lambda: self._fire_special("@introduceDomain"))
        return OK

    def _do_release(self, connection: _Connection, tx_id: int, payload: bytes, after: list[Callable[[], None]]) -> bytes:
        self._privileged(connection)
        domid = _domid(self._arguments(payload, 1)[0])
        if self.introduced.pop(domid, None) is None:
            raise _RequestError("ENOENT")
        self.targets.pop(domid, None)
        after.append(lambda: self._fire_special("@releaseDomain"))
        return OK

    def _do_resume(self, connection: _Connection, tx_id: int, payload: bytes, after: list[Callable[[], None]]) -> bytes:
        self._privileged(connection)
        if _domid(self._arguments(payload, 1)[0]) not in self.introduced:
            raise _RequestError("ENOENT")
        return OK

    def _do_is_domain_introduced(self, connection: _Connection, tx_id: int, payload: bytes, after: list[Callable[[], None]]) -> bytes:
        domid = _domid(self._arguments(payload, 1)[0])
        return join_strings("T" if domid == 0 or domid in self.introduced else "F")

    def _do_set_target(self, connection: _Connection, tx_id: int, payload: bytes, after: list[Callable[[], None]]) -> bytes:
        self._privileged(connection)
        domid_text, target_text = self._arguments(payload, 2)
        domid, target = _domid(domid_text), _domid(target_text)
        if domid not in self.introduced:
            raise _RequestError("ENOENT")
        self.targets[domid] = target
        return OK

    def _do_get_domain_path(self, connection: _Connection, tx_id: int, payload: bytes, after: list[Callable[[], None]]) -> bytes:
        return join_strings(f"/local/domain/{_domid(self._arguments(payload, 1)[0])}")
