"""The conformance kit's API for plugin authors: the test peer a plugin gives the kit.

The kit (:mod:`pvcore.testing.kit`, run as ``pytest --pvcore-plugin=NAME``)
checks a hypervisor plugin against the contract of :mod:`pvcore.hookspecs`.
What it cannot know — how to fake a host where the hypervisor is present, the
options a device needs on this hypervisor, how a guest reaches a device
through the plugin's own transport — the plugin tells it through a
:class:`ConformancePeer`. By convention the peer is the object
``conformance_peer`` of the module ``pvcore_NAME.testing``; ``--pvcore-peer
MODULE:ATTRIBUTE`` names another.

A peer connects a guest to a served device in one of two shapes:

* a :class:`RingGuest` — the guest side of a ring transport (the core's
  reference driver queues, a way to kick, the interrupt channels); the kit
  then speaks virtio-blk, virtio-net, virtio-console or virtio-rng over it
  and checks notification suppression and hostile rings;
* a device-class guest (:class:`BlockGuest`, :class:`NetGuest`,
  :class:`ConsoleGuest`, :class:`RngGuest`) for a transport that is neither a
  ring nor one of the core's stream front doors.

Devices served through the core's stream front doors (chardev, FIFO, EGD,
NBD, netdev stream) need nothing from the peer: the kit connects to them
itself. Every method of :class:`ConformancePeer` a plugin needs and does not
override fails its test with a message saying what to write.
"""

from __future__ import annotations

import os
import select
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import attrs

from pvcore.contract import DeviceInstance, FrontDoor, HostContext
from pvcore.testing.driver import DriverQueue, GuestRam, UsedBuffer
from pvcore.testing.loopthread import LoopThread

RECHECK_INTERVAL = 0.02
"""Longest sleep on an interrupt channel before the used ring is read again (interrupts may be suppressed)."""


class PeerMissing(NotImplementedError):
    """The plugin's peer does not supply something the kit needs; the message says what to write."""


@attrs.frozen
class KitContext:
    """What the kit gives a peer when the session starts.

    ``directory`` is a private temporary directory for sockets and files;
    ``loop`` is the background event loop the daemon under test runs on (a
    peer whose simulated hypervisor is asynchronous runs it there too).
    """

    directory: Path
    loop: LoopThread


@runtime_checkable
class InterruptChannel(Protocol):
    """The guest's end of one notification channel: polls readable when the other side signalled."""

    def fileno(self) -> int:
        """A descriptor that polls readable when the other side signalled."""

    def consume(self) -> int:
        """Clear pending signals; return how many arrived."""


