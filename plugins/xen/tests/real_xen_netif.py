"""netif on the REAL Xen boot of test_real_xen.py: its check and tests (imported there, so they share the one boot).

The guest gets two NICs from pvcore (``attach=on``), both ports of one
switch: Linux's xen-netfront brings them up as eth0 and eth1. eth1 moves into
a network namespace of its own, so the guest has two separate IP stacks
joined only by pvcore's switch, and eth0 pings eth1's address. Then eth0
takes a MAC that is not its pvcore device's: its frames are dropped by the
switch, the ping gets nothing back, eth1 receives nothing, and the device's
``dropped_spoof`` counter in ``pvcore ctl list`` says so.

A second check (``TAP``) puts dom0 on a switch of its own: dom0 makes a
persistent tap ``pvtap0`` with an address, and a third NIC whose switch has
``uplink=tap:pvtap0`` pings it from the guest (dom0's kernel answers ARP and
ICMP through pvcore's switch and the tap); with a forged MAC the guest reaches
nothing, and the uplink's counters say what crossed.
"""

from __future__ import annotations

import json
import re

from pvcore_xen.testing.real_xen import Check, XenRun

MAC0, MAC1, FORGED = "00:16:3e:5e:00:01", "00:16:3e:5e:00:02", "00:16:3e:5e:00:99"

NETIF = Check(
    name="netif",
    serve=(
        f"net:name=vif0,domain=$DOMID/0,mac={MAC0},switch=xenlan,attach=on",
        f"net:name=vif1,domain=$DOMID/1,mac={MAC1},switch=xenlan,attach=on",
    ),
    domu=rf"""
i=0; while [ ! -e /sys/class/net/eth1 ] && [ $i -lt 300 ]; do sleep 0.2; i=$((i+1)); done
for n in eth0 eth1; do echo "mac-$n $(cat /sys/class/net/$n/address)"; done
unshare -n sleep 600 &
NS=$!
sleep 0.5
ip link set eth1 netns $NS
nsenter -t $NS -n ip link set lo up
nsenter -t $NS -n ip link set eth1 up
nsenter -t $NS -n ip addr add 10.9.0.2/24 dev eth1
ip link set eth0 up; ip addr add 10.9.0.1/24 dev eth0
sleep 1
ping -c 3 -W 5 10.9.0.2
rx() {{ nsenter -t $NS -n cat /proc/net/dev | awk '$1 == "eth1:" {{print $3}}'; }}
ip link set eth0 down; ip link set eth0 address {FORGED}; ip link set eth0 up
sleep 1
before=$(rx)
ping -c 3 -W 2 10.9.0.2
echo "forged-eth1-rx $(( $(rx) - before ))"
kill $NS
""",
    dom0_after=r"""
$PVCORE ctl --run-dir $RUN list --json
""",
)
"""The netif part of the real Xen boot."""


TAP_MAC, TAP_FORGED = "00:16:3e:5e:00:03", "00:16:3e:5e:00:98"

TAP = Check(
    name="tap",
    dom0_before=r"""
$CHROOT ip tuntap add dev pvtap0 mode tap
$CHROOT ip addr add 10.9.1.1/24 dev pvtap0
$CHROOT ip link set pvtap0 up
""",
    serve=(f"net:name=vif2,domain=$DOMID/2,mac={TAP_MAC},switch=taplan,attach=on,uplink=tap:pvtap0",),
    domu=rf"""
IF=""; i=0
while [ -z "$IF" ] && [ $i -lt 300 ]; do
  for n in /sys/class/net/*; do [ "$(cat $n/address)" = "{TAP_MAC}" ] && IF=${{n##*/}}; done
  [ -z "$IF" ] && sleep 0.2; i=$((i+1))
done
echo "tap-if $IF"
ip link set $IF up; ip addr add 10.9.1.2/24 dev $IF
sleep 1
ping -c 3 -W 5 10.9.1.1
ip neigh show 10.9.1.1
ip link set $IF down; ip link set $IF address {TAP_FORGED}; ip neigh flush dev $IF; ip link set $IF up
sleep 1
ping -c 3 -W 2 10.9.1.1
echo tap-done
""",
    dom0_after=r"""
echo "dom0-tap-rx $(cat /sys/class/net/pvtap0/statistics/rx_packets)"
$PVCORE ctl --run-dir $RUN list --json
""",
    dom0_final=r"""
$CHROOT ip addr show pvtap0
""",
)
"""dom0 on pvcore's switch: a tap uplink in dom0 (pvtap0, 10.9.1.1) and a third netfront NIC that pings it."""


def _number(output: str, key: str) -> int:
    match = re.search(rf"^{key} (-?\d+)", output, re.M)
    assert match, f"no {key!r} line in:\n{output}"
    return int(match.group(1))


def _received(output: str) -> list[int]:
    """ping's "N packets received" counts, in order."""
    return [int(n) for n in re.findall(r"(\d+) packets received", output)]


def test_a_netfront_guest_pings_through_pvcores_switch(xen_run: XenRun) -> None:
    guest = xen_run.domu["netif"]
    assert guest.rc == 0, xen_run.describe()
    assert f"mac-eth0 {MAC0}" in guest.output and f"mac-eth1 {MAC1}" in guest.output, guest.output
    assert _received(guest.output)[:1] == [3], guest.output


def test_a_forged_mac_gets_nothing_through(xen_run: XenRun) -> None:
    guest = xen_run.domu["netif"]
    assert _received(guest.output)[1:] == [0], guest.output
    assert _number(guest.output, "forged-eth1-rx") == 0, guest.output
    after = xen_run.dom0["netif.dom0_after"]
    assert after.rc == 0, after.output
    devices = {device["name"]: device for device in json.loads(after.output[after.output.index("["):])}
    assert devices["vif0"]["counters"]["dropped_spoof"] >= 3, devices["vif0"]
    assert devices["vif1"]["counters"]["dropped_spoof"] == 0, devices["vif1"]


def test_a_netfront_guest_pings_dom0_through_the_tap_uplink(xen_run: XenRun) -> None:
    """The guest's third NIC reaches dom0's kernel through pvcore's switch and tap; a forged MAC reaches nothing."""
    guest = xen_run.domu["tap"]
    assert "tap-if eth" in guest.output and "tap-done" in guest.output, xen_run.describe()
    assert _received(guest.output) == [3, 0], guest.output
    after = xen_run.dom0["tap.dom0_after"]
    assert after.rc == 0, after.output
    devices = {device["name"]: device for device in json.loads(after.output[after.output.index("["):])}
    counters = devices["vif2"]["counters"]
    uplink = counters["uplink"]
    assert uplink["name"] == "tap:pvtap0", counters
    assert uplink["rx_frames"] >= 4 and uplink["tx_frames"] >= 4, uplink  # ARP and 3 echoes each way
    assert counters["dropped_spoof"] >= 3 and uplink["dropped_spoof"] == 0, counters
    assert uplink["write_errors"] == uplink["read_errors"] == 0, uplink
    assert _number(after.output, "dom0-tap-rx") == uplink["tx_frames"], after.output  # dom0 got what the switch sent, no more
    assert "10.9.1.1/24" in xen_run.dom0["tap.dom0_final"].output  # pvcore left the persistent tap as it found it
