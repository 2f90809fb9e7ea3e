"""The blkif front door on the SIMULATED Xen host: handshake, I/O, flush, discard, indirect, attach, hostile requests.

A malformed request fails that request (``BLKIF_RSP_ERROR`` or
``BLKIF_RSP_EOPNOTSUPP``) and the disk keeps serving; ring indexes that
overrun the ring fail that disk only (its backend goes Closing); the other
guest's disk works throughout.
"""

from __future__ import annotations

import asyncio
import logging
import os

import pytest
from helpers import run
from pvcore_xen import blkif
from pvcore_xen.blkback import MAX_INDIRECT_SEGMENTS, PVCORE_KIND
from pvcore_xen.ring import REQ_PROD, RSP_PROD
from pvcore_xen.testing.blkfront import (
    SimulatedBlkFrontend,
    direct_request,
    discard_request,
    indirect_request,
)
from pvcore_xen.xenbus import XenbusState
from world import device, xen_world

DISK_SIZE = 1024 * 1024
XVDA = 51712


def disks(tmp_path, **options):  # type: ignore[no-untyped-def]
    configs = []
    for domid in (1, 2):
        image = tmp_path / f"dom{domid}.img"
        image.write_bytes(os.urandom(DISK_SIZE))
        configs.append(device("block", f"dom{domid}-disk", f"{domid}/{XVDA}", path=str(image), **options))
    return configs


async def front(world, domid: int, **kwargs) -> SimulatedBlkFrontend:  # type: ignore[no-untyped-def]
    disk = SimulatedBlkFrontend(world.host.domains[domid], world.clients[domid], devid=XVDA, **kwargs)
    await disk.connect()
    return disk