class RingGuest:
    """A guest's side of a ring transport, connected through the plugin's own transport.

    ``queues`` are the reference driver's queues, in the device's queue order;
    ``kick(index)`` notifies the device of new buffers on a queue;
    ``interrupts[index]`` is the guest's end of the queue's interrupt channel;
    ``failed()`` says whether the device reported that it needs a reset;
    ``close`` disconnects. Chains are posted and collected from one thread.
    """

    def __init__(
        self,
        queues: Sequence[DriverQueue],
        kick: Callable[[int], None],
        interrupts: Sequence[InterruptChannel],
        failed: Callable[[], bool],
        close: Callable[[], None],
    ) -> None:
        if len(interrupts) != len(queues):
            raise ValueError(f"{len(queues)} queues but {len(interrupts)} interrupt channels")
        self.queues = list(queues)
        self._kick = kick
        self.channels = list(interrupts)
        self.failed = failed
        self._close = close
        self.kicks = [0] * len(queues)
        self.interrupts = [0] * len(queues)
        self._collected: list[list[UsedBuffer]] = [[] for _ in queues]

    def __repr__(self) -> str:
        return f"RingGuest(queues={len(self.queues)})"

    def kick(self, index: int) -> None:
        """Notify the device on queue ``index`` (counted)."""
        self.kicks[index] += 1
        self._kick(index)

    def submit(self, index: int, readable: Sequence[bytes], writable: Sequence[int]) -> int:
        """Post one chain, kick only if the device asked for kicks; return its head."""
        queue = self.queues[index]
        head = queue.add(readable, writable)
        if queue.kick_needed():
            self.kick(index)
        return head

    def count_interrupts(self, index: int) -> int:
        """Interrupts seen on queue ``index`` so far."""
        self.interrupts[index] += self.channels[index].consume()
        return self.interrupts[index]

    def _collect_more(self, index: int, deadline: float, waiting_for: str) -> None:
        """Add newly used chains of queue ``index`` to its backlog, sleeping on its interrupt channel if none.

        The used ring is re-read at least every :data:`RECHECK_INTERVAL`, so a
        suppressed interrupt never hangs the guest.
        """
        while True:
            self.count_interrupts(index)
            found = self.queues[index].used()
            if found:
                self._collected[index] += found
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"queue {index}: timed out waiting for {waiting_for}")
            select.select([self.channels[index].fileno()], [], [], min(left, RECHECK_INTERVAL))

    def wait_used(self, index: int, count: int, timeout: float = 5.0) -> list[UsedBuffer]:
        """Wait until ``count`` chains of queue ``index`` are used; return them (oldest first)."""
        collected = self._collected[index]
        deadline = time.monotonic() + timeout
        while len(collected) < count:
            self._collect_more(index, deadline, f"{count} used chains (have {len(collected)})")
        done, collected[:] = collected[:count], collected[count:]
        return done

    def request(self, index: int, readable: Sequence[bytes], writable: Sequence[int], timeout: float = 5.0) -> UsedBuffer:
        """Post one chain and wait until it is used (chains used meanwhile stay in the backlog)."""
        head = self.submit(index, readable, writable)
        deadline = time.monotonic() + timeout
        while True:
            for position, used in enumerate(self._collected[index]):
                if used.head == head:
                    return self._collected[index].pop(position)
            self._collect_more(index, deadline, f"the chain with head {head}")

    def close(self) -> None:
        """Disconnect from the device."""
        self._close()


class BlockGuest(Protocol):
    """A guest's disk: 512-byte sectors."""

    def read(self, sector: int, count: int) -> bytes:
        """``count`` sectors from ``sector``."""

    def write(self, sector: int, data: bytes) -> None:
        """Write whole sectors at ``sector``."""

    def flush(self) -> None:
        """Make every completed write durable."""

    def close(self) -> None:
        """Disconnect."""


class NetGuest(Protocol):
    """A guest's NIC: whole Ethernet frames."""

    def send(self, frame: bytes) -> None:
        """Transmit one frame."""

    def receive(self, timeout: float) -> bytes:
        """The next frame for this NIC (``TimeoutError`` if none comes)."""

    def close(self) -> None:
        """Disconnect."""


class ConsoleGuest(Protocol):
    """A guest's console: bytes out (guest output) and in (what a person types)."""

    def send(self, data: bytes) -> None:
        """Guest output."""

    def receive(self, size: int, timeout: float) -> bytes:
        """Exactly ``size`` bytes of guest input (``TimeoutError`` if they do not come)."""

    def close(self) -> None:
        """Disconnect."""


class RngGuest(Protocol):
    """A guest's entropy device."""

    def read(self, size: int) -> bytes:
        """Up to ``size`` bytes of entropy (at least one)."""

    def close(self) -> None:
        """Disconnect."""


