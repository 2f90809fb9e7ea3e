"""The kvm plugin's hook implementations (entry point ``pvcore.plugins: kvm``).

What is KVM/QEMU specific, and nothing else:

* detect: ``/dev/kvm``, or a libvirt connection whose type is QEMU;
* probe and libvirt XML: the vhost-user disks and interfaces, unix-socket
  consoles and EGD rngs of each libvirt domain, written and read back by one
  module (:mod:`pvcore_kvm.libvirt`);
* memory and notification: vhost-user SET_MEM_TABLE fds and eventfds (KVM
  ioeventfd/irqfd), which the core's default primitives serve;
* stream/transport: vhost-user for block, net and rng; the core's chardev
  front door for consoles (QEMU 7.2 has no vhost-user console); the core's
  EGD front door for an rng whose config says ``protocol=egd`` (what a
  libvirt ``<rng><backend model='egd'>`` connects to: libvirt has no
  vhost-user rng).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from xml.etree import ElementTree

from pvcore.contract import (
    CONTRACT_VERSION,
    DaemonContext,
    Detection,
    DeviceConfig,
    DeviceInstance,
    DeviceSlot,
    FrontDoor,
    HostContext,
    OptionSpec,
    PluginInfo,
)
from pvcore.hookspecs import hookimpl
from pvcore.spread import is_spread
from pvcore.streams.chardev import ChardevFrontDoor
from pvcore.streams.egd import QEMU_UNASKED_BYTES, EgdFrontDoor
from pvcore.transports.vhost_user import VhostUserFrontDoor
from pvcore_kvm.libvirt import LIBVIRT_XML, KvmLibvirtXml
from pvcore_kvm.options import DEVICE_OPTIONS
from pvcore_kvm.qemu import qemu_arguments

log = logging.getLogger("pvcore.kvm")

HYPERVISOR = "kvm"

RING_CLASSES = ("block", "net", "rng", "scsi")
"""Classes served over vhost-user; scsi is the pvcore-scsi plugin's (QEMU vhost-user-scsi-pci)."""


@hookimpl
def pvcore_plugin_info() -> PluginInfo:
    """The kvm plugin: vhost-user and QEMU chardev front doors."""
    return PluginInfo(
        name="kvm",
        contract=CONTRACT_VERSION,
        hypervisor=HYPERVISOR,
        primitives={"detect", "probe", "stream"},
        device_classes={*RING_CLASSES, "console"},
        description="KVM/QEMU: vhost-user (block, net, rng, scsi) and chardev (console) front doors",
    )


@hookimpl
def pvcore_detect(host: HostContext) -> Detection | None:
    """QEMU behind the libvirt connection (confident), or a /dev/kvm node (less so: it may be unusable)."""
    if host.libvirt_driver() == "QEMU":
        return Detection(HYPERVISOR, 90, "libvirt connection type is QEMU")
    if host.path("/dev/kvm").exists():
        return Detection(HYPERVISOR, 60, "/dev/kvm exists (QEMU may still have to use TCG if it is unusable)")
    return None


@hookimpl
def pvcore_probe(host: HostContext) -> list[DeviceSlot]:
    """The devices of every libvirt domain that pvcore could serve, read by :mod:`pvcore_kvm.libvirt`.

    A domain whose XML cannot be read (it vanished meanwhile, or the XML is broken) is skipped with a warning.
    """
    if host.libvirt is None:
        return []
    slots: list[DeviceSlot] = []
    for domain in host.libvirt.listAllDomains(0):
        name = domain.name()
        try:
            root = ElementTree.fromstring(domain.XMLDesc(0))
        except ElementTree.ParseError as exc:
            log.warning("libvirt domain %s: unreadable XML: %s; skipped", name, exc)
            continue
        except Exception as exc:  # libvirt raises its own libvirtError, e.g. for a domain that just vanished
            log.warning("libvirt domain %s: cannot read its XML: %s; skipped", name, exc)
            continue
        slots.extend(LIBVIRT_XML.slots(name, root))
    return slots


@hookimpl
def pvcore_libvirt_xml() -> KvmLibvirtXml:
    """QEMU/KVM domain XML: vhost-user disks and interfaces, unix consoles, EGD rngs (see :mod:`pvcore_kvm.libvirt`)."""
    return LIBVIRT_XML


@hookimpl
def pvcore_front_door(device: DeviceInstance, context: DaemonContext) -> FrontDoor:
    """vhost-user for block/net/rng, the core's chardev door for consoles, EGD for an rng with protocol=egd."""
    config = device.config
    socket_path = config.get("socket") or context.run_dir / f"{config.name}.sock"
    if config.device_class == "console":
        return ChardevFrontDoor(device.engine, socket_path)
    if config.device_class == "rng" and config.get("protocol") == "egd":
        if config.get("socket-mode") == "client":
            raise ValueError(f"{config.name}: an rng over EGD is served listening (QEMU's rng-egd connects); drop socket-mode=client")
        # QEMU's rng-egd is the client: answer at once a request it may have sent to a previous daemon.
        return EgdFrontDoor(device.engine, socket_path, unasked_bytes=QEMU_UNASKED_BYTES)
    if config.device_class not in RING_CLASSES or device.virtio is None:
        raise ValueError(
            f"{config.name}: kvm serves block, net, rng and scsi over vhost-user and console over a chardev "
            f"socket, not {config.device_class}"
        )
    if config.get("socket-mode") == "client" and is_spread(config.options):
        raise ValueError(f"{config.name}: spread=on needs the daemon to listen (its parent hands the connection "
                         "out); drop socket-mode=client or spread=on")
    return VhostUserFrontDoor(
        device.virtio, socket_path, primitives=context.primitives, name=config.name,
        client=config.get("socket-mode") == "client", poll_max_ns=config.get("poll-max-us", 0),
    )


@hookimpl
def pvcore_device_options() -> Mapping[str, Mapping[str, OptionSpec]]:
    """socket-mode= (block, net, rng; a console only listens) and an rng's protocol= (see :mod:`pvcore_kvm.options`)."""
    return DEVICE_OPTIONS


@hookimpl
def pvcore_qemu_args(configs: Sequence[DeviceConfig]) -> dict[str, list[str]]:
    """The x86 QEMU arguments (vhost-user, chardev) that attach each guest (see :mod:`pvcore_kvm.qemu`)."""
    return qemu_arguments(configs)
