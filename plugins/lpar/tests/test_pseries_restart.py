"""A real pseries partition keeps working while ``pvcore serve`` is killed (SIGKILL) and started again.

The partition's v-scsi disk (NBD), vty (chardev) and rng (FIFO) are served by
a ``pvcore serve --hypervisor lpar`` subprocess; QEMU gets exactly the
arguments the lpar plugin's ``pvcore_qemu_args`` gives (so the NBD drive has
``file.reconnect-delay=``), plus ``-serial stdio`` for the harness's own
console (hvc0; pvcore's vty is hvc1).

The guest writes numbered 4 KiB records to /dev/sda with O_DIRECT, one after
another, and after each acknowledged write prints ``CON n`` on pvcore's vty
and ``ACK n`` on the harness console. Midway the test kills pvcore with
SIGKILL, waits, and starts it again with the same command line: the writes
in between wait in QEMU (reconnect-delay) and go on. A line the host sends
through pvcore's console then stops the loop; the guest reads more entropy
than the FIFO holds (so the restarted daemon must feed the FIFO QEMU still
has open) and powers off. Then every record the guest reported is in the
image, the guest saw no I/O error, and the console log holds every line the
guest printed while pvcore was up: only lines printed around the restart,
while no pvcore read the vty, may be missing (one contiguous run).
"""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest

from pvcore.devices.console import console_exchange, console_socket_path
from pvcore.registry import Registry
from pvcore.testing.guest import Guest, GuestTimeout, build_initramfs, fetch_kernel, plugin_qemu_args, result_line
from pvcore.testing.serve_process import ServeProcess

pytestmark = pytest.mark.guest

RECORD = 4096
DISK_SIZE = 64 << 20
MAX_RECORDS = DISK_SIZE // RECORD - 1
RECORDS_BEFORE_KILL = 40
RECORDS_AFTER_RESTART = 100
DOWN_SECONDS = 1.5
STOPPED_MARKER = "PVCORE-RESTART-LOOP-ENDED"

MODULES = [
    "scsi_common", "crc64", "crc64-rocksoft", "crc64_rocksoft_generic", "crct10dif_common",
    "crct10dif_generic", "crc-t10dif", "t10-pi", "sd_mod", "scsi_transport_srp", "ibmvscsi", "pseries-rng",
]

GUEST_SCRIPT = "\n".join([
    "stty -F /dev/hvc1 -echo",
    # Any line the host sends through pvcore's console ends the loop.
    "( read -t 900 line < /dev/hvc1; touch /tmp/stop ) &",
    "dmesg > /tmp/dmesg.before",
    "i=0",
    f"while [ ! -e /tmp/stop ] && [ $i -lt {MAX_RECORDS} ]; do",
    "  i=$((i + 1))",
    "  printf 'PVCORE-REC %08d\\n' $i > /tmp/rec",
    "  if ! dd if=/tmp/rec of=/dev/sda bs=4096 count=1 seek=$i conv=sync oflag=direct 2>/tmp/dd.err; then",
    '    echo "PVCORE-WRITE-FAILED $i: $(cat /tmp/dd.err)"; exit 1',
    "  fi",
    '  echo "CON $i" > /dev/hvc1',
    '  echo "ACK $i"',
    "done",
    f"echo {STOPPED_MARKER}",
    'echo "CON-LAST $i" > /dev/hvc1',
    result_line("records", "echo $i"),
    # 16 KiB: four times what the FIFO holds, so most of it was written by the restarted daemon.
    result_line("rng_after", "dd if=/dev/hwrng bs=512 count=32 iflag=fullblock 2>/dev/null | wc -c"),
    # Kernel messages since the loop began that speak of trouble (SCSI errors, aborts, resets, timeouts).
    result_line(
        "dmesg_problems",
        "dmesg | grep -v -x -F -f /tmp/dmesg.before | grep -i -e error -e abort -e reset -e timeout -e offline",
    ),
])


def _acks(guest: Guest) -> list[int]:
    return [int(n) for n in re.findall(r"\bACK (\d+)", guest.output)]


