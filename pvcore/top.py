"""``pvcore top``: every device of a running daemon, refreshed each second, from its control socket.

Each refresh asks the daemon for its devices' counters (the control
socket's ``list``) and shows, per device, the rates since the last refresh:
requests per second, bytes per second, requests in flight now, interrupts
per completion (vhost-user rings) and, for block devices of a daemon that
keeps the service-time histogram (``--metrics``), the 50th and 99th
percentile of service time over the interval (the upper bound of the
histogram bucket the percentile falls in), and the worker process serving
it (``pvcore serve --workers N``; ``w0,w1`` for an export spread over
workers; ``-`` in a daemon without workers). ``--once`` prints one table,
over one interval, and exits (for scripts and tests).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

import attrs

from pvcore.control import ControlError, request

BLOCK_OPS = ("reads", "writes", "flushes", "discards", "write_zeroes")
CLEAR_SCREEN = "\x1b[H\x1b[2J"


@attrs.frozen
class DeviceRates:
    """One row of the view: what a device did per second over one interval, and its state now."""

    name: str
    device_class: str
    domain: str
    iops: float
    bytes_per_second: float
    in_flight: int
    interrupts_per_completion: float | None
    p50: float | None
    p99: float | None
    worker: str = "-"
    """The worker process serving the device (``w0``; ``w0,w1`` if spread), or ``-`` without workers."""


def _requests(counters: Mapping[str, Any]) -> int:
    if "reads" in counters:
        return sum(int(counters[op]) for op in BLOCK_OPS)
    if "rx_frames" in counters:
        return int(counters["rx_frames"]) + int(counters["tx_frames"])
    return int(counters.get("requests", 0))


def _bytes(counters: Mapping[str, Any]) -> int:
    if "bytes_read" in counters:
        return int(counters["bytes_read"]) + int(counters["bytes_written"])
    if "rx_bytes" in counters:
        return int(counters["rx_bytes"]) + int(counters["tx_bytes"])
    return int(counters.get("bytes_delivered", 0))


def percentile(bounds: Sequence[float], counts: Sequence[int], fraction: float) -> float | None:
    """The upper bound of the bucket holding the ``fraction`` quantile (inf: past the last bound; None: no requests)."""
    total = sum(counts)
    if total <= 0:
        return None
    rank, seen = fraction * total, 0
    for bound, count in zip((*bounds, float("inf")), counts):
        seen += count
        if seen >= rank:
            return bound
    return float("inf")


def rates(before: Sequence[Mapping[str, Any]], after: Sequence[Mapping[str, Any]], seconds: float) -> list[DeviceRates]:
    """The rows for two ``list`` answers taken ``seconds`` apart (a device new in ``after`` counts from zero)."""
    if seconds <= 0:
        raise ValueError(f"interval must be positive, not {seconds}")
    earlier = {device["name"]: device["counters"] for device in before}
    rows = []
    for device in after:
        now, then = device["counters"], earlier.get(device["name"], {})
        completions = int(now.get("completions", 0)) - int(then.get("completions", 0))
        interrupts = int(now.get("interrupts", 0)) - int(then.get("interrupts", 0))
        p50 = p99 = None
        if "service_time" in now:
            counts = now["service_time"]["counts"]
            old = then.get("service_time", {}).get("counts", [0] * len(counts))
            delta = [a - b for a, b in zip(counts, old)]
            p50 = percentile(now["service_time"]["bounds"], delta, 0.50)
            p99 = percentile(now["service_time"]["bounds"], delta, 0.99)
        rows.append(DeviceRates(
            name=device["name"],
            device_class=device["class"],
            domain=str(device["domain"]),
            iops=(_requests(now) - _requests(then) if then else _requests(now)) / seconds,
            bytes_per_second=(_bytes(now) - _bytes(then) if then else _bytes(now)) / seconds,
            in_flight=int(now.get("in_flight", now.get("ring_in_flight", 0))),
            interrupts_per_completion=interrupts / completions if "completions" in now and completions > 0 else None,
            p50=p50,
            p99=p99,
            worker=str(device.get("worker") or "-"),
        ))
    return rows


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value == float("inf"):
        return ">2.5s"
    return f"{value * 1e3:g}ms" if value >= 1e-3 else f"{value * 1e6:g}us"


def _size(value: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return f"{value:.1f}GiB"


def render(rows: Sequence[DeviceRates]) -> str:
    """The table of one refresh."""
    lines = [f"{'DEVICE':<20} {'CLASS':<8} {'DOMAIN':<10} {'IOPS':>9} {'BW/s':>10} {'INFL':>5} {'IRQ/C':>6} "
             f"{'P50':>8} {'P99':>8} WORKER"]
    for row in rows:
        irq = "-" if row.interrupts_per_completion is None else f"{row.interrupts_per_completion:.2f}"
        lines.append(
            f"{row.name:<20} {row.device_class:<8} {row.domain:<10} {row.iops:>9.0f} {_size(row.bytes_per_second):>10} "
            f"{row.in_flight:>5} {irq:>6} {_seconds(row.p50):>8} {_seconds(row.p99):>8} {row.worker}"
        )
    return "\n".join(lines) + "\n"


def _devices(run_dir: Path) -> list[dict[str, Any]]:
    answer = request(run_dir, {"command": "list"})
    if not answer.get("ok"):
        raise ControlError(str(answer.get("error")))
    return answer["devices"]


def run_top(run_dir: Path, *, interval: float = 1.0, once: bool = False, out: TextIO = sys.stdout) -> None:
    """Show the view every ``interval`` seconds until interrupted (``once``: one table, then return)."""
    before, taken = _devices(run_dir), time.monotonic()
    while True:
        time.sleep(interval)
        after, now = _devices(run_dir), time.monotonic()
        table = render(rates(before, after, now - taken))
        if once:
            out.write(table)
            return
        out.write(CLEAR_SCREEN + f"pvcore top: {run_dir} (every {interval:g}s; Ctrl-C quits)\n" + table)
        out.flush()
        before, taken = after, now
