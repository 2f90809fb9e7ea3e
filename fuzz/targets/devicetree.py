"""lpar's flattened device tree reader: a hostile blob through parse_dtb and device_slots.

Only a :class:`~pvcore_lpar.devicetree.DeviceTreeError` (a ``ValueError``
naming the blob) may escape; every slot found must name a known device class.
The seed is the tree QEMU's pseries machine generates (``-M
pseries,dumpdtb=``) with a console, NIC, vSCSI host and rng.
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

from fuzz.harness import InvariantError
from pvcore_lpar.devicetree import DeviceTreeError, device_slots, parse_dtb

CLASSES = {"console", "net", "block", "rng", "scsi"}
QEMU_DEVICES = (
    "-nodefaults",
    "-chardev", "null,id=c0", "-device", "spapr-vty,chardev=c0",
    "-netdev", "user,id=n0", "-device", "spapr-vlan,netdev=n0,mac=52:54:00:12:34:56",
    "-device", "spapr-vscsi,id=vs0",
    "-object", "rng-random,id=rng0,filename=/dev/urandom", "-device", "spapr-rng,rng=rng0",
)


def setup() -> None:
    """Nothing to build."""


def one_input(data: bytes) -> None:
    """Parse one blob and list its device slots."""
    try:
        slots = device_slots(parse_dtb(data, source="fuzz"))
    except DeviceTreeError:
        return
    for slot in slots:
        if slot.device_class not in CLASSES:
            raise InvariantError(f"slot {slot} has unknown class {slot.device_class!r}")


def seeds() -> dict[str, bytes]:
    """The device tree QEMU 7.2's pseries machine writes for a partition with every virtual device."""
    path = Path(tempfile.mkdtemp(prefix="pvcore-fuzz-dtb-")) / "pseries.dtb"
    subprocess.run(["qemu-system-ppc64", "-M", f"pseries,dumpdtb={path}", "-accel", "tcg", "-nographic",
                    "-m", "512", *QEMU_DEVICES], capture_output=True, timeout=90)
    return {"qemu-pseries": path.read_bytes()}
