"""The xenstore client against the SIMULATED xenstored: every message type, watches, transactions."""

from __future__ import annotations

import asyncio
import socket

import pytest

from helpers import run, simulated_store
from pvcore_xen.testing.xenstored import SimulatedXenstored
from pvcore_xen.xenstore import Transaction, XenstoreClient
from pvcore_xen.xs_wire import Access, MessageType, Permission, XenstoreError


def test_node_operations_round_trip(tmp_path):
    async def body():
        async with simulated_store(tmp_path, 0) as (store, clients):
            dom0 = clients[0]
            await dom0.write("/local/domain/1/name", "guest1")
            assert await dom0.read("/local/domain/1/name") == b"guest1"
            await dom0.write("/bin", b"\x00\x01\xff")
            assert await dom0.read("/bin") == b"\x00\x01\xff"
            await dom0.mkdir("/local/domain/1/device")
            await dom0.mkdir("/local/domain/1/device")
            assert await dom0.read("/local/domain/1/device") == b""
            assert await dom0.directory("/local/domain/1") == ["name", "device"]
            assert await dom0.directory("/local/domain/1/device") == []
            assert await dom0.exists("/local/domain/1/name")
            assert not await dom0.exists("/local/domain/9")
            await dom0.rm("/local/domain/1")
            assert await dom0.directory("/local/domain") == []
            assert store.read_value("/local/domain/1/name") is None
            await dom0.rm("/local/domain/7")
            with pytest.raises(XenstoreError) as missing_parent:
                await dom0.rm("/no/such")
            assert missing_parent.value.name == "ENOENT"

    run(body)


def test_errors_come_back_as_errno_names(tmp_path):
    async def body():
        async with simulated_store(tmp_path, 0) as (_store, clients):
            dom0 = clients[0]
            with pytest.raises(XenstoreError) as missing:
                await dom0.read("/missing")
            assert missing.value.name == "ENOENT"
            assert isinstance(missing.value, OSError)
            with pytest.raises(XenstoreError) as root:
                await dom0.rm("/")
            assert root.value.name == "EINVAL"
            for not_a_request in (MessageType.WATCH_EVENT, MessageType.ERROR, 99):
                with pytest.raises(XenstoreError) as invalid:
                    await dom0.request(not_a_request, b"/x\0", f"type {not_a_request}")
                assert invalid.value.name == "EINVAL"
            with pytest.raises(XenstoreError) as unknown_tx:
                await dom0.request(MessageType.READ, b"/\0", "READ in a made-up transaction", tx_id=77)
            assert unknown_tx.value.name == "ENOENT"
            with pytest.raises(ValueError):
                await dom0.read("/bad path")
            with pytest.raises(ValueError):
                await dom0.write("/trailing/", "x")

    run(body)


def test_permissions_between_domains(tmp_path):
    async def body():
        async with simulated_store(tmp_path, 0, 1, 2) as (store, clients):
            dom0, dom1, dom2 = clients[0], clients[1], clients[2]
            await dom0.mkdir("/local/domain/1")
            await dom0.set_perms("/local/domain/1", [Permission(1, Access.NONE)])
            assert await dom0.get_perms("/local/domain/1") == [Permission(1, Access.NONE)]
            await dom1.write("device/vbd/51712/state", "1")
            assert store.read_value("/local/domain/1/device/vbd/51712/state") == b"1"
            assert (await dom0.get_perms("/local/domain/1/device/vbd"))[0].domid == 1
            with pytest.raises(XenstoreError) as denied:
                await dom2.read("/local/domain/1/device/vbd/51712/state")
            assert denied.value.name == "EACCES"
            await dom1.set_perms("device", [Permission(1, Access.NONE), Permission(2, Access.READ)])
            assert await dom2.read("/local/domain/1/device") == b""
            with pytest.raises(XenstoreError) as read_only:
                await dom2.write("/local/domain/1/device/x", "1")
            assert read_only.value.name == "EACCES"
            with pytest.raises(XenstoreError) as give_away:
                await dom1.set_perms("device", [Permission(2, Access.BOTH)])
            assert give_away.value.name == "EPERM"
            await dom0.write("/secret", "s")
            with pytest.raises(XenstoreError) as root_owned:
                await dom1.read("/secret")
            assert root_owned.value.name == "EACCES"
            with pytest.raises(XenstoreError) as unprivileged:
                await dom1.introduce(3, 1, 1)
            assert unprivileged.value.name == "EACCES"

    run(body)


