"""Hostile frontends on the SIMULATED Xen host: each fails its own device with a logged reason, never another's.

The xenbus handshake and the console ring; netif's own hostile cases are in
test_netif_hostile.py.
"""

from __future__ import annotations

import logging
import uuid

import pytest
from helpers import run
from pvcore_xen.netif import NETIF_RSP_OKAY
from pvcore_xen.testing.frontend import SimulatedConsoleFrontend
from pvcore_xen.testing.netfront import SimulatedNetFrontend
from pvcore_xen.xenbus import XenbusState
from test_netif import MAC2, ethernet, nics
from world import device, xen_world


def configs() -> list:  # type: ignore[type-arg]
    """A NIC for each guest, on a switch of this test's own."""
    return nics(f"xen-{uuid.uuid4().hex[:8]}")


def failures(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The messages of the xen plugin's device failures."""
    return [r.getMessage() for r in caplog.records if r.name == "pvcore.xen" and r.levelno == logging.ERROR]


async def healthy_neighbour(world) -> None:  # type: ignore[no-untyped-def]
    """Domain 2's NIC still transmits."""
    neighbour = SimulatedNetFrontend(world.host.domains[2], world.clients[2], devid=0)
    await neighbour.connect()
    neighbour.send(ethernet(b"\xff" * 6, MAC2, b"anyone?"))
    assert await neighbour.wait_tx(1) == [(0, NETIF_RSP_OKAY)]


async def failed_backend(front, world, name: str) -> None:  # type: ignore[no-untyped-def]
    """The backend of ``front`` went Closing and is no longer serving."""
    assert await front.wait_backend(XenbusState.CLOSING) == XenbusState.CLOSING
    _, door = world.served(name)
    assert not door.connected and door.failure


def test_state_jumps_to_connected_without_nodes(tmp_path, caplog):
    async def body() -> None:
        async with xen_world(tmp_path, configs()) as world:
            front = SimulatedNetFrontend(world.host.domains[1], world.clients[1], devid=0)
            await front.set_state(XenbusState.CONNECTED)
            await failed_backend(front, world, "dom1-nic")
            await healthy_neighbour(world)

    run(body)
    assert any("device/vif/0/request-rx-copy is not 1" in message for message in failures(caplog))


def test_failed_device_recovers_when_the_frontend_starts_over(tmp_path, caplog):
    async def body() -> None:
        async with xen_world(tmp_path, configs()) as world:
            domain = world.host.domains[1]
            front = SimulatedNetFrontend(domain, world.clients[1], devid=0)
            await front.set_state(XenbusState.CONNECTED)
            await failed_backend(front, world, "dom1-nic")
            await front.set_state(XenbusState.CLOSED)
            await front.wait_backend(XenbusState.CLOSED)
            await front.set_state(XenbusState.INITIALISING)
            again = SimulatedNetFrontend(domain, world.clients[1], devid=0)
            await again.connect()
            again.send(ethernet(b"\xff" * 6, bytes.fromhex("00163e000001"), b"back"))
            assert await again.wait_tx(1) == [(0, NETIF_RSP_OKAY)]

    run(body)


def test_bad_state_value_fails_the_device(tmp_path, caplog):
    async def body() -> None:
        async with xen_world(tmp_path, configs()) as world:
            front = SimulatedNetFrontend(world.host.domains[1], world.clients[1], devid=0)
            await front.client.write(f"{front.path}/state", "connected!")
            await failed_backend(front, world, "dom1-nic")
            await healthy_neighbour(world)

    run(body)
    assert any("is not a number" in message for message in failures(caplog))


def test_console_producer_index_too_far_ahead(tmp_path, caplog):
    async def body() -> None:
        async with xen_world(tmp_path, [device("console", "dom1-con", "1/0"), *configs()[1:]]) as world:
            front = SimulatedConsoleFrontend(world.host.domains[1], world.clients[1], devid=0)
            await front.connect()
            front.set_out_prod(0x5000)
            front.channel.signal()
            assert await front.wait_backend(XenbusState.CLOSING) == XenbusState.CLOSING
            await healthy_neighbour(world)

    run(body)
    assert any("out ring: producer 0x5000 is more than 2048 bytes ahead" in message for message in failures(caplog))


def test_console_ring_ref_not_granted(tmp_path, caplog):
    async def body() -> None:
        async with xen_world(tmp_path, [device("console", "dom1-con", "1/0")]) as world:
            front = SimulatedConsoleFrontend(world.host.domains[1], world.clients[1], devid=0)
            await front.publish(ring_ref=0x7777)
            assert await front.wait_backend(XenbusState.CLOSING, XenbusState.CONNECTED) == XenbusState.CLOSING

    run(body)
    assert any("ring-ref 30583" in message for message in failures(caplog))
