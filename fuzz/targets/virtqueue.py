"""The split virtqueue (descriptor table, avail ring, indirect tables) in a real GuestMemory.

Guest memory is three regions cut from one host buffer with guard bytes
around each: RAM A at 0 (the rings), RAM B at 1 MiB (buffers) and a
read-only region at 2 MiB (a ROM). The input gives the queue size and
features, the avail index and every byte of A and B, so the fuzzer writes
the descriptor tables, avail ring and indirect tables. The device side pops
every chain (as a device's handler would), writes a pattern into each
writable buffer, pushes and publishes used elements, until the ring is empty
or broken (a :class:`VirtqueueError`, which means "needs reset").

Checked: no byte outside the chains' writable buffers and the used ring
changes (guards, the read-only region and readable buffers included); every
popped buffer lies in guest memory; after a failed request the used ring is
consistent (once anything completed, the used idx in memory equals the
elements published, each a head that was popped, with the length written
to it, unless the guest gave its own used ring as a buffer).
"""

from __future__ import annotations

import struct

from fuzz.harness import InvariantError
from pvcore.ring.memory import GuestMemory, MemoryRegion, scatter
from pvcore.ring.virtqueue import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    Virtqueue,
    VirtqueueError,
    ring_sizes,
)

GUARD = 4096
REGION = 64 * 1024
ROM = 16 * 1024
B_ADDR = 1 << 20
ROM_ADDR = 2 << 20
USED_ADDR = 32 * 1024
"""The used ring's offset in RAM A; the descriptor table is at 0 and the avail ring follows it."""
_HEAD = struct.Struct("<BBH")
_ROM_FILL = bytes(range(256)) * (ROM // 256)


def setup() -> None:
    """Nothing to build: each input gets fresh memory."""


def _layout(backing: bytearray) -> GuestMemory:
    view = memoryview(backing)
    a = GUARD
    b = a + REGION + GUARD
    rom = b + REGION + GUARD
    return GuestMemory([
        MemoryRegion(0, view[a : a + REGION]),
        MemoryRegion(B_ADDR, view[b : b + REGION]),
        MemoryRegion(ROM_ADDR, view[rom : rom + ROM].toreadonly()),
    ])


def _host_offset(guest_addr: int) -> int:
    if guest_addr < REGION:
        return GUARD + guest_addr
    if B_ADDR <= guest_addr < B_ADDR + REGION:
        return GUARD + REGION + GUARD + guest_addr - B_ADDR
    raise InvariantError(f"a writable buffer at {guest_addr:#x} lies outside the writable RAM")


def one_input(data: bytes) -> None:
    """Lay out one ring from the input and serve it until it is empty or broken."""
    if len(data) < _HEAD.size:
        return
    size_log2, features, avail_idx = _HEAD.unpack_from(data)
    size = 1 << (size_log2 % 9)
    backing = bytearray(GUARD + REGION + GUARD + REGION + GUARD + ROM + GUARD)
    body = data[_HEAD.size:]
    backing[GUARD : GUARD + min(len(body), REGION)] = body[:REGION]
    rest = body[REGION : 2 * REGION]
    b_start = GUARD + REGION + GUARD
    backing[b_start : b_start + len(rest)] = rest
    rom_start = b_start + REGION + GUARD
    backing[rom_start : rom_start + ROM] = _ROM_FILL
    desc_len, avail_len, used_len = ring_sizes(size)
    avail_addr = desc_len
    struct.pack_into("<H", backing, GUARD + avail_addr + 2, avail_idx)
    memory = _layout(backing)
    before = bytes(backing)
    queue = Virtqueue(memory, size, 0, avail_addr, USED_ADDR, event_idx=bool(features & 1),
                      indirect=bool(features & 2), next_used=0)
    allowed = [(GUARD + USED_ADDR, GUARD + USED_ADDR + used_len + 2)]
    pushed: list[tuple[int, int]] = []
    for _ in range(size + 1):
        try:
            chain = queue.pop()
        except VirtqueueError:
            break
        if chain is None:
            break
        for addr, length in chain.readable + chain.writable:
            memory.check(addr, length)
        for addr, length in chain.writable:
            memory.check(addr, length, write=True)
            if length:
                allowed.append((_host_offset(addr), _host_offset(addr) + length))
        pattern = bytes([len(pushed) & 0xFF or 1]) * min(chain.writable_len, 4096)
        written = scatter(memory, chain.writable, pattern)
        queue.push_used(chain.head, written)
        pushed.append((chain.head, written))
        if len(pushed) % 3 == 0:
            queue.publish()
    queue.publish()
    used_start, used_end = allowed[0]
    if not any(start < used_end and end > used_start for start, end in allowed[1:]):
        _check_used(backing, size, pushed)  # unless the guest gave its own used ring as a buffer
    _check_untouched(before, backing, allowed)


def _check_used(backing: bytearray, size: int, pushed: list[tuple[int, int]]) -> None:
    used = GUARD + USED_ADDR
    (idx,) = struct.unpack_from("<H", backing, used + 2)
    if pushed and idx != len(pushed) & 0xFFFF:  # with none, the idx is what the guest wrote
        raise InvariantError(f"used idx {idx} after {len(pushed)} completions")
    for n, (head, written) in enumerate(pushed[-size:], start=max(0, len(pushed) - size)):
        got = struct.unpack_from("<II", backing, used + 4 + 8 * (n % size))
        if got != (head, written):
            raise InvariantError(f"used element {n} is {got}, completed was {(head, written)}")


def _check_untouched(before: bytes, after: bytearray, allowed: list[tuple[int, int]]) -> None:
    if before == after:
        return
    allowed.sort()
    at = 0
    for start, end in allowed + [(len(after), len(after))]:
        if before[at:start] != after[at:start]:
            offset = next(i for i in range(at, start) if before[i] != after[i])
            raise InvariantError(f"host byte {offset:#x} changed outside the writable buffers and the used ring")
        at = max(at, end)


def _desc(addr: int, length: int, flags: int, nxt: int) -> bytes:
    return struct.pack("<QIHH", addr, length, flags, nxt)


def seeds() -> dict[str, bytes]:
    """Rings as Linux's virtio drivers build them: a block request (header, data, status) direct and indirect."""
    size = 8
    desc_len, _, _ = ring_sizes(size)

    def ring(table: bytes, heads: list[int], indirect_table: bytes = b"") -> bytes:
        ram = bytearray(REGION)
        ram[0 : len(table)] = table
        struct.pack_into(f"<HH{len(heads)}H", ram, desc_len, 0, len(heads), *heads)
        ram[16384 : 16384 + len(indirect_table)] = indirect_table
        return _HEAD.pack(3, 3, len(heads)) + bytes(ram)

    direct = (_desc(B_ADDR, 16, VIRTQ_DESC_F_NEXT, 1) + _desc(B_ADDR + 512, 4096, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 2)
              + _desc(B_ADDR + 8192, 1, VIRTQ_DESC_F_WRITE, 0))
    indirect_table = (_desc(B_ADDR, 16, VIRTQ_DESC_F_NEXT, 1) + _desc(ROM_ADDR, 512, VIRTQ_DESC_F_NEXT, 2)
                      + _desc(B_ADDR + 9000, 1, VIRTQ_DESC_F_WRITE, 0))
    indirect = _desc(16384, len(indirect_table), VIRTQ_DESC_F_INDIRECT, 0)
    return {
        "direct": ring(direct, [0]),
        "indirect": ring(direct + indirect, [0, 3], indirect_table),
        "loop": ring(_desc(B_ADDR, 8, VIRTQ_DESC_F_NEXT, 0), [0]),
    }
