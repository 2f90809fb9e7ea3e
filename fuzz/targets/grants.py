"""Xen grant references: a virtqueue whose descriptors name grant DMA addresses, over GrantMemory.

A simulated domain (16 pages of memfd RAM) grants the backend refs 0..7 for
frames 0..7 writable and refs 8..11 for frames 8..11 read-only; frames
12..15 are never granted. The input fills the domain's RAM (so the fuzzer
writes the descriptor table, avail ring and indirect tables, whose
addresses are grant addresses: bit 63, ref, offset) and picks the queue
size. The device side pops and completes chains as in the virtqueue target.

Checked: no byte of a read-only or ungranted frame changes; every page
GrantMemory mapped is unmapped at close (the memfd mappings are counted);
the used index equals the completions.
"""

from __future__ import annotations

import struct

from fuzz.harness import InvariantError, mappings
from pvcore.ring.memory import GuestMemoryError, scatter
from pvcore.ring.virtqueue import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, Virtqueue, VirtqueueError, ring_sizes
from pvcore_xen.grants import GrantMemory, grant_address
from pvcore_xen.host import PAGE_SIZE
from pvcore_xen.testing.host import SimulatedXenHost

PAGES = 16
WRITABLE = range(0, 8)
READONLY = range(8, 12)
USED_OFFSET = 2048
"""The used ring's offset in frame 0 (the descriptor table and avail ring start at 0 and must fit before it)."""
_state: dict[str, object] = {}


def setup() -> None:
    """One simulated host and domain with its grants."""
    host = SimulatedXenHost()
    domain = host.add_domain(1, PAGES * PAGE_SIZE)
    for frame in WRITABLE:
        domain.grant(frame, 0, ref=frame)
    for frame in READONLY:
        domain.grant(frame, 0, readonly=True, ref=frame)
    _state.update(host=host, domain=domain)


def one_input(data: bytes) -> None:
    """Serve one ring laid out in the domain's RAM."""
    if not data:
        return
    domain = _state["domain"]
    ram = domain.memory
    body = data[1 : 1 + PAGES * PAGE_SIZE]
    ram[:] = body + bytes(PAGES * PAGE_SIZE - len(body))
    before = bytes(ram)
    size = 1 << (data[0] % 7)
    memory = GrantMemory(1, _state["host"])
    base = mappings()
    desc_len, _, used_len = ring_sizes(size)
    pushed = 0
    own_ring = False
    try:
        try:
            queue = Virtqueue(memory, size, grant_address(0), grant_address(0, desc_len), grant_address(0, USED_OFFSET),
                              indirect=bool(data[0] & 0x80), next_used=0)
        except VirtqueueError:
            return
        for _ in range(size + 1):
            try:
                chain = queue.pop()
            except (VirtqueueError, GuestMemoryError):
                break
            if chain is None:
                break
            own_ring |= any(addr < grant_address(1) for addr, _ in chain.writable)
            written = scatter(memory, chain.writable, b"\xee" * min(chain.writable_len, 8192))
            queue.push_used(chain.head, written)
            pushed += 1
        queue.publish()
        (idx,) = struct.unpack_from("<H", ram, USED_OFFSET + 2)
        if pushed and not own_ring and idx != pushed & 0xFFFF:  # a buffer in frame 0 may overwrite the ring
            raise InvariantError(f"used idx {idx} after {pushed} completions (queue size {size})")
    finally:
        memory.close()
        del memory
    if mappings() > base:
        raise InvariantError(f"grant pages still mapped after close: {mappings() - base}")
    after = bytes(ram)
    for frame in range(len(WRITABLE), PAGES):
        start = frame * PAGE_SIZE
        if before[start : start + PAGE_SIZE] != after[start : start + PAGE_SIZE]:
            raise InvariantError(f"frame {frame} (read-only or not granted) was written")


def _desc(addr: int, length: int, flags: int, nxt: int) -> bytes:
    return struct.pack("<QIHH", addr, length, flags, nxt)


def seeds() -> dict[str, bytes]:
    """A Xen virtio-blk-like request over grants (header read-only, data and status writable), and one into a ROM frame."""
    size = 8
    desc_len, _, _ = ring_sizes(size)

    def ring(table: bytes, heads: list[int]) -> bytes:
        ram = bytearray(PAGE_SIZE)
        ram[: len(table)] = table
        struct.pack_into(f"<HH{len(heads)}H", ram, desc_len, 0, len(heads), *heads)
        return bytes([3]) + bytes(ram)

    good = (_desc(grant_address(8), 16, VIRTQ_DESC_F_NEXT, 1)
            + _desc(grant_address(1), 4096, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 2)
            + _desc(grant_address(2, 100), 1, VIRTQ_DESC_F_WRITE, 0))
    into_rom = _desc(grant_address(9), 512, VIRTQ_DESC_F_WRITE, 0) + _desc(grant_address(13), 16, 0, 0)
    return {"grant-request": ring(good, [0]), "into-rom": ring(into_rom, [0, 1])}