def _wait_for_ack(guest: Guest, count: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while True:
        acks = _acks(guest)
        if acks and max(acks) >= count:
            return max(acks)
        if not guest.running or time.monotonic() > deadline:
            raise AssertionError(f"the guest never acknowledged record {count}; console tail:\n{guest.output[-3000:]}")
        time.sleep(0.1)


def _console_numbers(log: Path) -> list[int]:
    text = log.read_text(errors="replace") if log.exists() else ""
    return [int(n) for n in re.findall(r"^CON (\d+)\r?$", text, re.MULTILINE)]


def test_pseries_disk_and_console_survive_a_pvcore_restart(registry: Registry, tmp_path: Path) -> None:
    started = time.monotonic()
    kernel = fetch_kernel("ppc64")
    initramfs = build_initramfs(kernel, GUEST_SCRIPT, MODULES, tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    image = tmp_path / "disk.img"
    with open(image, "wb") as disk:
        disk.truncate(DISK_SIZE)
    console_log = tmp_path / "p1-console.log"
    devices = [
        f"console:socket={run}/p1-vty.sock,log={console_log},name=p1-vty",
        f"rng:socket={run}/p1-rng.fifo,name=p1-rng",
        f"block:path={image},socket={run}/p1-disk.sock,name=p1-disk",
    ]
    (qemu_args,) = plugin_qemu_args("lpar", devices, registry).values()
    assert any("reconnect-delay=" in argument for argument in qemu_args), qemu_args
    served = ServeProcess([sys.executable, "-m", "pvcore.cli", "serve", "--hypervisor", "lpar", *devices],
                          tmp_path / "pvcore.log", env=dict(os.environ, PVCORE_RUN_DIR=str(run)))
    served.start()
    guest = Guest(kernel, initramfs, [*qemu_args, "-serial", "stdio"], name="pseries-restart", max_runtime=600)
    timings: dict[str, float] = {}
    try:
        guest.start()
        _wait_for_ack(guest, RECORDS_BEFORE_KILL, 300)
        # Every console line up to here was printed at least a second before the kill: pvcore has read it.
        logged_before = max(_acks(guest))
        time.sleep(1.0)
        acked_at_kill = max(_acks(guest))
        killed = time.monotonic()
        assert served.stop(signal.SIGKILL) == -signal.SIGKILL
        time.sleep(DOWN_SECONDS)
        served.start()
        timings["down"] = time.monotonic() - killed
        _wait_for_ack(guest, acked_at_kill + 1, 120)
        timings["first_ack_after_kill"] = time.monotonic() - killed
        _wait_for_ack(guest, acked_at_kill + RECORDS_AFTER_RESTART, 300)
        # QEMU's vty is back once new lines reach the log; then a line through pvcore's console stops the loop.
        deadline = time.monotonic() + 60
        while not [n for n in _console_numbers(console_log) if n > acked_at_kill]:
            assert time.monotonic() < deadline, "the vty never reconnected to the restarted pvcore"
            time.sleep(0.2)
        for _ in range(10):
            console_exchange(console_socket_path(run, "p1-vty"), b"stop\n", duration=0.5)
            try:
                guest.wait_for(STOPPED_MARKER, 20)
                break
            except GuestTimeout:  # the line did not reach the guest; send it again
                continue
        result = guest.wait(300)
        deadline = time.monotonic() + 30
        while "CON-LAST" not in (console_log.read_text(errors="replace") if console_log.exists() else ""):
            assert time.monotonic() < deadline, "the guest's last console line never reached the log"
            time.sleep(0.2)
        assert served.stop(signal.SIGTERM) == 0
    finally:
        guest.kill()
        served.kill()
    elapsed = time.monotonic() - started
    result.check()
    results = result.results
    output = result.output
    acks = _acks(guest)
    records = int(results["records"])
    print(f"pseries restart: {records} records ({acked_at_kill} before the kill), pvcore down "
          f"{timings['down']:.1f}s, first write after the kill acknowledged {timings['first_ack_after_kill']:.1f}s "
          f"after it; boot to poweroff {result.elapsed:.1f}s, whole test {elapsed:.1f}s")

    # The disk: the loop went on across the restart, every acknowledged record is in the image.
    assert "PVCORE-WRITE-FAILED" not in output
    assert not re.search(r"I/O error|Buffer I/O|blk_update_request|critical (medium|target) error", output), output[-3000:]
    assert results["dmesg_problems"] == "", results["dmesg_problems"]
    assert acks == list(range(1, records + 1))
    assert records >= acked_at_kill + RECORDS_AFTER_RESTART
    with open(image, "rb") as disk:
        for number in acks:
            disk.seek(number * RECORD)
            assert disk.read(20) == b"PVCORE-REC %08d\n" % number, f"record {number} is not in the image"

    # rng: more than the FIFO holds came through after the restart (the new daemon feeds QEMU's open FIFO).
    assert results["rng_after"] == "16384"

    # The console: every line printed while pvcore was up is in the log; lines printed around the
    # restart (no pvcore reading the vty) may be missing, in one run, and nothing else is.
    logged = _console_numbers(console_log)
    assert logged == sorted(set(logged)), "console lines duplicated or out of order"
    missing = sorted(set(range(1, records + 1)) - set(logged))
    assert all(n > logged_before for n in missing), (logged_before, missing[:20])
    if missing:
        assert missing == list(range(missing[0], missing[-1] + 1)), missing
    print(f"console lines lost around the restart: {len(missing)} ({missing[:1]}..{missing[-1:]})")

    # pvcore's side: the same sockets again, the FIFO reused, two starts.
    pvcore_log = served.log.read_text(errors="replace")
    assert pvcore_log.count(f"serving {len(devices)} device(s)") == 2
    assert "replacing stale socket" in pvcore_log
    assert "reusing FIFO" in pvcore_log
