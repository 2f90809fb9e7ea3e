"""The lpar probe: a partition's virtual devices, read from its Open Firmware device tree.

A PAPR partition finds its virtual I/O devices as the children of
``/vdevice`` (and the random-number facility under
``/ibm,platform-facilities``). The tree comes in two forms, both read here
into one :class:`DeviceTree`:

* a flattened blob (DTB), e.g. what ``qemu-system-ppc64 -M
  pseries,dumpdtb=FILE`` writes: parsed with PyPI's ``fdt``. That parser
  does not check the header's sizes against the data (a truncated blob
  parses into silently shortened property values) and raises bare
  ``Exception`` on corrupt input, so :func:`parse_dtb` checks the header's
  bounds itself and turns every parser failure into a
  :class:`DeviceTreeError` naming the file;
* the directory form the Linux kernel exports (``/proc/device-tree``): one
  directory per node, one file per property.

:func:`device_slots` turns the nodes into :class:`~pvcore.contract.DeviceSlot`
s: vty (``hvterm1``) -> console, l-lan (``IBM,l-lan``) -> net, v-scsi
(``IBM,v-scsi``) -> block, ``ibm,random-v1`` -> rng; every other node (nvram,
vty-server, ...) is not a device pvcore serves and is left out.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import attrs
import fdt

from pvcore.contract import DeviceSlot
from pvcore.devices.net.switch import format_mac
from pvcore_lpar import HYPERVISOR

VIRTUAL_PARENTS = ("vdevice", "ibm,platform-facilities")
"""The nodes whose children are a partition's virtual devices."""

MAX_BLOB_BYTES = 16 << 20
"""A device tree larger than this is refused (QEMU's are about 15 KiB)."""
MAX_PROPERTY_BYTES = 64 << 10
"""A property file larger than this in the directory form is refused."""

_HEADER_WORDS = 10
_FDT_MAGIC = 0xD00DFEED


class DeviceTreeError(ValueError):
    """A device tree cannot be read or is corrupt; the message names the file or node."""


@attrs.frozen
class DeviceTreeNode:
    """One node under a :data:`VIRTUAL_PARENTS` node: its path and its raw property values."""

    path: str
    properties: Mapping[str, bytes]

    @property
    def name(self) -> str:
        """The node's name with its unit address (``l-lan@71000002``)."""
        return self.path.rsplit("/", 1)[-1]

    def strings(self, prop: str) -> list[str]:
        """A string-list property (``compatible``) as its non-empty strings."""
        raw = self.properties.get(prop, b"")
        return [part.decode("ascii", "replace") for part in raw.split(b"\0") if part]


@attrs.frozen
class DeviceTree:
    """What the probe needs of a device tree: the root's properties and the virtual device nodes.

    ``source`` names where it was read from, for messages.
    """

    source: str
    root: Mapping[str, bytes]
    nodes: tuple[DeviceTreeNode, ...]

    @property
    def partition_name(self) -> str:
        """The root's ``ibm,partition-name`` (QEMU sets it from ``-name``), or empty."""
        return self.root.get("ibm,partition-name", b"").split(b"\0", 1)[0].decode("ascii", "replace")


def read_dtb(path: Path | str) -> DeviceTree:
    """Read a flattened device tree file."""
    try:
        with open(path, "rb") as blob:
            data = blob.read(MAX_BLOB_BYTES + 1)
    except OSError as exc:
        raise DeviceTreeError(f"device tree {path}: cannot read: {exc.strerror or exc}") from None
    return parse_dtb(data, source=os.fspath(path))


def parse_dtb(data: bytes, *, source: str) -> DeviceTree:
    """Parse a flattened device tree blob; ``source`` names it in errors."""
    blob = _checked_blob(data, source)
    try:
        tree = fdt.parse_dtb(blob)
    except Exception as exc:  # fdt raises bare Exception, struct.error, IndexError... on corrupt input
        raise DeviceTreeError(f"device tree {source}: corrupt structure block: {exc or type(exc).__name__}") from None
    if tree.root is None:
        raise DeviceTreeError(f"device tree {source}: corrupt structure block: no root node")
    nodes = []
    for parent in tree.root.nodes:
        if parent.name in VIRTUAL_PARENTS:
            for child in parent.nodes:
                path = f"/{parent.name}/{child.name}"
                nodes.append(DeviceTreeNode(path, {prop.name: _raw_value(prop) for prop in child.props}))
    root = {prop.name: _raw_value(prop) for prop in tree.root.props}
    return DeviceTree(source, root, tuple(nodes))


def _checked_blob(data: bytes, source: str) -> bytes:
    """The blob cut to its header's total size, after checking every header offset lies inside it."""
    if len(data) > MAX_BLOB_BYTES:
        raise DeviceTreeError(f"device tree {source}: larger than {MAX_BLOB_BYTES} bytes; not a device tree blob")
    if len(data) < 4 * _HEADER_WORDS or int.from_bytes(data[:4], "big") != _FDT_MAGIC:
        raise DeviceTreeError(f"device tree {source}: not a flattened device tree (no d00dfeed header)")
    try:
        header = fdt.Header.parse(data)
    except Exception as exc:  # fdt raises bare Exception / ValueError for a bad version
        raise DeviceTreeError(f"device tree {source}: corrupt header: {exc}") from None
    if header.total_size > len(data):
        raise DeviceTreeError(
            f"device tree {source}: truncated: the header says {header.total_size} bytes, the file has {len(data)}"
        )
    blocks = [("memory reservation", header.off_mem_rsvmap, 16)]
    if header.version >= 17:
        blocks.append(("structure", header.off_dt_struct, header.size_dt_struct))
    else:
        blocks.append(("structure", header.off_dt_struct, 4))
    if header.version >= 3:
        blocks.append(("strings", header.off_dt_strings, header.size_dt_strings))
    for what, offset, size in blocks:
        if offset < 4 * _HEADER_WORDS or offset + size > header.total_size:
            raise DeviceTreeError(
                f"device tree {source}: corrupt header: {what} block at {offset} (+{size}) is outside "
                f"the blob's {header.total_size} bytes"
            )
    return data[: header.total_size]


