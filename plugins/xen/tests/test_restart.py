"""Backend restart on the SIMULATED Xen host: a new daemon picks each device up from xenstore and the rings.

The frontends never leave Connected and never reconnect: the daemon stops (as
SIGTERM does, or as a crash would), requests keep being posted, a fresh daemon
with the same configuration starts, and every request completes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

import pytest
from helpers import run
from pvcore_xen.grants import grant_address
from pvcore_xen.testing.frontend import SimulatedConsoleFrontend, SimulatedVirtioFrontend
from pvcore_xen.testing.xenstored import SimulatedXenstored
from pvcore_xen.xenbus import XenbusState
from world import device, start_daemon, stop_daemon, xen_world

from pvcore.devices.block.virtio_blk import REQUEST_HEADER, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT

SECTOR = 512
OK = bytes([VIRTIO_BLK_S_OK])


def state_writes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Record every write to a ``state`` node of the simulated xenstored: (path, value)."""
    written: list[tuple[str, str]] = []
    write = SimulatedXenstored._do_write

    def recording(self, connection, tx_id, payload, after):  # type: ignore[no-untyped-def]
        path, _, value = payload.partition(b"\0")
        if path.endswith(b"/state"):
            written.append((path.decode(), value.decode()))
        return write(self, connection, tx_id, payload, after)

    monkeypatch.setattr(SimulatedXenstored, "_do_write", recording)
    return written


def failures(caplog: pytest.LogCaptureFixture) -> list[str]:
    """ERROR lines of the xen plugin and the ring engine."""
    return [r.getMessage() for r in caplog.records if r.name in ("pvcore.xen", "pvcore.ring") and r.levelno >= logging.ERROR]


def write_request(sector: int, data: bytes) -> tuple[list[bytes], list[int]]:
    return [REQUEST_HEADER.pack(VIRTIO_BLK_T_OUT, 0, sector), data], [1]


def read_request(sector: int, length: int) -> tuple[list[bytes], list[int]]:
    return [REQUEST_HEADER.pack(VIRTIO_BLK_T_IN, 0, sector)], [length, 1]


async def wait_for(predicate, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("crash", [False, True], ids=["sigterm", "crash"])
def test_restart_picks_up_block_and_console_without_the_frontend(tmp_path, monkeypatch, crash):
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(64 * SECTOR))
    log_file = tmp_path / "dom2.log"
    configs = [
        device("block", "dom1-disk", "1/0", path=str(image)),
        device("console", "dom2-con", "2/0", log=str(log_file)),
    ]
    before, stopped, during = os.urandom(4 * SECTOR), os.urandom(4 * SECTOR), os.urandom(4 * SECTOR)

    async def body() -> None:
        async with xen_world(tmp_path, configs) as world:
            disk = SimulatedVirtioFrontend(world.host.domains[1], world.clients[1], devid=0)
            console = SimulatedConsoleFrontend(world.host.domains[2], world.clients[2], devid=0)
            await disk.connect()
            await console.connect()
            assert (await disk.request(0, *write_request(0, before))).data == OK
            await console.write(b"before the restart\n")
            writes = state_writes(monkeypatch)

            if crash:  # the old daemon took these two and died before finishing them
                _, door = world.served("dom1-disk")
                taken = []
                door.device.handle = lambda queue, chain: taken.append(chain)
            heads = [disk.submit(0, *write_request(8, stopped)), disk.submit(0, *read_request(0, len(before)))]
            if crash:
                await wait_for(lambda: len(taken) == 2)
            await stop_daemon(world, crash=crash)

            heads.append(disk.submit(0, *write_request(16, during)))  # posted while no backend runs
            heads.append(disk.submit(0, *read_request(8, len(stopped))))
            await console.write(b"while no backend ran\n")
            await start_daemon(world, configs)

            used = {u.head: u for u in await disk.wait_used(0, len(heads))}
            assert sorted(used) == sorted(heads)
            assert used[heads[0]].data == OK and used[heads[2]].data == OK
            assert used[heads[1]].data == before + OK
            assert used[heads[3]].data == stopped + OK
            assert (await disk.request(0, *read_request(16, len(during)))).data == during + OK
            await console.write(b"after\n")
            for name in ("dom1-disk", "dom2-con"):
                _, door = world.served(name)
                assert door.resumed and door.connected and door.state == XenbusState.CONNECTED
            assert await disk.backend_state() == XenbusState.CONNECTED
            assert await console.backend_state() == XenbusState.CONNECTED
            for front in (disk, console):
                assert await front.client.read(f"{front.path}/state") == b"4"
            assert writes == []  # neither side's state moved: no reconnect
            await start_over(world, disk)

    run(body)
    data = image.read_bytes()
    assert data[0 : 4 * SECTOR] == before and data[8 * SECTOR : 12 * SECTOR] == stopped
    assert data[16 * SECTOR : 20 * SECTOR] == during
    assert log_file.read_bytes() == b"before the restart\nwhile no backend ran\nafter\n"


