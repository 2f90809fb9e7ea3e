"""End to end: a real Linux guest under QEMU (TCG) reads and writes a disk served by pvcore over vhost-user-blk.

The transport is the core's (its own tests are tests/test_vhost_user.py); this
test stays with the kvm plugin because the guest is attached with the kvm
plugin's ``pvcore_qemu_args``, so it checks that what ``--print-qemu-args``
prints (QEMU 7.2 workarounds included) really reaches the core back end.
"""

from __future__ import annotations

import hashlib
import os

import pytest

from pvcore.devices.block import create_block_device
from pvcore.testing.guest import plugin_qemu_args, result_line, run_guest
from pvcore.transports.vhost_user import VhostUserFrontDoor

DISK_SIZE = 4 << 20
MARK = b"written by the guest through pvcore"
MARK_SECTOR = 2048


@pytest.mark.guest
def test_guest_reads_and_writes_vhost_user_blk_disk(loop_thread, registry, tmp_path, caplog):
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(DISK_SIZE))
    expected = hashlib.md5(image.read_bytes()).hexdigest()
    path = tmp_path / "vda.sock"
    backend, device = create_block_device({"path": str(image)}, name="vda")
    door = VhostUserFrontDoor(device, path, primitives=registry.primitives("kvm"), name="vda")
    loop_thread.run(door.start())
    (qemu_args,) = plugin_qemu_args("kvm", [f"block:path={image},socket={path},name=vda"]).values()
    try:
        result = run_guest(
            "x86_64",
            script="\n".join(
                [
                    result_line("md5", "md5sum /dev/vda | cut -d' ' -f1"),
                    result_line("size", "cat /sys/block/vda/size"),
                    result_line("ro", "cat /sys/block/vda/ro"),
                    f"printf '{MARK.decode()}' | dd of=/dev/vda bs=512 seek={MARK_SECTOR} conv=notrunc,fsync",
                    result_line("written", "echo $?"),
                ]
            ),
            modules=["virtio_pci", "virtio_blk"],
            qemu_args=qemu_args,
            timeout=240,
            work_dir=tmp_path,
            name="kvm-vhost-user-blk",
        )
    finally:
        loop_thread.run(door.stop(), timeout=30)
        backend.close()
    assert result.results.get("md5") == expected, result.output[-3000:]
    assert result.results["size"] == str(DISK_SIZE // 512)
    assert result.results["ro"] == "0"
    assert result.results["written"] == "0"
    assert image.read_bytes()[MARK_SECTOR * 512 :][: len(MARK)] == MARK
    assert result.returncode == 0
    assert door.connections == 1
    assert "protocol error" not in caplog.text
