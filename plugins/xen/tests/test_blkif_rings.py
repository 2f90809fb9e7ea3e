"""blkif rings of several pages and several queues on the SIMULATED Xen host.

The backend offers ``max-ring-page-order`` and ``multi-queue-max-queues``; a
frontend that takes them is served on every ring it published, each ring's
pages mapped back to back. What a frontend writes about its rings is
hostile: an order or a queue count beyond the offer, a missing or bad ref, a
page named twice fail that disk only, with the node named in the reason.
"""

from __future__ import annotations

import os

import pytest
from helpers import run
from pvcore_xen import blkif
from pvcore_xen.blkback import MAX_QUEUES, MAX_RING_PAGE_ORDER
from pvcore_xen.grants import GrantMemory
from pvcore_xen.host import PAGE_SIZE
from pvcore_xen.ring import REQ_PROD
from pvcore_xen.testing.blkfront import SimulatedBlkFrontend, direct_request
from pvcore_xen.testing.host import SimulatedXenHost
from pvcore_xen.xenbus import XenbusState
from test_blkif import XVDA, disks, front
from world import start_daemon, stop_daemon, xen_world


def test_the_backend_offers_several_pages_and_queues(tmp_path):
    async def body() -> None:
        async with xen_world(tmp_path, disks(tmp_path)) as world:
            disk = await front(world, 1)
            assert await disk.node("max-ring-page-order") == str(MAX_RING_PAGE_ORDER) == "2"
            assert await disk.node("multi-queue-max-queues") == str(MAX_QUEUES) == "2"

    run(body)


@pytest.mark.parametrize("order", [0, 1, MAX_RING_PAGE_ORDER])
def test_a_multi_page_ring_holds_as_many_requests_as_its_pages_do(tmp_path, order):
    """All of a full ring's requests in one push: a backend that saw a one-page ring would fail the disk."""
    image = (tmp_path / "dom1.img")
    configs = disks(tmp_path)

    async def body() -> None:
        async with xen_world(tmp_path, configs) as world:
            disk = await front(world, 1, order=order)
            assert disk.ring.size == {0: 32, 1: 64, 2: 128}[order]
            assert await disk.client.read(f"{disk.path}/ring-ref{(1 << order) - 1}")
            for round_ in range(2):  # the second round reuses every slot, the ones straddling pages too
                buffers = [disk.buffer() for _ in range(disk.ring.size)]
                base = round_ * disk.ring.size
                disk.post(*(direct_request(blkif.BLKIF_OP_READ, base + index, 8 * (base + index) % 2040,
                                           [(disk.ref(buffer), 0, 7)]) for index, buffer in enumerate(buffers)))
                data = image.read_bytes()
                for index, buffer in enumerate(buffers):
                    assert await disk.wait(base + index) == blkif.BLKIF_RSP_OKAY
                    at, sector = disk.offset(buffer), 8 * (base + index) % 2040
                    assert bytes(disk.domain.memory[at : at + 4096]) == data[sector * 512 : sector * 512 + 4096]
                    disk.domain.ram.free(buffer)
            assert await disk.backend_state() == XenbusState.CONNECTED
            assert world.served("dom1-disk")[1].queues[0].ring.size == disk.ring.size

    run(body)


def test_two_queues_are_served_by_one_disk_each_with_its_own_ids(tmp_path):
    configs = disks(tmp_path)

    async def body() -> None:
        async with xen_world(tmp_path, configs) as world:
            disk = await front(world, 1, order=1, queues=2)
            _, door = world.served("dom1-disk")
            assert len(door.queues) == 2 and door.queues[1].ring.size == 64
            payloads = [os.urandom(4096), os.urandom(4096)]
            for queue, payload in enumerate(payloads):  # the same id on both queues at once is no clash
                assert await disk.write(7, 64 + 8 * queue, payload, queue=queue) == blkif.BLKIF_RSP_OKAY
            for queue, payload in enumerate(payloads):
                assert await disk.read(9, 64 + 8 * queue, 4096, queue=1 - queue) == (blkif.BLKIF_RSP_OKAY, payload)
            assert door.rejected == 0
            disk.rings[1].put(REQ_PROD, 1000)
            disk.channels[1].signal()
            assert await disk.wait_backend(XenbusState.CLOSING) == XenbusState.CLOSING
            assert "blkif queue-1 ring" in door.failure and "more than 64 ahead" in door.failure
            other = await front(world, 2, queues=2)
            assert (await other.read(1, 0, 4096, queue=1))[0] == blkif.BLKIF_RSP_OKAY

    run(body)


