"""Prometheus metrics of a running daemon (``--metrics HOST:PORT``), read from the engines at scrape time.

Nothing here runs on the request path: :class:`DeviceCollector` is a
prometheus-client custom collector that, when Prometheus scrapes, reads the
counters the engines keep anyway (a block backend's :class:`BlockCounters`, a
switch port's :class:`PortCounters` and the switch's own, an entropy source's
byte count, a vhost-user ring's interrupts, the block I/O thread pool's
:class:`~pvcore.devices.block.iopool.PoolStats`). The one addition to the hot path
is the block service-time histogram (:mod:`pvcore.service_time`), switched on
only when metrics are served. The families and their labels are listed in
docs/operations.md ("Metrics").
"""

from __future__ import annotations

import errno
import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import attrs
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from pvcore.contract import DeviceInstance, FrontDoor
from pvcore.device_counters import ring_counts, socket_poll_counts
from pvcore.device_limits import device_throttle
from pvcore.devices.block.backend import BlockBackend
from pvcore.devices.block.iopool import shared_pool
from pvcore.devices.net.switch import Switch
from pvcore.devices.rng import EntropySource

log = logging.getLogger("pvcore.metrics")

LABELS = ("device", "domain", "class", "hypervisor")
"""The labels of every per-device family."""


class MetricsError(Exception):
    """The metrics endpoint cannot be served; the message says why and what to change."""


