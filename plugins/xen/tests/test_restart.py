"""Backend restart on the SIMULATED Xen host: a new daemon picks each device up from xenstore and the rings.

The frontends never leave Connected and never reconnect: the daemon stops (as
SIGTERM does, or as a crash would), frames and console output keep being
posted, a fresh daemon with the same configuration starts, and everything
posted meanwhile is served.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

import pytest
from helpers import run
from pvcore_xen.netif import NETIF_RSP_OKAY
from pvcore_xen.ring import REQ_PROD
from pvcore_xen.testing.frontend import SimulatedConsoleFrontend
from pvcore_xen.testing.netfront import SimulatedNetFrontend
from pvcore_xen.testing.xenstored import SimulatedXenstored
from pvcore_xen.xenbus import XenbusState
from test_netif import MAC1, MAC2, ethernet, nics
from world import device, start_daemon, stop_daemon, xen_world

BROADCAST = b"\xff" * 6


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
    """ERROR lines of the xen plugin."""
    return [r.getMessage() for r in caplog.records if r.name == "pvcore.xen" and r.levelno >= logging.ERROR]


async def wait_for(predicate, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def netfront(world, domid: int) -> SimulatedNetFrontend:  # type: ignore[no-untyped-def]
    """Guest ``domid``'s netfront, connected, with receive buffers posted."""
    front = SimulatedNetFrontend(world.host.domains[domid], world.clients[domid], devid=0)
    await front.connect()
    front.post_rx(8)
    return front


async def still_serving(front: SimulatedNetFrontend) -> None:
    """``front`` can transmit."""
    front.send(ethernet(BROADCAST, front_mac(front), b"still here"), first_id=50)
    assert await front.wait_tx(1) == [(50, NETIF_RSP_OKAY)]


def front_mac(front: SimulatedNetFrontend) -> bytes:
    return MAC1 if front.domain.domid == 1 else MAC2


@pytest.mark.parametrize("crash", [False, True], ids=["sigterm", "crash"])
def test_restart_picks_up_net_and_console_without_the_frontend(tmp_path, monkeypatch, crash):
    log_file = tmp_path / "dom2.log"
    configs = [*nics(f"xen-{uuid.uuid4().hex[:8]}"), device("console", "dom2-con", "2/0", log=str(log_file))]

    async def body() -> None:
        async with xen_world(tmp_path, configs) as world:
            one, two = await netfront(world, 1), await netfront(world, 2)
            console = SimulatedConsoleFrontend(world.host.domains[2], world.clients[2], devid=0)
            await console.connect()
            before = ethernet(MAC2, MAC1, b"before")
            one.send(before)
            assert await two.receive() == before
            await console.write(b"before the restart\n")
            writes = state_writes(monkeypatch)

            await stop_daemon(world, crash=crash)
            one.send(ethernet(MAC2, MAC1, b"posted while no backend ran"), first_id=1)  # waits in the tx ring
            await console.write(b"while no backend ran\n")
            await start_daemon(world, configs)

            assert await one.wait_tx(2) == [(0, NETIF_RSP_OKAY), (1, NETIF_RSP_OKAY)]  # taken by the new backend
            await wait_for(lambda: all(world.served(name)[1].connected for name in ("dom1-nic", "dom2-nic")))
            after = ethernet(MAC2, MAC1, b"after the restart")
            one.send(after, first_id=2)
            assert await two.receive() == after  # into a buffer posted before the restart
            two.send(ethernet(MAC1, MAC2, b"after"))
            assert await one.receive() == ethernet(MAC1, MAC2, b"after")
            await console.write(b"after\n")
            for name in ("dom1-nic", "dom2-nic", "dom2-con"):
                _, door = world.served(name)
                assert door.resumed and door.connected and door.state == XenbusState.CONNECTED
            for front in (one, two, console):
                assert await front.backend_state() == XenbusState.CONNECTED
                assert await front.client.read(f"{front.path}/state") == b"4"
            assert writes == []  # neither side's state moved: no reconnect
            await one.close()
            await one.set_state(XenbusState.INITIALISING)
            await still_serving(await netfront(world, 1))  # the ordinary handshake still works afterwards

    run(body)
    assert log_file.read_bytes() == b"before the restart\nwhile no backend ran\nafter\n"


