"""Across hypervisors: a ppc64 pseries partition and an x86_64 KVM-style guest ping each other through one pvcore switch.

One ``pvcore serve --hypervisor kvm`` subprocess (the CLI contract) serves two
NICs on switch ``lan0``: the x86_64 guest's virtio-net through the kvm
plugin's vhost-user door, and the partition's spapr-vlan (ibmveth) through
the lpar plugin's netdev-stream door, picked by the device's
``hypervisor=lpar`` option. Both guests' QEMU arguments are what
``pvcore serve --print-qemu-args`` prints for the same device specs.

Both guests boot in parallel under TCG. Each puts an address from TEST-NET-1
(192.0.2.0/24) on eth0, pings the other until it answers, pings three more
times for the round trip, then waits until the other has finished pinging it
(its ICMP InEchos counter in /proc/net/snmp has counted at least four echo
requests and stopped growing) before powering off, so neither leaves while
the other still needs it.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pvcore.testing.guest import Guest, GuestResult, build_initramfs, fetch_kernel, result_line

X86_MAC = "52:54:00:c0:86:01"
X86_IP = "192.0.2.86"
PSERIES_MAC = "52:54:00:c0:64:01"
PSERIES_IP = "192.0.2.64"
SWITCH = "lan0"
FIRST_PING_TRIES = 30
WAIT_FOR_PEER_SECONDS = 30
# The echo requests a peer sends that answer: its first successful ping and three more.
PEER_ECHOS = 4
# 200 ms ticks without a new echo request before a guest believes its peer finished.
QUIET_TICKS = 13

# The ICMP InEchos column of /proc/net/snmp, found by its header name.
IN_ECHOS = "awk '/^Icmp:/ {if (!seen) {for (i = 1; i <= NF; i++) if ($i == \"InEchos\") col = i; seen = 1} else print $col}' /proc/net/snmp"


def _guest_script(own_ip: str, peer_ip: str) -> str:
    """Bring eth0 up on ``own_ip``, ping ``peer_ip`` both ways, report, and wait for the peer's pings."""
    return "\n".join([
        result_line("eth0_driver", "basename $(readlink /sys/class/net/eth0/device/driver)"),
        result_line("eth0_mac", "cat /sys/class/net/eth0/address"),
        f"ip link set eth0 up && ip addr add {own_ip}/24 dev eth0",
        f"tries=0; ok=0; while [ $tries -lt {FIRST_PING_TRIES} ]; do tries=$((tries + 1)); "
        f"ping -c 1 -W 1 {peer_ip} >/dev/null 2>&1 && ok=1 && break; done",
        'echo "PVCORE-RESULT first_ping=$ok"',
        'echo "PVCORE-RESULT first_ping_tries=$tries"',
        f"ping -c 3 -W 2 {peer_ip} > /tmp/ping.txt 2>&1",
        result_line("ping_received", "sed -n 's/.* \\([0-9]*\\) packets received.*/\\1/p' /tmp/ping.txt"),
        result_line("ping_rtt", "sed -n 's/^round-trip .* = \\(.*\\)$/\\1/p' /tmp/ping.txt"),
        # The peer is done once its first ping and its three more have arrived and
        # nothing new came for QUIET_TICKS (ping sends one a second).
        f"waited=0; last=-1; quiet=0; while [ $waited -lt {WAIT_FOR_PEER_SECONDS * 5} ]; do "
        f"n=$({IN_ECHOS}); if [ \"$n\" = \"$last\" ]; then quiet=$((quiet + 1)); else quiet=0; last=$n; fi; "
        f"[ \"$n\" -ge {PEER_ECHOS} ] && [ $quiet -ge {QUIET_TICKS} ] && break; "
        "usleep 200000; waited=$((waited + 1)); done",
        result_line("echo_requests_received", IN_ECHOS),
    ])


def _pvcore(*args: str) -> list[str]:
    """The ``pvcore`` command line with ``args``, run by this interpreter."""
    return [sys.executable, "-m", "pvcore.cli", *args]


