"""The plugin contract: every hook a pvcore plugin may implement.

pvcore's device logic (rings, block, net, console, rng) is written once in the
core, and so are the ring transports several hypervisors speak (vhost-user).
A hypervisor plugin supplies only what is really hypervisor specific:

* **detect** — is this hypervisor here? (:func:`pvcore_detect`)
* **probe** — which device instances want a backend? (:func:`pvcore_probe`)
* **memory** — how the backend reaches guest memory (:func:`pvcore_map_memory`;
  optional: the core maps fd-described memory itself)
* **notification** — how the two sides signal each other
  (:func:`pvcore_open_notifier`; optional: the core adopts eventfds itself)
* **stream / transport** — the front door a device is served through
  (:func:`pvcore_front_door`): a core ring transport (vhost-user), its own
  (xen's PV rings), or one of the core's stream front doors (chardev,
  EGD, FIFO, netdev stream, NBD); how a guest is pointed at it
  (:func:`pvcore_qemu_args`, :func:`pvcore_libvirt_xml`); and the device
  options that only this plugin understands (:func:`pvcore_device_options`).

Device classes are registered through the same contract
(:func:`pvcore_device_classes`): the core's own block, net, console and rng
are plugins registered from the ``pvcore.plugins`` entry-point group exactly
like a third party's. Every plugin also answers :func:`pvcore_plugin_info`.

Two kinds of hooks:

* *every plugin* hooks (:func:`pvcore_plugin_info`,
  :func:`pvcore_device_classes`, :func:`pvcore_detect`): all plugins answer
  and the core collects the answers;
* *hypervisor* hooks (all the others): the registry calls only the plugin
  whose :class:`~pvcore.contract.PluginInfo` names the hypervisor at hand,
  so a plugin never checks whether a call is meant for it. A hypervisor hook
  a plugin does not implement answers None, and the core then uses its
  default where it has one.
"""

from __future__ import annotations

from collections.abc import Mapping
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
        LibvirtXml,
        OptionSpec,
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


@hookspec(firstresult=True)
def pvcore_probe(host: HostContext) -> list[DeviceSlot] | None:
    """List the device instances on ``host`` that want a backend.

    Called (a hypervisor hook: only the serving plugin answers) for the
    hypervisor chosen by detect or ``--hypervisor``. Returns a list of
    :class:`~pvcore.contract.DeviceSlot` (class, hypervisor address,
    properties). Hostile or broken sources (a corrupt device tree, a bad
    xenstore node) raise an exception whose message names the source; the core
    reports it.
    """


@hookspec(firstresult=True)
def pvcore_device_options() -> Mapping[str, Mapping[str, OptionSpec]] | None:
    """Declare the ``key=value`` device options only this plugin understands.

    Called (a hypervisor hook: only the serving plugin answers) when device
    options are parsed and by ``--help``, as nbdkit's ``config``/``config_help``.
    Returns, per device class name, the :class:`~pvcore.contract.OptionSpec` of each key
    (its help text and parser). A device served by this plugin (the daemon's
    hypervisor, or the device's ``hypervisor=``) accepts these keys on top of
    the core's common keys and its class's own; a device served by another
    plugin is refused them as unknown keys. Declaring a common key again
    (``socket``, ``domain``) gives it this plugin's help, parser or
    requirement for its devices. Each parser raises ``ValueError`` naming the
    fix, so the front door may rely on the parsed values.
    ``pvcore serve --help`` and ``pvcore plugins -v`` list them under the
    plugin's name. None (or no implementation) declares none.
    """


@hookspec(firstresult=True)
def pvcore_map_memory(layout: Any) -> GuestMemory | None:
    """The **memory** primitive: make guest memory reachable from the backend.

    Called (a hypervisor hook: only the serving plugin answers) by a ring
    transport when its frontend describes guest memory (xen: a domain's grant-addressed memory). Returns a
    :class:`~pvcore.ring.memory.GuestMemory` whose every access is bounds
    checked, or None to leave ``layout`` to the core: the core maps a
    :class:`~pvcore.contract.FdMemoryLayout` (vhost-user's SET_MEM_TABLE)
    itself, so only a hypervisor whose memory is reached otherwise implements
    this. A layout that cannot be mapped raises ``OSError`` or ``ValueError``
    with a message naming the region.
    """


@hookspec(firstresult=True)
def pvcore_open_notifier(channel: Any) -> Notifier | None:
    """The **notification** primitive: open one direction of guest<->backend signalling.

    Called (a hypervisor hook: only the serving plugin answers) by a ring
    transport for each queue's kick
    (guest->backend) and call (backend->guest) channel (xen: an event-channel
    port). Returns a :class:`~pvcore.ring.notify.Notifier`, or None to leave
    ``channel`` to the core, which adopts an
    :class:`~pvcore.contract.EventFdChannel` (KVM ioeventfd/irqfd, vhost-user)
    itself.
    """


@hookspec(firstresult=True)
def pvcore_front_door(device: DeviceInstance, context: DaemonContext) -> FrontDoor | None:
    """The **stream / transport** primitive: build the front door that serves ``device``.

    Called (a hypervisor hook: only the serving plugin answers) by the daemon
    once per configured device, after the device engine was built. ``device.config`` holds the user's options
    (``socket=`` and friends); ``context.primitives`` maps memory and opens
    notifiers for this hypervisor. Returns a
    :class:`~pvcore.contract.FrontDoor`: a core ring transport
    (:mod:`pvcore.transports`) or the plugin's own around ``device.virtio``,
    or one of the core's stream front doors (:mod:`pvcore.streams`) around
    ``device.engine``. A device class the hypervisor cannot serve raises
    ``ValueError`` saying which classes it can.
    """


@hookspec(firstresult=True)
def pvcore_qemu_args(configs: Sequence[DeviceConfig]) -> dict[str, list[str]] | None:
    """The QEMU arguments that attach each guest to the devices ``configs`` describe.

    Called (a hypervisor hook: only the serving plugin answers) by
    ``pvcore serve --print-qemu-args`` and ``pvcore demo`` with the devices of
    this hypervisor. Returns, per domain
    (the ``domain`` option of each device), the arguments to add to that
    guest's QEMU command line. A device that cannot be attached raises
    ``ValueError`` naming it.
    """


@hookspec(firstresult=True)
def pvcore_libvirt_xml() -> LibvirtXml | None:
    """How this hypervisor's guests name pvcore's devices in libvirt domain XML.

    Called (a hypervisor hook: only the serving plugin answers) by ``pvcore
    deploy``, ``pvcore undeploy``, ``pvcore probe`` and ``pvcore daemon`` for domains of the hypervisor that
    detect chose. Returns a :class:`~pvcore.contract.LibvirtXml`, which writes
    a device's element, reads the elements back, and checks what a domain
    definition must have for them (e.g. shared memory). None (or no
    implementation) means the plugin cannot deploy through libvirt, and
    ``pvcore deploy`` says so.
    """
