"""One real x86 guest (QEMU 7.2, TCG, Debian's kernel) on a pvcore scsi target over vhost-user-scsi-pci.

`pvcore serve --hypervisor kvm` serves ``scsi:media=first.iso,disk=disk.img``:
LUN 0 a CD-ROM holding an ISO that genisoimage builds here, LUN 1 a raw disk.
The guest (virtio_scsi, sr_mod, sd_mod, sg, isofs) checks, in one boot:

* /dev/sr0 mounts as iso9660 and its files' md5 are the host's; while it is
  mounted (Linux locks the tray) a raw START STOP UNIT eject is refused;
* SG_IO with raw CDBs through /dev/sg0 (INQUIRY, READ CAPACITY) answers what pvcore emulates;
* CDROMEJECT from the guest reaches pvcore (its log says so) and a READ(10)
  after it is CHECK CONDITION NOT READY / MEDIUM NOT PRESENT; an unknown
  opcode is ILLEGAL REQUEST / INVALID COMMAND OPERATION CODE;
* a disc the host inserts through the media control socket mounts, with its own files;
* /dev/sda (the disk LUN) reads back the image's md5, an O_DIRECT write
  from the guest is in the host file after poweroff, and Linux's sd sees
  UNMAP support: blkdiscard zeroes a range of the host file.

busybox has neither eject nor sg_raw: ``guest/scsitool.c`` is compiled
static here (gcc is one of the project's Debian packages) and put in the
initramfs. The test never skips: CI installs QEMU, genisoimage and gcc.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pvcore.testing.guest import Guest, build_initramfs, fetch_kernel, plugin_qemu_args, result_line
from pvcore_scsi.media import send

pytestmark = pytest.mark.guest

HERE = Path(__file__).parent
FIRST_FILES = {"hello.txt": b"hello from the first disc\n", "random.bin": os.urandom(300_000)}
SECOND_FILES = {"second.txt": b"the host changed the disc\n" * 100}
DISK_SIZE = 4 << 20
PATTERN = b"PVCORE-SCSI-DIRECT-WRITE".ljust(4096, b".")
PATTERN_BLOCK = 100  # 4 KiB blocks: byte offset 400 KiB
DISCARD_OFFSET, DISCARD_LENGTH = 1 << 20, 64 << 10

SCRIPT = r"""
chmod 755 /pvcore/scsitool
for i in $(seq 1 120); do [ -b /dev/sr0 ] && [ -b /dev/sda ] && [ -c /dev/sg0 ] && break; sleep 0.5; done
{devices}
mkdir -p /mnt
mount -t iso9660 -o ro /dev/sr0 /mnt
{first_md5}
{locked_eject}
umount /mnt
{inquiry}
{capacity}
{unknown}
{eject}
{read_after_eject}
echo PVCORE-WAITING-FOR-MEDIA
ok=0; for i in $(seq 1 240); do mount -t iso9660 -o ro /dev/sr0 /mnt 2>/dev/null && ok=1 && break; sleep 0.5; done
{second_md5}
umount /mnt 2>/dev/null
{disk_md5}
printf 'PVCORE-SCSI-DIRECT-WRITE' > /tmp/p; dd if=/dev/zero bs=4072 count=1 2>/dev/null | tr '\0' '.' >> /tmp/p
{disk_write}
{discard}
"""


def _script(first: dict[str, bytes], second: dict[str, bytes]) -> str:
    tool = "/pvcore/scsitool"
    return SCRIPT.format(
        devices=result_line("devices", "ls /dev/sr0 /dev/sda /dev/sg0 /dev/sg1 2>&1"),
        first_md5=result_line("first_md5", " ; ".join(f"md5sum /mnt/{name} | cut -d' ' -f1" for name in first)),
        locked_eject=result_line("locked_eject", f"{tool} sgio /dev/sg0 1b0000000200 0"),
        inquiry=result_line("inquiry", f"{tool} sgio /dev/sg0 120000002400 36"),
        capacity=result_line("capacity", f"{tool} sgio /dev/sg0 25000000000000000000 8"),
        unknown=result_line("unknown", f"{tool} sgio /dev/sg0 ea0000000000 0"),
        eject=result_line("eject", f"{tool} eject /dev/sr0"),
        read_after_eject=result_line("read_after_eject", f"{tool} sgio /dev/sg0 28000000000000000100 2048"),
        second_md5=result_line("second_md5", "[ $ok = 1 ] && "
                               + " ; ".join(f"md5sum /mnt/{name} | cut -d' ' -f1" for name in second)),
        disk_md5=result_line("disk_md5", "md5sum /dev/sda | cut -d' ' -f1"),
        disk_write=result_line(
            "disk_write", f"dd if=/tmp/p of=/dev/sda bs=4096 seek={PATTERN_BLOCK} count=1 oflag=direct conv=fsync "
            "2>/dev/null && echo done"),
        discard=result_line("discard", f"cat /sys/block/sda/queue/discard_max_bytes; "
                            f"blkdiscard -o {DISCARD_OFFSET} -l {DISCARD_LENGTH} /dev/sda && echo done"),
    )


def _make_iso(directory: Path, files: dict[str, bytes], out: Path) -> None:
    directory.mkdir()
    for name, data in files.items():
        (directory / name).write_bytes(data)
    subprocess.run(["genisoimage", "-quiet", "-r", "-J", "-V", out.stem.upper(), "-o", str(out), str(directory)],
                   check=True, timeout=120)


def _scsitool(work: Path) -> bytes:
    binary = work / "scsitool"
    subprocess.run(["gcc", "-static", "-Os", "-o", str(binary), str(HERE / "guest" / "scsitool.c")],
                   check=True, timeout=120)
    return binary.read_bytes()


@pytest.fixture(scope="module")
def guest_run(tmp_path_factory: pytest.TempPathFactory):
    for tool in ("genisoimage", "gcc", "qemu-system-x86_64"):
        assert shutil.which(tool), f"{tool} is missing: run scripts/ensure-debian-packages"
    work = tmp_path_factory.mktemp("scsi-guest")
    first, second = work / "first.iso", work / "second.iso"
    _make_iso(work / "first", FIRST_FILES, first)
    _make_iso(work / "second", SECOND_FILES, second)
    disk = work / "disk.img"
    disk.write_bytes(os.urandom(DISK_SIZE))
    disk_md5 = hashlib.md5(disk.read_bytes()).hexdigest()
    run_dir = work / "run"
    device = f"scsi:media={first},disk={disk},socket={work / 'scsi.sock'},name=vm-cd"
    qemu_args = plugin_qemu_args("kvm", [device])["vm"]
    log = work / "pvcore.log"
    env = dict(os.environ, PVCORE_RUN_DIR=str(run_dir))
    kernel = fetch_kernel("x86_64")
    initramfs = build_initramfs(kernel, _script(FIRST_FILES, SECOND_FILES),
                                ["virtio_scsi", "sr_mod", "sd_mod", "sg", "isofs"], work / "initramfs",
                                files={"pvcore/scsitool": _scsitool(work)})
    with open(log, "wb") as log_file:
        served = subprocess.Popen([sys.executable, "-m", "pvcore.cli", "--log-level", "debug", "serve", "--hypervisor", "kvm", device],
                                  stdout=log_file, stderr=subprocess.STDOUT, env=env)
    guest = Guest(kernel, initramfs, qemu_args, name="scsi-guest")
    facts: dict[str, object] = {"disk_md5": disk_md5, "first_blocks": first.stat().st_size // 2048}
    started = time.monotonic()
    try:
        deadline = time.monotonic() + 60
        while "serving 1 device" not in log.read_text(errors="replace"):
            assert served.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")
            time.sleep(0.1)
        guest.start()
        guest.wait_for("PVCORE-WAITING-FOR-MEDIA", 300)
        facts["insert"] = send(str(run_dir / "vm-cd.media"), f"insert 0 {second}")
        facts["result"] = guest.wait(300)
    finally:
        guest.kill()
        served.terminate()
        try:
            served.wait(30)
        except subprocess.TimeoutExpired:
            served.kill()
    print(f"scsi guest: {time.monotonic() - started:.0f} s from pvcore start to poweroff")
    facts["log"] = log.read_text(errors="replace")
    facts["disk"] = disk.read_bytes()
    return facts


def _results(guest_run) -> dict[str, str]:
    result = guest_run["result"]
    assert result.done, result.output[-3000:]
    return result.results


def test_guest_sees_a_cdrom_a_disk_and_their_sg_nodes(guest_run) -> None:
    assert "No such file" not in _results(guest_run)["devices"], _results(guest_run)["devices"]


def test_guest_mounts_the_iso_and_reads_files_of_known_md5(guest_run) -> None:
    expected = " ".join(hashlib.md5(data).hexdigest() for data in FIRST_FILES.values())
    assert _results(guest_run)["first_md5"] == expected


def test_sg_io_inquiry_and_read_capacity_with_raw_cdbs(guest_run) -> None:
    results = _results(guest_run)
    status, sense, data = results["inquiry"].split()
    assert status == "status=0"
    inquiry = bytes.fromhex(data.removeprefix("data="))
    assert inquiry[0] == 0x05 and inquiry[8:16] == b"PVCORE  " and inquiry[16:29] == b"VIRTUAL CDROM"
    status, _, data = results["capacity"].split()
    last_block, block_size = int(data[5:13], 16), int(data[13:21], 16)
    assert status == "status=0" and (last_block + 1, block_size) == (guest_run["first_blocks"], 2048)


def test_unknown_opcode_is_invalid_command_operation_code(guest_run) -> None:
    assert _results(guest_run)["unknown"].startswith("status=2 sense=5/20/00")


def test_tray_the_mounting_kernel_locked_refuses_a_raw_eject(guest_run) -> None:
    assert _results(guest_run)["locked_eject"].startswith("status=2 sense=5/53/02")


def test_guest_eject_reaches_pvcore_and_the_next_read_is_not_ready(guest_run) -> None:
    results = _results(guest_run)
    assert results["eject"] == "eject=0"
    assert "guest ejected the disc (lun 0, tray open)" in guest_run["log"]
    assert results["read_after_eject"].startswith("status=2 sense=2/3a/02"), results["read_after_eject"]


def test_host_inserted_disc_is_mounted_by_the_guest(guest_run) -> None:
    assert guest_run["insert"].startswith("ok lun 0: cdrom tray closed"), guest_run["insert"]
    assert "host inserted" in guest_run["log"]
    assert "event 0x3 (lun field 0100400000000000, reason 0x28) sent" in guest_run["log"]  # into a guest's buffer
    expected = " ".join(hashlib.md5(data).hexdigest() for data in SECOND_FILES.values())
    assert _results(guest_run)["second_md5"] == expected


def test_disk_lun_reads_the_image_and_takes_a_direct_write(guest_run) -> None:
    results = _results(guest_run)
    assert results["disk_md5"] == guest_run["disk_md5"]
    assert results["disk_write"] == "done"
    block = guest_run["disk"][PATTERN_BLOCK * 4096 : (PATTERN_BLOCK + 1) * 4096]
    assert block == PATTERN


def test_disk_lun_discard_reaches_the_host_file(guest_run) -> None:
    max_bytes, done = _results(guest_run)["discard"].split()
    assert int(max_bytes) > 0 and done == "done"
    assert guest_run["disk"][DISCARD_OFFSET : DISCARD_OFFSET + DISCARD_LENGTH] == bytes(DISCARD_LENGTH)