@attrs.frozen
class MetricsAddress:
    """Where the metrics endpoint listens: ``HOST:PORT`` (``[::1]:9100`` for IPv6)."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> MetricsAddress:
        """Parse ``HOST:PORT``; a ``ValueError`` says what is wrong."""
        host, sep, port = str(text).strip().rpartition(":")
        host = host.removeprefix("[").removesuffix("]")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"metrics address {text!r}: expected HOST:PORT, e.g. 127.0.0.1:9464")
        return cls(host, int(port))

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@attrs.frozen
class ServedEntry:
    """One device as the collector sees it: its engine, its front door and the hypervisor serving it."""

    instance: DeviceInstance
    door: FrontDoor
    hypervisor: str


ServedDevices = Callable[[], Iterable[ServedEntry]]
"""What the collector reads at each scrape: the devices being served right now."""


def measure_service_times(instance: DeviceInstance) -> None:
    """Switch on the service-time histogram of a device whose engine keeps one (block)."""
    if isinstance(instance.engine, BlockBackend):
        instance.engine.measure_service_time()


class DeviceCollector(Collector):
    """A custom collector: every family, built from the engines' counters when Prometheus scrapes."""

    def __init__(self, served: ServedDevices) -> None:
        self.served = served

    def collect(self) -> Iterator[Any]:
        """The metric families of every served device (called by prometheus-client's HTTP thread)."""
        requests = CounterMetricFamily("pvcore_requests", "Requests completed or refused, by operation", labels=(*LABELS, "op"))
        request_bytes = CounterMetricFamily("pvcore_request_bytes", "Bytes moved by requests, by operation", labels=(*LABELS, "op"))
        seconds = HistogramMetricFamily(
            "pvcore_request_seconds", "Service time of block requests, from submission to the engine to completion",
            labels=LABELS,
        )
        inflight = GaugeMetricFamily("pvcore_inflight_requests", "Requests taken from the guest and not yet completed", labels=LABELS)
        interrupts = CounterMetricFamily(
            "pvcore_interrupts", "Interrupts sent to the guest by the rings of the current front-end connections", labels=LABELS
        )
        completions = CounterMetricFamily(
            "pvcore_ring_completions", "Ring completions of the current front-end connections (interrupts per completion)",
            labels=LABELS,
        )
        polls = CounterMetricFamily(
            "pvcore_ring_polls", "Polling windows of the current front-end connections' rings (poll-max-us > 0)",
            labels=LABELS,
        )
        polls_caught = CounterMetricFamily(
            "pvcore_ring_polls_caught", "Polling windows in which the guest posted a request", labels=LABELS
        )
        poll_seconds = CounterMetricFamily(
            "pvcore_ring_poll_seconds", "Time the rings spent in polling windows", labels=LABELS
        )
        socket_polls = CounterMetricFamily(
            "pvcore_nbd_polls", "Polling windows of an NBD export's idle connections (poll-max-us > 0)", labels=LABELS
        )
        socket_polls_caught = CounterMetricFamily(
            "pvcore_nbd_polls_caught", "Polling windows in which the client sent its next request", labels=LABELS
        )
        socket_poll_seconds = CounterMetricFamily(
            "pvcore_nbd_poll_seconds", "Time an NBD export's connections spent in polling windows", labels=LABELS
        )
        errors = CounterMetricFamily("pvcore_errors", "Requests or frames that failed or were dropped, by reason", labels=(*LABELS, "reason"))
        switch_frames = CounterMetricFamily(
            "pvcore_switch_frames", "Frames the switch handled, by outcome", labels=("switch", "outcome")
        )
        rng_bytes = CounterMetricFamily("pvcore_rng_bytes", "Entropy bytes delivered, per domain", labels=("domain",))
        throttled = CounterMetricFamily(
            "pvcore_throttled_seconds", "Seconds during which the device's I/O limits held at least one request back",
            labels=LABELS,
        )
        switches: dict[int, Switch] = {}
        sources: dict[int, EntropySource] = {}
        for entry in list(self.served()):
            config = entry.instance.config
            labels = (config.name, str(config.get("domain") or ""), config.device_class, entry.hypervisor)
            engine = entry.instance.engine
            if isinstance(engine, BlockBackend):
                self._block(engine, labels, requests, request_bytes, seconds, inflight, errors)
            elif isinstance(engine, EntropySource):
                sources[id(engine)] = engine
            elif isinstance(getattr(engine, "switch", None), Switch):
                switches[id(engine.switch)] = engine.switch
                self._nic(engine, labels, requests, request_bytes, errors)
            throttle = device_throttle(entry.instance)
            if throttle is not None:
                throttled.add_metric(labels, throttle.throttled_seconds())
            ring = ring_counts(entry.door)
            if ring:
                interrupts.add_metric(labels, ring["interrupts"])
                completions.add_metric(labels, ring["completions"])
                if "polls" in ring:
                    polls.add_metric(labels, ring["polls"])
                    polls_caught.add_metric(labels, ring["polls_caught"])
                    poll_seconds.add_metric(labels, ring["poll_ns"] / 1e9)
                if not isinstance(engine, BlockBackend):
                    inflight.add_metric(labels, ring["ring_in_flight"])
            polled = socket_poll_counts(entry.door)
            if polled:
                socket_polls.add_metric(labels, polled["polls"])
                socket_polls_caught.add_metric(labels, polled["polls_caught"])
                socket_poll_seconds.add_metric(labels, polled["poll_ns"] / 1e9)
        for switch in switches.values():
            counts = switch.counters
            for outcome in ("forwarded", "flooded", "dropped_forged"):
                switch_frames.add_metric((switch.name, outcome), getattr(counts, outcome))
        for source in sources.values():
            rng_bytes.add_metric((source.name,), source.bytes_delivered)
        yield from (
            requests, request_bytes, seconds, inflight, interrupts, completions, polls, polls_caught, poll_seconds,
            socket_polls, socket_polls_caught, socket_poll_seconds, errors, switch_frames, rng_bytes, throttled,
        )
        yield from self._io_pool()

    @staticmethod
    def _io_pool() -> Iterator[Metric]:
        """The families of the process's shared block I/O threads (summed over the workers by the parent)."""
        stats = shared_pool().stats()
        yield GaugeMetricFamily("pvcore_io_pool_threads", "Block I/O threads alive (idle ones included)", value=stats.threads)
        yield GaugeMetricFamily("pvcore_io_pool_busy_threads", "Block I/O threads running a request", value=stats.busy)
        yield GaugeMetricFamily(
            "pvcore_io_pool_max_threads", "The bound on block I/O threads (--io-threads, else by the CPUs)",
            value=stats.max_threads,
        )
        yield GaugeMetricFamily(
            "pvcore_io_pool_queued_turns", "Block devices waiting for an I/O thread to run their next request",
            value=stats.queued,
        )
        yield CounterMetricFamily("pvcore_io_pool_turns", "Requests the block I/O threads took", value=stats.turns)
        yield CounterMetricFamily(
            "pvcore_io_pool_stall_threads",
            "Block I/O threads started beyond the bound because no thread took a request for a second (stuck I/O)",
            value=stats.stall_threads,
        )

    @staticmethod
    def _block(
        backend: BlockBackend, labels: tuple[str, ...], requests: Any, request_bytes: Any, seconds: Any, inflight: Any,
        errors: Any,
    ) -> None:
        counts = backend.counters()
        for op, value in (("read", counts.reads), ("write", counts.writes), ("flush", counts.flushes),
                          ("discard", counts.discards), ("write_zeroes", counts.write_zeroes)):
            requests.add_metric((*labels, op), value)
        request_bytes.add_metric((*labels, "read"), counts.bytes_read)
        request_bytes.add_metric((*labels, "write"), counts.bytes_written)
        inflight.add_metric(labels, counts.in_flight)
        errors.add_metric((*labels, "failed"), counts.errors)
        times = backend.service_times()
        if times is not None:
            cumulative, buckets = 0, []
            for bound, count in zip((*times.bounds, float("inf")), times.counts):
                cumulative += count
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
            seconds.add_metric(labels, buckets, times.total)

    @staticmethod
    def _nic(endpoint: Any, labels: tuple[str, ...], requests: Any, request_bytes: Any, errors: Any) -> None:
        port = next((p for p in list(endpoint.switch.ports.values()) if p.mac == endpoint.mac), None)
        if port is None:  # no front end has attached the NIC's port yet
            return
        counts = port.counters
        # The switch's rx is what the guest transmitted; its tx is what the guest received.
        requests.add_metric((*labels, "tx"), counts.rx_frames)
        requests.add_metric((*labels, "rx"), counts.tx_frames)
        request_bytes.add_metric((*labels, "tx"), counts.rx_bytes)
        request_bytes.add_metric((*labels, "rx"), counts.tx_bytes)
        for reason, value in (("forged", counts.dropped_spoof), ("malformed", counts.dropped_malformed),
                              ("receiver_full", counts.dropped_full), ("too_big", counts.dropped_too_big)):
            errors.add_metric((*labels, reason), value)


