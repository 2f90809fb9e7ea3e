"""What ``--metrics`` costs a block device: IOPS of one NBD client with and without it.

    .venv/bin/python bench/metrics_overhead.py [--rounds 9] [--count 50000] [--depth 1 16]

Two ``pvcore serve --hypervisor lpar`` processes serve two copies of one
64 MiB image over the lpar NBD door, one with ``--metrics 127.0.0.1:PORT``
(which also switches on the block service-time histogram, the one cost
metrics add to the request path), one without. In every round
``qemu-img bench`` (QEMU's C NBD client) sends ``--count`` 4 KiB reads at each
``--depth`` to each server in turn (which goes first flips every round), and
then, to be sure the endpoint was live, this scrapes it once. Prints per
depth the median IOPS of each side over the rounds and the ratio
with / without, and every round's figure (the machine is shared: look at the spread). Reads of an image in the page cache: the cheapest requests
pvcore serves, so the histogram's share is as large as it can be.

Last, the same comparison without a client or a socket, to see the
histogram's own cost through the noise of a shared machine: one block
engine in this process serves ``--engine-reads`` 4 KiB reads from the page
cache on the calling thread (``BlockBackend.serve_now``, the path most NBD
reads take at depth 1), with and without the histogram, alternating over
the rounds; it prints the medians of the microseconds per read.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from pvcore.devices.block.backend import BlockBackend, BlockOp, BlockRequest
from pvcore.devices.block.store import RawFileStore

IMAGE_MIB = 64
SIDES = ("without", "with")
COMPLETED = re.compile(r"Run completed in ([\d.]+) seconds")


def free_port() -> int:
    """A TCP port nobody listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def serving(tmp: Path, side: str, metrics_port: int) -> Path:
    """A ``pvcore serve`` of a fresh image copy; yields its NBD socket."""
    image, sock = tmp / f"{side}.img", tmp / f"{side}.sock"
    shutil.copyfile(tmp / "image.img", image)
    extra = ["--metrics", f"127.0.0.1:{metrics_port}"] if side == "with" else []
    log = open(tmp / f"{side}.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pvcore.cli", "serve", "--hypervisor", "lpar", *extra, f"block:path={image},socket={sock}"],
        stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PVCORE_RUN_DIR=str(tmp / f"run-{side}")),
    )
    try:
        deadline = time.monotonic() + 60
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"pvcore serve ({side} metrics) did not start: {(tmp / f'{side}.log').read_text()}")
            time.sleep(0.1)
        yield sock
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        log.close()


def iops(sock: Path, count: int, depth: int) -> float:
    """4 KiB reads per second that ``qemu-img bench`` got from the export at ``sock``."""
    done = subprocess.run(
        ["qemu-img", "bench", "-c", str(count), "-d", str(depth), "-s", "4k", "-f", "raw",
         f"nbd+unix:///?socket={sock}"],
        check=True, capture_output=True, text=True, timeout=600,
    )
    match = COMPLETED.search(done.stdout)
    if match is None:
        raise SystemExit(f"qemu-img bench printed no time: {done.stdout}")
    return count / float(match.group(1))


def engine_microseconds(image: Path, reads: int, histogram: bool) -> float:
    """Microseconds per 4 KiB read that a block engine serves on the calling thread."""
    backend = BlockBackend(RawFileStore(str(image), readonly=True), name="bench")
    try:
        if histogram:
            backend.measure_service_time()
        size = image.stat().st_size
        requests = [
            BlockRequest(BlockOp.READ, (i * 4096 * 7) % size, 4096, (memoryview(bytearray(4096)),)) for i in range(256)
        ]
        for request in requests:  # bring the 256 blocks into the page cache
            backend.store.readv(request.buffers, request.offset)
        started = time.perf_counter()
        for i in range(reads):
            request = requests[i % len(requests)]
            while not backend.serve_now(request):  # evicted under memory pressure: bring it back, count it again
                backend.store.readv(request.buffers, request.offset)
        return (time.perf_counter() - started) / reads * 1e6
    finally:
        backend.close()


def main() -> None:
    """Run the rounds and print the medians and ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--count", type=int, default=50000, help="reads per qemu-img bench run")
    parser.add_argument("--depth", type=int, nargs="+", default=[1, 16], help="queue depths")
    parser.add_argument("--engine-reads", type=int, default=200000, help="reads per in-process engine run")
    args = parser.parse_args()
    if shutil.which("qemu-img") is None:
        raise SystemExit("qemu-img is needed (Debian: qemu-utils)")
    port = free_port()
    results: dict[tuple[str, int], list[float]] = {(side, depth): [] for side in SIDES for depth in args.depth}
    with tempfile.TemporaryDirectory(prefix="pvcore-bench-") as name:
        tmp = Path(name)
        (tmp / "image.img").write_bytes(os.urandom(IMAGE_MIB << 20))
        with serving(tmp, "without", port) as without, serving(tmp, "with", port) as with_metrics:
            sockets = {"without": without, "with": with_metrics}
            for round_ in range(args.rounds):
                order = SIDES if round_ % 2 == 0 else SIDES[::-1]
                for depth in args.depth:
                    for side in order:
                        results[side, depth].append(iops(sockets[side], args.count, depth))
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
                    assert b"pvcore_request_seconds_bucket" in response.read()
        print_nbd(args, results)
        engine: dict[bool, list[float]] = {False: [], True: []}
        for round_ in range(args.rounds):
            for histogram in (False, True) if round_ % 2 == 0 else (True, False):
                engine[histogram].append(engine_microseconds(tmp / "image.img", args.engine_reads, histogram))
    without, with_ = statistics.median(engine[False]), statistics.median(engine[True])
    print(
        f"engine alone, serve_now 4 KiB read: without histogram {without:.2f} us, with {with_:.2f} us, "
        f"+{with_ - without:.2f} us per read"
    )


def print_nbd(args: argparse.Namespace, results: dict[tuple[str, int], list[float]]) -> None:
    """The NBD client's medians, ratios and every round's figure."""
    print(f"4 KiB reads, qemu-img bench -c {args.count}, medians of {args.rounds} rounds")
    for depth in args.depth:
        without = statistics.median(results["without", depth])
        with_ = statistics.median(results["with", depth])
        print(f"QD{depth:<3} without --metrics {without:9.0f} IOPS   with {with_:9.0f} IOPS   ratio {with_ / without:.3f}")
        for side in SIDES:
            print(f"      {side:>7}: " + " ".join(f"{value:.0f}" for value in results[side, depth]), flush=True)


if __name__ == "__main__":
    main()
