"""Block engine through the loopback transport, against plain preadv in the same run.

    .venv/bin/python bench/loopback_block.py [--rounds 5] [--seconds 2] [--poll-max-us 0]

For queue depths 1 and 32 it runs 4 KiB random reads from a 64 MiB image
(page cache warm) two ways, interleaved round by round:

* pvcore: the reference driver posts virtio-blk IN requests to the ring, the
  ring engine and block engine serve them (I/O threads do preadv straight
  into guest memory), completions come back with batched interrupts;
* peer: the same preadv calls issued by a thread pool of the same size,
  with no ring at all — the floor any Python backend pays.

It prints, per depth, the medians of requests/s and of backend CPU
microseconds per request (CPU time of every thread except the driver's,
from /proc/self/task/*/stat), interrupts per completion, and the ratios
pvcore / peer. ``--poll-max-us`` turns on the ring's adaptive polling
(:mod:`pvcore.ring.poll`; off by default here) and adds what it did.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import os
import random
import statistics
import struct
import tempfile
import threading
import time
from pathlib import Path

from pvcore.devices.block import create_block_device
from pvcore.testing.loopback import Loopback

BLOCK = 4096
IMAGE_SIZE = 64 << 20
WORKERS = 4
TICK = os.sysconf("SC_CLK_TCK")


def backend_cpu_seconds(exclude_tid: int) -> float:
    """CPU time of this process's threads other than ``exclude_tid``."""
    total = 0
    for task in os.listdir("/proc/self/task"):
        if int(task) == exclude_tid:
            continue
        try:
            fields = Path(f"/proc/self/task/{task}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / TICK


def run_pvcore(lb: Loopback, depth: int, seconds: float) -> tuple[float, float, float]:
    rng = random.Random(1)
    sectors = IMAGE_SIZE // 512
    me = threading.get_native_id()

    def post() -> None:
        sector = rng.randrange(0, sectors - 8) & ~7
        lb.submit(0, [struct.pack("<IIQ", 0, 0, sector)], [BLOCK, 1])

    interrupts0 = lb.interrupts(0)
    cpu0, start = backend_cpu_seconds(me), time.perf_counter()
    done = 0
    for _ in range(depth):
        post()
    while time.perf_counter() - start < seconds:
        used = lb.wait_used(0, 1)
        for item in used:
            assert item.data[-1] == 0, "read failed"
        done += len(used)
        for _ in used:
            post()
    lb.wait_used(0, depth)
    elapsed, cpu = time.perf_counter() - start, backend_cpu_seconds(me) - cpu0
    total = done + depth
    return total / elapsed, cpu / total * 1e6, (lb.interrupts(0) - interrupts0) / total


def run_peer(fd: int, depth: int, seconds: float, pool: concurrent.futures.ThreadPoolExecutor) -> tuple[float, float]:
    rng = random.Random(1)
    me = threading.get_native_id()
    buffers = [bytearray(BLOCK) for _ in range(depth)]

    def read(index: int) -> int:
        offset = rng.randrange(0, IMAGE_SIZE // BLOCK) * BLOCK
        return os.preadv(fd, [buffers[index]], offset)

    cpu0, start = backend_cpu_seconds(me), time.perf_counter()
    pending = {pool.submit(read, i): i for i in range(depth)}
    done = 0
    while time.perf_counter() - start < seconds:
        finished, _ = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
        for future in finished:
            index = pending.pop(future)
            future.result()
            done += 1
            pending[pool.submit(read, index)] = index
    concurrent.futures.wait(pending)
    done += len(pending)
    elapsed, cpu = time.perf_counter() - start, backend_cpu_seconds(me) - cpu0
    return done / elapsed, cpu / done * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--poll-max-us", type=int, default=0, help="the ring's longest polling window (0: off)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pvcore-bench-") as tmp:
        image = Path(tmp) / "disk.img"
        image.write_bytes(os.urandom(IMAGE_SIZE))
        backend, device = create_block_device({"path": str(image), "workers": str(WORKERS)}, name="bench")
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, daemon=True)
        thread.start()
        fd = os.open(image, os.O_RDONLY)
        pool = concurrent.futures.ThreadPoolExecutor(WORKERS)
        print(f"4 KiB random reads, 64 MiB image, {WORKERS} I/O threads, {args.rounds} rounds x {args.seconds} s, medians")
        print(f"{'depth':>5} {'pvcore req/s':>13} {'peer req/s':>11} {'ratio':>6} {'pvcore cpu us':>14} "
              f"{'peer cpu us':>12} {'ratio':>6} {'irq/compl':>9}")
        try:
            with Loopback(device, loop=loop, queue_size=128, poll_max_ns=args.poll_max_us * 1000) as lb:
                for depth in (1, 32):
                    ours, peers = [], []
                    for _ in range(args.rounds):
                        ours.append(run_pvcore(lb, depth, args.seconds))
                        peers.append(run_peer(fd, depth, args.seconds, pool))
                    rps = statistics.median(r[0] for r in ours)
                    cpu = statistics.median(r[1] for r in ours)
                    irq = statistics.median(r[2] for r in ours)
                    peer_rps = statistics.median(p[0] for p in peers)
                    peer_cpu = statistics.median(p[1] for p in peers)
                    print(f"{depth:>5} {rps:>13.0f} {peer_rps:>11.0f} {rps / peer_rps:>6.2f} {cpu:>14.1f} "
                          f"{peer_cpu:>12.1f} {cpu / peer_cpu:>6.2f} {irq:>9.2f}")
                if args.poll_max_us:
                    stats = lb.run_in_loop(lb.session.stats)
                    print(f"polling (max {args.poll_max_us} us): {stats['polls']} windows, {stats['polls_caught']} "
                          f"caught a request, {stats['poll_ns'] / 1e6:.1f} ms; {stats['kicks']} kicks, "
                          f"{stats['completions']} completions")
        finally:
            pool.shutdown()
            os.close(fd)
            backend.close()
            loop.call_soon_threadsafe(loop.stop)
            thread.join(5)


if __name__ == "__main__":
    main()
