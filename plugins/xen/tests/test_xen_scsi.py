"""The scsi class (the pvcore-scsi plugin) over grant-mapped virtio on the SIMULATED Xen host.

The xen plugin's whole change for the class was to list it in
``VIRTIO_TYPES``; here a simulated frontend on the core's reference driver
drives the virtio-scsi device through xenstore, grants and event channels:
the probe finds it, INQUIRY and READ(10) answer from the disc, and a host
eject through the media socket is what the next command sees.
"""

from __future__ import annotations

import asyncio
import os
import struct

from helpers import run
from pvcore_scsi.media import send
from pvcore_xen.testing.frontend import SimulatedVirtioFrontend
from world import device, xen_world

from pvcore.contract import HostContext

BLOCK = 2048
REQUEST_QUEUE = 2
RESPONSE_SIZE = 12 + 96
GOOD, CHECK_CONDITION = 0, 2


def header(cdb: bytes, tag: int) -> bytes:
    """A virtio-scsi request header for LUN 0 of target 0 (Linux's single-level LUN form)."""
    return bytes([1, 0, 0x40, 0, 0, 0, 0, 0]) + struct.pack("<QBBB", tag, 0, 0, 0) + cdb.ljust(32, b"\0")


async def scsi(front: SimulatedVirtioFrontend, cdb: bytes, data_in: int, tag: int) -> tuple[int, int, bytes, bytes]:
    """One command: (virtio response, SCSI status, sense, data-in)."""
    used = await front.request(REQUEST_QUEUE, [header(cdb, tag)], [RESPONSE_SIZE] + ([data_in] if data_in else []))
    sense_len, _, _, status, response = struct.unpack_from("<IIHBB", used.data)
    return response, status, used.data[12 : 12 + sense_len], used.data[RESPONSE_SIZE : used.written]


def test_a_cdrom_served_as_virtio_scsi_over_xenbus(tmp_path):
    disc = tmp_path / "disc.iso"
    disc.write_bytes(os.urandom(16 * BLOCK))

    async def body() -> None:
        async with xen_world(tmp_path, [device("scsi", "dom1-cd", "1/0", media=[str(disc)])]) as world:
            front = SimulatedVirtioFrontend(world.host.domains[1], world.clients[1], devid=0)
            await front.connect()
            loop = asyncio.get_running_loop()
            slots = await loop.run_in_executor(None, lambda: world.registry.call("xen", "pvcore_probe", host=HostContext(environ={})))
            assert [(slot.device_class, slot.properties["type"]) for slot in slots] == [("scsi", "virtio,device8")]
            num_queues, *_, max_lun = struct.unpack_from("<7I2HI", front.config)
            assert (num_queues, max_lun) == (1, 0)

            response, status, _, inquiry = await scsi(front, bytes([0x12, 0, 0, 0, 36, 0]), 36, tag=1)
            assert (response, status) == (0, GOOD)
            assert inquiry[0] & 0x1F == 5 and inquiry[8:16] == b"PVCORE  "  # a CD-ROM unit, pvcore's own
            response, status, _, data = await scsi(front, bytes([0x28, 0, 0, 0, 0, 3, 0, 0, 2, 0]), 2 * BLOCK, tag=2)
            assert (response, status) == (0, GOOD)
            assert data == disc.read_bytes()[3 * BLOCK : 5 * BLOCK]

            answer = await loop.run_in_executor(None, send, str(tmp_path / "run" / "dom1-cd.media"), "eject 0")
            assert answer.startswith("ok "), answer
            response, status, sense, _ = await scsi(front, bytes(6), 0, tag=3)  # TEST UNIT READY
            assert (response, status) == (0, CHECK_CONDITION)
            assert (sense[2] & 0x0F, sense[12]) == (2, 0x3A)  # NOT READY, MEDIUM NOT PRESENT

    run(body)
