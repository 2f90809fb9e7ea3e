"""Hostile frontends on the SIMULATED Xen host: each fails its own device with a logged reason, never another's."""

from __future__ import annotations

import logging

import pytest
from helpers import run
from pvcore_xen.grants import grant_address
from pvcore_xen.host import PAGE_SIZE
from pvcore_xen.testing.frontend import SimulatedConsoleFrontend, SimulatedVirtioFrontend
from pvcore_xen.xenbus import XenbusState
from world import device, xen_world

from pvcore.ring.virtqueue import VIRTQ_DESC_F_WRITE

CONFIGS = [device("rng", "dom1-rng", "1/0"), device("rng", "dom2-rng", "2/0")]


def failures(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The messages of the xen plugin's device failures."""
    return [r.getMessage() for r in caplog.records if r.name == "pvcore.xen" and r.levelno == logging.ERROR]


async def healthy_neighbour(world) -> None:
    """Domain 2's rng still serves entropy."""
    neighbour = SimulatedVirtioFrontend(world.host.domains[2], world.clients[2], devid=0)
    await neighbour.connect()
    assert (await neighbour.request(0, [], [32])).written == 32


async def failed_backend(front: SimulatedVirtioFrontend, world, name: str) -> None:
    """The backend of ``front`` went Closing and is no longer serving."""
    assert await front.wait_backend(XenbusState.CLOSING) == XenbusState.CLOSING
    _, door = world.served(name)
    assert not door.connected and door.failure


def test_grant_ref_never_granted(tmp_path, caplog):
    async def body() -> None:
        async with xen_world(tmp_path, CONFIGS) as world:
            front = SimulatedVirtioFrontend(world.host.domains[1], world.clients[1], devid=0)
            await front.connect()
            queue = front.queues[0]
            head = queue.add([], [64])
            queue.write_descriptor(head, grant_address(0x7777), 64, VIRTQ_DESC_F_WRITE, 0)
            front.kick(0)
            await failed_backend(front, world, "dom1-rng")
            await healthy_neighbour(world)

    run(body)
    assert any("grant ref 30583 cannot be mapped" in message for message in failures(caplog))


def test_ring_address_on_the_wrong_page(tmp_path, caplog):
    async def body() -> None:
        async with xen_world(tmp_path, CONFIGS) as world:
            domain = world.host.domains[1]
            junk = domain.ram.alloc(PAGE_SIZE, PAGE_SIZE)
            domain.ram.memory.fill(junk, PAGE_SIZE, 0xFF)
            front = SimulatedVirtioFrontend(domain, world.clients[1], devid=0)
            await front.connect(overrides={"queue-0/desc": f"{junk:#x}"})
            front.submit(0, [], [16])
            await failed_backend(front, world, "dom1-rng")
            await healthy_neighbour(world)

    run(body)
    assert any("failed: ring: queue 0:" in message for message in failures(caplog))


def test_event_channel_that_does_not_exist(tmp_path, caplog):
    async def body() -> None:
        async with xen_world(tmp_path, CONFIGS) as world:
            front = SimulatedVirtioFrontend(world.host.domains[1], world.clients[1], devid=0)
            await front.publish(overrides={"queue-0/event-channel": "999"})
            await failed_backend(front, world, "dom1-rng")
            await healthy_neighbour(world)

    run(body)
    assert any("event channel 999" in message and "not allocated" in message for message in failures(caplog))


def test_state_jumps_to_connected_early(tmp_path, caplog):
    async def body() -> None:
        async with xen_world(tmp_path, CONFIGS) as world:
            front = SimulatedVirtioFrontend(world.host.domains[1], world.clients[1], devid=0)
            await front.set_state(XenbusState.CONNECTED)
            await failed_backend(front, world, "dom1-rng")
            await healthy_neighbour(world)

    run(body)
    assert any("device/virtio/0/features is missing" in message for message in failures(caplog))


def test_failed_device_recovers_when_the_frontend_starts_over(tmp_path, caplog):
    async def body() -> None:
        async with xen_world(tmp_path, CONFIGS) as world:
            domain = world.host.domains[1]
            front = SimulatedVirtioFrontend(domain, world.clients[1], devid=0)
            await front.set_state(XenbusState.CONNECTED)
            await failed_backend(front, world, "dom1-rng")
            await front.set_state(XenbusState.CLOSED)
            await front.wait_backend(XenbusState.CLOSED)
            await front.set_state(XenbusState.INITIALISING)
            again = SimulatedVirtioFrontend(domain, world.clients[1], devid=0)
            await again.connect()
            assert (await again.request(0, [], [16])).written == 16

    run(body)


def test_bad_state_value_fails_the_device(tmp_path, caplog):
    async def body() -> None:
        async with xen_world(tmp_path, CONFIGS) as world:
            front = SimulatedVirtioFrontend(world.host.domains[1], world.clients[1], devid=0)
            await front.client.write(f"{front.path}/state", "connected!")
            await failed_backend(front, world, "dom1-rng")
            await healthy_neighbour(world)

    run(body)
    assert any("is not a number" in message for message in failures(caplog))


def test_console_producer_index_too_far_ahead(tmp_path, caplog):
    async def body() -> None:
        async with xen_world(tmp_path, [device("console", "dom1-con", "1/0"), *CONFIGS[1:]]) as world:
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