async def start_over(world, disk: SimulatedVirtioFrontend) -> None:  # type: ignore[no-untyped-def]
    """After a pick-up the ordinary handshake still works: the frontend closes and connects afresh."""
    await disk.close()
    await disk.set_state(XenbusState.INITIALISING)
    again = SimulatedVirtioFrontend(world.host.domains[1], world.clients[1], devid=0)
    await again.connect()
    assert (await again.request(0, *read_request(0, SECTOR))).written == SECTOR + 1


def test_rng_keeps_serving_across_restarts(tmp_path):
    configs = [device("rng", "dom1-rng", "1/0")]

    async def body() -> None:
        async with xen_world(tmp_path, configs) as world:
            front = SimulatedVirtioFrontend(world.host.domains[1], world.clients[1], devid=0)
            await front.connect()
            for _ in range(3):
                assert (await front.request(0, [], [64])).written == 64
                await stop_daemon(world)
                front.submit(0, [], [64])
                await start_daemon(world, configs)
                (used,) = await front.wait_used(0, 1)
                assert used.written == 64

    run(body)


@pytest.mark.parametrize(
    "node, value, reason",
    [
        ("queue-0/desc", "garbage!", "queue-0/desc = 'garbage!' is not a number"),
        ("queue-0/used", f"{grant_address(0x7777):x}", "grant ref 30583 cannot be mapped"),
        ("queue-0/event-channel", "999", "event channel 999"),
    ],
)
def test_ring_refs_changed_while_stopped_fail_that_device_only(tmp_path, caplog, node, value, reason):
    configs = [device("rng", "dom1-rng", "1/0"), device("console", "dom1-con", "1/0"), device("rng", "dom2-rng", "2/0")]

    async def body() -> None:
        async with xen_world(tmp_path, configs) as world:
            bad = SimulatedVirtioFrontend(world.host.domains[1], world.clients[1], devid=0)
            console = SimulatedConsoleFrontend(world.host.domains[1], world.clients[1], devid=0)
            good = SimulatedVirtioFrontend(world.host.domains[2], world.clients[2], devid=0)
            for front in (bad, console, good):
                await front.connect()
            await stop_daemon(world)
            await bad.client.write(f"{bad.path}/{node}", value)
            await start_daemon(world, configs)
            assert await bad.wait_backend(XenbusState.CLOSING) == XenbusState.CLOSING
            _, door = world.served("dom1-rng")
            assert not door.connected and reason in door.failure
            assert (await good.request(0, [], [32])).written == 32
            await console.write(b"still here\n")
            assert world.served("dom1-con")[1].state == XenbusState.CONNECTED

    run(body)
    lines = failures(caplog)
    assert len(lines) == 1 and reason in lines[0] and "dom1-rng" in lines[0], lines