def families_as_json(collector: Collector) -> list[dict[str, Any]]:
    """Every family ``collector`` yields now, as JSON-ready dicts (a worker process's answer to its parent)."""
    return [
        {
            "name": family.name, "documentation": family.documentation, "type": family.type, "unit": family.unit,
            "samples": [[sample.name, sample.labels, sample.value] for sample in family.samples],
        }
        for family in collector.collect()
    ]


SeriesKey = tuple[str, tuple[tuple[str, str], ...]]
"""A sample's name and its sorted labels."""
_CUMULATIVE_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum")}
"""By family type, the samples that only ever grow in one process."""


class MergedCollector(Collector):
    """The families of several processes (``pvcore serve --workers N``), merged by name at each scrape.

    ``fetch()`` returns, per worker that answered, its name and what
    :func:`families_as_json` made of its :class:`DeviceCollector`; a family
    two workers both yield is one family with the samples of both, as
    Prometheus's text format wants, and a series two workers both yield (the
    I/O pool's, an NBD export spread over the workers, a switch whose NICs
    moved from one worker to another) is their sum.

    A counter's sum (and a histogram's buckets, count and sum) must never go
    down, or ``rate()`` reads a reset: each worker's part of such a series is
    kept as it last was, so a worker
    that misses a scrape still counts with its last value, and one that
    started again (its counters from zero) counts on top of what it had
    counted before. A series an answering worker no longer has (its device
    removed) is forgotten.
    """

    def __init__(self, fetch: Callable[[], list[tuple[str, list[dict[str, Any]]]]]) -> None:
        self.fetch = fetch
        self._counted: dict[tuple[str, str, SeriesKey], tuple[float, float]] = {}
        """(worker, family, series): (the worker's last value, what it counted before it last started again)."""
        self._lock = threading.Lock()

    def collect(self) -> Iterator[Any]:
        """The merged families (called by prometheus-client's HTTP thread)."""
        merged: dict[str, tuple[Metric, dict[SeriesKey, float]]] = {}
        with self._lock:  # scrapes one at a time: a late answer merged after a newer one would look like a reset
            answers = self.fetch()
            answered = {worker for worker, _ in answers}
            kept = {key: value for key, value in self._counted.items() if key[0] not in answered}
            for worker, families in answers:
                for family in families:
                    if family["name"] not in merged:
                        merged[family["name"]] = (
                            Metric(family["name"], family["documentation"], family["type"], family["unit"]), {}
                        )
                    series = merged[family["name"]][1]
                    cumulative = _CUMULATIVE_SUFFIXES.get(family["type"], ())
                    for name, labels, value in family["samples"]:
                        key = (name, tuple(sorted(labels.items())))
                        if name.endswith(cumulative):
                            last, before = self._counted.get((worker, family["name"], key), (0.0, 0.0))
                            if value < last:
                                before += last  # the worker started again: its counters went back to zero
                            kept[(worker, family["name"], key)] = (value, before)
                            value += before
                        series[key] = series.get(key, 0.0) + value
            for (worker, family_name, key), (last, before) in kept.items():
                if worker not in answered and family_name in merged:
                    series = merged[family_name][1]
                    series[key] = series.get(key, 0.0) + last + before
            self._counted = kept
        for metric, series in merged.values():
            for (name, labels), value in series.items():
                metric.add_sample(name, dict(labels), value)
            yield metric


class MetricsServer:
    """The HTTP endpoint Prometheus scrapes (prometheus-client's server, on its own thread), answered by ``collector``."""

    def __init__(self, address: MetricsAddress, collector: Collector) -> None:
        self.address = address
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)
        self._server: Any = None
        self._thread: Any = None

    def start(self) -> None:
        """Listen; a port in use or an address not on this host is a :class:`MetricsError`."""
        from prometheus_client import start_http_server

        try:
            self._server, self._thread = start_http_server(self.address.port, self.address.host, registry=self.registry)
        except OSError as exc:
            hint = "; another process listens there: pick another port" if exc.errno == errno.EADDRINUSE else ""
            raise MetricsError(f"metrics {self.address}: {exc.strerror or exc}{hint}") from None
        log.info("metrics: serving http://%s/metrics", self.address)

    def stop(self) -> None:
        """Stop listening and wait for the server thread."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join()
            self._server = self._thread = None
