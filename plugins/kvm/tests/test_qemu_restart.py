"""A real QEMU guest keeps its disk across ``kill -9`` of ``pvcore serve``, with requests in flight out of order.

The disk is a vhost-user-blk device exactly as the kvm plugin attaches it
(``pvcore_qemu_args``: a chardev with ``reconnect=1``). QEMU asks pvcore for an
inflight region (INFLIGHT_SHMFD) and keeps it. Four writers in the guest write
numbered 4 KiB records with O_DIRECT, each to its own area, and print an
acknowledgement after each. The daemon runs under
:mod:`pvcore.testing.stalled_writes`, which holds writer 0's write of record
:data:`HELD` in an I/O thread: writers 1-3 go on, so pvcore has completed
later requests and not that earlier one. In that window the test kills the
daemon with SIGKILL and starts it again with the same command line (the hold
released). QEMU reconnects and hands the region back; the new daemon resubmits
what its predecessor had in flight, once, and every writer finishes. Then: no
I/O error in the guest, every acknowledged record is in the image, the held
record too, and every record reads back in the guest.
"""

from __future__ import annotations

import re
import signal
import sys
import time
from pathlib import Path

import pytest

from pvcore.testing.guest import Guest, build_initramfs, fetch_kernel, plugin_qemu_args, result_line
from pvcore.testing.serve_process import ServeProcess

pytestmark = pytest.mark.guest

RECORD = 4096
WRITERS = 4
RECORDS = 50
AREA = 1000
"""Blocks between two writers' first records."""
HELD = 10
"""Writer 0's record whose write the first daemon holds."""
LATER = 8
"""Records each other writer must have acknowledged after the hold began before the kill."""
DISK_SIZE = (WRITERS * AREA + 1) * RECORD


def _block(writer: int, number: int) -> int:
    return 1 + writer * AREA + number


SCRIPT = f"""
dmesg > /tmp/dmesg.before
writer() {{
  n=1
  while [ $n -le {RECORDS} ]; do
    printf 'W%d REC %08d\\n' $1 $n \\
      | dd of=/dev/vda bs={RECORD} seek=$((1 + $1 * {AREA} + n)) count=1 conv=sync,notrunc oflag=direct 2>/tmp/err$1 \\
      || {{ echo "WRITE-FAILED $1 $n: $(cat /tmp/err$1)"; return; }}
    echo "ACK $1 $n"
    n=$((n + 1))
  done
}}
for w in {' '.join(str(w) for w in range(WRITERS))}; do writer $w & done
wait
good=0
for w in {' '.join(str(w) for w in range(WRITERS))}; do
  n=1
  while [ $n -le {RECORDS} ]; do
    got=$(dd if=/dev/vda bs={RECORD} skip=$((1 + w * {AREA} + n)) count=1 iflag=direct 2>/dev/null | head -c 15)
    [ "$got" = "$(printf 'W%d REC %08d' $w $n)" ] && good=$((good + 1))
    n=$((n + 1))
  done
done
{result_line("readback", "echo $good")}
{result_line("dmesg_problems",
             "dmesg | grep -v -x -F -f /tmp/dmesg.before | grep -i -e error -e abort -e reset -e timeout -e virtio")}
"""


def acks(output: str) -> set[tuple[int, int]]:
    return {(int(w), int(n)) for w, n in re.findall(r"^ACK (\d) (\d+)\s*$", output, re.M)}


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_kill_9_with_out_of_order_completions_loses_no_write(tmp_path: Path) -> None:
    started = time.monotonic()
    image = tmp_path / "disk.img"
    with open(image, "wb") as disk:
        disk.truncate(DISK_SIZE)
    hold = tmp_path / "hold"
    hold.touch()
    device = f"block:path={image},socket={tmp_path / 'vda.sock'},name=vda"
    held_at = _block(0, HELD) * RECORD
    daemon = ServeProcess([sys.executable, "-m", "pvcore.testing.stalled_writes", "--hold-while", str(hold),
                     "--range", f"{held_at}:{held_at + RECORD}", "--", "serve", "--hypervisor", "kvm", device],
                    tmp_path / "pvcore.log")
    (qemu_args,) = plugin_qemu_args("kvm", [device]).values()
    kernel = fetch_kernel("x86_64")
    initrd = build_initramfs(kernel, SCRIPT, ["virtio_pci", "virtio_blk"], tmp_path, name="restart.cpio.gz")
    daemon.start()
    guest = Guest(kernel, initrd, qemu_args, name="kill-9", max_runtime=400)
    try:
        guest.start()
        wait_for(lambda: "stalled-writes: holding write" in daemon.text(), 240, "writer 0's held write")
        at_hold = acks(guest.output)
        wait_for(lambda: all(len({n for w, n in acks(guest.output) - at_hold if w == writer}) >= LATER
                             for writer in range(1, WRITERS)), 120, "the other writers to go on past the held write")
        assert (0, HELD) not in acks(guest.output), "the held write was acknowledged"
        out_of_order = len(acks(guest.output) - at_hold)
        assert daemon.stop(signal.SIGKILL) == -signal.SIGKILL
        hold.unlink()
        killed = time.monotonic()
        daemon.start()
        result = guest.wait(300)
        down_to_done = time.monotonic() - killed
    finally:
        guest.kill()
        daemon.terminate()
    output = result.output
    print(f"kill -9: {out_of_order} later writes completed after the held one before the kill; the guest finished "
          f"{down_to_done:.1f}s after it; whole test {time.monotonic() - started:.0f}s")
    assert result.returncode == 0, output[-3000:]
    assert "WRITE-FAILED" not in output and not re.search(r"I/O error|blk_update_request", output), output[-3000:]
    assert result.results["dmesg_problems"] == "", result.results["dmesg_problems"]
    assert acks(output) == {(w, n) for w in range(WRITERS) for n in range(1, RECORDS + 1)}
    with open(image, "rb") as disk:
        for writer, number in sorted(acks(output)):
            disk.seek(_block(writer, number) * RECORD)
            assert disk.read(16) == b"W%d REC %08d\n" % (writer, number), f"record {number} of writer {writer} lost"
    assert result.results["readback"] == str(WRITERS * RECORDS)
    log = daemon.text()
    resumed = re.findall(r"queue 0 resumes (\d+) requests a previous back end had in flight", log)
    assert len(resumed) == 1 and int(resumed[0]) >= 1, log[-3000:]
    assert log.count("serving 1 device(s)") == 2 and "needs reset" not in log
