"""The warm virtio-blk request path in one thread: one kick handled, one 4 KiB read, timed alone.

    .venv/bin/python bench/handler_block.py [--rounds 7] [--requests 20000] [--image-mb 64]

Through the loopback transport, the reference driver posts one 4 KiB
virtio-blk read from a 64 MiB image in the page cache,
and the queue's kick handler (``RunningQueue.on_kick``: ring walk and
validation, virtio-blk header, ``BlockBackend.serve_now``, used-ring write,
publication and interrupt decision, call eventfd write) is called directly
in the event loop's thread. Only that call is timed (``time.thread_time_ns``
around it); the driver's work between requests is not. On a busy machine
the CPU time of so short a call varies by ±30 %; for a figure that does not,
count instructions (docs/performance.md: ``valgrind --tool=cachegrind`` with
two request counts, the difference divided by the difference of requests). Prints the median per
round of the mean CPU microseconds per request, and which build of the hot
modules is loaded (``PVCORE_PURE_PYTHON=1`` forces the pure-Python one).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import struct
import tempfile
import time
from pathlib import Path

from pvcore.build import loaded_builds
from pvcore.devices.block import create_block_device
from pvcore.testing.loopback import Loopback

BLOCK = 4096
IMAGE_SIZE = 64 << 20
VIRTIO_BLK_T_IN = 0


def one_round(lb: Loopback, requests: int, image_size: int) -> float:
    """Mean CPU microseconds of ``on_kick`` over ``requests`` requests, run in the loop thread."""
    driver = lb.queues[0]
    running = lb.session.running[0]
    rng = random.Random(1)
    sectors = image_size // 512

    def run() -> float:
        spent = 0
        for _ in range(requests):
            sector = rng.randrange(0, sectors - 8) & ~7
            driver.add([struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, sector)], [BLOCK, 1])
            start = time.thread_time_ns()
            running.on_kick()
            spent += time.thread_time_ns() - start
            used = driver.used()
            assert len(used) == 1 and used[0].data[-1] == 0, "request failed or was not served inline"
        return spent / requests / 1000

    return lb.run_in_loop(run)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--image-mb", type=int, default=IMAGE_SIZE >> 20)
    args = parser.parse_args()
    builds = loaded_builds()
    compiled = sorted(name for name, build in builds.items() if build == "compiled")
    print(f"hot modules compiled: {len(compiled)} of {len(builds)}")
    with tempfile.TemporaryDirectory(prefix="pvcore-bench-") as tmp:
        image = Path(tmp) / "disk.img"
        image_size = args.image_mb << 20
        image.write_bytes(os.urandom(image_size))
        backend, device = create_block_device({"path": str(image), "workers": "4"}, name="bench")
        try:
            with Loopback(device, queue_size=128) as lb:
                one_round(lb, min(2000, args.requests), image_size)
                means = [one_round(lb, args.requests, image_size) for _ in range(args.rounds)]
        finally:
            backend.close()
    print(f"4 KiB read, on_kick CPU us/request: median {statistics.median(means):.2f} "
          f"(rounds: {' '.join(f'{m:.2f}' for m in means)})")


if __name__ == "__main__":
    main()
