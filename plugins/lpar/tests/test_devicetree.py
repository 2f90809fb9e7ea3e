"""The lpar probe against device trees QEMU's pseries machine generates, and against broken ones."""

from __future__ import annotations

import random
from pathlib import Path

import fdt
import pytest
from lpar_testing import dump_pseries_dtb

from pvcore.contract import HostContext
from pvcore_lpar import plugin
from pvcore_lpar.devicetree import DeviceTreeError, device_slots, parse_dtb, read_dtb, read_tree_directory

FULL_MIX = (
    "-nodefaults",
    "-chardev", "null,id=c0", "-device", "spapr-vty,chardev=c0",
    "-netdev", "user,id=n0", "-device", "spapr-vlan,netdev=n0,mac=52:54:00:12:34:56",
    "-device", "spapr-vscsi,id=vs0",
    "-object", "rng-random,id=rng0,filename=/dev/urandom", "-device", "spapr-rng,rng=rng0",
)


def summary(slots: list) -> list[tuple[str, str]]:
    return [(slot.device_class, slot.address) for slot in slots]


@pytest.fixture(scope="module")
def full_dtb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One of each device (QEMU numbers them from 71000000; its nvram comes first)."""
    return dump_pseries_dtb(tmp_path_factory.mktemp("dtb") / "full.dtb", *FULL_MIX)


def test_every_vdevice_of_a_full_partition(full_dtb: Path) -> None:
    slots = device_slots(read_dtb(full_dtb))
    assert summary(slots) == [
        ("rng", "ibm,random-v1"),
        ("console", "71000001"),
        ("net", "71000002"),
        ("block", "71000003"),
    ]
    by_class = {slot.device_class: slot for slot in slots}
    assert by_class["net"].properties["local-mac-address"] == "52:54:00:12:34:56"
    assert by_class["net"].properties["compatible"] == "IBM,l-lan"
    assert by_class["console"].properties == {
        "node": "/vdevice/vty@71000001", "compatible": "hvterm1", "device_type": "serial"
    }
    assert by_class["block"].properties["device_type"] == "vscsi"
    assert by_class["rng"].properties["node"] == "/ibm,platform-facilities/ibm,random-v1"
    assert all(slot.hypervisor == "lpar" and slot.domain == "" for slot in slots)


def test_several_devices_at_chosen_addresses_and_a_partition_name(tmp_path: Path) -> None:
    dtb = dump_pseries_dtb(
        tmp_path / "many.dtb",
        "-nodefaults", "-name", "lpar7",
        "-chardev", "null,id=c0", "-device", "spapr-vty,chardev=c0,reg=0x71000010",
        "-chardev", "null,id=c1", "-device", "spapr-vty,chardev=c1,reg=0x71000011",
        "-netdev", "user,id=n0", "-device", "spapr-vlan,netdev=n0,mac=02:00:00:00:00:0a,reg=0x71000020",
        "-netdev", "user,id=n1", "-device", "spapr-vlan,netdev=n1,mac=02:00:00:00:00:0b,reg=0x71000021",
        "-device", "spapr-vscsi,id=vs0,reg=0x71000030",
        "-device", "spapr-vscsi,id=vs1,reg=0x71000031",
    )
    slots = device_slots(read_dtb(dtb))
    assert sorted(summary(slots)) == [
        ("block", "71000030"), ("block", "71000031"),
        ("console", "71000010"), ("console", "71000011"),
        ("net", "71000020"), ("net", "71000021"),
    ]
    macs = {slot.address: slot.properties["local-mac-address"] for slot in slots if slot.device_class == "net"}
    assert macs == {"71000020": "02:00:00:00:00:0a", "71000021": "02:00:00:00:00:0b"}
    assert {slot.domain for slot in slots} == {"lpar7"}


def test_qemu_defaults_and_an_empty_partition(tmp_path: Path) -> None:
    defaults = device_slots(read_dtb(dump_pseries_dtb(tmp_path / "defaults.dtb")))
    # Without -nodefaults QEMU adds a vty for -nographic's serial, a NIC, and a v-scsi for its cdrom.
    assert summary(defaults) == [("console", "71000000"), ("net", "71000002"), ("block", "71000003")]
    empty = read_dtb(dump_pseries_dtb(tmp_path / "empty.dtb", "-nodefaults"))
    assert [node.name for node in empty.nodes] == ["nvram@71000000"]
    assert device_slots(empty) == []


def test_probe_reads_the_blob_named_in_the_environment(full_dtb: Path) -> None:
    host = HostContext(root=Path("/nonexistent"), environ={"PVCORE_LPAR_DTB": str(full_dtb)})
    slots = plugin.pvcore_probe(host=host)
    assert summary(slots) == summary(device_slots(read_dtb(full_dtb)))


@pytest.mark.parametrize("length", [0, 12, 39, 40, 200, 1000, -1])
def test_a_truncated_blob_is_a_clear_error(full_dtb: Path, tmp_path: Path, length: int) -> None:
    data = full_dtb.read_bytes()
    cut = tmp_path / "cut.dtb"
    cut.write_bytes(data[:length])
    with pytest.raises(DeviceTreeError, match=str(cut)) as caught:
        read_dtb(cut)
    assert isinstance(caught.value, ValueError)
    if length >= 40:
        assert f"the header says {len(data)} bytes, the file has {len(data[:length])}" in str(caught.value)


def test_a_corrupt_header_or_structure_is_a_clear_error(full_dtb: Path) -> None:
    data = bytearray(full_dtb.read_bytes())
    with pytest.raises(DeviceTreeError, match=r"x\.dtb: not a flattened device tree"):
        parse_dtb(b"\0" * 64, source="x.dtb")
    header = fdt.Header.parse(bytes(data))
    bad_offset = bytearray(data)
    bad_offset[8:12] = (header.total_size + 4).to_bytes(4, "big")  # off_dt_struct past the end
    with pytest.raises(DeviceTreeError, match=r"x\.dtb: corrupt header: structure block"):
        parse_dtb(bytes(bad_offset), source="x.dtb")
    bad_tag = bytearray(data)
    bad_tag[header.off_dt_struct : header.off_dt_struct + 4] = (0x0000_0042).to_bytes(4, "big")
    with pytest.raises(DeviceTreeError, match=r"x\.dtb: corrupt structure block"):
        parse_dtb(bytes(bad_tag), source="x.dtb")
    with pytest.raises(DeviceTreeError, match="no-such.dtb: cannot read"):
        read_dtb("/nonexistent/no-such.dtb")


def test_random_corruption_never_escapes_as_another_exception(full_dtb: Path) -> None:
    data = full_dtb.read_bytes()
    rng = random.Random(4)
    outcomes = {"parsed": 0, "refused": 0}
    for _ in range(300):
        blob = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            blob[rng.randrange(len(blob))] = rng.randrange(256)
        try:
            device_slots(parse_dtb(bytes(blob), source="fuzz.dtb"))
        except DeviceTreeError as exc:
            assert "fuzz.dtb" in str(exc)
            outcomes["refused"] += 1
        else:
            outcomes["parsed"] += 1
    assert outcomes["refused"] > 0 and outcomes["parsed"] > 0, outcomes


def write_tree_directory(blob: Path, directory: Path) -> None:
    """Lay a blob out as the kernel's /proc/device-tree does: a directory per node, a file per property."""
    tree = fdt.parse_dtb(blob.read_bytes())
    for path, nodes, props in tree.walk():
        node_dir = directory / path.strip("/")
        node_dir.mkdir(parents=True, exist_ok=True)
        for prop in props:
            (node_dir / prop.name).write_bytes(_prop_bytes(prop))


