"""One device's counters as plain numbers by name, for the control socket's ``list`` (and ``pvcore top``).

Read from what the engines keep anyway: a block backend's counters (with
the service-time histogram when it is kept), a NIC's switch-port counters
(and its tap uplink's, under ``uplink``),
an rng's per-domain entropy counts, a vhost-user ring's interrupts and
completions over its current connection (and, when it polls, its polling
windows: ``polls``, ``polls_caught``, ``poll_ns``; an NBD export that polls its
connections' sockets has the same three, over every connection it served), and the seconds a block device's or
NIC's limits held requests back (``throttled_seconds``).
"""

from __future__ import annotations

from typing import Any

import attrs

from pvcore.contract import DeviceInstance, FrontDoor
from pvcore.devices.block.backend import BlockBackend
from pvcore.devices.net.switch import Switch
from pvcore.device_limits import device_throttle
from pvcore.devices.rng import EntropySource


def ring_counts(door: FrontDoor) -> dict[str, int]:
    """``interrupts``, ``completions`` and ``ring_in_flight`` of a ring front door's live connections ({} otherwise),
    with ``polls``, ``polls_caught`` and ``poll_ns`` if the door polls its rings."""
    live = getattr(door, "live", None)
    if live is None:
        return {}
    counts = {"interrupts": 0, "completions": 0, "ring_in_flight": 0}
    polling = getattr(door, "poll_max_ns", 0) > 0
    if polling:
        counts.update(polls=0, polls_caught=0, poll_ns=0)
    for connection in list(live):
        counts["interrupts"] += sum(connection.interrupts)
        counts["completions"] += sum(connection.completions)
        if polling:
            for key, value in connection.polled.items():
                counts[key] += value
    hosted = [host.session for host in list(getattr(door, "hosted", ()))]  # queues of another worker's connection
    for session in [connection.session for connection in list(live)] + hosted:
        for queue in list(session.running.values()):
            counts["interrupts"] += queue.interrupts
            counts["completions"] += queue.completions
            counts["ring_in_flight"] += queue.in_flight
            if polling and queue.poll is not None:
                counts["polls"] += queue.poll.polls
                counts["polls_caught"] += queue.poll.caught
                counts["poll_ns"] += queue.poll.poll_ns
    return counts


def socket_poll_counts(door: FrontDoor) -> dict[str, int]:
    """``polls``, ``polls_caught`` and ``poll_ns`` of a stream door that polls its sockets ({} otherwise)."""
    poll_counts = getattr(door, "poll_counts", None)
    return {} if poll_counts is None else poll_counts()


def device_counters(instance: DeviceInstance, door: FrontDoor) -> dict[str, Any]:
    """The counters of one served device, by name (JSON-ready)."""
    engine = instance.engine
    counters: dict[str, Any] = {}
    if isinstance(engine, BlockBackend):
        counters.update(attrs.asdict(engine.counters()))
        times = engine.service_times()
        if times is not None:
            counters["service_time"] = {"bounds": list(times.bounds), "counts": list(times.counts), "total": times.total}
    elif isinstance(engine, EntropySource):
        counters.update(bytes_delivered=engine.bytes_delivered, requests=engine.requests, held=engine.held)
    elif isinstance(getattr(engine, "switch", None), Switch):
        port = next((p for p in list(engine.switch.ports.values()) if p.mac == engine.mac), None)
        if port is not None:
            counters.update(port.counters.as_dict())
        uplink = getattr(instance, "uplink", None)
        if uplink is not None:
            counters["uplink"] = {"name": uplink.name, **uplink.counters.as_dict(), **uplink.stats.as_dict()}
    throttle = device_throttle(instance)
    if throttle is not None:
        counters["throttled_seconds"] = round(throttle.throttled_seconds(), 3)
    counters.update(ring_counts(door))
    counters.update(socket_poll_counts(door))
    return counters
