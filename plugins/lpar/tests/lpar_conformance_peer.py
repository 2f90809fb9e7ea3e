"""The lpar plugin's conformance peer: partition device trees written as /proc/device-tree directories.

Every lpar device is served through a core stream front door (chardev, FIFO,
netdev stream, NBD), which the kit reaches by itself; the peer only says
where each device's socket goes. Used by test_lpar_conformance.py.
"""

from __future__ import annotations

from pathlib import Path

from pvcore.contract import HostContext
from pvcore.testing.conformance import ConformancePeer

SOCKET_SUFFIX = {"console": "vty.sock", "rng": "rng.fifo", "net": "net.sock", "block": "disk.sock"}


def write_node(tree: Path, path: str, properties: dict[str, bytes]) -> None:
    """One device-tree node as a directory of property files."""
    node = tree / path
    node.mkdir(parents=True, exist_ok=True)
    for name, value in properties.items():
        (node / name).write_bytes(value)


class LparPeer(ConformancePeer):
    """What the kit needs from lpar: partition device trees and socket paths."""

    def present_host(self, root: Path) -> HostContext:
        """A partition: /proc/device-tree with ibm,partition-name."""
        write_node(root, "proc/device-tree", {"ibm,partition-name": b"p1\0"})
        return HostContext(root=root, environ={})

    def probe_host(self, root: Path) -> HostContext:
        """A partition with a vty and an l-lan, as QEMU pseries describes them."""
        host = self.present_host(root)
        tree = root / "proc/device-tree"
        write_node(tree, "vdevice/vty@30000000", {"compatible": b"hvterm1\0", "reg": bytes.fromhex("30000000"),
                                                  "device_type": b"serial\0"})
        write_node(tree, "vdevice/l-lan@71000002", {"compatible": b"IBM,l-lan\0", "reg": bytes.fromhex("71000002"),
                                                    "local-mac-address": bytes.fromhex("525400000021")})
        return host

    def hostile_probe_host(self, root: Path) -> HostContext:
        """An l-lan whose MAC is three bytes long."""
        host = self.present_host(root)
        write_node(root / "proc/device-tree", "vdevice/l-lan@71000003",
                   {"compatible": b"IBM,l-lan\0", "local-mac-address": b"\x52\x54\x00"})
        return host

    def device_options(self, device_class: str, name: str) -> dict[str, str]:
        """The path each stream front door serves at."""
        return {"socket": str(self.directory / f"{name}-{SOCKET_SUFFIX[device_class]}")}


conformance_peer = LparPeer()
"""The lpar plugin's peer."""
