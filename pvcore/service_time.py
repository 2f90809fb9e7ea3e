"""A cheap histogram of request service times, filled on the hot path and read at scrape time.

An engine that is asked to (the daemon does when it serves ``--metrics``)
keeps one :class:`ServiceTimeHistogram` and calls :meth:`observe` once per
completed request, under a lock it already holds; the metrics collector
copies it with :meth:`snapshot`. One ``bisect`` and two additions per request:
no allocation, no lock of its own.
"""

from __future__ import annotations

import bisect

import attrs

BUCKET_BOUNDS: tuple[float, ...] = (
    25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 500e-3, 1.0, 2.5,
)
"""Upper bounds (seconds, inclusive) of the buckets; a last, unbounded bucket holds the rest."""


@attrs.frozen
class ServiceTimes:
    """A copy of a histogram: ``counts[i]`` requests took at most ``bounds[i]`` seconds (not cumulative;
    the last count has no bound), ``total`` seconds in all."""

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    total: float

    @property
    def observations(self) -> int:
        """How many requests were observed."""
        return sum(self.counts)


class ServiceTimeHistogram:
    """Counts of service times by bucket; the caller serialises :meth:`observe` and :meth:`snapshot`."""

    def __init__(self, bounds: tuple[float, ...] = BUCKET_BOUNDS) -> None:
        if list(bounds) != sorted(set(bounds)) or not bounds or bounds[0] <= 0:
            raise ValueError(f"bucket bounds must be positive and strictly increasing, not {bounds}")
        self.bounds = bounds
        self._counts = [0] * (len(bounds) + 1)
        self._total = 0.0

    def observe(self, seconds: float) -> None:
        """Count one request that took ``seconds``."""
        self._counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self._total += seconds

    def snapshot(self) -> ServiceTimes:
        """A copy of the counts so far."""
        return ServiceTimes(self.bounds, tuple(self._counts), self._total)
