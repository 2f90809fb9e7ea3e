"""pvcore's libvirt metadata XML: a ``<devices>`` element alone, or inside a whole domain definition.

First byte even: the rest is the metadata element (:func:`parse_metadata`);
odd: a domain definition (:func:`specs_in_definition`). Every spec found is
then split as a DEVICE string. Only :class:`LibvirtError` and
:class:`~pvcore.config.ConfigError` may escape.
"""

from __future__ import annotations

from xml.etree import ElementTree

from pvcore.config import ConfigError, split_spec
from pvcore.libvirt import LibvirtError
from pvcore.libvirt.metadata import metadata_xml, parse_metadata, set_in_definition, specs_in_definition


def setup() -> None:
    """Nothing to build."""


def one_input(data: bytes) -> None:
    """Parse one metadata element or domain definition."""
    if not data:
        return
    text = data[1:].decode("utf-8", "replace")
    try:
        if data[0] % 2 == 0:
            specs = parse_metadata(text, origin="fuzz")
        else:
            try:
                domain = ElementTree.fromstring(text)
            except ElementTree.ParseError:
                return
            specs = specs_in_definition(domain, origin="fuzz")
        for spec in specs:
            split_spec(spec)
    except (LibvirtError, ConfigError):
        pass


def seeds() -> dict[str, bytes]:
    """What pvcore itself writes, alone and in a domain definition."""
    element = metadata_xml(["block:path=/var/lib/disk.img", "rng:rate=1024/1s"]).encode()
    domain = ElementTree.fromstring("<domain type='kvm'><name>g</name><devices/></domain>")
    set_in_definition(domain, ["net:mac=52:54:00:00:00:01", "console:scrollback=64K"])
    return {"element": b"\0" + element, "domain": b"\1" + ElementTree.tostring(domain)}