def _prop_bytes(prop: fdt.Property) -> bytes:
    if isinstance(prop, fdt.PropStrings):
        return b"".join(text.encode() + b"\0" for text in prop.data)
    if isinstance(prop, fdt.PropWords):
        return b"".join(word.to_bytes(4, "big") for word in prop.data)
    if isinstance(prop, fdt.PropBytes):
        return bytes(prop.data)
    return b""


def test_directory_form_of_a_qemu_tree_matches_the_blob(full_dtb: Path, tmp_path: Path) -> None:
    write_tree_directory(full_dtb, tmp_path / "proc" / "device-tree")
    from_blob = device_slots(read_dtb(full_dtb))
    from_directory = plugin.pvcore_probe(host=HostContext(root=tmp_path, environ={}))
    assert sorted(from_directory, key=lambda s: s.address) == sorted(from_blob, key=lambda s: s.address)


def make_node(directory: Path, properties: dict[str, bytes]) -> None:
    directory.mkdir(parents=True)
    for name, value in properties.items():
        (directory / name).write_bytes(value)


def test_directory_form_of_a_powervm_style_partition(tmp_path: Path) -> None:
    tree = tmp_path / "proc" / "device-tree"
    make_node(tree, {"ibm,partition-name": b"prod-db1\0", "compatible": b"IBM,9009-42A\0"})
    vdevice = tree / "vdevice"
    make_node(vdevice / "vty@30000000", {"compatible": b"hvterm1\0", "device_type": b"serial\0", "reg": bytes.fromhex("30000000")})
    # Old PowerVM firmware: an 8-byte local-mac-address whose last 6 bytes are the MAC.
    make_node(vdevice / "l-lan@30000002", {
        "compatible": b"IBM,l-lan\0", "device_type": b"network\0", "reg": bytes.fromhex("30000002"),
        "local-mac-address": bytes.fromhex("0000fa163e000001"),
    })
    make_node(vdevice / "v-scsi@30000003", {"compatible": b"IBM,v-scsi\0", "reg": bytes.fromhex("30000003")})
    make_node(vdevice / "vty-server@30000004", {"compatible": b"hvterm2\0", "reg": bytes.fromhex("30000004")})
    make_node(vdevice / "nvram@4000", {"compatible": b"IBM,nvram\0", "reg": bytes.fromhex("00004000")})
    make_node(tree / "ibm,platform-facilities" / "ibm,random-v1", {"compatible": b"ibm,random\0"})
    host = HostContext(root=tmp_path, environ={})

    detection = plugin.pvcore_detect(host=host)
    assert detection is not None and detection.hypervisor == "lpar" and detection.confidence == 90
    slots = plugin.pvcore_probe(host=host)
    assert sorted(summary(slots)) == [
        ("block", "30000003"), ("console", "30000000"), ("net", "30000002"), ("rng", "ibm,random-v1")
    ]
    assert {slot.domain for slot in slots} == {"prod-db1"}
    net = next(slot for slot in slots if slot.device_class == "net")
    assert net.properties["local-mac-address"] == "fa:16:3e:00:00:01"


@pytest.mark.parametrize(
    ("properties", "message"),
    [
        ({"compatible": b"IBM,l-lan\0", "reg": b"\x30\x00\x00\x02", "local-mac-address": b"\x02\x00\x00"},
         "local-mac-address is 3 bytes, expected 6"),
        ({"compatible": b"IBM,l-lan\0", "reg": b"\x30\x00\x00\x02"}, "an l-lan without local-mac-address"),
        ({"compatible": b"hvterm1\0", "reg": b"\x30\x00"}, "reg is 2 bytes"),
    ],
)
def test_a_broken_node_names_the_node(tmp_path: Path, properties: dict[str, bytes], message: str) -> None:
    make_node(tmp_path / "vdevice" / "node@30000002", properties)
    with pytest.raises(DeviceTreeError, match=rf"/vdevice/node@30000002: {message}"):
        device_slots(read_tree_directory(tmp_path))


def test_an_oversized_property_is_refused(tmp_path: Path) -> None:
    make_node(tmp_path / "vdevice" / "vty@1", {"compatible": b"x" * (65 << 10)})
    with pytest.raises(DeviceTreeError, match=r"vty@1/compatible: larger than"):
        read_tree_directory(tmp_path)
