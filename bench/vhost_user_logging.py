"""What dirty-page logging costs the block engine: 4 KiB reads over vhost-user, logging off and on.

    .venv/bin/python bench/vhost_user_logging.py [--rounds 5] [--seconds 2] [--depth 1 --depth 32]

``--off-only`` runs logging off only, so that the same script can measure
a pvcore from before logging existed (``PYTHONPATH=OLD_CHECKOUT``).

The Python front end (pvcore.testing.vhost_user_frontend) drives pvcore's
vhost-user-blk back end (served in this process, on its own event-loop thread)
with 4 KiB random reads from a 64 MiB image (page cache warm). Rounds alternate
logging off (no log) and on (SET_LOG_BASE + VHOST_F_LOG_ALL + VRING_F_LOG, as
QEMU sends while migrating). It prints the medians of requests/s and of the
back end's CPU microseconds per request (CPU of every thread except the
front end's), and the cost of one DirtyLog.mark call.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import tempfile
import threading
import time
import timeit
from pathlib import Path

from pvcore.devices.block import create_block_device
from pvcore.devices.block.virtio_blk import REQUEST_HEADER, VIRTIO_BLK_T_IN
from pvcore.primitives import HypervisorPrimitives
from pvcore.ring.fdmemory import sealed_memfd
from pvcore.testing.vhost_user_frontend import VhostUserFrontend
from pvcore.transports.vhost_user import VhostUserFrontDoor
from loopback_block import backend_cpu_seconds

IMAGE = 64 << 20
RAM = 64 << 20


def run(frontend: VhostUserFrontend, depth: int, seconds: float) -> tuple[float, float]:
    me = threading.get_native_id()
    sectors = IMAGE // 512 // 8
    done = 0
    cpu0, t0 = backend_cpu_seconds(me), time.perf_counter()
    outstanding = 0
    while time.perf_counter() - t0 < seconds:
        while outstanding < depth:
            frontend.submit(0, [REQUEST_HEADER.pack(VIRTIO_BLK_T_IN, 0, 8 * random.randrange(sectors))], [4096, 1])
            outstanding += 1
        got = frontend.wait_used(0, 1)
        got += frontend.queues[0].used()
        outstanding -= len(got)
        done += len(got)
    frontend.wait_used(0, outstanding) if outstanding else None
    elapsed, cpu = time.perf_counter() - t0, backend_cpu_seconds(me) - cpu0
    return done / elapsed, cpu / done * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--depth", type=int, action="append")
    parser.add_argument("--off-only", action="store_true",
                        help="logging off only (runs on a pvcore from before logging existed, to compare)")
    args = parser.parse_args()
    modes = (False,) if args.off_only else (False, True)
    depths = args.depth or [1, 32]
    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "disk.img"
        image.write_bytes(os.urandom(IMAGE))
        backend, device = create_block_device({"path": str(image)}, name="bench")
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, daemon=True)
        thread.start()
        door = VhostUserFrontDoor(device, Path(tmp) / "b.sock", primitives=HypervisorPrimitives(), name="bench")
        asyncio.run_coroutine_threadsafe(door.start(), loop).result()
        log_fd = sealed_memfd("log", RAM // 4096 // 8)
        results: dict[tuple[int, bool], list[tuple[float, float]]] = {}
        try:
            for depth in depths:
                for round_ in range(args.rounds):
                    for logging_on in (modes if round_ % 2 == 0 else modes[::-1]):
                        with VhostUserFrontend.connect(Path(tmp) / "b.sock", ram_size=RAM) as frontend:
                            frontend.start(queue_size=128)
                            if logging_on:
                                frontend.start_logging(log_fd, RAM // 4096 // 8)
                            results.setdefault((depth, logging_on), []).append(run(frontend, depth, args.seconds))
        finally:
            asyncio.run_coroutine_threadsafe(door.stop(), loop).result()
            loop.call_soon_threadsafe(loop.stop)
            backend.close()
        print(f"{'depth':>5} {'logging':>7} {'req/s':>9} {'CPU us/req':>10}")
        for (depth, on), values in sorted(results.items()):
            rate = statistics.median(v[0] for v in values)
            cpu = statistics.median(v[1] for v in values)
            print(f"{depth:>5} {'on' if on else 'off':>7} {rate:>9.0f} {cpu:>10.1f}")
        if args.off_only:
            return
        from pvcore.ring.dirtylog import DirtyLog

        log = DirtyLog(log_fd, RAM // 4096 // 8, 0)
        per = min(timeit.repeat(lambda: log.mark(0x123000, 4096), number=100000, repeat=5)) / 100000
        per_used = min(timeit.repeat(lambda: log.mark(0x200010, 8), number=100000, repeat=5)) / 100000
        print(f"DirtyLog.mark: {per * 1e6:.2f} us per 4 KiB buffer, {per_used * 1e6:.2f} us per used element")
        log.close()
        os.close(log_fd)


if __name__ == "__main__":
    main()
