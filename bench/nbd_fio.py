"""pvcore's NBD door against nbdkit's file plugin, driven by fio's nbd engine (libnbd), no guest.

    .venv/bin/python bench/nbd_fio.py [--rounds 5] [--seconds 4] [--workloads randread/4k/1,randread/4k/16,read/1m/4]
                                      [--placement any|same|split] [--poll-max-us N]

One 64 MiB image in the page cache is served twice: by
``pvcore serve --hypervisor lpar block:path=...,socket=...`` (its NBD server)
and by ``nbdkit --unix SOCKET file IMAGE`` (the C peer, 4 threads like pvcore's
4 I/O threads), each on one connection. Each round runs every workload (fio
``rw``/block size/queue depth; the default is the performance targets' three:
4 KiB random reads at depth 1 and 16, 1 MiB sequential reads at depth 4) on
one server and then the other (the order flips every round). It prints per
workload the medians of IOPS and of server CPU microseconds per I/O (utime+stime of the
server process from ``/proc/PID/stat`` around each fio run) and the ratios
pvcore / nbdkit, and which build of pvcore's hot modules the daemon ran
(``PVCORE_PURE_PYTHON=1`` in the environment forces the pure-Python one).
``--placement`` pins the processes with ``taskset``: ``same`` puts both
servers and fio on one CPU, ``split`` the servers on one and fio on another
(``any``, the default, leaves it to the scheduler). On a virtual machine a
request that wakes a process on another, idle CPU costs that CPU's wake-up,
and the cold caches it finds, so QD1 figures depend on where the scheduler
put the client and the server. ``--poll-max-us N`` gives pvcore's export that
option (an idle connection polls its socket for up to N µs before sleeping;
nbdkit does not poll), so its CPU per I/O includes the polling.
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

from proc_cpu import cpu_seconds

IMAGE_SIZE = 64 << 20


def wait_for_socket(path: Path, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 30
    while not path.exists():
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode} before creating {path}")
        if time.monotonic() > deadline:
            raise SystemExit(f"{what} did not create {path} within 30 s")
        time.sleep(0.05)


def pinned(cpu: int | None) -> list[str]:
    """The command prefix that runs a command on ``cpu`` only (none for None)."""
    return [] if cpu is None else ["taskset", "-c", str(cpu)]


def fio(socket: Path, workload: tuple[str, str, int], seconds: float, server: int, cpu: int | None = None
        ) -> tuple[float, float]:
    """IOPS and server CPU microseconds per I/O of one fio run of ``(rw, bs, depth)`` (on ``cpu``, if given)."""
    rw, bs, depth = workload
    cpu0 = cpu_seconds(server)
    done = subprocess.run(
        [*pinned(cpu), "fio", "--output-format=json", "--ioengine=nbd", f"--rw={rw}", f"--bs={bs}", f"--iodepth={depth}",
         "--time_based", f"--runtime={seconds}", "--name=bench", f"--uri=nbd+unix:///?socket={socket}"],
        capture_output=True, text=True, timeout=seconds + 60,
    )
    cpu = cpu_seconds(server) - cpu0
    if done.returncode != 0:
        raise SystemExit(done.stdout + done.stderr)
    job = json.loads(done.stdout[done.stdout.index("{"):])["jobs"][0]
    direction = "write" if "write" in rw else "read"
    ios = job[direction]["total_ios"]
    return job[direction]["iops"], cpu / ios * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--workloads", default="randread/4k/1,randread/4k/16,read/1m/4",
                        help="comma-separated fio rw/bs/iodepth triples")
    parser.add_argument("--placement", choices=("any", "same", "split"), default="any",
                        help="servers and fio on CPUs the scheduler picks (any), on one CPU (same), or apart (split)")
    parser.add_argument("--poll-max-us", type=int, default=0,
                        help="pvcore's poll-max-us= for its export (default 0: no polling)")
    args = parser.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    if args.placement == "split" and len(cpus) < 2:
        raise SystemExit("--placement split needs two CPUs")
    server_cpu = None if args.placement == "any" else cpus[-1]
    client_cpu = {"any": None, "same": cpus[-1], "split": cpus[0]}[args.placement]
    workloads = [(rw, bs, int(depth)) for rw, bs, depth in (w.split("/") for w in args.workloads.split(","))]
    with tempfile.TemporaryDirectory(prefix="pvcore-nbd-bench-") as tmp:
        directory = Path(tmp)
        image = directory / "disk.img"
        image.write_bytes(os.urandom(IMAGE_SIZE))
        sockets = {"pvcore": directory / "pvcore.sock", "nbdkit": directory / "nbdkit.sock"}
        log = open(directory / "servers.log", "wb")
        env = dict(os.environ, PVCORE_RUN_DIR=str(directory / "run"))
        servers = {
            "pvcore": subprocess.Popen(
                [*pinned(server_cpu), sys.executable, "-m", "pvcore.cli", "serve", "--hypervisor", "lpar",
                 f"block:name=bench,path={image},socket={sockets['pvcore']},workers=4,"
                 f"poll-max-us={args.poll_max_us}"],
                stdout=log, stderr=subprocess.STDOUT, env=env),
            "nbdkit": subprocess.Popen(
                [*pinned(server_cpu), "nbdkit", "--foreground", "--unix", str(sockets["nbdkit"]), "--threads", "4", "file", str(image)],
                stdout=log, stderr=subprocess.STDOUT),
        }
        try:
            for name, proc in servers.items():
                wait_for_socket(sockets[name], proc, name)
            build = subprocess.run([sys.executable, "-m", "pvcore.cli", "--version"], capture_output=True, text=True,
                                   env=env).stdout.splitlines()[1]
            print(f"pvcore {build}; 64 MiB image, {args.rounds} rounds x {args.seconds} s, medians; "
                  f"placement {args.placement}; pvcore poll-max-us={args.poll_max_us}")
            print(f"{'workload':>16} {'pvcore IOPS':>12} {'nbdkit IOPS':>12} {'ratio':>6} {'pvcore cpu us':>14} "
                  f"{'nbdkit cpu us':>14} {'ratio':>6}")
            for workload in workloads:
                results: dict[str, list[tuple[float, float]]] = {"pvcore": [], "nbdkit": []}
                for round_ in range(args.rounds):
                    order = ["pvcore", "nbdkit"] if round_ % 2 == 0 else ["nbdkit", "pvcore"]
                    for name in order:
                        results[name].append(fio(sockets[name], workload, args.seconds, servers[name].pid,
                                                 client_cpu))
                ours = [statistics.median(r[i] for r in results["pvcore"]) for i in (0, 1)]
                peer = [statistics.median(r[i] for r in results["nbdkit"]) for i in (0, 1)]
                print(f"{'/'.join(map(str, workload)):>16} {ours[0]:>12.0f} {peer[0]:>12.0f} {ours[0] / peer[0]:>6.2f} {ours[1]:>14.1f} "
                      f"{peer[1]:>14.1f} {ours[1] / peer[1]:>6.2f}")
        finally:
            for proc in servers.values():
                proc.terminate()
                proc.wait(timeout=30)
            log.close()


if __name__ == "__main__":
    main()
