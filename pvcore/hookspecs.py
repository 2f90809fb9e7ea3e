"""The plugin contract: every hook a pvcore plugin may implement.

pvcore's device logic (rings, block, net, console, rng) is written once in the
core. A hypervisor plugin supplies only what is really hypervisor specific:

* **detect** — is this hypervisor here? (:func:`pvcore_detect`)
* **probe** — which device instances want a backend? (:func:`pvcore_probe`)
* **memory** — how the backend reaches guest memory (:func:`pvcore_map_memory`)
* **notification** — how the two sides signal each other (:func:`pvcore_open_notifier`)
* **stream / transport** — the front door a device is served through
  (:func:`pvcore_front_door`): a ring transport (vhost-user, grant-mapped
  virtio) or one of the core's stream front doors (chardev, EGD, FIFO,
  netdev stream, NBD); and how a guest is pointed at it
  (:func:`pvcore_qemu_args`).

Device classes are registered through the same contract
(:func:`pvcore_device_classes`): the core's own block, net, console and rng
are plugins registered from the ``pvcore.plugins`` entry-point group exactly
like a third party's. Every plugin also answers :func:`pvcore_plugin_info`.

Hooks whose docstring says *firstresult* stop at the first plugin that returns
something other than None; the others collect a list of every plugin's answer.
``hypervisor`` arguments let a plugin decline what is not its own by returning
None.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from collections.abc import Sequence

    from pvcore.contract import (
        DaemonContext,
        DeviceClass,
        DeviceConfig,
        DeviceInstance,
        DeviceSlot,
        Detection,
        FrontDoor,
        HostContext,
        PluginInfo,
    )
    from pvcore.ring.memory import GuestMemory
    from pvcore.ring.notify import Notifier

PROJECT = "pvcore"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def pvcore_plugin_info() -> PluginInfo:
    """Describe this plugin.

    Called once when the plugin is registered, and by ``pvcore plugins``.
    Every plugin must implement it. Returns a :class:`~pvcore.contract.PluginInfo`
    naming the plugin, the contract version it was written against, the
    hypervisor it serves (if any), and the primitives and device classes it
    supplies. All plugins answer (a list is collected).
    """


@hookspec
def pvcore_device_classes() -> list[DeviceClass]:
    """Offer device classes (block, net, console, rng, or new ones).

    Called when the daemon starts and by ``pvcore plugins``. Returns a list of
    :class:`~pvcore.contract.DeviceClass`: a name, the ``key=value`` options it
    accepts, and a factory that builds the device engine for one
    :class:`~pvcore.contract.DeviceConfig`. All plugins answer; two plugins
    offering the same class name is an error reported by the registry.
    """


@hookspec
def pvcore_detect(host: HostContext) -> Detection | None:
    """Is this plugin's hypervisor present on ``host`` (or behind its libvirt connection)?

    Called by ``pvcore probe`` / ``pvcore serve`` without ``--hypervisor`` and by
    ``pvcore deploy`` to choose a plugin. Look only at paths under
    ``host.root`` (``host.path("/dev/kvm")``) and at ``host.libvirt`` if set.
    Returns a :class:`~pvcore.contract.Detection` with a confidence and the
    evidence, or None. All plugins answer; the core picks the highest confidence.
    Must not raise for an ordinary absence: that is None.
    """


@hookspec
def pvcore_probe(hypervisor: str, host: HostContext) -> list[DeviceSlot] | None:
    """List the device instances on ``host`` that want a backend.

    Called for the hypervisor chosen by detect or ``--hypervisor``. A plugin
    that does not serve ``hypervisor`` returns None. Returns a list of
    :class:`~pvcore.contract.DeviceSlot` (class, hypervisor address,
    properties). Hostile or broken sources (a corrupt device tree, a bad
    xenstore node) raise an exception whose message names the source; the core
    reports it. All plugins answer.
    """


@hookspec(firstresult=True)
def pvcore_map_memory(hypervisor: str, layout: Any) -> GuestMemory | None:
    """The **memory** primitive: make guest memory reachable from the backend.

    Called by a ring transport when its frontend describes guest memory
    (kvm: a vhost-user SET_MEM_TABLE as a :class:`~pvcore.contract.FdMemoryLayout`;
    xen: a domain's grant-addressed memory). Returns a
    :class:`~pvcore.ring.memory.GuestMemory` whose every access is bounds
    checked, or None when ``hypervisor``/``layout`` is not this plugin's.
    firstresult. A layout that cannot be mapped raises ``OSError`` or
    ``ValueError`` with a message naming the region.
    """


@hookspec(firstresult=True)
def pvcore_open_notifier(hypervisor: str, channel: Any) -> Notifier | None:
    """The **notification** primitive: open one direction of guest<->backend signalling.

    Called by a ring transport for each queue's kick (guest->backend) and call
    (backend->guest) channel (kvm: an :class:`~pvcore.contract.EventFdChannel`
    from SET_VRING_KICK/CALL; xen: an event-channel port). Returns a
    :class:`~pvcore.ring.notify.Notifier`, or None when the channel is not this
    plugin's. firstresult.
    """


@hookspec(firstresult=True)
def pvcore_front_door(hypervisor: str, device: DeviceInstance, context: DaemonContext) -> FrontDoor | None:
    """The **stream / transport** primitive: build the front door that serves ``device``.

    Called by the daemon once per configured device, after the device engine
    was built. ``device.config`` holds the user's options (``socket=`` and
    friends). Returns a :class:`~pvcore.contract.FrontDoor` — the plugin's own
    ring transport (vhost-user, xenbus) around ``device.virtio``, or one of the
    core's stream front doors (:mod:`pvcore.streams`) around ``device.engine`` —
    or None if ``hypervisor`` is not its own. firstresult. A device class the
    hypervisor cannot serve raises ``ValueError`` saying which classes it can.
    """


@hookspec(firstresult=True)
def pvcore_qemu_args(hypervisor: str, configs: Sequence[DeviceConfig]) -> dict[str, list[str]] | None:
    """The QEMU arguments that attach each guest to the devices ``configs`` describe.

    Called by ``pvcore serve --print-qemu-args`` with the devices of one
    hypervisor. Returns, per domain (the ``domain`` option of each device),
    the arguments to add to that guest's QEMU command line, or None when
    ``hypervisor`` is not this plugin's. firstresult. A device that cannot be
    attached raises ``ValueError`` naming it.
    """
