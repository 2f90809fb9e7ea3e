"""pvcore on a REAL Xen 4.17 (QEMU TCG): one boot, every check of ``CHECKS``.

The harness is :mod:`pvcore_xen.testing.real_xen` (its docstring says how a
boot runs). To add a check to the same boot, append a
:class:`~pvcore_xen.testing.real_xen.Check` to ``CHECKS`` and write tests that
read its outputs from the ``xen_run`` fixture (``xen_run.dom0["NAME.PHASE"]``,
``xen_run.domu["NAME"]``).
"""

from __future__ import annotations

import re

import pytest

from pvcore_xen.testing.real_xen import Check, XenRun, boot, unavailable_reason
from real_xen_netif import (  # noqa: F401 (netif's tests run on this module's boot)
    NETIF,
    TAP,
    test_a_forged_mac_gets_nothing_through,
    test_a_netfront_guest_pings_dom0_through_the_tap_uplink,
    test_a_netfront_guest_pings_through_pvcores_switch,
)

pytestmark = pytest.mark.guest

HOST_LAYER = Check(
    name="dom0",
    dom0_before=r"""
cat /proc/xen/capabilities
ls /dev/xen
""",
)

BLOCK = Check(
    name="blkif",
    serve=("block:name=disk0,path=$SCRATCH/disk.img,domain=$DOMID/51712,attach=on",),
    dom0_before=r"""
dd if=/dev/urandom of=$SCRATCH/disk.img bs=1M count=16 2>/dev/null
echo "image $(md5sum < $SCRATCH/disk.img)"
""",
    domu=r"""
i=0; while [ ! -b /dev/xvda ] && [ $i -lt 300 ]; do sleep 0.2; i=$((i+1)); done
echo "sectors $(cat /sys/block/xvda/size)"
echo "xvda $(md5sum < /dev/xvda)"
dd if=/dev/urandom of=/tmp/pattern bs=4096 count=1 2>/dev/null
echo "pattern $(md5sum < /tmp/pattern)"
dd if=/tmp/pattern of=/dev/xvda bs=4096 seek=256 count=1 oflag=direct conv=notrunc,fsync 2>&1
echo "readback $(dd if=/dev/xvda bs=4096 skip=256 count=1 iflag=direct 2>/dev/null | md5sum)"
""",
    dom0_final=r"""
echo "written $(dd if=$SCRATCH/disk.img bs=4096 skip=256 count=1 2>/dev/null | md5sum)"
""",
)

RING_PAGE_ORDER = 2

BLOCK_RINGS = Check(
    name="blkif_rings",
    xl_config=("vcpus = 2",),
    domu_module_options=(f"xen-blkfront max_ring_page_order={RING_PAGE_ORDER}",),
    dom0_during=r"""
F=/local/domain/$DOMID/device/vbd/51712
i=0; while [ "$(xenstore-read $F/state 2>/dev/null)" != 4 ] && [ $i -lt 1500 ]; do sleep 0.2; i=$((i+1)); done
echo "state $(xenstore-read $F/state)"
echo "offered $(xenstore-read $(xenstore-read $F/backend)/max-ring-page-order)"
echo "order $(xenstore-read $F/ring-page-order)"
echo "queues $(xenstore-read $F/multi-queue-num-queues)"
for q in 0 1; do echo "queue$q-refs $(xenstore-list $F/queue-$q | grep -c '^ring-ref[0-9]')"; done
""",
    domu=r"""
echo "cpus $(grep -c ^processor /proc/cpuinfo)"
echo "hwqueues $(ls /sys/block/xvda/mq | wc -l)"
""",
)

CONSOLE = Check(
    name="console",
    serve=("console:name=con1,domain=$DOMID/1,attach=on,log=$SCRATCH/con1.log",),
    domu=r"""
i=0; while [ ! -c /dev/hvc1 ] && [ $i -lt 300 ]; do sleep 0.2; i=$((i+1)); done
stty -F /dev/hvc1 raw -echo
echo HELLO-FROM-DOMU > /dev/hvc1
echo "got $(timeout 90 head -n1 /dev/hvc1)"
""",
    dom0_during=r"""
$PVCORE console --run-dir $RUN con1 --send 'PING-FROM-DOM0\n' --read-for 2
""",
    dom0_final=r"""
cat $SCRATCH/con1.log
""",
)

RESTART_BLOCKS = 10

RESTART = Check(
    name="restart",
    domu=rf"""
: > /tmp/acked
echo RESTART-WRITING
i=0
while [ $i -lt {RESTART_BLOCKS} ]; do
  dd if=/dev/urandom of=/tmp/block bs=4096 count=1 2>/dev/null
  dd if=/tmp/block of=/dev/xvda bs=4096 seek=$((2048 + i)) count=1 oflag=direct conv=notrunc 2>/dev/null || break
  cat /tmp/block >> /tmp/acked
  i=$((i + 1)); sleep 1
done
echo "blocks $i"
echo "acked $(md5sum < /tmp/acked)"
echo "readback $(dd if=/dev/xvda bs=4096 skip=2048 count=$i iflag=direct 2>/dev/null | md5sum)"
""",
    dom0_during=r"""
i=0; while ! grep -aq RESTART-WRITING /var/log/xen/console/guest-domU.log 2>/dev/null && [ $i -lt 1500 ]; do sleep 0.2; i=$((i+1)); done
sleep 3
kill -9 $(cat $SCRATCH/pvcore.pid) && echo killed
sleep 1
sh /mnt/work/serve.sh && echo restarted
""",
    dom0_final=rf"""
echo "image $(dd if=$SCRATCH/disk.img bs=4096 skip=2048 count={RESTART_BLOCKS} 2>/dev/null | md5sum)"
""",
)

