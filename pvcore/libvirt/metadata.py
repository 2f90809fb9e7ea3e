"""pvcore's record in a domain's ``<metadata>``: the devices pvcore owns.

Each device is kept as its DEVICE spec, the ``pvcore serve`` syntax, complete
(socket, name and domain filled in, paths absolute), so that ``pvcore daemon``
serves it from the definition alone::

    <metadata>
      <pvcore:devices xmlns:pvcore="https://pvcore.invalid/xmlns/pvcore/1">
        <pvcore:device spec="block:path=/srv/vm1.img,socket=/run/pvcore/vm1-block0.sock,name=vm1-block0,domain=vm1"/>
      </pvcore:devices>
    </metadata>

The namespace is pvcore's own (``.invalid`` on purpose: it names, it does not
point anywhere); ``version`` on ``<devices>`` is the format of this record.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any
from xml.etree import ElementTree

from pvcore.libvirt import LibvirtError

NAMESPACE = "https://pvcore.invalid/xmlns/pvcore/1"
"""The XML namespace of pvcore's metadata."""

PREFIX = "pvcore"
"""The namespace prefix (libvirt's ``key`` for ``virDomainSetMetadata``)."""

FORMAT_VERSION = "1"

ElementTree.register_namespace(PREFIX, NAMESPACE)
# Keep libvirt's own extension prefixes readable when a definition is rewritten.
ElementTree.register_namespace("qemu", "http://libvirt.org/schemas/domain/qemu/1.0")

_DEVICES = f"{{{NAMESPACE}}}devices"
_DEVICE = f"{{{NAMESPACE}}}device"


def format_spec(device_class: str, options: Mapping[str, str]) -> str:
    """``CLASS:key=value,...`` with every literal comma written ``,,`` (what :func:`pvcore.config.split_spec` reads)."""
    items = ",".join(f"{key}={str(value).replace(',', ',,')}" for key, value in options.items())
    return f"{device_class}:{items}" if items else device_class


def devices_element(specs: Sequence[str]) -> ElementTree.Element:
    """The namespaced ``<pvcore:devices>`` element holding ``specs``."""
    root = ElementTree.Element(_DEVICES, version=FORMAT_VERSION)
    for spec in specs:
        ElementTree.SubElement(root, _DEVICE, spec=spec)
    return root


def metadata_xml(specs: Sequence[str]) -> str:
    """The element text ``virDomainSetMetadata`` takes (libvirt adds the namespace itself)."""
    root = ElementTree.Element("devices", version=FORMAT_VERSION)
    for spec in specs:
        ElementTree.SubElement(root, "device", spec=spec)
    return ElementTree.tostring(root, encoding="unicode")


def parse_metadata(text: str, *, origin: str) -> list[str]:
    """The specs of a ``<devices>`` element as libvirt returns it; anything else is an error naming ``origin``."""
    try:
        root = ElementTree.fromstring(text)
    except ElementTree.ParseError as exc:
        raise LibvirtError(f"{origin}: pvcore metadata is not XML: {exc}") from None
    return _specs(root, origin)


def _specs(root: ElementTree.Element, origin: str) -> list[str]:
    if root.tag.rpartition("}")[2] != "devices":
        raise LibvirtError(f"{origin}: pvcore metadata has <{root.tag}>, expected <devices>")
    version = root.get("version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise LibvirtError(f"{origin}: pvcore metadata format {version} is not {FORMAT_VERSION}; upgrade pvcore")
    specs = []
    for child in root:
        spec = child.get("spec")
        if child.tag.rpartition("}")[2] != "device" or not spec:
            raise LibvirtError(f"{origin}: pvcore metadata holds <{child.tag}> without spec=; expected <device spec=...>")
        specs.append(spec)
    return specs


def specs_in_definition(domain: ElementTree.Element, *, origin: str) -> list[str]:
    """The specs recorded in a whole domain definition (empty if pvcore owns nothing there)."""
    found = domain.find(f"metadata/{_DEVICES}")
    return [] if found is None else _specs(found, origin)


def set_in_definition(domain: ElementTree.Element, specs: Sequence[str]) -> None:
    """Replace pvcore's record in a whole definition (removing it when ``specs`` is empty)."""
    metadata = domain.find("metadata")
    if metadata is not None:
        for old in metadata.findall(_DEVICES):
            metadata.remove(old)
    if not specs:
        if metadata is not None and len(metadata) == 0:
            domain.remove(metadata)
        return
    if metadata is None:
        metadata = ElementTree.Element("metadata")
        domain.insert(_metadata_position(domain), metadata)
    metadata.append(devices_element(specs))


def _metadata_position(domain: ElementTree.Element) -> int:
    """libvirt's schema puts <metadata> after name, uuid, genid, title and description."""
    position = 0
    for index, child in enumerate(domain):
        if child.tag in ("name", "uuid", "genid", "title", "description"):
            position = index + 1
    return position


def read_specs(domain: Any, flags: int, libvirt: Any) -> list[str]:
    """The specs in a domain's live (``VIR_DOMAIN_AFFECT_LIVE``) or persistent (``..._CONFIG``) metadata."""
    try:
        text = domain.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, NAMESPACE, flags)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_METADATA:
            return []
        raise
    return parse_metadata(text, origin=f"domain {domain.name()}")


def write_specs(domain: Any, specs: Sequence[str], flags: int, libvirt: Any) -> None:
    """Replace pvcore's record in a domain's live (``VIR_DOMAIN_AFFECT_LIVE``) or persistent
    (``..._CONFIG``) metadata, removing it when ``specs`` is empty."""
    domain.setMetadata(
        libvirt.VIR_DOMAIN_METADATA_ELEMENT,
        metadata_xml(specs) if specs else None,
        PREFIX,
        NAMESPACE,
        flags,
    )


def write_live_specs(domain: Any, specs: Sequence[str], libvirt: Any) -> None:
    """Replace pvcore's record in a running domain's live metadata (removing it when ``specs`` is empty)."""
    write_specs(domain, specs, libvirt.VIR_DOMAIN_AFFECT_LIVE, libvirt)
