"""Guest-given lengths never size a copy on the shared event loop (virtio-blk segment lists, console output).

A descriptor chain may describe gigabytes (many descriptors pointing at the
same guest pages). A device that joined such a payload into one bytes object
before checking its length would stall every guest of the daemon while it
copied. These tests post such chains by hand and watch every byte the device
reads from guest memory.
"""

from __future__ import annotations

import struct
import time
from pathlib import Path

import pytest

from pvcore.devices.block import BlockBackend, RawFileStore
from pvcore.devices.console import ConsoleStream, VirtioConsole
from pvcore.devices.console.virtio import MAX_TRANSMIT_BYTES, TRANSMITQ
from pvcore.devices.block.virtio_blk import (
    MAX_DISCARD_SEGMENTS,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_WRITE_ZEROES,
    VirtioBlock,
)
from pvcore.ring.virtqueue import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from pvcore.testing.loopback import Loopback

PAYLOAD_DESCRIPTORS = 100
PAYLOAD_BUFFER = 1 << 20
"""Each payload descriptor points at the same 1 MiB: the chain describes 100 MiB."""


class ReadCounter:
    """Wraps ``GuestMemory.read`` of one memory object and counts the bytes read inside a range."""

    def __init__(self, memory, start: int, length: int) -> None:
        self.memory = memory
        self.start, self.end = start, start + length
        self.bytes = 0
        self._read = memory.read
        memory.read = self.read

    def read(self, addr: int, length: int) -> bytes:
        if addr < self.end and addr + length > self.start:
            self.bytes += length
        return self._read(addr, length)


def post_chain(lb: Loopback, buffers: list[tuple[int, int, int]]) -> None:
    """Write ``(addr, length, flags)`` descriptors 0..n-1 as one chain and make head 0 available."""
    queue = lb.queues[0]
    for index, (addr, length, flags) in enumerate(buffers):
        last = index == len(buffers) - 1
        queue.write_descriptor(index, addr, length, flags | (0 if last else VIRTQ_DESC_F_NEXT), index + 1)
    queue.post_head(0)
    lb.kick(0)


def wait_used(lb: Loopback, count: int, timeout: float = 60.0) -> None:
    """Wait until the device has put ``count`` chains in the used ring (read straight from guest memory)."""
    queue = lb.queues[0]
    deadline = time.monotonic() + timeout
    while lb.ram.memory.read_u16(queue.used_addr + 2) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"the device used fewer than {count} chains in {timeout}s")
        time.sleep(0.01)


@pytest.mark.parametrize("kind", [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES])
def test_huge_segment_list_is_refused_before_it_is_read(tmp_path: Path, kind: int) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    backend = BlockBackend(RawFileStore(str(image)))
    device = VirtioBlock(backend)
    try:
        with Loopback(device, queue_size=128, ram_size=4 << 20) as lb:
            header = lb.ram.alloc(16)
            lb.ram.memory.write(header, struct.pack("<IIQ", kind, 0, 0))
            payload = lb.ram.alloc(PAYLOAD_BUFFER)
            status = lb.ram.alloc(1)
            lb.ram.memory.write_u8(status, 0xFF)
            counter = ReadCounter(lb.ram.memory, payload, PAYLOAD_BUFFER)
            chain = [(header, 16, 0)]
            chain += [(payload, PAYLOAD_BUFFER, 0)] * PAYLOAD_DESCRIPTORS
            chain += [(status, 1, VIRTQ_DESC_F_WRITE)]
            post_chain(lb, chain)
            wait_used(lb, 1)
            assert lb.ram.memory.read(status, 1)[0] == VIRTIO_BLK_S_IOERR
            assert counter.bytes <= MAX_DISCARD_SEGMENTS * 16, (
                f"the device read {counter.bytes} bytes of a segment list it had to refuse"
            )
    finally:
        backend.close()


def test_a_huge_console_transmit_chain_is_capped() -> None:
    stream = ConsoleStream("huge")
    device = VirtioConsole(stream)
    with Loopback(device, queue_size=128, ram_size=4 << 20) as lb:
        payload = lb.ram.alloc(PAYLOAD_BUFFER)
        lb.ram.memory.fill(payload, PAYLOAD_BUFFER, ord("x"))
        counter = ReadCounter(lb.ram.memory, payload, PAYLOAD_BUFFER)
        queue = lb.queues[TRANSMITQ]
        for index in range(PAYLOAD_DESCRIPTORS):
            last = index == PAYLOAD_DESCRIPTORS - 1
            queue.write_descriptor(index, payload, PAYLOAD_BUFFER, 0 if last else VIRTQ_DESC_F_NEXT, index + 1)
        queue.post_head(0)
        lb.kick(TRANSMITQ)
        deadline = time.monotonic() + 60
        while lb.ram.memory.read_u16(queue.used_addr + 2) < 1:
            assert time.monotonic() < deadline, "the console never returned the chain"
            time.sleep(0.01)
        assert counter.bytes <= MAX_TRANSMIT_BYTES
        assert stream.bytes_out == MAX_TRANSMIT_BYTES
        assert device.output_dropped == PAYLOAD_DESCRIPTORS * PAYLOAD_BUFFER - MAX_TRANSMIT_BYTES
        assert stream.scrollback.snapshot().endswith(b"x" * 1024)