PROBE = Check(
    name="probe",
    dom0_during=r"""
B=/local/domain/0/backend/console/$DOMID/7
xenstore-write $B/frontend /local/domain/$DOMID/device/console/7 $B/frontend-id $DOMID $B/state 1
echo "domid $DOMID"
$PVCORE probe --hypervisor xen
xenstore-rm /local/domain/0/backend/console/$DOMID
""",
)
"""A device waiting for a backend, as a toolstack leaves it (backend nodes in state 1), found by
``pvcore probe`` on the real xenstored."""

CHECKS = [HOST_LAYER, BLOCK, BLOCK_RINGS, CONSOLE, RESTART, NETIF, TAP, PROBE]


@pytest.fixture(scope="module")
def xen_run(tmp_path_factory) -> XenRun:
    """Boot Xen once with every check of ``CHECKS``; a host that cannot fails, as the other real-guest tests do."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.fail(f"the real Xen boot cannot run: {reason}")
    run = boot(CHECKS, tmp_path_factory.mktemp("real-xen"))
    assert run.completed, f"the Xen boot did not finish in time\n{run.describe()}"
    return run


def _value(output: str, key: str) -> str:
    match = re.search(rf"^{key} (\S+)", output, re.M)
    assert match, f"no {key!r} line in:\n{output}"
    return match.group(1)


def test_pvcore_runs_in_dom0_of_a_real_xen(xen_run):
    before = xen_run.dom0["dom0.dom0_before"]
    assert before.rc == 0, before.output
    assert "control_d" in before.output
    for node in ("evtchn", "gntdev", "xenbus"):
        assert node in before.output
    assert "device disk0 (block) up" in xen_run.pvcore_log, xen_run.describe()


def test_blkfront_reads_the_image_pvcore_serves(xen_run):
    guest = xen_run.domu["blkif"]
    assert guest.rc == 0, xen_run.describe()
    image = _value(xen_run.dom0["blkif.dom0_before"].output, "image")
    assert _value(guest.output, "sectors") == str(16 * 1024 * 1024 // 512)
    assert _value(guest.output, "xvda") == image


def test_an_o_direct_write_from_the_guest_is_in_the_image(xen_run):
    guest = xen_run.domu["blkif"]
    pattern = _value(guest.output, "pattern")
    assert _value(guest.output, "readback") == pattern, guest.output
    assert _value(xen_run.dom0["blkif.dom0_final"].output, "written") == pattern


def test_the_guests_fsync_is_a_flush_the_engine_did(xen_run):
    flushes = re.findall(r"disk0: flush for id \S+: (\S+)", xen_run.pvcore_log)
    assert flushes and set(flushes) == {"ok"}, xen_run.describe()


def test_blkfront_runs_on_multi_page_rings_in_two_queues(xen_run):
    """The guest's blkfront takes the offered order and a queue per vCPU; every block check above ran through them."""
    during = xen_run.dom0["blkif_rings.dom0_during"]
    assert _value(during.output, "state") == "4", during.output
    assert _value(during.output, "offered") == str(RING_PAGE_ORDER)
    assert _value(during.output, "order") == str(RING_PAGE_ORDER)
    assert _value(during.output, "queues") == "2"
    for queue in (0, 1):
        assert _value(during.output, f"queue{queue}-refs") == str(1 << RING_PAGE_ORDER), during.output
    guest = xen_run.domu["blkif_rings"]
    assert _value(guest.output, "cpus") == "2" and _value(guest.output, "hwqueues") == "2", guest.output
    assert re.search(rf"disk0: dom\d+ vbd 51712 connected, \d+ bytes, 2 queue\(s\) of {1 << RING_PAGE_ORDER}-page rings",
                     xen_run.pvcore_log), xen_run.describe()
    assert xen_run.domu["blkif"].rc == 0 and "DOMU: insmod" not in xen_run.guest_console


def test_the_console_carries_text_both_ways(xen_run):
    guest = xen_run.domu["console"]
    assert guest.rc == 0, xen_run.describe()
    assert "got PING-FROM-DOM0" in guest.output, guest.output
    assert "HELLO-FROM-DOMU" in xen_run.dom0["console.dom0_final"].output


def test_pvcore_killed_under_the_guest_is_picked_up_with_no_acknowledged_write_lost(xen_run):
    during = xen_run.dom0["restart.dom0_during"]
    assert "killed" in during.output and "restarted" in during.output, during.output
    assert re.search(r"disk0: dom\d+ vbd 51712 picked up", xen_run.pvcore_log), xen_run.describe()
    guest = xen_run.domu["restart"]
    assert _value(guest.output, "blocks") == str(RESTART_BLOCKS), guest.output
    acked = _value(guest.output, "acked")
    assert _value(guest.output, "readback") == acked
    assert _value(xen_run.dom0["restart.dom0_final"].output, "image") == acked


def test_probe_on_dom0_lists_a_device_waiting_for_a_backend(xen_run):
    during = xen_run.dom0["probe.dom0_during"]
    assert during.rc == 0, during.output
    domid = _value(during.output, "domid")
    consoles = {line.split()[1]: line for line in during.output.splitlines() if line.startswith("console ")}
    root = f"/local/domain/0/backend/console/{domid}"
    assert f"{root}/0" not in consoles, during.output  # the primary console, which xl leaves to xenconsoled
    assert "state=4" in consoles[f"{root}/1"], during.output  # the console pvcore serves (CONSOLE)
    line = consoles[f"{root}/7"]
    assert "state=1" in line, line
    assert f"domain={domid}/7" in line and f"frontend=/local/domain/{domid}/device/console/7" in line, line