def test_read_write_flush_and_the_backend_nodes(tmp_path):
    configs = disks(tmp_path)
    image = (tmp_path / "dom1.img").read_bytes()

    async def body() -> None:
        async with xen_world(tmp_path, configs) as world:
            disk = await front(world, 1)
            assert await disk.node("sectors") == str(DISK_SIZE // 512)
            assert await disk.node("feature-flush-cache") == "1"
            assert await disk.node("feature-max-indirect-segments") == str(MAX_INDIRECT_SEGMENTS)
            status, data = await disk.read(1, 8, 3 * 4096)
            assert status == blkif.BLKIF_RSP_OKAY and data == image[4096 : 4 * 4096]
            payload = os.urandom(2 * 4096)
            assert await disk.write(2, 16, payload) == blkif.BLKIF_RSP_OKAY
            assert await disk.flush(3) == blkif.BLKIF_RSP_OKAY
            assert await disk.write(4, 32, payload, blkif.BLKIF_OP_WRITE_BARRIER) == blkif.BLKIF_RSP_OKAY
            assert (await disk.read(5, 16, 2 * 4096)) == (blkif.BLKIF_RSP_OKAY, payload)
            instance, _ = world.served("dom1-disk")
            counters = instance.engine.counters()
            assert counters.flushes == 2 and counters.errors == 0
            with open(tmp_path / "dom1.img", "rb") as file:
                file.seek(16 * 512)
                assert file.read(len(payload)) == payload

    run(body)


def test_indirect_read_and_write_and_discard(tmp_path):
    configs = disks(tmp_path)

    async def body() -> None:
        async with xen_world(tmp_path, configs) as world:
            disk = await front(world, 1)
            count = 40
            data_page = disk.buffer(count)
            payload = os.urandom(count * 4096)
            at = disk.offset(data_page)
            disk.domain.memory[at : at + len(payload)] = payload
            table = disk.buffer()
            segments = b"".join(
                blkif._SEGMENT.pack(ref, first, last) for ref, first, last in disk.segments(data_page, len(payload))
            )
            disk.domain.memory[disk.offset(table) : disk.offset(table) + len(segments)] = segments
            disk.post(indirect_request(blkif.BLKIF_OP_WRITE, 7, 64, count, [disk.ref(table)]))
            assert await disk.wait_response(7) == (blkif.BLKIF_OP_WRITE, blkif.BLKIF_RSP_OKAY)  # as blkfront checks
            assert await disk.read(8, 64 + 8 * 39, 4096) == (blkif.BLKIF_RSP_OKAY, payload[39 * 4096 :])
            disk.post(discard_request(9, 0, 8))
            assert await disk.wait(9) == blkif.BLKIF_RSP_OKAY
            assert world.served("dom1-disk")[0].engine.counters().discards == 1

    run(body)


def test_attach_writes_the_nodes_under_pvcores_own_backend_type(tmp_path):
    configs = disks(tmp_path, attach=True)[:1]

    async def body() -> None:
        async with xen_world(tmp_path, configs) as world:
            dom0 = world.clients[0]
            backend = f"/local/domain/0/backend/{PVCORE_KIND}/1/{XVDA}"
            frontend = f"/local/domain/1/device/vbd/{XVDA}"
            assert (await dom0.read(f"{frontend}/backend")).decode() == backend
            assert (await dom0.read(f"{frontend}/virtual-device")).decode() == str(XVDA)
            assert (await dom0.read(f"{backend}/frontend")).decode() == frontend
            disk = await front(world, 1, backend_kind=PVCORE_KIND)
            assert (await disk.read(1, 0, 4096))[0] == blkif.BLKIF_RSP_OKAY

    run(body)


def _page_segment(disk: SimulatedBlkFrontend) -> tuple[int, int, int]:
    return (disk.ref(disk.buffer()), 0, 7)


HOSTILE = {
    "twelve-segments": (lambda d: direct_request(blkif.BLKIF_OP_READ, 66, 0, [_page_segment(d)] * 11, count=12),
                        blkif.BLKIF_RSP_ERROR),
    "no-segments": (lambda d: direct_request(blkif.BLKIF_OP_WRITE, 66, 0, []), blkif.BLKIF_RSP_ERROR),
    "sector-past-page": (lambda d: direct_request(blkif.BLKIF_OP_READ, 66, 0, [(d.ref(d.buffer()), 2, 8)]),
                         blkif.BLKIF_RSP_ERROR),
    "first-after-last": (lambda d: direct_request(blkif.BLKIF_OP_READ, 66, 0, [(d.ref(d.buffer()), 5, 4)]),
                         blkif.BLKIF_RSP_ERROR),
    "ungranted-ref": (lambda d: direct_request(blkif.BLKIF_OP_WRITE, 66, 0, [(12345, 0, 7)]), blkif.BLKIF_RSP_ERROR),
    "ungranted-read-target": (lambda d: direct_request(blkif.BLKIF_OP_READ, 66, 0, [(99999, 0, 7)]),
                              blkif.BLKIF_RSP_ERROR),
    "past-the-end": (lambda d: direct_request(blkif.BLKIF_OP_READ, 66, DISK_SIZE // 512 - 4, [_page_segment(d)]),
                     blkif.BLKIF_RSP_ERROR),
    "huge-sector": (lambda d: direct_request(blkif.BLKIF_OP_WRITE, 66, 2**64 - 1, [_page_segment(d)]),
                    blkif.BLKIF_RSP_ERROR),
    "unknown-op": (lambda d: direct_request(99, 66, 0, [_page_segment(d)]), blkif.BLKIF_RSP_EOPNOTSUPP),
    "reserved-op": (lambda d: direct_request(4, 66, 0, []), blkif.BLKIF_RSP_EOPNOTSUPP),
    "secure-discard": (lambda d: discard_request(66, 0, 8, flag=blkif.BLKIF_DISCARD_SECURE), blkif.BLKIF_RSP_EOPNOTSUPP),
    "discard-past-the-end": (lambda d: discard_request(66, 0, 2**40), blkif.BLKIF_RSP_ERROR),
    "indirect-too-many": (lambda d: indirect_request(blkif.BLKIF_OP_READ, 66, 0, MAX_INDIRECT_SEGMENTS + 1,
                                                     [d.ref(d.buffer())]), blkif.BLKIF_RSP_ERROR),
    "indirect-flush": (lambda d: indirect_request(blkif.BLKIF_OP_FLUSH_DISKCACHE, 66, 0, 1, [d.ref(d.buffer())]),
                       blkif.BLKIF_RSP_ERROR),
    "indirect-ungranted-table": (lambda d: indirect_request(blkif.BLKIF_OP_READ, 66, 0, 1, [77777]),
                                 blkif.BLKIF_RSP_ERROR),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_a_bad_request_fails_that_request_and_the_disk_serves_on(tmp_path, name):
    configs = disks(tmp_path)
    make, expected = HOSTILE[name]

    async def body() -> None:
        async with xen_world(tmp_path, configs) as world:
            disk = await front(world, 1)
            slot = make(disk)
            disk.post(slot)
            operation = slot[1] if slot[0] == blkif.BLKIF_OP_INDIRECT else slot[0]
            assert await disk.wait_response(66) == (operation, expected)
            assert (await disk.read(67, 0, 4096))[0] == blkif.BLKIF_RSP_OKAY
            assert await disk.backend_state() == XenbusState.CONNECTED
            other = await front(world, 2)
            assert (await other.read(1, 0, 4096))[0] == blkif.BLKIF_RSP_OKAY

    run(body)


def test_an_id_still_in_flight_is_refused(tmp_path):
    configs = disks(tmp_path)

    async def body() -> None:
        async with xen_world(tmp_path, configs) as world:
            disk = await front(world, 1)
            # the flush goes to an I/O thread, so it is in flight when the read with its id is taken
            disk.post(direct_request(blkif.BLKIF_OP_FLUSH_DISKCACHE, 5, 0, []),
                      direct_request(blkif.BLKIF_OP_READ, 5, 0, [_page_segment(disk)]))
            statuses = sorted([await disk.wait(5), await disk.wait(5)])
            assert statuses == [blkif.BLKIF_RSP_ERROR, blkif.BLKIF_RSP_OKAY]
            assert world.served("dom1-disk")[1].rejected == 1

    run(body)


def test_a_producer_beyond_the_ring_fails_that_disk_only(tmp_path, caplog):
    configs = disks(tmp_path)

    async def body() -> None:
        async with xen_world(tmp_path, configs) as world:
            disk = await front(world, 1)
            other = await front(world, 2)
            disk.ring.put(REQ_PROD, 1000)
            disk.channel.signal()
            assert await disk.wait_backend(XenbusState.CLOSING) == XenbusState.CLOSING
            assert "more than 32 ahead" in world.served("dom1-disk")[1].failure
            assert (await other.read(1, 0, 4096))[0] == blkif.BLKIF_RSP_OKAY

    run(body)
    assert any("more than 32 ahead" in r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)


@pytest.mark.parametrize(
    "overrides, reason",
    [
        ({"protocol": "x86_32-abi"}, "only x86_64-abi"),
        ({"ring-ref": "424242"}, "cannot be mapped"),
        ({"event-channel": "999"}, "event channel 999"),
    ],
)
def test_frontend_choices_the_backend_did_not_offer_fail_the_disk(tmp_path, overrides, reason):
    configs = disks(tmp_path)

    async def body() -> None:
        async with xen_world(tmp_path, configs) as world:
            disk = SimulatedBlkFrontend(world.host.domains[1], world.clients[1], devid=XVDA)
            await disk.connect(overrides)
            assert await disk.wait_backend(XenbusState.CLOSING) == XenbusState.CLOSING
            assert reason in world.served("dom1-disk")[1].failure

    run(body)


def test_pvcore_probe_lists_the_toolstacks_disks_and_their_state(tmp_path, capsys):
    from pvcore.cli import cmd_probe_host

    configs = disks(tmp_path)

    async def body() -> None:
        async with xen_world(tmp_path, configs) as world:
            await world.clients[0].write(f"/local/domain/0/backend/vbd/1/{XVDA + 16}/state", "1")  # no pvcore device
            loop = asyncio.get_running_loop()
            served_state = f"/local/domain/0/backend/vbd/1/{XVDA}/state"
            deadline = loop.time() + 30
            store = world.clients[0]
            while not (await store.exists(served_state) and await store.read(served_state) == b"2"):
                assert loop.time() < deadline, "pvcore's backend never reached InitWait (it does so on its own task)"
                await asyncio.sleep(0.05)
            assert await loop.run_in_executor(None, cmd_probe_host, world.registry, "xen") == 0

    run(body)
    lines = capsys.readouterr().out.splitlines()
    waiting = [line for line in lines if f"/backend/vbd/1/{XVDA + 16} " in line]
    assert len(waiting) == 1 and waiting[0].startswith("block") and "state=1" in waiting[0], lines
    served = [line for line in lines if f"/backend/vbd/1/{XVDA} " in line]
    assert len(served) == 1 and "state=2" in served[0] and f"domain=1/{XVDA}" in served[0], lines


def test_a_read_finishing_after_its_ring_was_disconnected_copies_nothing_to_the_guest(tmp_path, monkeypatch):
    """Its segments' grants may have been given to new requests by then: the late answer must not touch them."""
    from pvcore_xen import blkback

    from pvcore.devices.block.backend import BlockResult, BlockStatus

    configs = disks(tmp_path)[:1]
    monkeypatch.setattr(blkback, "DRAIN_TIMEOUT", 0.2)

    async def body() -> None:
        async with xen_world(tmp_path, configs) as world:
            disk = await front(world, 1)
            _, door = world.served("dom1-disk")
            stalled = []
            monkeypatch.setattr(door.engine, "serve_now", lambda request: False)
            monkeypatch.setattr(door.engine, "submit", lambda request, callback: stalled.append((request, callback)))
            page = disk.buffer()
            disk.post(direct_request(blkif.BLKIF_OP_READ, 11, 0, disk.segments(page, 4096)))
            for _ in range(100):
                if stalled:
                    break
                await asyncio.sleep(0.02)
            assert len(stalled) == 1
            await door.disconnect()
            copies = []
            monkeypatch.setattr(door.host, "grant_copy", lambda *args, **kwargs: copies.append(args) or [])
            request, callback = stalled[0]
            callback(BlockResult(BlockStatus.OK, request.length))
            assert copies == []

    run(body)


def test_each_response_is_announced_and_each_request_is_seen_after_one_kick(tmp_path):
    """At queue depth 1 nothing is left for a timer or a later kick to find (``io/ring.h`` event indexes).

    The frontend waits only on its event channel (no ring polling, unlike the
    simulated frontend's helpers) and kicks only when ``req_event`` asks it
    to: an idle backend must have asked (RING_FINAL_CHECK_FOR_REQUESTS) and
    must announce every response (RING_PUSH_RESPONSES_AND_CHECK_NOTIFY), for
    reads answered on the spot and for flushes answered by an I/O thread.
    """
    configs = disks(tmp_path)
    image = (tmp_path / "dom1.img").read_bytes()

    async def body() -> None:
        async with xen_world(tmp_path, configs) as world:
            disk = await front(world, 1)
            buffer = disk.buffer()
            loop = asyncio.get_running_loop()
            for request_id in range(1, 41):
                read = request_id % 2 == 1
                slot = (direct_request(blkif.BLKIF_OP_READ, request_id, 8 * request_id, [(disk.ref(buffer), 0, 7)])
                        if read else direct_request(blkif.BLKIF_OP_FLUSH_DISKCACHE, request_id, 0, []))
                disk.ring.write(slot)
                assert disk.ring.push(), f"request {request_id}: the idle backend did not ask to be kicked"
                disk.channel.signal()
                ready = loop.create_future()
                loop.add_reader(disk.channel.fileno(), lambda f=ready: f.done() or f.set_result(None))
                try:
                    await asyncio.wait_for(ready, 2.0)
                except TimeoutError:
                    raise AssertionError(f"request {request_id}: no response announced") from None
                finally:
                    loop.remove_reader(disk.channel.fileno())
                assert disk.channel.consume() and disk.ring.get(RSP_PROD) == request_id
                assert await disk.wait(request_id, timeout=0.1) == blkif.BLKIF_RSP_OKAY
                if read:
                    at = disk.offset(buffer)
                    assert bytes(disk.domain.memory[at : at + 4096]) == image[4096 * request_id : 4096 * (request_id + 1)]

    run(body)