def test_watches_fire_at_and_below_the_watched_path(tmp_path):
    async def body():
        async with simulated_store(tmp_path, 0, 1) as (_store, clients):
            dom0, dom1 = clients[0], clients[1]
            watch = await dom0.watch("/backend/vbd")
            assert (await watch.get()).path == "/backend/vbd"
            await dom0.write("/backend/vbd/1/51712/state", "2")
            assert (await watch.get()).path == "/backend/vbd/1/51712/state"
            await dom0.write("/backend/vbdx", "not below")
            await dom0.write("/backend/vbd", "at")
            event = await watch.get()
            assert event.path == "/backend/vbd"
            assert event.token == watch.token
            await dom0.rm("/backend/vbd/1")
            assert (await watch.get()).path == "/backend/vbd/1"
            assert watch.events.empty()

            await dom0.write("/a/b/c/d", "1")
            inner = await dom0.watch("/a/b/c")
            await inner.get()
            await dom0.rm("/a")
            assert (await inner.get()).path == "/a/b/c"

            seen = []
            callback_watch = await dom0.watch("/cb", callback=seen.append)
            await dom0.write("/cb/x", "1")
            await dom0.read("/cb/x")
            assert [event.path for event in seen] == ["/cb", "/cb/x"]
            await dom0.unwatch(callback_watch)
            await dom0.write("/cb/y", "1")
            await dom0.read("/cb/y")
            assert len(seen) == 2

            await dom0.mkdir("/local/domain/1")
            await dom0.set_perms("/local/domain/1", [Permission(1, Access.NONE)])
            relative = await dom1.watch("device")
            assert (await relative.get()).path == "device"
            await dom0.write("/local/domain/1/device/console/0/ring-ref", "8")
            assert (await relative.get()).path == "device/console/0/ring-ref"
            hidden = await dom1.watch("/private")
            await hidden.get()
            await dom0.write("/private/x", "1")
            await dom0.read("/private/x")
            assert hidden.events.empty(), "a watch must not report a node its domain cannot read"

            await dom0.reset_watches()
            await dom0.write("/backend/vbd/2", "x")
            await dom0.read("/backend/vbd/2")
            assert watch.events.empty()

    run(body)


def test_domain_messages(tmp_path):
    async def body():
        async with simulated_store(tmp_path, 0) as (store, clients):
            dom0 = clients[0]
            assert await dom0.get_domain_path(5) == "/local/domain/5"
            introduced = await dom0.watch("@introduceDomain")
            released = await dom0.watch("@releaseDomain")
            assert (await introduced.get()).path == "@introduceDomain"
            assert (await released.get()).path == "@releaseDomain"
            assert not await dom0.is_domain_introduced(5)
            await dom0.introduce(5, 0xFEFFF, 3)
            assert (await introduced.get()).path == "@introduceDomain"
            assert await dom0.is_domain_introduced(5)
            assert await dom0.is_domain_introduced(0)
            assert store.introduced[5] == (0xFEFFF, 3)
            await dom0.resume(5)
            await dom0.set_target(5, 6)
            assert store.targets[5] == 6
            await dom0.release(5)
            assert (await released.get()).path == "@releaseDomain"
            with pytest.raises(XenstoreError) as gone:
                await dom0.resume(5)
            assert gone.value.name == "ENOENT"
            with pytest.raises(XenstoreError) as not_introduced:
                await dom0.release(5)
            assert not_introduced.value.name == "ENOENT"
            assert await dom0.debug("print", "hello from a test") == b"OK\0"
            with pytest.raises(XenstoreError):
                await dom0.debug("no-such-command")
            with pytest.raises(XenstoreError) as special:
                await dom0.watch("@notAWatch")
            assert special.value.name == "EINVAL"

    run(body)


def test_transaction_is_isolated_until_commit(tmp_path):
    async def body():
        async with simulated_store(tmp_path, 0) as (store, clients):
            dom0 = clients[0]
            watch = await dom0.watch("/tx")
            await watch.get()
            tx = await dom0.start_transaction()
            await tx.write("/tx/a", "1")
            await tx.mkdir("/tx/dir")
            await tx.set_perms("/tx/a", [Permission(0, Access.READ)])
            assert await tx.read("/tx/a") == b"1"
            assert await tx.directory("/tx") == ["a", "dir"]
            assert await tx.get_perms("/tx/a") == [Permission(0, Access.READ)]
            assert store.read_value("/tx/a") is None
            assert watch.events.empty()
            await tx.commit()
            assert store.read_value("/tx/a") == b"1"
            assert (await watch.get()).path == "/tx/a"

            aborted = await dom0.start_transaction()
            await aborted.rm("/tx")
            await aborted.abort()
            assert await dom0.read("/tx/a") == b"1"
            with pytest.raises(XenstoreError) as ended:
                await aborted.commit()
            assert ended.value.name == "ENOENT"
            with pytest.raises(XenstoreError) as nested:
                await dom0.request(MessageType.TRANSACTION_START, b"\0", "nested", tx_id=tx.tx_id)
            assert nested.value.name == "EBUSY"

    run(body)


