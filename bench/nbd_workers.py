"""NBD over several cores: two exports, or two connections to one spread export, against one process and nbdkit.

    .venv/bin/python bench/nbd_workers.py [--rounds 5] [--seconds 4] [--depth 16]

Two 64 MiB images in the page cache, each exported by NBD (the lpar
plugin's door), are served three ways at once: by one ``pvcore serve
--workers 1`` (both exports in one process), by one ``pvcore serve --workers
2`` (one export per worker process) and by two ``nbdkit file`` processes (the
C peer). Each round runs, on each server in turn (the order rotates), one fio
job of 4 KiB random reads at ``--depth`` per export, both at once (fio's nbd
engine, one connection per export), and for pvcore ``--workers 1`` also one
export alone. It prints the medians of total IOPS and of server CPU
microseconds per I/O (utime+stime of the server and its worker processes),
and the ratios the performance issue asks for: two exports with ``--workers
2`` over pvcore's own one-export figure (target >= 1.7), and over nbdkit.

The same is run for two connections to one export (two fio jobs on one
socket): served by ``pvcore serve --workers 2`` with ``spread=on`` (each
worker serves the export, the parent hands the connections out in turn), by
``--workers 1`` (both connections in one process) and by one nbdkit; the
ratio the issue names is two connections to the spread export over one
connection to one export (target >= 1.7).
Needs fio and nbdkit (Debian: fio, nbdkit).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from proc_cpu import tree_cpu_seconds

IMAGE_SIZE = 64 << 20


def wait_for_sockets(paths: list[Path], proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 60
    while not all(path.exists() for path in paths):
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode} before creating {paths}")
        if time.monotonic() > deadline:
            raise SystemExit(f"{what} did not create {paths} within 60 s")
        time.sleep(0.05)


def fio(sockets: list[Path], depth: int, seconds: float, servers: list[int]) -> tuple[float, float]:
    """Total IOPS of one fio job (one connection) per entry of ``sockets``, run at once, and server CPU
    microseconds per I/O."""
    jobs = []
    for index, sock in enumerate(sockets):
        jobs += [f"--name=export{index}", f"--uri=nbd+unix:///?socket={sock}"]
    cpu0 = sum(tree_cpu_seconds(pid) for pid in servers)
    done = subprocess.run(
        ["fio", "--output-format=json", "--ioengine=nbd", "--rw=randread", "--bs=4k", f"--iodepth={depth}",
         "--time_based", f"--runtime={seconds}", *jobs],
        capture_output=True, text=True, timeout=seconds + 60,
    )
    cpu = sum(tree_cpu_seconds(pid) for pid in servers) - cpu0
    if done.returncode != 0:
        raise SystemExit(done.stdout + done.stderr)
    results = json.loads(done.stdout[done.stdout.index("{"):])["jobs"]
    iops = sum(job["read"]["iops"] for job in results)
    ios = sum(job["read"]["total_ios"] for job in results)
    return iops, cpu / ios * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--depth", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pvcore-workers-bench-") as tmp:
        directory = Path(tmp)
        images = [directory / f"disk{i}.img" for i in (0, 1)]
        for image in images:
            image.write_bytes(os.urandom(IMAGE_SIZE))
        log = open(directory / "servers.log", "wb")
        sockets: dict[str, list[Path]] = {}
        pids: dict[str, list[int]] = {}
        procs: list[subprocess.Popen[bytes]] = []
        try:
            for workers in (1, 2):
                name = f"pvcore --workers {workers}"
                sockets[name] = [directory / f"w{workers}-{i}.sock" for i in (0, 1)]
                env = dict(os.environ, PVCORE_RUN_DIR=str(directory / f"run{workers}"))
                proc = subprocess.Popen(
                    [sys.executable, "-m", "pvcore.cli", "serve", "--hypervisor", "lpar", "--workers", str(workers),
                     *(f"block:name=e{i},path={images[i]},socket={sockets[name][i]}" for i in (0, 1))],
                    stdout=log, stderr=subprocess.STDOUT, env=env)
                procs.append(proc)
                pids[name] = [proc.pid]
                wait_for_sockets(sockets[name], proc, name)
            spread = "pvcore --workers 2 spread=on"
            sockets[spread] = [directory / "spread.sock"]
            proc = subprocess.Popen(
                [sys.executable, "-m", "pvcore.cli", "serve", "--hypervisor", "lpar", "--workers", "2",
                 f"block:name=s,path={images[0]},socket={sockets[spread][0]},spread=on"],
                stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PVCORE_RUN_DIR=str(directory / "runs")))
            procs.append(proc)
            pids[spread] = [proc.pid]
            wait_for_sockets(sockets[spread], proc, spread)
            sockets["nbdkit x2"] = [directory / f"nbdkit-{i}.sock" for i in (0, 1)]
            pids["nbdkit x2"] = []
            for i in (0, 1):
                proc = subprocess.Popen(["nbdkit", "--foreground", "--unix", str(sockets["nbdkit x2"][i]), "--threads",
                                         "4", "file", str(images[i])], stdout=log, stderr=subprocess.STDOUT)
                procs.append(proc)
                pids["nbdkit x2"].append(proc.pid)
                wait_for_sockets([sockets["nbdkit x2"][i]], proc, "nbdkit")
            build = subprocess.run([sys.executable, "-m", "pvcore.cli", "--version"], capture_output=True,
                                   text=True).stdout.splitlines()[1]
            print(f"pvcore {build}; {os.cpu_count()} CPUs; 4 KiB random reads at depth {args.depth}, "
                  f"{args.rounds} rounds x {args.seconds} s, medians")
            runs = {"one export, pvcore --workers 1": ("pvcore --workers 1", [0]),
                    **{f"two exports, {name}": (name, [0, 1]) for name in sockets if name != spread},
                    **{f"one export 2 conns, {name}": (name, [0, 0])
                       for name in ("pvcore --workers 1", spread, "nbdkit x2")}}
            results: dict[str, list[tuple[float, float]]] = {label: [] for label in runs}
            labels = list(runs)
            for round_ in range(args.rounds):
                for label in labels[round_ % len(labels):] + labels[:round_ % len(labels)]:
                    name, indexes = runs[label]
                    results[label].append(fio([sockets[name][i] for i in indexes], args.depth, args.seconds,
                                              pids[name]))
            medians = {label: [statistics.median(r[i] for r in rs) for i in (0, 1)] for label, rs in results.items()}
            print(f"{'':>50} {'IOPS':>9} {'cpu us/IO':>10}")
            for label, (iops, cpu) in medians.items():
                print(f"{label:>50} {iops:>9.0f} {cpu:>10.1f}")
            alone = medians["one export, pvcore --workers 1"][0]
            two = medians["two exports, pvcore --workers 2"][0]
            print(f"two exports --workers 2 / one export: {two / alone:.2f} (target >= 1.7)")
            print(f"two exports --workers 2 / --workers 1: {two / medians['two exports, pvcore --workers 1'][0]:.2f}")
            print(f"two exports --workers 2 / nbdkit x2: {two / medians['two exports, nbdkit x2'][0]:.2f}")
            conns = medians[f"one export 2 conns, {spread}"][0]
            print(f"one export 2 conns spread=on --workers 2 / one conn: {conns / alone:.2f} (target >= 1.7)")
            print(f"one export 2 conns spread=on --workers 2 / --workers 1: "
                  f"{conns / medians['one export 2 conns, pvcore --workers 1'][0]:.2f}")
            print(f"one export 2 conns spread=on --workers 2 / nbdkit: "
                  f"{conns / medians['one export 2 conns, nbdkit x2'][0]:.2f}")
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait(timeout=60)
            log.close()


if __name__ == "__main__":
    main()