def _print_qemu_args(device_spec: str) -> tuple[str, list[str]]:
    """``pvcore serve --print-qemu-args`` for one device: the header line and the argument list."""
    done = subprocess.run(
        _pvcore("serve", "--hypervisor", "kvm", "--print-qemu-args", device_spec),
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    header, arguments = done.stdout.strip().splitlines()
    return header, shlex.split(arguments)


def _start_daemon(devices: list[str], log: Path, run_dir: Path) -> subprocess.Popen[bytes]:
    """Start ``pvcore serve --hypervisor kvm DEVICE...`` and wait until it serves every device."""
    env = dict(os.environ, PVCORE_RUN_DIR=str(run_dir))
    with open(log, "wb") as out:
        proc = subprocess.Popen(_pvcore("serve", "--hypervisor", "kvm", *devices), stdout=out, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 30
    while f"serving {len(devices)} device(s)" not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"pvcore serve did not come up:\n{log.read_text(errors='replace')}")
        time.sleep(0.05)
    return proc


def _check_ping(result: GuestResult, driver: str, mac: str) -> dict[str, str]:
    results = result.check().results
    assert results["eth0_driver"] == driver
    assert results["eth0_mac"] == mac
    assert results["first_ping"] == "1", results
    assert results["ping_received"] == "3", results
    assert int(results["echo_requests_received"]) >= PEER_ECHOS, results
    return results


@pytest.mark.guest
def test_pseries_ibmveth_and_x86_virtio_net_ping_through_one_switch(tmp_path: Path) -> None:
    started = time.monotonic()
    x86_socket, pseries_socket = tmp_path / "x86-net.sock", tmp_path / "p1-net.sock"
    x86_spec = f"net:socket={x86_socket},mac={X86_MAC},switch={SWITCH},name=x86-net"
    pseries_spec = f"net:socket={pseries_socket},mac={PSERIES_MAC},switch={SWITCH},hypervisor=lpar,name=p1-net"

    header, pseries_args = _print_qemu_args(pseries_spec)
    assert header == "# p1 (lpar)"
    assert pseries_args == [
        "-nodefaults",
        "-netdev", f"stream,id=n0,server=off,addr.type=unix,addr.path={pseries_socket}",
        "-device", f"spapr-vlan,netdev=n0,mac={PSERIES_MAC}",
    ]
    header, x86_args = _print_qemu_args(x86_spec)
    assert header == "# x86 (kvm)"

    x86_kernel, pseries_kernel = fetch_kernel("x86_64"), fetch_kernel("ppc64")
    x86_initramfs = build_initramfs(x86_kernel, _guest_script(X86_IP, PSERIES_IP), ["virtio_net"], tmp_path / "x86")
    pseries_initramfs = build_initramfs(pseries_kernel, _guest_script(PSERIES_IP, X86_IP), ["ibmveth"], tmp_path / "p1")

    log = tmp_path / "pvcore.log"
    daemon = _start_daemon([x86_spec, pseries_spec], log, tmp_path / "run")
    # -serial stdio: the harness's console vty (hvc0) next to -nodefaults.
    pseries = Guest(pseries_kernel, pseries_initramfs, [*pseries_args, "-serial", "stdio"], name="pseries", max_runtime=150)
    x86 = Guest(x86_kernel, x86_initramfs, x86_args, name="x86", max_runtime=150)
    try:
        pseries.start()
        x86.start()
        pseries_result = pseries.wait(140)
        x86_result = x86.wait(140)
    finally:
        pseries.kill()
        x86.kill()
        daemon.send_signal(signal.SIGTERM)
        daemon_rc = daemon.wait(30)
    pvcore_log = log.read_text(errors="replace")
    print(
        f"cross-hypervisor ping: pseries {pseries_result.elapsed:.1f}s, x86 {x86_result.elapsed:.1f}s, "
        f"whole test {time.monotonic() - started:.1f}s; rtt pseries->x86 {pseries_result.results.get('ping_rtt')}, "
        f"x86->pseries {x86_result.results.get('ping_rtt')}"
    )

    # One daemon served both NICs, each through its own hypervisor plugin's door.
    assert re.search(r"device x86-net \(net\) up: vhost-user server socket", pvcore_log), pvcore_log
    assert re.search(r"device p1-net \(net\) up: netdev stream socket", pvcore_log), pvcore_log
    assert daemon_rc == 0, pvcore_log

    # Both directions: each guest's pings were answered, and each received the other's echo requests.
    _check_ping(pseries_result, "ibmveth", PSERIES_MAC)
    _check_ping(x86_result, "virtio_net", X86_MAC)
