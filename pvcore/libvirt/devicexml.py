"""The libvirt domain XML of each device class, and the checks a definition must pass.

Each device pvcore serves appears in the domain as the element libvirt gives
QEMU for it; its socket path ties the element to the device's spec in
pvcore's metadata:

* block — ``<disk type='vhostuser' device='disk'>`` (QEMU's vhost-user-blk),
  ``queues=`` becomes ``<driver queues=N>``;
* net — ``<interface type='vhostuser'>`` with the device's MAC;
* console — ``<console type='unix'>`` on a virtio console target (QEMU 7.2
  has no vhost-user console; the kvm plugin serves a chardev stream);
* rng — ``<rng model='virtio'>`` with an EGD backend (libvirt has no
  vhost-user rng): the device is served with ``protocol=egd``.

Every chardev source says ``<reconnect enabled='yes' timeout='1'/>`` so that
QEMU comes back to a restarted pvcore daemon by itself.

vhost-user devices (block, net) need the guest's RAM shared with the daemon;
:func:`check_shared_memory` refuses a definition without it and gives the
exact XML to add.
"""

from __future__ import annotations

import string
from collections.abc import Iterable, Sequence
from xml.etree import ElementTree

import attrs

from pvcore.contract import DeviceConfig
from pvcore.libvirt import LibvirtError

VHOST_USER_CLASSES = frozenset({"block", "net"})
"""Classes whose device is a vhost-user device in QEMU, so guest RAM must be shared."""

RECONNECT_SECONDS = "1"

SHARED_MEMORY_XML = """<memoryBacking>
  <source type='memfd'/>
  <access mode='shared'/>
</memoryBacking>"""
"""What a domain needs for vhost-user devices (inside ``<domain>``)."""

_DEVICE_TAGS = ("disk", "interface", "console", "serial", "rng")


def protocol_for(device_class: str) -> str | None:
    """The ``protocol=`` a device of this class is served with under libvirt (None: the plugin's default)."""
    return "egd" if device_class == "rng" else None


def served_config(config: DeviceConfig) -> DeviceConfig:
    """``config`` as a libvirt domain's element needs it served (an rng over EGD)."""
    protocol = protocol_for(config.device_class)
    if protocol is None:
        return config
    return attrs.evolve(config, options={**config.options, "protocol": protocol})


def _reconnecting_source(parent: ElementTree.Element, **attributes: str) -> ElementTree.Element:
    source = ElementTree.SubElement(parent, "source", attributes)
    ElementTree.SubElement(source, "reconnect", enabled="yes", timeout=RECONNECT_SECONDS)
    return source


def device_element(config: DeviceConfig, *, target_dev: str = "vda") -> ElementTree.Element:
    """The ``<devices>`` child that attaches ``config``'s device (``target_dev`` names a disk)."""
    socket = config.get("socket")
    if not socket:
        raise LibvirtError(f"{config.name}: a libvirt device needs its socket= path")
    mode = config.get("socket-mode", "server")
    if config.device_class == "block":
        if mode != "server":
            raise LibvirtError(f"{config.name}: libvirt's vhost-user disks always connect; drop socket-mode={mode}")
        disk = ElementTree.Element("disk", type="vhostuser", device="disk")
        driver = ElementTree.SubElement(disk, "driver", name="qemu", type="raw")
        if config.get("queues"):
            driver.set("queues", str(config.get("queues")))
        _reconnecting_source(disk, type="unix", path=str(socket))
        ElementTree.SubElement(disk, "target", dev=target_dev, bus="virtio")
        return disk
    if config.device_class == "net":
        interface = ElementTree.Element("interface", type="vhostuser")
        ElementTree.SubElement(interface, "mac", address=str(config.get("mac")))
        # libvirt's mode is QEMU's side of the socket.
        _reconnecting_source(interface, type="unix", path=str(socket), mode="client" if mode == "server" else "server")
        ElementTree.SubElement(interface, "model", type="virtio")
        return interface
    if config.device_class in ("console", "rng") and mode != "server":
        raise LibvirtError(f"{config.name}: under libvirt pvcore listens for a {config.device_class}; drop socket-mode={mode}")
    if config.device_class == "console":
        console = ElementTree.Element("console", type="unix")
        _reconnecting_source(console, mode="connect", path=str(socket))
        ElementTree.SubElement(console, "target", type="virtio")
        return console
    if config.device_class == "rng":
        rng = ElementTree.Element("rng", model="virtio")
        backend = ElementTree.SubElement(rng, "backend", model="egd", type="unix")
        _reconnecting_source(backend, mode="connect", path=str(socket))
        return rng
    raise LibvirtError(
        f"{config.name}: pvcore has no libvirt device XML for class {config.device_class!r} (block, net, console, rng)"
    )


