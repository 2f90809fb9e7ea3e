"""Hostile netfronts on the SIMULATED Xen host: a bad request fails that request or that vif, never another.

Ring geometry a real netfront never writes (a slot across its page, a packet
of too many slots or with slots not yet published, a producer beyond the
ring) fails the vif: its backend goes Closing with a logged reason. What
netback also answers per packet (a grant that cannot be copied, sizes that do
not add up) is a NETIF_RSP_ERROR for that packet and the vif carries on. The
other guest's vif keeps working throughout.
"""

from __future__ import annotations

import logging
import uuid

import pytest
from helpers import run
from pvcore_xen.netif import NETIF_RSP_ERROR, NETIF_RSP_OKAY, NETTXF_MORE_DATA
from pvcore_xen.ring import REQ_PROD
from pvcore_xen.testing.netfront import SimulatedNetFrontend
from pvcore_xen.xenbus import XenbusState
from test_netif import MAC1, MAC2, ethernet, nics
from world import xen_world

BROADCAST = b"\xff" * 6


def failures(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The messages of the xen plugin's device failures."""
    return [r.getMessage() for r in caplog.records if r.name == "pvcore.xen" and r.levelno == logging.ERROR]


async def fronts(world) -> tuple[SimulatedNetFrontend, SimulatedNetFrontend]:  # type: ignore[no-untyped-def]
    """Both guests' netfronts, connected, each with receive buffers posted."""
    pair = []
    for domid in (1, 2):
        front = SimulatedNetFrontend(world.host.domains[domid], world.clients[domid], devid=0)
        await front.connect()
        front.post_rx(8)
        pair.append(front)
    return pair[0], pair[1]


async def still_serving(front: SimulatedNetFrontend, peer: SimulatedNetFrontend, src: bytes, dst: bytes) -> None:
    """``front`` sends ``peer`` a frame and it arrives."""
    frame = ethernet(dst, src, b"still here")
    front.send(frame, first_id=40)
    assert await peer.receive() == frame


async def failed(front: SimulatedNetFrontend, world, name: str) -> str:  # type: ignore[no-untyped-def]
    """Wait for the vif's backend to go Closing; return its failure."""
    assert await front.wait_backend(XenbusState.CLOSING) == XenbusState.CLOSING
    _, backend = world.served(name)
    assert not backend.connected and backend.failure
    return backend.failure


@pytest.mark.parametrize(
    "requests, reason",
    [
        ([(0, 4000, 0, 1, 200)], "a slot of 200 bytes at offset 4000 crosses its page"),
        ([(0, 0, NETTXF_MORE_DATA, i, 60) for i in range(19)] + [(0, 0, 0, 19, 60)], "a packet of more than 18 slots"),
        ([(0, 0, NETTXF_MORE_DATA, 1, 100)], "slots were not all published"),
    ],
    ids=["slot-crosses-page", "too-many-slots", "unpublished-slots"],
)
def test_bad_tx_geometry_fails_that_vif_only(tmp_path, caplog, requests, reason):
    async def body() -> None:
        async with xen_world(tmp_path, nics(f"xen-{uuid.uuid4().hex[:8]}")) as world:
            one, two = await fronts(world)
            page = one.domain.ram.alloc(4096, 4096)
            one.post_tx([(one.ref(page), *request[1:]) for request in requests])
            assert reason in await failed(one, world, "dom1-nic")
            two.send(ethernet(BROADCAST, MAC2, b"anyone?"))
            assert await two.wait_tx(1) == [(0, NETIF_RSP_OKAY)]

    run(body)
    assert any(reason in message for message in failures(caplog))


def test_request_producer_beyond_the_ring_fails_that_vif(tmp_path, caplog):
    async def body() -> None:
        async with xen_world(tmp_path, nics(f"xen-{uuid.uuid4().hex[:8]}")) as world:
            one, two = await fronts(world)
            one.tx.put(REQ_PROD, 1000)
            one.channel.signal()
            assert "more than 256 ahead" in await failed(one, world, "dom1-nic")
            two.send(ethernet(BROADCAST, MAC2, b"anyone?"))
            assert await two.wait_tx(1) == [(0, NETIF_RSP_OKAY)]

    run(body)


def test_bad_grants_and_sizes_fail_the_packet_and_the_vif_carries_on(tmp_path):
    async def body() -> None:
        async with xen_world(tmp_path, nics(f"xen-{uuid.uuid4().hex[:8]}")) as world:
            one, two = await fronts(world)
            page = one.domain.ram.alloc(4096, 4096)
            one.post_tx([(0x7777, 0, 0, 0xFFFF, 60)])  # never granted; any id is the frontend's own and echoed
            assert await one.wait_tx(1) == [(0xFFFF, NETIF_RSP_ERROR)]
            one.post_tx([(one.ref(page), 0, NETTXF_MORE_DATA, 5, 60), (one.ref(page), 0, 0, 6, 100)])  # 60 < 100
            assert await one.wait_tx(2) == [(5, NETIF_RSP_ERROR), (6, NETIF_RSP_ERROR)]
            one.post_tx([(one.ref(page), 0, 0, 7, 6)])  # shorter than an Ethernet header
            assert await one.wait_tx(1) == [(7, NETIF_RSP_ERROR)]
            _, backend = world.served("dom1-nic")
            assert backend.stats.tx_errors == 3 and backend.connected
            await still_serving(one, two, MAC1, MAC2)

    run(body)


def test_receive_buffer_with_a_bad_grant_fails_that_frame(tmp_path):
    async def body() -> None:
        async with xen_world(tmp_path, nics(f"xen-{uuid.uuid4().hex[:8]}")) as world:
            one = SimulatedNetFrontend(world.host.domains[1], world.clients[1], devid=0)
            two = SimulatedNetFrontend(world.host.domains[2], world.clients[2], devid=0)
            await one.connect()
            await two.connect()
            one.post_rx(1, gref=0x7777)
            two.send(ethernet(MAC1, MAC2, b"lost"))
            assert await one.receive() == NETIF_RSP_ERROR
            one.post_rx(1, first_id=1)
            await still_serving(two, one, MAC2, MAC1)
            _, backend = world.served("dom1-nic")
            assert backend.stats.rx_errors == 1

    run(body)


@pytest.mark.parametrize(
    "overrides, reason",
    [
        ({"request-rx-copy": "0"}, "request-rx-copy is not 1"),
        ({"event-channel": "999"}, "event channel 999"),
        ({"tx-ring-ref": "30583"}, "grant ref 30583 cannot be mapped"),
        ({"multi-queue-num-queues": "4"}, "offers one queue"),
        ({"mac": "00:16:3e:00:00:99"}, "give the vif in xl.cfg the mac= of the pvcore device"),
    ],
    ids=["no-rx-copy", "bad-event-channel", "bad-ring-ref", "multi-queue", "other-mac"],
)
def test_bad_frontend_nodes_fail_that_vif_only(tmp_path, caplog, overrides, reason):
    async def body() -> None:
        async with xen_world(tmp_path, nics(f"xen-{uuid.uuid4().hex[:8]}")) as world:
            one = SimulatedNetFrontend(world.host.domains[1], world.clients[1], devid=0)
            await one.publish(overrides=overrides)
            assert reason in await failed(one, world, "dom1-nic")
            two = SimulatedNetFrontend(world.host.domains[2], world.clients[2], devid=0)
            await two.connect()
            two.send(ethernet(BROADCAST, MAC2, b"anyone?"))
            assert await two.wait_tx(1) == [(0, NETIF_RSP_OKAY)]

    run(body)
    assert any(reason in message for message in failures(caplog))
