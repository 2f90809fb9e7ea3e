"""The libvirt domain XML of QEMU/KVM guests: written by deploy, read back by probe, checked before both.

Each device pvcore serves appears in the domain as the element libvirt gives
QEMU for it; its socket path ties the element to the device's spec in
pvcore's metadata:

* block — ``<disk type='vhostuser' device='disk'>`` (QEMU's vhost-user-blk),
  ``queues=`` becomes ``<driver queues=N>``, target the first free ``vdX``;
* net — ``<interface type='vhostuser'>`` with the device's MAC;
* console — ``<console type='unix'>`` on a virtio console target (QEMU 7.2
  has no vhost-user console; the plugin serves a chardev stream);
* rng — ``<rng model='virtio'>`` with an EGD backend (libvirt has no
  vhost-user rng): the device is served with ``protocol=egd``.

Every chardev source says ``<reconnect enabled='yes' timeout='1'/>`` so that
QEMU comes back to a restarted pvcore daemon by itself. Reading back takes
the same four forms (and a unix ``<serial>``), wherever they came from.
vhost-user devices (block, net) need the guest's RAM shared with the daemon;
:meth:`KvmLibvirtXml.check` says exactly what XML to add.
"""

from __future__ import annotations

from collections.abc import Sequence
from xml.etree import ElementTree

import attrs

from pvcore.contract import DeviceConfig, DeviceSlot
from pvcore.libvirt.devicexml import free_disk_target, has_shared_memory

VHOST_USER_CLASSES = frozenset({"block", "net"})
"""Classes whose device is a vhost-user device in QEMU, so guest RAM must be shared."""

RECONNECT_SECONDS = "1"

SHARED_MEMORY_XML = """<memoryBacking>
  <source type='memfd'/>
  <access mode='shared'/>
</memoryBacking>"""
"""What a domain needs for vhost-user devices (inside ``<domain>``)."""


def _source(parent: ElementTree.Element, **attributes: str) -> ElementTree.Element:
    source = ElementTree.SubElement(parent, "source", attributes)
    ElementTree.SubElement(source, "reconnect", enabled="yes", timeout=RECONNECT_SECONDS)
    return source


def _read(element: ElementTree.Element) -> tuple[str, ElementTree.Element] | None:
    """The class and the socket's ``<source>`` of an element of a form this module writes, else None."""
    tag, kind = element.tag, element.get("type")
    if tag == "disk" and kind == "vhostuser":
        device_class, source = "block", element.find("source")
    elif tag == "interface" and kind == "vhostuser":
        device_class, source = "net", element.find("source")
    elif tag in ("console", "serial") and kind == "unix":
        device_class, source = "console", element.find("source[@mode='connect']")
    elif tag == "rng":
        device_class, source = "rng", element.find("backend[@model='egd'][@type='unix']/source[@mode='connect']")
    else:
        return None
    return (device_class, source) if source is not None and source.get("path") else None


