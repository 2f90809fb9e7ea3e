"""Many devices in one daemon: threads, RSS, idle CPU and start-up time, and the thread bound under disk load.

    .venv/bin/python bench/many_devices.py [--counts 1,64,1024] [--rounds 3] [--idle 10] [--load-disks 16]
                                           [--load-seconds 5] [--json FILE] [--source DIR] [--serve-arg=ARG]...

For each count N, one ``pvcore serve --hypervisor kvm`` serves N vhost-user
devices, a quarter each of disks (sparse 64 MiB files in a scratch
directory), NICs (one switch), rng devices and consoles (N=1: one disk).
No guest is needed: the devices listen. Once the daemon logs that it serves
them all and every socket path exists, the bench reads, over the daemon and
any process it started:

* start-up: seconds from starting the process to that point;
* threads (``Threads`` in ``/proc/PID/status``) and RSS (``VmRSS``);
* idle CPU: ``utime + stime`` (``/proc/PID/stat``) over ``--idle`` seconds,
  as a percentage of one CPU;

then drives ``--load-disks`` disks at once, each through the Python
vhost-user front end at queue depth 16 (256 KiB writes and reads, too big for
the event loop's inline path, so every request goes to the I/O threads), for
``--load-seconds``, sampling the thread count every 50 ms (the most is
reported), and reads the threads again ``--after`` seconds after the load (the
I/O threads end after 10 s idle). RSS per device is ``(RSS(N) - RSS(1)) /
(N - 1)``, from the medians. Medians of ``--rounds`` rounds are printed.

The bench raises its own soft RLIMIT_NOFILE to the hard limit (the daemon
inherits it): 1024 devices need about 1300 descriptors (a listening socket
each, a file for each disk). ``--source DIR`` runs the pvcore of another
source tree (for a before/after comparison, e.g. ``git archive`` of an older
commit); its plugins are the installed ones. ``--serve-arg`` passes an
argument on to ``pvcore serve`` (``--serve-arg=--workers=1``: every device in
one process; by default ``pvcore serve`` spreads them over one worker process
per CPU, and the figures are those of the whole process tree).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pvcore.devices.block.virtio_blk import REQUEST_HEADER, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT  # noqa: E402
from pvcore.testing.vhost_user_frontend import VhostUserFrontend  # noqa: E402

DISK_SIZE = 64 << 20
IO_SIZE = 256 << 10
QUEUE_DEPTH = 16
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def disk_specs(run: Path, count: int) -> tuple[list[str], list[Path]]:
    """The arguments for ``count`` disks on sparse files in ``run``, and their socket paths."""
    out, sockets = [], []
    for n in range(count):
        image = run / f"disk{n}.img"
        with open(image, "wb") as f:
            f.truncate(DISK_SIZE)
        socket_path = run / f"blk{n}.sock"
        sockets.append(socket_path)
        out.append(f"block:socket={socket_path},path={image},name=blk{n}")
    return out, sockets


def specs(run: Path, count: int) -> tuple[list[str], list[Path]]:
    """The device arguments for ``count`` devices in ``run`` (a quarter of each class), and the disks' sockets."""
    per_class = count // 4
    out, disk_sockets = disk_specs(run, count - 3 * per_class)
    for n in range(per_class):
        mac = f"52:54:00:{n >> 16 & 0xff:02x}:{n >> 8 & 0xff:02x}:{n & 0xff:02x}"
        out.append(f"net:socket={run}/net{n}.sock,mac={mac},switch=bench,name=net{n}")
        out.append(f"rng:socket={run}/rng{n}.sock,name=rng{n}")
        out.append(f"console:socket={run}/con{n}.sock,name=con{n}")
    return out, disk_sockets


def tree(pid: int) -> list[int]:
    """``pid`` and every process descended from it."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(parents.get(current, []))
    return found


def figures(pid: int) -> dict[str, float]:
    """Threads, RSS (KiB) and CPU seconds (utime + stime) summed over the daemon's process tree."""
    threads = rss = ticks = 0
    for member in tree(pid):
        try:
            status = Path(f"/proc/{member}/status").read_text()
            stat = Path(f"/proc/{member}/stat").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        threads += int(fields["Threads"])
        rss += int(fields["VmRSS"].split()[0])
        after_comm = stat.rsplit(")", 1)[1].split()
        ticks += int(after_comm[11]) + int(after_comm[12])  # utime, stime (fields 14 and 15)
    return {"threads": threads, "rss_kib": rss, "cpu_s": ticks / CLOCK_TICKS}


