"""The memory and notification primitives a ring transport uses, with the core's defaults.

A ring transport (vhost-user, a plugin's own) asks :class:`HypervisorPrimitives`
to map the guest memory its frontend describes and to open the notification
channels it is given. The plugin that serves the hypervisor answers first
(``pvcore_map_memory``, ``pvcore_open_notifier``); when it has no answer the
core's defaults serve what many hypervisors share:

* an :class:`~pvcore.contract.FdMemoryLayout` (vhost-user SET_MEM_TABLE,
  vfio-user DMA regions) is mapped by :func:`pvcore.ring.fdmemory.map_fd_layout`;
* an :class:`~pvcore.contract.EventFdChannel` (KVM ioeventfd/irqfd) is
  adopted by :meth:`pvcore.ring.notify.EventFdNotifier.adopt`.

Anything else no one answers for is a ``ValueError`` naming the hypervisor.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pvcore.contract import EventFdChannel, FdMemoryLayout
from pvcore.ring.fdmemory import map_fd_layout
from pvcore.ring.memory import GuestMemory
from pvcore.ring.notify import EventFdNotifier, Notifier

PluginCall = Callable[..., Any]
"""Calls one hypervisor hook of the serving plugin by name, with keyword arguments; None if it has no answer."""


def _no_plugin(_hook: str, **_kwargs: Any) -> None:
    return None


def default_memory(layout: Any) -> GuestMemory | None:
    """The core's memory primitive: map fd-described memory; None for any other layout."""
    return map_fd_layout(layout) if isinstance(layout, FdMemoryLayout) else None


def default_notifier(channel: Any) -> Notifier | None:
    """The core's notification primitive: adopt an eventfd; None for any other channel."""
    return EventFdNotifier.adopt(channel.fd) if isinstance(channel, EventFdChannel) else None


class HypervisorPrimitives:
    """:class:`~pvcore.contract.Primitives` of one hypervisor: its plugin's hooks, then the core's defaults.

    ``call(hook_name, **kwargs)`` calls the serving plugin's hook (see
    :meth:`pvcore.registry.Registry.call`); without it only the core's
    defaults answer, which is what a transport under test wants.
    """

    def __init__(self, hypervisor: str = "core", call: PluginCall = _no_plugin) -> None:
        self.hypervisor = hypervisor
        self._call = call

    def __repr__(self) -> str:
        return f"HypervisorPrimitives({self.hypervisor!r})"

    def map_memory(self, layout: Any) -> GuestMemory:
        """The guest memory ``layout`` describes; ``ValueError`` when no one maps that kind of layout."""
        memory = self._call("pvcore_map_memory", layout=layout)
        if memory is None:
            memory = default_memory(layout)
        if memory is None:
            raise ValueError(f"{self.hypervisor}: nothing maps guest memory described as {type(layout).__name__}")
        return memory

    def open_notifier(self, channel: Any) -> Notifier:
        """The notifier for ``channel``; ``ValueError`` when no one opens that kind of channel."""
        notifier = self._call("pvcore_open_notifier", channel=channel)
        if notifier is None:
            notifier = default_notifier(channel)
        if notifier is None:
            raise ValueError(f"{self.hypervisor}: nothing opens a notification channel {type(channel).__name__}")
        return notifier