def test_conflicting_transaction_gets_eagain_and_the_helper_retries(tmp_path):
    async def body():
        async with simulated_store(tmp_path, 0, 1) as (store, clients):
            dom0, other = clients[0], clients[1]
            await dom0.write("/counter", "0")
            await dom0.set_perms("/counter", [Permission(0, Access.BOTH)])

            tx = await dom0.start_transaction()
            value = int(await tx.read("/counter"))
            await other.write("/counter", "10")
            await tx.write("/counter", str(value + 1))
            with pytest.raises(XenstoreError) as conflict:
                await tx.commit()
            assert conflict.value.name == "EAGAIN"
            assert store.read_value("/counter") == b"10"

            attempts = 0

            async def increment(tx: Transaction) -> int:
                nonlocal attempts
                attempts += 1
                current = int(await tx.read("/counter"))
                if attempts == 1:
                    await other.write("/counter", "100")
                await tx.write("/counter", str(current + 1))
                return current + 1

            assert await dom0.transaction(increment) == 101
            assert attempts == 2
            assert store.read_value("/counter") == b"101"

            async def always_conflicts(tx: Transaction) -> None:
                await tx.read("/counter")
                await other.write("/counter", "x")

            with pytest.raises(XenstoreError) as gave_up:
                await dom0.transaction(always_conflicts, attempts=3)
            assert gave_up.value.name == "EAGAIN"

            async def fails(tx: Transaction) -> None:
                await tx.write("/counter", "never")
                raise RuntimeError("body failed")

            with pytest.raises(RuntimeError):
                await dom0.transaction(fails)
            assert store.read_value("/counter") == b"x"

    run(body)


def test_large_directory_is_read_in_parts(tmp_path):
    async def body():
        async with simulated_store(tmp_path, 0) as (_store, clients):
            dom0 = clients[0]
            names = [f"child-with-a-long-name-{index:04d}" for index in range(200)]
            for name in names:
                await dom0.mkdir(f"/big/{name}")
            with pytest.raises(XenstoreError) as too_big:
                await dom0.request(MessageType.DIRECTORY, b"/big\0", "DIRECTORY /big")
            assert too_big.value.name == "E2BIG"
            assert await dom0.directory("/big") == names

    run(body)


def test_every_message_type_is_served():
    """Each request type of xs_wire.h has a handler in the simulation (replies-only types excepted)."""
    requests = set(MessageType) - {MessageType.WATCH_EVENT, MessageType.ERROR}
    assert set(SimulatedXenstored()._handlers()) == requests


def test_client_over_a_device_descriptor(tmp_path):
    """The /dev/xen/xenbus path of the client (a plain descriptor) against the simulation."""

    async def body():
        store = SimulatedXenstored()
        socket_path = tmp_path / "xs.sock"
        await store.listen(socket_path)
        raw = socket.socket(socket.AF_UNIX)
        raw.connect(str(socket_path))
        client = await XenstoreClient.open_fd(raw.detach(), "descriptor", timeout=2.0)
        try:
            await client.write("/over/fd", "yes")
            assert await client.read("/over/fd") == b"yes"
        finally:
            await client.close()
            await store.close()

    run(body)


def test_connect_explains_a_missing_xenstore(tmp_path, monkeypatch):
    monkeypatch.setenv("XENSTORED_PATH", str(tmp_path / "absent.sock"))

    async def body():
        with pytest.raises(FileNotFoundError, match="XENSTORED_PATH"):
            await XenstoreClient.connect()

    run(body)


def test_concurrent_requests_are_matched_by_request_id(tmp_path):
    async def body():
        async with simulated_store(tmp_path, 0) as (_store, clients):
            dom0 = clients[0]
            await asyncio.gather(*(dom0.write(f"/many/{index}", str(index)) for index in range(50)))
            values = await asyncio.gather(*(dom0.read(f"/many/{index}") for index in range(50)))
            assert values == [str(index).encode() for index in range(50)]

    run(body)