class KvmLibvirtXml:
    """The :class:`~pvcore.contract.LibvirtXml` of QEMU/KVM domains (answer of the kvm plugin's ``pvcore_libvirt_xml``)."""

    def element(self, config: DeviceConfig, domain: ElementTree.Element) -> ElementTree.Element:
        """The ``<devices>`` child that attaches ``config``'s device (a disk takes ``domain``'s first free vdX)."""
        socket, mode = config.get("socket"), config.get("socket-mode", "server")
        if not socket:
            raise ValueError(f"{config.name}: a libvirt device needs its socket= path")
        if config.device_class == "block":
            if mode != "server":
                raise ValueError(f"{config.name}: libvirt's vhost-user disks always connect; drop socket-mode={mode}")
            disk = ElementTree.Element("disk", type="vhostuser", device="disk")
            driver = ElementTree.SubElement(disk, "driver", name="qemu", type="raw")
            if config.get("queues"):
                driver.set("queues", str(config.get("queues")))
            _source(disk, type="unix", path=str(socket))
            ElementTree.SubElement(disk, "target", dev=free_disk_target(domain), bus="virtio")
            return disk
        if config.device_class == "net":
            interface = ElementTree.Element("interface", type="vhostuser")
            ElementTree.SubElement(interface, "mac", address=str(config.get("mac")))
            # libvirt's mode is QEMU's side of the socket.
            _source(interface, type="unix", path=str(socket), mode="client" if mode == "server" else "server")
            ElementTree.SubElement(interface, "model", type="virtio")
            return interface
        if config.device_class in ("console", "rng") and mode != "server":
            raise ValueError(f"{config.name}: under libvirt pvcore listens for a {config.device_class}; drop socket-mode={mode}")
        if config.device_class == "console":
            console = ElementTree.Element("console", type="unix")
            _source(console, mode="connect", path=str(socket))
            ElementTree.SubElement(console, "target", type="virtio")
            return console
        if config.device_class == "rng":
            rng = ElementTree.Element("rng", model="virtio")
            _source(ElementTree.SubElement(rng, "backend", model="egd", type="unix"), mode="connect", path=str(socket))
            return rng
        raise ValueError(
            f"{config.name}: pvcore has no libvirt device XML for class {config.device_class!r} (block, net, console, rng)"
        )

    def served(self, config: DeviceConfig) -> DeviceConfig:
        """``config`` as its element needs it served: an rng over EGD, the others unchanged."""
        if config.device_class != "rng":
            return config
        return attrs.evolve(config, options={**config.options, "protocol": "egd"})

    def socket(self, element: ElementTree.Element) -> str | None:
        """The Unix socket a device element connects to, if it is one pvcore could serve."""
        found = _read(element)
        return found[1].get("path") if found else None

    def slots(self, domain_name: str, domain: ElementTree.Element) -> list[DeviceSlot]:
        """Every vhost-user disk and interface, unix console/serial and EGD rng of ``domain`` (a console once per socket)."""
        slots: list[DeviceSlot] = []
        consoles: set[str] = set()
        for element in domain.iterfind("devices/*"):
            found = _read(element)
            if found is None:
                continue
            device_class, source = found
            path = source.get("path", "")
            properties = {"socket": path}
            if device_class == "block":
                properties["socket-mode"] = "server"
                target = element.find("target")
                if target is not None and target.get("dev"):
                    properties["target"] = target.get("dev", "")
            elif device_class == "net":
                # libvirt's mode is QEMU's side: QEMU as client means pvcore listens.
                properties["socket-mode"] = "client" if source.get("mode") == "server" else "server"
                mac = element.find("mac")
                if mac is not None and mac.get("address"):
                    properties["mac"] = mac.get("address", "")
            elif device_class == "rng":
                properties["protocol"] = "egd"
            elif path in consoles:
                continue
            else:
                consoles.add(path)
            slots.append(DeviceSlot("kvm", device_class, path, domain_name, properties))
        return slots

    def check(self, domain_name: str, domain: ElementTree.Element, configs: Sequence[DeviceConfig]) -> list[str]:
        """vhost-user devices need the domain's RAM shared: the problem, with the exact XML to add."""
        needing = [f"{c.device_class} {c.name}" for c in configs if c.device_class in VHOST_USER_CLASSES]
        if not needing:
            return []
        if has_shared_memory(domain):
            if domain.find("memoryBacking/source[@type='memfd']") is not None:
                return []
            return [
                f"domain {domain_name} shares its memory from a file or hugepages, not a memfd, and pvcore maps only "
                f"guest memory sealed against shrinking ({', '.join(needing)}): set <source type='memfd'/> in its "
                f"<memoryBacking> (virsh edit {domain_name}), then start the domain again"
            ]
        backing = domain.find("memoryBacking")
        if backing is None:
            fix = f"add inside <domain>:\n{SHARED_MEMORY_XML}"
        else:
            missing = "" if backing.find("source") is not None else "<source type='memfd'/> and "
            fix = f"add {missing}<access mode='shared'/> inside its existing <memoryBacking>, so that it reads e.g.:\n{SHARED_MEMORY_XML}"
        return [
            f"domain {domain_name} has no shared memory, which vhost-user devices need ({', '.join(needing)}): "
            f"QEMU must share guest RAM with the pvcore daemon. Edit its definition (virsh edit {domain_name}) and {fix}\n"
            "then start the domain again (a running domain keeps its old memory until it is restarted)"
        ]


LIBVIRT_XML = KvmLibvirtXml()
