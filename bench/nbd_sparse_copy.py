"""Copying a mostly sparse image with nbdcopy: pvcore's NBD server against nbdkit's file plugin.

    .venv/bin/python bench/nbd_sparse_copy.py [--rounds 3] [--size-mib 1024] [--data-mib 16]

A sparse image of ``--size-mib`` with ``--data-mib`` of random data in 1 MiB
pieces spread over it is served read-only by ``pvcore serve --hypervisor lpar
block:...`` (one daemon for the whole run) and by ``nbdkit --filter=stats file``
(started afresh for each copy, its stats file read when it exits). Each round
copies it with ``nbdcopy`` (libnbd: structured replies) to a file, twice per
server: as nbdcopy does by default (it asks the server for the image's extents
first, ``base:allocation``, and reads the data only), and with
``--no-extents`` (it reads everything: here pvcore answers holes with hole
chunks, nbdkit with zeros). Printed per server and mode, medians: the wall time
of nbdcopy and the bytes the server read from the image and sent as data
(pvcore: the device's ``bytes_read`` from ``pvcore ctl list --json``, which a
hole does not add to; nbdkit: its stats filter's read bytes). Each copy is
checked against the image with ``cmp``. Needs nbdcopy and nbdkit (Debian:
libnbd-bin, nbdkit).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MIB = 1 << 20
UNITS = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
STATS_READ = re.compile(r"^read: \d+ ops, [\d.]+ s, ([\d.]+) (B|KiB|MiB|GiB)", re.MULTILINE)


def wait_for_socket(path: Path, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 60
    while not path.exists():
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode} before creating {path}")
        if time.monotonic() > deadline:
            raise SystemExit(f"{what} did not create {path} within 60 s")
        time.sleep(0.05)


def copy(uri: str, out: Path, image: Path, extents: bool) -> float:
    """Seconds nbdcopy took to copy ``uri`` to ``out``; the copy must equal ``image``."""
    argv = ["nbdcopy", uri, str(out)] if extents else ["nbdcopy", "--no-extents", uri, str(out)]
    started = time.monotonic()
    subprocess.run(argv, check=True, timeout=600)
    seconds = time.monotonic() - started
    if subprocess.run(["cmp", str(image), str(out)]).returncode != 0:
        raise SystemExit(f"{' '.join(argv)}: the copy differs from the image")
    out.unlink()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--data-mib", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pvcore-nbd-sparse-", dir="/var/tmp") as tmp:
        directory = Path(tmp)
        image, out = directory / "sparse.img", directory / "copy.img"
        with open(image, "wb") as f:
            f.truncate(args.size_mib * MIB)
            step = args.size_mib // args.data_mib
            for piece in range(args.data_mib):
                f.seek(piece * step * MIB)
                f.write(os.urandom(MIB))
        env = dict(os.environ, PVCORE_RUN_DIR=str(directory / "run"))
        sock = directory / "pvcore.sock"
        log = open(directory / "servers.log", "wb")
        pvcore = subprocess.Popen(
            [sys.executable, "-m", "pvcore.cli", "serve", "--hypervisor", "lpar",
             f"block:name=sparse,path={image},socket={sock},readonly=on"],
            stdout=log, stderr=subprocess.STDOUT, env=env)

        def pvcore_bytes_read() -> int:
            done = subprocess.run([sys.executable, "-m", "pvcore.cli", "ctl", "list", "--json"],
                                  capture_output=True, text=True, check=True, env=env)
            (device,) = [d for d in json.loads(done.stdout) if d["name"] == "sparse"]
            return device["counters"]["bytes_read"]

        def run_pvcore(extents: bool) -> tuple[float, int]:
            before = pvcore_bytes_read()
            seconds = copy(f"nbd+unix:///?socket={sock}", out, image, extents)
            return seconds, pvcore_bytes_read() - before

        def run_nbdkit(extents: bool) -> tuple[float, int]:
            nbdkit_sock, stats = directory / "nbdkit.sock", directory / "stats.txt"
            stats.unlink(missing_ok=True)
            nbdkit_sock.unlink(missing_ok=True)
            proc = subprocess.Popen(
                ["nbdkit", "--foreground", "--unix", str(nbdkit_sock), "--threads", "4", "--filter=stats",
                 "file", str(image), f"statsfile={stats}"], stdout=log, stderr=subprocess.STDOUT)
            try:
                wait_for_socket(nbdkit_sock, proc, "nbdkit")
                seconds = copy(f"nbd+unix:///?socket={nbdkit_sock}", out, image, extents)
            finally:
                proc.terminate()
                proc.wait(timeout=30)
            match = STATS_READ.search(stats.read_text())
            return seconds, int(float(match[1]) * UNITS[match[2]]) if match else 0

        try:
            wait_for_socket(sock, pvcore, "pvcore")
            results: dict[tuple[str, bool], list[tuple[float, int]]] = {}
            for round_ in range(args.rounds):
                servers = [("pvcore", run_pvcore), ("nbdkit", run_nbdkit)]
                for name, run in servers if round_ % 2 == 0 else servers[::-1]:
                    for extents in (True, False):
                        results.setdefault((name, extents), []).append(run(extents))
            print(f"{args.size_mib} MiB image, {args.data_mib} MiB of data; nbdcopy, {args.rounds} rounds, medians")
            print(f"{'server':>8} {'mode':>14} {'seconds':>8} {'MiB read and sent as data':>26}")
            for (name, extents), runs in results.items():
                seconds = statistics.median(r[0] for r in runs)
                moved = statistics.median(r[1] for r in runs) / MIB
                print(f"{name:>8} {'extents' if extents else '--no-extents':>14} {seconds:>8.2f} {moved:>26.1f}")
        finally:
            pvcore.terminate()
            pvcore.wait(timeout=30)
            log.close()


if __name__ == "__main__":
    main()