def test_console_ring_ref_changed_while_stopped(tmp_path, caplog):
    configs = [device("console", "dom1-con", "1/0"), device("rng", "dom1-rng", "1/0")]

    async def body() -> None:
        async with xen_world(tmp_path, configs) as world:
            console = SimulatedConsoleFrontend(world.host.domains[1], world.clients[1], devid=0)
            rng = SimulatedVirtioFrontend(world.host.domains[1], world.clients[1], devid=0)
            await console.connect()
            await rng.connect()
            await stop_daemon(world, crash=True)
            await console.client.write(f"{console.path}/ring-ref", "4294967296")
            await start_daemon(world, configs)
            assert await console.wait_backend(XenbusState.CLOSING) == XenbusState.CLOSING
            assert (await rng.request(0, [], [16])).written == 16

    run(body)
    lines = failures(caplog)
    assert len(lines) == 1 and "ring-ref" in lines[0] and "dom1-con" in lines[0], lines


def test_avail_index_beyond_the_queue_fails_the_pick_up(tmp_path, caplog):
    """A driver whose avail index ran more than a queue ahead of the used index cannot be picked up."""
    configs = [device("rng", "dom1-rng", "1/0"), device("rng", "dom2-rng", "2/0")]

    async def body() -> None:
        async with xen_world(tmp_path, configs) as world:
            bad = SimulatedVirtioFrontend(world.host.domains[1], world.clients[1], devid=0)
            good = SimulatedVirtioFrontend(world.host.domains[2], world.clients[2], devid=0)
            await bad.connect()
            await good.connect()
            await stop_daemon(world)
            bad.queues[0].set_avail_idx(1000)
            await start_daemon(world, configs)
            assert await bad.wait_backend(XenbusState.CLOSING) == XenbusState.CLOSING
            assert (await good.request(0, [], [16])).written == 16

    run(body)
    xen = [r.getMessage() for r in caplog.records if r.name == "pvcore.xen" and r.levelno >= logging.ERROR]
    assert len(xen) == 1 and "dom1-rng" in xen[0] and "avail index jumped by 1000" in xen[0], caplog.text


def test_a_failed_device_stays_failed_across_a_restart(tmp_path):
    """Closing left by the previous backend is kept: its rings are not trusted until the frontend starts over."""
    configs = [device("rng", "dom1-rng", "1/0")]

    async def body() -> None:
        async with xen_world(tmp_path, configs) as world:
            front = SimulatedVirtioFrontend(world.host.domains[1], world.clients[1], devid=0)
            await front.set_state(XenbusState.CONNECTED)  # without its nodes: fails
            assert await front.wait_backend(XenbusState.CLOSING) == XenbusState.CLOSING
            await stop_daemon(world)
            await start_daemon(world, configs)
            _, door = world.served("dom1-rng")
            await wait_for(lambda: door.state == XenbusState.CLOSING)
            assert not door.connected and not door.resumed
            await front.set_state(XenbusState.CLOSED)
            await front.wait_backend(XenbusState.CLOSED)
            await front.set_state(XenbusState.INITIALISING)
            again = SimulatedVirtioFrontend(world.host.domains[1], world.clients[1], devid=0)
            await again.connect()
            assert (await again.request(0, [], [16])).written == 16

    run(body)


def test_a_frontend_that_closed_while_no_backend_ran_is_answered(tmp_path, monkeypatch):
    """The new backend adopts Connected and follows the handshake: Closing, Closed, then a fresh connection."""
    configs = [device("rng", "dom1-rng", "1/0")]

    async def body() -> None:
        async with xen_world(tmp_path, configs) as world:
            front = SimulatedVirtioFrontend(world.host.domains[1], world.clients[1], devid=0)
            await front.connect()
            await stop_daemon(world, crash=True)
            writes = state_writes(monkeypatch)
            await front.set_state(XenbusState.CLOSING)
            await start_daemon(world, configs)
            assert await front.wait_backend(XenbusState.CLOSING) == XenbusState.CLOSING
            await front.set_state(XenbusState.CLOSED)
            await front.wait_backend(XenbusState.CLOSED)
            _, door = world.served("dom1-rng")
            assert not door.resumed and not door.connected
            backend = [value for path, value in writes if path.startswith("/local/domain/0/")]
            assert backend == ["5", "6"], writes
            await front.set_state(XenbusState.INITIALISING)
            again = SimulatedVirtioFrontend(world.host.domains[1], world.clients[1], devid=0)
            await again.connect()
            assert (await again.request(0, [], [16])).written == 16

    run(body)