@pytest.mark.parametrize("crash", [False, True], ids=["sigterm", "crash"])
def test_a_restarted_daemon_picks_up_every_queue_of_a_multi_page_disk(tmp_path, crash):
    """Requests posted on both queues while no backend ran are served by the next one, from the same rings."""
    configs = disks(tmp_path)
    image = tmp_path / "dom1.img"

    async def body() -> None:
        async with xen_world(tmp_path, configs) as world:
            disk = await front(world, 1, order=2, queues=2)
            payload = os.urandom(4096)
            assert await disk.write(1, 40, payload, queue=1) == blkif.BLKIF_RSP_OKAY
            await stop_daemon(world, crash=crash)
            buffers = [disk.buffer(), disk.buffer()]
            for queue, buffer in enumerate(buffers):
                disk.post(direct_request(blkif.BLKIF_OP_READ, 2, 40, [(disk.ref(buffer), 0, 7)]), queue=queue)
            await start_daemon(world, configs)
            for queue, buffer in enumerate(buffers):
                assert await disk.wait(2, queue=queue) == blkif.BLKIF_RSP_OKAY
                at = disk.offset(buffer)
                assert bytes(disk.domain.memory[at : at + 4096]) == payload
            _, door = world.served("dom1-disk")
            assert door.resumed and [queue.ring.size for queue in door.queues] == [128, 128]
            assert await disk.read(3, 40, 4096, queue=0) == (blkif.BLKIF_RSP_OKAY, payload)
        assert image.read_bytes()[40 * 512 : 40 * 512 + 4096] == payload

    run(body)


def _ref(disk: SimulatedBlkFrontend, queue: int, page: int) -> str:
    return str(disk.ref(disk.ring_pages[queue] + page * PAGE_SIZE))


HOSTILE_NODES = {
    "order-beyond-the-offer": ({"order": 2}, lambda d: {"ring-page-order": "3"}, "ring-page-order = '3' is not a number in 0..0x2"),
    "order-not-a-number": ({"order": 1}, lambda d: {"ring-page-order": "one"}, "ring-page-order = 'one' is not a number"),
    "order-without-its-refs": ({}, lambda d: {"ring-page-order": "1"}, "ring-ref0 is missing"),
    "missing-last-ref": ({"order": 1}, lambda d: {"ring-page-order": "2"}, "ring-ref2 is missing"),
    "ref-not-a-number": ({"order": 1}, lambda d: {"ring-ref1": "0x10"}, "ring-ref1 = '0x10' is not a number"),
    "ref-beyond-32-bits": ({"order": 1}, lambda d: {"ring-ref1": str(1 << 32)}, "is not a number in 0..0xffffffff"),
    "ref-not-granted": ({"order": 2}, lambda d: {"ring-ref3": "424242"}, "cannot be mapped"),
    "page-named-twice": ({"order": 2}, lambda d: {"ring-ref2": _ref(d, 0, 0)}, "name a page twice"),
    "too-many-queues": ({"queues": 2}, lambda d: {"multi-queue-num-queues": "3"}, "multi-queue-num-queues = '3' is not a number in 0..0x2"),
    "no-queues": ({}, lambda d: {"multi-queue-num-queues": "0"}, "multi-queue-num-queues is 0"),
    "queues-without-their-directories": ({}, lambda d: {"multi-queue-num-queues": "2"}, "queue-0/ring-ref is missing"),
    "queue-ref-twice": ({"queues": 2}, lambda d: {"queue-1/ring-ref": _ref(d, 0, 0)}, "name a page twice"),
    "queue-channel-twice": ({"queues": 2}, lambda d: {"queue-1/event-channel": str(d.ports[0])}, "queue-1: event channel"),
    "queue-channel-missing": ({"queues": 2, "order": 0}, lambda d: {"multi-queue-num-queues": "2", "queue-1/event-channel": "x"},
                              "queue-1/event-channel = 'x' is not a number"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE_NODES))
def test_hostile_ring_nodes_fail_that_disk_only(tmp_path, name):
    shape, overrides, reason = HOSTILE_NODES[name]
    configs = disks(tmp_path)

    async def body() -> None:
        async with xen_world(tmp_path, configs) as world:
            disk = SimulatedBlkFrontend(world.host.domains[1], world.clients[1], devid=XVDA, **shape)
            await disk.connect(overrides(disk))
            assert await disk.wait_backend(XenbusState.CLOSING) == XenbusState.CLOSING
            failure = world.served("dom1-disk")[1].failure
            assert failure is not None and reason in failure, failure
            assert world.served("dom1-disk")[1].queues == []
            other = await front(world, 2, order=2, queues=2)
            assert (await other.read(1, 0, 4096, queue=1))[0] == blkif.BLKIF_RSP_OKAY

    run(body)


def test_a_ring_of_frames_in_any_order_is_mapped_back_to_back():
    """Ring refs name pages anywhere in the guest; the mapping puts them in the order of the refs."""
    host = SimulatedXenHost()
    try:
        guest = host.add_domain(1)
        second, first = guest.grant(5, to_domid=0), guest.grant(2, to_domid=0)
        guest.memory[6 * PAGE_SIZE - 3 : 6 * PAGE_SIZE] = b"end"
        guest.memory[2 * PAGE_SIZE : 2 * PAGE_SIZE + 5] = b"start"
        memory = GrantMemory(1, host)
        base = memory.map_ring([second, first])
        assert memory.read(base + PAGE_SIZE - 3, 8) == b"endstart"
        memory.write(base + PAGE_SIZE - 1, b"XY")
        assert guest.memory[6 * PAGE_SIZE - 1] == ord("X") and guest.memory[2 * PAGE_SIZE] == ord("Y")
        again = memory.map_ring([guest.grant(7, to_domid=0)])
        assert again == base + 2 * PAGE_SIZE and memory.size == 3 * PAGE_SIZE
        readonly = guest.grant(8, to_domid=0, readonly=True)
        with pytest.raises(Exception, match="cannot be mapped"):
            memory.map_ring([readonly])
        memory.close()
        assert memory.size == 0
    finally:
        host.close()