class EventFdChannelEnd:
    """The guest's end of an eventfd notification channel (a kvm-style irqfd or ioeventfd).

    ``fd`` is a descriptor of the same eventfd the backend holds (e.g. an
    ``os.dup`` of it); it is not closed here unless ``owned``.
    """

    def __init__(self, fd: int, *, owned: bool = False) -> None:
        self.fd = fd
        self.owned = owned

    def fileno(self) -> int:
        """The eventfd."""
        return self.fd

    def consume(self) -> int:
        """Read and reset the counter."""
        try:
            return os.eventfd_read(self.fd)
        except BlockingIOError:
            return 0

    def signal(self) -> None:
        """Signal the backend."""
        os.eventfd_write(self.fd, 1)

    def close(self) -> None:
        """Close the descriptor if this end owns it."""
        if self.owned and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class ConformancePeer:
    """The hypervisor's side of the conformance kit; a plugin subclasses it in ``pvcore_NAME.testing``.

    Override what your plugin supplies. The kit calls :meth:`start` once per
    test session and :meth:`stop` at its end; every other method may be
    called many times. ``directory`` is the session's scratch directory (for
    sockets); descriptors put in ``leftovers`` and guest RAM put in ``rams``
    are closed by :meth:`stop`.
    """

    def __init__(self) -> None:
        self.directory = Path()
        self.leftovers: list[int] = []
        self.rams: list[GuestRam] = []

    def _missing(self, method: str, what: str) -> PeerMissing:
        return PeerMissing(f"the conformance peer {type(self).__name__} does not implement {method}: {what} (docs/porting.md)")

    def start(self, kit: KitContext) -> None:
        """Set up what the hypervisor side needs for the session (a simulated host, a xenstore...).

        The default remembers the kit's scratch directory.
        """
        self.directory = kit.directory

    def stop(self) -> None:
        """Tear down what :meth:`start` set up; the default closes ``leftovers`` and ``rams``."""
        for fd in self.leftovers:
            os.close(fd)
        for ram in self.rams:
            ram.close()
        self.leftovers, self.rams = [], []

    def plugin(self) -> Any | None:
        """The plugin object to test instead of the one the entry point names (e.g. bound to a simulated host)."""
        return None

    def present_host(self, root: Path) -> HostContext | None:
        """A host on which ``pvcore_detect`` must find the hypervisor (files created under ``root``).

        Return None only when presence cannot be faked at all (the detect test is then skipped).
        """
        raise self._missing("present_host", "create the files that show your hypervisor under root and return HostContext(root=root)")

    def probe_host(self, root: Path) -> HostContext:
        """A host on which ``pvcore_probe`` finds at least one device slot."""
        raise self._missing("probe_host", "return a HostContext on which pvcore_probe lists at least one device")

    def hostile_probe_host(self, root: Path) -> HostContext | None:
        """A host whose device source is corrupt (probe must raise a clean error or skip the bad part), or None."""
        return None

    def device_options(self, device_class: str, name: str) -> dict[str, str]:
        """The options device ``name`` of ``device_class`` needs on this hypervisor (``socket=``, ``domain=``...).

        The kit adds the class's own options (a disk image, a MAC...). Called
        before the daemon starts: create the device on the simulated host here if it needs that.
        """
        raise self._missing("device_options", f"return the options a {device_class} device needs (e.g. socket=...)")

    def open_guest(self, device: DeviceInstance, door: FrontDoor) -> RingGuest | Any | None:
        """Connect a guest to a served device: a :class:`RingGuest`, a device-class guest, or None.

        None means the device is served through one of the core's stream front
        doors, which the kit reaches by itself.
        """
        return None

    def notification_channel(self) -> tuple[Any, Any]:
        """A fresh channel for ``pvcore_open_notifier`` and the guest's end of it (``fileno``, ``consume``, ``signal``)."""
        raise self._missing("notification_channel", "return (channel for pvcore_open_notifier, the guest's end of it)")

    def hostile_channel(self) -> Any | None:
        """A channel a hostile frontend could pass that ``pvcore_open_notifier`` must refuse, or None."""
        return None

    def memory_layout(self) -> tuple[Any, GuestRam]:
        """A guest's RAM and the ``layout`` that describes it to ``pvcore_map_memory``."""
        raise self._missing("memory_layout", "return (layout for pvcore_map_memory, the GuestRam it describes)")