@pytest.mark.parametrize(
    "node, value, reason",
    [
        ("tx-ring-ref", "garbage!", "tx-ring-ref = 'garbage!' is not a number"),
        ("rx-ring-ref", "30583", "grant ref 30583 cannot be mapped"),
        ("event-channel", "999", "event channel 999"),
    ],
)
def test_ring_refs_changed_while_stopped_fail_that_device_only(tmp_path, caplog, node, value, reason):
    configs = [*nics(f"xen-{uuid.uuid4().hex[:8]}"), device("console", "dom1-con", "1/0")]

    async def body() -> None:
        async with xen_world(tmp_path, configs) as world:
            bad, good = await netfront(world, 1), await netfront(world, 2)
            console = SimulatedConsoleFrontend(world.host.domains[1], world.clients[1], devid=0)
            await console.connect()
            await stop_daemon(world)
            await bad.client.write(f"{bad.path}/{node}", value)
            await start_daemon(world, configs)
            assert await bad.wait_backend(XenbusState.CLOSING) == XenbusState.CLOSING
            _, door = world.served("dom1-nic")
            assert not door.connected and reason in door.failure
            await still_serving(good)
            await console.write(b"still here\n")
            assert world.served("dom1-con")[1].state == XenbusState.CONNECTED

    run(body)
    lines = failures(caplog)
    assert len(lines) == 1 and reason in lines[0] and "dom1-nic" in lines[0], lines


def test_console_ring_ref_changed_while_stopped(tmp_path, caplog):
    configs = [device("console", "dom1-con", "1/0"), *nics(f"xen-{uuid.uuid4().hex[:8]}")]

    async def body() -> None:
        async with xen_world(tmp_path, configs) as world:
            console = SimulatedConsoleFrontend(world.host.domains[1], world.clients[1], devid=0)
            await console.connect()
            nic = await netfront(world, 1)
            await stop_daemon(world, crash=True)
            await console.client.write(f"{console.path}/ring-ref", "4294967296")
            await start_daemon(world, configs)
            assert await console.wait_backend(XenbusState.CLOSING) == XenbusState.CLOSING
            await still_serving(nic)

    run(body)
    lines = failures(caplog)
    assert len(lines) == 1 and "ring-ref" in lines[0] and "dom1-con" in lines[0], lines


def test_request_producer_beyond_the_ring_fails_the_pick_up(tmp_path, caplog):
    """A netfront whose tx producer ran more than a ring ahead of the responses cannot be picked up."""
    configs = nics(f"xen-{uuid.uuid4().hex[:8]}")

    async def body() -> None:
        async with xen_world(tmp_path, configs) as world:
            bad, good = await netfront(world, 1), await netfront(world, 2)
            await stop_daemon(world)
            bad.tx.put(REQ_PROD, 1000)
            await start_daemon(world, configs)
            assert await bad.wait_backend(XenbusState.CLOSING) == XenbusState.CLOSING
            await still_serving(good)

    run(body)
    xen = failures(caplog)
    assert len(xen) == 1 and "dom1-nic" in xen[0] and "is more than 256 ahead" in xen[0], caplog.text


def test_a_failed_device_stays_failed_across_a_restart(tmp_path):
    """Closing left by the previous backend is kept: its rings are not trusted until the frontend starts over."""
    configs = nics(f"xen-{uuid.uuid4().hex[:8]}")[:1]

    async def body() -> None:
        async with xen_world(tmp_path, configs) as world:
            front = SimulatedNetFrontend(world.host.domains[1], world.clients[1], devid=0)
            await front.set_state(XenbusState.CONNECTED)  # without its nodes: fails
            assert await front.wait_backend(XenbusState.CLOSING) == XenbusState.CLOSING
            await stop_daemon(world)
            await start_daemon(world, configs)
            _, door = world.served("dom1-nic")
            await wait_for(lambda: door.state == XenbusState.CLOSING)
            assert not door.connected and not door.resumed
            await front.set_state(XenbusState.CLOSED)
            await front.wait_backend(XenbusState.CLOSED)
            await front.set_state(XenbusState.INITIALISING)
            await still_serving(await netfront(world, 1))

    run(body)


def test_a_frontend_that_closed_while_no_backend_ran_is_answered(tmp_path, monkeypatch):
    """The new backend adopts Connected and follows the handshake: Closing, Closed, then a fresh connection."""
    configs = nics(f"xen-{uuid.uuid4().hex[:8]}")[:1]

    async def body() -> None:
        async with xen_world(tmp_path, configs) as world:
            front = await netfront(world, 1)
            await stop_daemon(world, crash=True)
            writes = state_writes(monkeypatch)
            await front.set_state(XenbusState.CLOSING)
            await start_daemon(world, configs)
            assert await front.wait_backend(XenbusState.CLOSING) == XenbusState.CLOSING
            await front.set_state(XenbusState.CLOSED)
            await front.wait_backend(XenbusState.CLOSED)
            _, door = world.served("dom1-nic")
            assert not door.resumed and not door.connected
            backend = [value for path, value in writes if path.startswith("/local/domain/0/")]
            assert backend == ["5", "6"], writes
            await front.set_state(XenbusState.INITIALISING)
            await still_serving(await netfront(world, 1))

    run(body)