def has_shared_memory(domain: ElementTree.Element) -> bool:
    """Whether the definition shares guest RAM: ``<memoryBacking><access mode='shared'/>``, or every NUMA cell shared."""
    if domain.find("memoryBacking/access[@mode='shared']") is not None:
        return True
    cells = domain.findall("cpu/numa/cell")
    return bool(cells) and all(cell.get("memAccess") == "shared" for cell in cells)


def check_shared_memory(name: str, domain: ElementTree.Element, configs: Iterable[DeviceConfig]) -> None:
    """Refuse vhost-user devices for a domain whose RAM is not shared, saying exactly what to add."""
    needing = [f"{c.device_class} {c.name}" for c in configs if c.device_class in VHOST_USER_CLASSES]
    if not needing or has_shared_memory(domain):
        return
    backing = domain.find("memoryBacking")
    if backing is None:
        fix = f"add inside <domain>:\n{SHARED_MEMORY_XML}"
    else:
        missing = "" if backing.find("source") is not None else "<source type='memfd'/> and "
        fix = f"add {missing}<access mode='shared'/> inside its existing <memoryBacking>, so that it reads e.g.:\n{SHARED_MEMORY_XML}"
    raise LibvirtError(
        f"domain {name} has no shared memory, which vhost-user devices need ({', '.join(needing)}): "
        f"QEMU must share guest RAM with the pvcore daemon. Edit its definition (virsh edit {name}) and {fix}\n"
        "then start the domain again (a running domain keeps its old memory until it is restarted)"
    )


def element_socket(element: ElementTree.Element) -> str | None:
    """The Unix socket path a device element connects to, if it is one pvcore could serve."""
    if element.tag == "disk" and element.get("type") == "vhostuser":
        source = element.find("source")
    elif element.tag == "interface" and element.get("type") == "vhostuser":
        source = element.find("source")
    elif element.tag in ("console", "serial") and element.get("type") == "unix":
        source = element.find("source")
    elif element.tag == "rng":
        source = element.find("backend[@model='egd'][@type='unix']/source")
    else:
        return None
    return source.get("path") if source is not None and source.get("path") else None


def elements_by_socket(domain: ElementTree.Element, sockets: Iterable[str]) -> list[ElementTree.Element]:
    """The device elements of ``domain`` that connect to one of ``sockets``."""
    wanted = set(sockets)
    devices = domain.find("devices")
    if devices is None:
        return []
    return [child for child in devices if child.tag in _DEVICE_TAGS and element_socket(child) in wanted]


def disk_targets(domain: ElementTree.Element) -> set[str]:
    """Every disk target name in use (``vda``, ``sda``...)."""
    return {target.get("dev", "") for target in domain.iterfind("devices/disk/target")}


def next_disk_targets(used: Iterable[str], count: int) -> list[str]:
    """``count`` free virtio disk names in libvirt's order: vda..vdz, vdaa, vdab..."""
    taken = set(used)
    letters = string.ascii_lowercase
    names: list[str] = []
    index = 0
    while len(names) < count:
        suffix, n = "", index
        while True:
            suffix = letters[n % 26] + suffix
            n = n // 26 - 1
            if n < 0:
                break
        if f"vd{suffix}" not in taken:
            names.append(f"vd{suffix}")
        index += 1
    return names


def insert_devices(domain: ElementTree.Element, elements: Sequence[ElementTree.Element]) -> None:
    """Append ``elements`` to the definition's ``<devices>`` (created if missing)."""
    devices = domain.find("devices")
    if devices is None:
        devices = ElementTree.SubElement(domain, "devices")
    devices.extend(elements)


def remove_devices(domain: ElementTree.Element, elements: Iterable[ElementTree.Element]) -> None:
    """Remove ``elements`` (found with :func:`elements_by_socket`) from the definition."""
    devices = domain.find("devices")
    if devices is None:
        return
    for element in elements:
        devices.remove(element)