def _raw_value(prop: fdt.Property) -> bytes:
    """A property's bytes as they were in the blob (fdt decodes them into strings, words or bytes)."""
    if isinstance(prop, fdt.PropStrings):
        return b"".join(text.encode("ascii") + b"\0" for text in prop.data)
    if isinstance(prop, fdt.PropWords):
        return b"".join(word.to_bytes(4, "big") for word in prop.data)
    if isinstance(prop, fdt.PropBytes):
        return bytes(prop.data)
    return b""


def read_tree_directory(path: Path | str) -> DeviceTree:
    """Read the directory form of a device tree (``/proc/device-tree``)."""
    root_dir = Path(path)
    if not root_dir.is_dir():
        raise DeviceTreeError(f"device tree {root_dir}: not a directory")
    nodes = []
    for parent in VIRTUAL_PARENTS:
        parent_dir = root_dir / parent
        if not parent_dir.is_dir():
            continue
        with os.scandir(parent_dir) as entries:
            children = sorted(entry.name for entry in entries if entry.is_dir(follow_symlinks=False))
        for child in children:
            nodes.append(DeviceTreeNode(f"/{parent}/{child}", _read_properties(parent_dir / child)))
    return DeviceTree(os.fspath(root_dir), _read_properties(root_dir), tuple(nodes))


def _read_properties(node_dir: Path) -> dict[str, bytes]:
    properties = {}
    with os.scandir(node_dir) as entries:
        files = sorted(entry.name for entry in entries if entry.is_file(follow_symlinks=False))
    for name in files:
        try:
            with open(node_dir / name, "rb") as value:
                data = value.read(MAX_PROPERTY_BYTES + 1)
        except OSError as exc:
            raise DeviceTreeError(f"device tree property {node_dir / name}: cannot read: {exc.strerror or exc}") from None
        if len(data) > MAX_PROPERTY_BYTES:
            raise DeviceTreeError(f"device tree property {node_dir / name}: larger than {MAX_PROPERTY_BYTES} bytes")
        properties[name] = data
    return properties


def device_class(node: DeviceTreeNode) -> str | None:
    """The pvcore device class a node is served as, or None for nodes pvcore does not serve."""
    compatible = node.strings("compatible")
    if "hvterm1" in compatible:
        return "console"
    if "IBM,l-lan" in compatible:
        return "net"
    if "IBM,v-scsi" in compatible:
        return "block"
    if node.name.partition("@")[0] == "ibm,random-v1" or "ibm,random-v1" in compatible:
        return "rng"
    return None


def device_slots(tree: DeviceTree) -> list[DeviceSlot]:
    """A slot for every node pvcore serves, in tree order.

    ``address`` is the unit address from ``reg`` as 8 hex digits
    (``71000002``), else the one in the node's name, else the name (QEMU's
    ``ibm,random-v1`` has neither). ``properties`` hold ``node`` (the path),
    ``compatible`` (space separated), ``device_type`` when present, and
    ``local-mac-address`` (``52:54:00:12:34:56``) for an l-lan.
    """
    slots = []
    for node in tree.nodes:
        kind = device_class(node)
        if kind is None:
            continue
        properties = {"node": node.path, "compatible": " ".join(node.strings("compatible"))}
        device_type = node.strings("device_type")
        if device_type:
            properties["device_type"] = device_type[0]
        if kind == "net":
            properties["local-mac-address"] = _mac(tree, node)
        slots.append(DeviceSlot(HYPERVISOR, kind, _unit_address(tree, node), tree.partition_name, properties))
    return slots


def _unit_address(tree: DeviceTree, node: DeviceTreeNode) -> str:
    reg = node.properties.get("reg")
    if reg is None:
        return node.name.partition("@")[2] or node.name
    if not reg or len(reg) % 4:
        raise DeviceTreeError(f"device tree {tree.source}: {node.path}: reg is {len(reg)} bytes, not whole 32-bit cells")
    return reg[:4].hex()


def _mac(tree: DeviceTree, node: DeviceTreeNode) -> str:
    raw = node.properties.get("local-mac-address")
    if raw is None:
        raise DeviceTreeError(f"device tree {tree.source}: {node.path}: an l-lan without local-mac-address")
    # Old PowerVM firmware gives 8 bytes with the MAC in the last 6 (as ibmveth accepts).
    if len(raw) == 8:
        raw = raw[2:]
    if len(raw) != 6:
        raise DeviceTreeError(
            f"device tree {tree.source}: {node.path}: local-mac-address is {len(raw)} bytes, expected 6"
        )
    return format_mac(raw)
