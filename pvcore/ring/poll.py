"""Adaptive polling of a queue's available ring, as QEMU's iothreads poll (``poll-max-ns``).

After a pass over its available ring a queue may keep kicks disabled and
look at the avail index again for a short *window* before it goes to sleep
on its kick notifier: a driver that posts its next request within the window
is served without a kick (no eventfd write by the front end, no wake-up of
the loop). :class:`PollWindow` holds one queue's window and its counters;
:class:`pvcore.ring.session.RunningQueue` runs the polling.

The window adapts to what polling catches, bounded by ``max_ns``:

* it starts at 0 (no polling);
* a queue woken by a kick after sleeping for no longer than ``max_ns`` would
  have caught that request by polling: the window grows (to
  :data:`POLL_START_NS`, then doubling, up to ``max_ns``);
* a poll that caught a request doubles the window (up to ``max_ns``);
* a window that passed with nothing arriving is halved, and below
  :data:`POLL_START_NS` it is 0;
* a sleep longer than ``max_ns`` (the device was idle) sets it to 0.

So an idle device does not poll at all, and a busy one spends at most
``max_ns`` per pass looking for work. ``max_ns`` 0 turns polling off.

The NBD door's connections (:class:`pvcore.streams.nbd.NbdFrontDoor`) use
the same window with QEMU's rule for one that passes empty
(:meth:`PollWindow.expired`): the window is kept, and the wait is judged as
a whole when the request comes (:meth:`PollWindow.woke`: within ``max_ns``
it grows, later it closes).
"""

from __future__ import annotations

DEFAULT_POLL_MAX_NS = 32_000
"""QEMU's default ``poll-max-ns`` for an iothread: 32 µs."""
POLL_START_NS = 4_000
"""The first window after polling was off (QEMU grows from 0 to 4 µs too)."""


MAX_POLL_MAX_US = 1_000_000


def parse_poll_max_us(text: str) -> int:
    """A ``poll-max-us=`` value: the longest window in µs, 0 (off) to 1 s; returned in ns."""
    try:
        value = int(text.strip())
    except ValueError:
        raise ValueError(f"expected a whole number of microseconds, 0 (no polling) to {MAX_POLL_MAX_US}") from None
    if not 0 <= value <= MAX_POLL_MAX_US:
        raise ValueError(f"expected 0 (no polling) to {MAX_POLL_MAX_US} microseconds")
    return value * 1000


class PollWindow:
    """One queue's adaptive polling window (nanoseconds) and what its polling did.

    ``polls`` counts the windows started, ``caught`` those in which a request
    arrived, ``poll_ns`` the time spent in windows.
    """

    __slots__ = ("max_ns", "window_ns", "polls", "caught", "poll_ns")

    def __init__(self, max_ns: int = DEFAULT_POLL_MAX_NS) -> None:
        if max_ns < 0:
            raise ValueError(f"poll window maximum must be >= 0 ns, not {max_ns}")
        self.max_ns = max_ns
        self.window_ns = 0
        self.polls = 0
        self.caught = 0
        self.poll_ns = 0

    def __repr__(self) -> str:
        return (f"PollWindow(max_ns={self.max_ns}, window_ns={self.window_ns}, polls={self.polls}, "
                f"caught={self.caught}, poll_ns={self.poll_ns})")

    def _grow(self) -> None:
        self.window_ns = min(self.max_ns, self.window_ns * 2 if self.window_ns else POLL_START_NS)

    def woke(self, slept_ns: int) -> None:
        """A kick woke the queue after it slept ``slept_ns``: grow if polling would have caught it, else stop."""
        if slept_ns > self.max_ns:
            self.window_ns = 0
        elif self.window_ns < self.max_ns:
            self._grow()

    def started(self) -> None:
        """A window starts."""
        self.polls += 1

    def hit(self, elapsed_ns: int) -> None:
        """A request arrived ``elapsed_ns`` into the window: grow."""
        self.caught += 1
        self.poll_ns += elapsed_ns
        self._grow()

    def missed(self, elapsed_ns: int) -> None:
        """The window passed (``elapsed_ns``) with nothing arriving: halve it, down to 0."""
        self.poll_ns += elapsed_ns
        window = self.window_ns // 2
        self.window_ns = window if window >= POLL_START_NS else 0

    def expired(self, elapsed_ns: int) -> None:
        """The window passed (``elapsed_ns``) with nothing arriving; the window is left to :meth:`woke`.

        For a waiter that learns when its work came after the window (QEMU's rule: a wait that ended
        within ``max_ns`` grows the window, a longer one sets it to 0), where :meth:`missed` halves at once.
        """
        self.poll_ns += elapsed_ns

    def counts(self) -> dict[str, int]:
        """``polls``, ``polls_caught``, ``poll_ns`` and the current ``poll_window_ns``."""
        return {"polls": self.polls, "polls_caught": self.caught, "poll_ns": self.poll_ns,
                "poll_window_ns": self.window_ns}