def drive(path: Path, stop: threading.Event, ops: list[int], errors: list[str]) -> None:
    """Keep QUEUE_DEPTH 256 KiB requests (writes, then reads) in flight on one disk until ``stop``."""
    try:
        with VhostUserFrontend.connect(path, ram_size=16 << 20, timeout=30) as frontend:
            frontend.start(queue_size=64)
            rng = random.Random(str(path))
            data = rng.randbytes(IO_SIZE)

            def post() -> None:
                sector = rng.randrange(DISK_SIZE // IO_SIZE) * (IO_SIZE // 512)
                if rng.random() < 0.5:
                    frontend.submit(0, [REQUEST_HEADER.pack(VIRTIO_BLK_T_OUT, 0, sector), data], [1])
                else:
                    frontend.submit(0, [REQUEST_HEADER.pack(VIRTIO_BLK_T_IN, 0, sector)], [IO_SIZE, 1])

            for _ in range(QUEUE_DEPTH):
                post()
            while not stop.is_set():
                for used in frontend.wait_used(0, 1, timeout=30):
                    if used.data[-1:] != b"\0":
                        raise AssertionError(f"{path.name}: request failed with status {used.data[-1:]!r}")
                    ops.append(1)
                    post()
            frontend.wait_used(0, QUEUE_DEPTH, timeout=30)
    except Exception as exc:
        errors.append(f"{path.name}: {exc!r}")


def one_round(count: int, args: argparse.Namespace) -> dict[str, float]:
    """Start a daemon with ``count`` devices, measure it idle and under load, stop it."""
    with tempfile.TemporaryDirectory(prefix="pvcore-many-") as scratch:
        run = Path(scratch)
        devices, disk_sockets = specs(run, count)
        sockets = [Path(spec.split("socket=", 1)[1].split(",", 1)[0]) for spec in devices]
        log = run / "daemon.log"
        env = dict(os.environ, PYTHONPATH=str(args.source))
        started = time.monotonic()
        with open(log, "wb") as out:
            daemon = subprocess.Popen(
                [sys.executable, "-m", "pvcore.cli", "serve", "--hypervisor", "kvm", "--run-dir", str(run),
                 *args.serve_arg, *devices],
                stdout=out, stderr=subprocess.STDOUT, cwd=args.source, env=env,
            )
        try:
            deadline = started + 300
            while (f"serving {count} device(s)" not in log.read_text(errors="replace")
                   or not all(path.exists() for path in sockets)):
                if daemon.poll() is not None or time.monotonic() > deadline:
                    print(log.read_text(errors="replace")[-4000:], file=sys.stderr)
                    raise SystemExit(f"pvcore serve with {count} devices did not come up")
                time.sleep(0.05)
            startup = time.monotonic() - started
            time.sleep(2)  # let start-up work (imports, first collections) settle
            idle_start = figures(daemon.pid)
            time.sleep(args.idle)
            idle_end = figures(daemon.pid)
            result = {
                "devices": count,
                "startup_s": startup,
                "threads_idle": idle_end["threads"],
                "rss_mib": idle_end["rss_kib"] / 1024,
                "idle_cpu_pct": 100 * (idle_end["cpu_s"] - idle_start["cpu_s"]) / args.idle,
            }
            loaded = disk_sockets[: args.load_disks]
            if loaded and args.load_seconds > 0:
                result.update(load(daemon.pid, loaded, args))
            return result
        finally:
            daemon.terminate()
            try:
                daemon.wait(60)
            except subprocess.TimeoutExpired:
                daemon.kill()


def load(pid: int, disks: list[Path], args: argparse.Namespace) -> dict[str, float]:
    """Drive ``disks`` at once; the most threads seen, requests per second, threads ``--after`` s later."""
    stop = threading.Event()
    ops: list[int] = []
    errors: list[str] = []
    clients = [threading.Thread(target=drive, args=(path, stop, ops, errors), daemon=True) for path in disks]
    for client in clients:
        client.start()
    most = 0
    started = time.monotonic()
    while time.monotonic() - started < args.load_seconds:
        most = max(most, figures(pid)["threads"])
        time.sleep(0.05)
    done = len(ops)
    stop.set()
    for client in clients:
        client.join(60)
    if errors:
        raise SystemExit("load failed: " + "; ".join(errors))
    time.sleep(args.after)
    return {
        "load_disks": len(disks),
        "threads_load_max": most,
        "load_iops": done / args.load_seconds,
        "threads_after_load": figures(pid)["threads"],
    }


def main(argv: list[str] | None = None) -> int:
    """Measure every count ``--rounds`` times; print medians (and write them to ``--json``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="1,64,1024", help="device counts, comma-separated (include 1)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--idle", type=float, default=10.0, help="seconds over which idle CPU is measured")
    parser.add_argument("--load-disks", type=int, default=16)
    parser.add_argument("--load-seconds", type=float, default=5.0)
    parser.add_argument("--after", type=float, default=15.0, help="seconds after the load to read threads again")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--source", type=Path, default=ROOT, help="the pvcore source tree to run")
    parser.add_argument("--serve-arg", action="append", default=[], help="an argument for pvcore serve")
    args = parser.parse_args(argv)
    args.source = args.source.resolve()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    print(f"RLIMIT_NOFILE raised from {soft} to {hard}; CPUs {len(os.sched_getaffinity(0))}; source {args.source}; "
          f"serve arguments {args.serve_arg}")
    counts = [int(n) for n in args.counts.split(",")]
    rounds: dict[int, list[dict[str, float]]] = {n: [] for n in counts}
    for round_number in range(args.rounds):
        for count in counts:
            result = one_round(count, args)
            rounds[count].append(result)
            print(f"round {round_number + 1} {json.dumps({k: round(v, 2) for k, v in result.items()})}", flush=True)
    medians = {n: {key: statistics.median(r[key] for r in rounds[n]) for key in rounds[n][0]} for n in counts}
    base = medians.get(1)
    print(f"\nmedians of {args.rounds} rounds")
    print("devices  start-up s  threads idle  RSS MiB  KiB/device beyond the first  idle CPU %  "
          "threads under load (disks)  req/s  threads after")
    for n in counts:
        m = medians[n]
        per_device = (m["rss_mib"] - base["rss_mib"]) * 1024 / (n - 1) if base and n > 1 else float("nan")
        m["rss_kib_per_device"] = per_device
        loaded = (f"{m['threads_load_max']:>10.0f} ({m['load_disks']:.0f})  {m['load_iops']:>6.0f}  "
                  f"{m['threads_after_load']:>6.0f}" if "threads_load_max" in m else "")
        print(f"{n:>7}  {m['startup_s']:>10.2f}  {m['threads_idle']:>12.0f}  {m['rss_mib']:>7.1f}  "
              f"{per_device:>27.1f}  {m['idle_cpu_pct']:>10.2f}  {loaded}")
    if args.json:
        args.json.write_text(json.dumps({"medians": medians, "rounds": rounds}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
