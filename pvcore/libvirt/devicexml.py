"""What every hypervisor's libvirt device XML shares: finding the plugin's writer, placing and finding elements.

The elements themselves come from the hypervisor plugin that detect (or
``--hypervisor``) chose, through the ``pvcore_libvirt_xml`` hook: a
:class:`~pvcore.contract.LibvirtXml` writes each device's element, reads
elements back (their socket, the slots pvcore could serve) and says what a
definition lacks for them. This module only handles elements as libvirt's
domain schema has them for every driver: ``<devices>`` children, disk target
names, ``<memoryBacking>``.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Iterable, Sequence
from xml.etree import ElementTree

from pvcore.contract import LibvirtXml
from pvcore.libvirt import LibvirtError
from pvcore.registry import Registry


def plugin_xml(registry: Registry, hypervisor: str) -> LibvirtXml | None:
    """The :class:`~pvcore.contract.LibvirtXml` of the plugin serving ``hypervisor``, or None if it has none."""
    answer = registry.call(hypervisor, "pvcore_libvirt_xml")
    if answer is not None and not isinstance(answer, LibvirtXml):
        plugin = registry.serving(hypervisor).name
        raise LibvirtError(
            f"plugin {plugin} answered pvcore_libvirt_xml with a {type(answer).__name__}, not a LibvirtXml "
            "(element, served, socket, slots, check); fix or update the plugin"
        )
    return answer


def require_xml(registry: Registry, hypervisor: str) -> LibvirtXml:
    """:func:`plugin_xml`, or :class:`LibvirtError` naming the plugin that has no libvirt device XML."""
    xml = plugin_xml(registry, hypervisor)
    if xml is None:
        plugin = registry.serving(hypervisor).name
        raise LibvirtError(
            f"plugin {plugin} cannot write libvirt device XML (it does not implement pvcore_libvirt_xml); "
            f"serve its guests with pvcore serve, or pass --hypervisor NAME for a plugin that can"
        )
    return xml


def has_shared_memory(domain: ElementTree.Element) -> bool:
    """Whether the definition shares guest RAM: ``<memoryBacking><access mode='shared'/>``, or every NUMA cell shared."""
    if domain.find("memoryBacking/access[@mode='shared']") is not None:
        return True
    cells = domain.findall("cpu/numa/cell")
    return bool(cells) and all(cell.get("memAccess") == "shared" for cell in cells)


def elements_by_socket(
    domain: ElementTree.Element, sockets: Iterable[str], socket_of: Callable[[ElementTree.Element], str | None]
) -> list[ElementTree.Element]:
    """The ``<devices>`` children of ``domain`` whose socket (as the plugin's ``socket_of`` reads it) is one of ``sockets``."""
    wanted = set(sockets)
    devices = domain.find("devices")
    if devices is None:
        return []
    return [child for child in devices if socket_of(child) in wanted]


def disk_targets(domain: ElementTree.Element) -> set[str]:
    """Every disk target name in use (``vda``, ``sda``...)."""
    return {target.get("dev", "") for target in domain.iterfind("devices/disk/target")}


def next_disk_targets(used: Iterable[str], count: int, prefix: str = "vd") -> list[str]:
    """``count`` free disk names in libvirt's order: vda..vdz, vdaa, vdab... (``prefix`` sd: sda...)."""
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
        if f"{prefix}{suffix}" not in taken:
            names.append(f"{prefix}{suffix}")
        index += 1
    return names


def free_disk_target(domain: ElementTree.Element, prefix: str = "vd") -> str:
    """The first disk target name ``domain`` does not use (for a plugin's ``element()``)."""
    return next_disk_targets(disk_targets(domain), 1, prefix)[0]


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
