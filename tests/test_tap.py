"""The tap uplink: a guest NIC on pvcore's switch talks to the host kernel through a real tap device.

`pvcore serve` runs in a network namespace of its own with the lpar plugin's
netdev stream door (the test plays QEMU on the socket, as in
test_netdev_stream.py); the namespace's kernel owns the tap and its address
and answers ARP and ICMP echo itself. Needs root (CI runs as root).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from pvcore.devices.net.switch import parse_mac
from pvcore.devices.net.tap import check_ifname, parse_uplink

GUEST_MAC = parse_mac("52:54:00:00:00:0a")
FORGED_MAC = parse_mac("52:54:00:00:00:ff")
GUEST_IP = socket.inet_aton("10.231.0.2")
HOST_IP = socket.inet_aton("10.231.0.1")
BROADCAST = b"\xff" * 6
TIMEOUT = 20.0

needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="a tap device and a network namespace need root (CI runs as root)"
)


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def arp_request(src_mac: bytes) -> bytes:
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, src_mac, GUEST_IP, bytes(6), HOST_IP)
    return BROADCAST + src_mac + b"\x08\x06" + arp


def icmp_echo(dst_mac: bytes, src_mac: bytes, ident: int, payload: bytes) -> bytes:
    icmp = struct.pack("!BBHHH", 8, 0, 0, ident, 1) + payload
    icmp = icmp[:2] + struct.pack("!H", checksum(icmp)) + icmp[4:]
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), ident, 0, 64, 1, 0, GUEST_IP, HOST_IP)
    header = header[:10] + struct.pack("!H", checksum(header)) + header[12:]
    return dst_mac + src_mac + b"\x08\x00" + header + icmp


def sh(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    command = ["ip", "netns", "exec", ns, *args] if ns else list(args)
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=check)


class Guest:
    """What QEMU's netdev stream sends and receives: a 4-byte big-endian length, then the frame."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))

    def send(self, frame: bytes) -> None:
        self.sock.sendall(struct.pack(">I", len(frame)) + frame)

    def _exactly(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = self.sock.recv(size - len(data))
            assert chunk, "pvcore closed the stream"
            data += chunk
        return data

    def receive(self, match, wait: float = TIMEOUT) -> bytes | None:
        """The first frame for which ``match(frame)`` holds (others, e.g. the host's IPv6 chatter, are skipped)."""
        deadline = time.monotonic() + wait
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                (length,) = struct.unpack(">I", self._exactly(4))
                frame = self._exactly(length)
            except TimeoutError:
                return None
            if match(frame):
                return frame
        return None


class Namespace:
    """A network namespace with pvcore serving one NIC (netdev stream) whose switch has ``uplink``."""

    def __init__(self, tmp: Path, uplink: str, *, tap_exists: bool = True) -> None:
        self.name = f"pvtap-{uuid.uuid4().hex[:8]}"
        self.tap = uplink
        self.tmp = tmp
        self.env = dict(os.environ, PVCORE_RUN_DIR=str(tmp / "run"))
        self.socket = tmp / "vm1-net.sock"
        self.proc: subprocess.Popen | None = None
        sh("ip", "netns", "add", self.name)
        if tap_exists:
            sh("ip", "tuntap", "add", "dev", uplink, "mode", "tap", ns=self.name)
            sh("ip", "addr", "add", "10.231.0.1/24", "dev", uplink, ns=self.name)
            sh("ip", "link", "set", uplink, "up", ns=self.name)

    def serve(self, *, prefix: tuple[str, ...] = ()) -> subprocess.Popen:
        self.log = self.tmp / "serve.log"
        device = f"net:socket={self.socket},mac=52:54:00:00:00:0a,switch=lan0,uplink=tap:{self.tap}"
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", self.name, *prefix, sys.executable, "-m", "pvcore.cli", "serve",
             "--hypervisor", "lpar", device],
            stdout=open(self.log, "wb"), stderr=subprocess.STDOUT, env=self.env,
        )
        deadline = time.monotonic() + 60
        while "serving " not in self.log.read_text() and self.proc.poll() is None:
            assert time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.05)
        return self.proc

    def ctl_list(self) -> dict:
        done = subprocess.run([sys.executable, "-m", "pvcore.cli", "ctl", "list", "--json"],
                              capture_output=True, text=True, timeout=60, env=self.env)
        assert done.returncode == 0, done.stderr
        (device,) = json.loads(done.stdout)
        return device["counters"]

    def host_counter(self, counter: str) -> int:
        return int(sh("cat", f"/sys/class/net/{self.tap}/statistics/{counter}", ns=self.name).stdout)

    def stop(self) -> int | None:
        code = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            code = self.proc.wait(30)
        return code

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        sh("ip", "netns", "del", self.name, check=False)


@pytest.fixture
def namespaces(tmp_path: Path):
    made: list[Namespace] = []

    def make(uplink: str = "pvt0", **kwargs) -> Namespace:
        namespace = Namespace(tmp_path, uplink, **kwargs)
        made.append(namespace)
        return namespace

    yield make
    for namespace in made:
        namespace.close()


@needs_root
def test_a_guest_pings_the_host_through_the_tap_uplink_and_cannot_spoof(namespaces) -> None:
    ns = namespaces()
    ns.serve()
    tap_mac = parse_mac(sh("cat", "/sys/class/net/pvt0/address", ns=ns.name).stdout.strip())
    guest = Guest(ns.socket)

    deadline = time.monotonic() + TIMEOUT
    reply = None
    while reply is None and time.monotonic() < deadline:  # a guest repeats its ARP request each second, as Linux does
        guest.send(arp_request(GUEST_MAC))
        reply = guest.receive(lambda f: f[12:14] == b"\x08\x06" and f[20:22] == b"\x00\x02", wait=1.0)
    assert reply is not None, f"the host kernel did not answer ARP through the tap:\n{ns.log.read_text()}"
    assert reply[:6] == GUEST_MAC and reply[6:12] == tap_mac
    assert reply[22:28] == tap_mac and reply[28:32] == HOST_IP and reply[38:42] == GUEST_IP

    payload = os.urandom(56)
    guest.send(icmp_echo(tap_mac, GUEST_MAC, 0x1234, payload))
    echo = guest.receive(lambda f: f[12:14] == b"\x08\x00" and f[23] == 1 and f[34] == 0)
    assert echo is not None, "the host kernel did not answer the ICMP echo"
    assert echo[26:30] == HOST_IP and echo[30:34] == GUEST_IP and echo[38:40] == b"\x12\x34" and echo[42:] == payload

    # A guest sending from a MAC not its own reaches nothing, the host included.
    host_rx = ns.host_counter("rx_packets")
    guest.send(icmp_echo(tap_mac, FORGED_MAC, 0x4321, payload))
    assert guest.receive(lambda f: f[12:14] == b"\x08\x00" and f[38:40] == b"\x43\x21", wait=1.0) is None
    assert ns.host_counter("rx_packets") == host_rx

    # The host cannot take the guest's address either: a frame from the guest's MAC out of the tap is dropped.
    forged = (BROADCAST + GUEST_MAC + b"\x08\x00" + bytes(46)).hex()
    sh(sys.executable, "-c",
       "import socket; s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW); s.bind(('pvt0', 0));"
       f"s.send(bytes.fromhex('{forged}'))", ns=ns.name)

    deadline = time.monotonic() + TIMEOUT
    while (counters := ns.ctl_list())["uplink"]["dropped_spoof"] < 1:
        assert time.monotonic() < deadline, counters
        time.sleep(0.1)
    uplink = counters["uplink"]
    assert uplink["name"] == "tap:pvt0"
    assert uplink["dropped_spoof"] == 1 and counters["dropped_spoof"] == 1
    assert uplink["rx_frames"] >= 2 and uplink["tx_frames"] >= 2  # ARP and echo replies in; request and echo out
    assert counters["rx_frames"] == 2 and counters["tx_frames"] >= 2
    assert uplink["write_errors"] == 0 and uplink["read_errors"] == 0
    assert ns.stop() == 0
    # a tap made beforehand (persistent) is left as it was found, address included
    assert "10.231.0.1/24" in sh("ip", "addr", "show", "pvt0", ns=ns.name).stdout


@needs_root
def test_a_tap_pvcore_creates_goes_away_with_it(namespaces) -> None:
    ns = namespaces("pvnew0", tap_exists=False)
    ns.serve()
    shown = sh("ip", "-d", "link", "show", "pvnew0", ns=ns.name).stdout
    assert "tun type tap" in shown and "persist off" in shown
    assert ns.stop() == 0
    assert sh("ip", "link", "show", "pvnew0", ns=ns.name, check=False).returncode != 0


@needs_root
def test_no_cap_net_admin_and_no_dev_net_tun_are_clear_errors(namespaces) -> None:
    ns = namespaces("pvnew1", tap_exists=False)
    proc = ns.serve(prefix=("setpriv", "--bounding-set=-net_admin", "--inh-caps=-net_admin"))
    assert proc.wait(60) != 0
    text = ns.log.read_text()
    assert "tap pvnew1: operation not permitted: creating a tap needs CAP_NET_ADMIN" in text, text
    assert "Traceback" not in text

    proc = ns.serve(prefix=("unshare", "--mount", "sh", "-c", 'mount -t tmpfs none /dev/net && exec "$0" "$@"'))
    assert proc.wait(60) != 0
    text = ns.log.read_text()
    assert "tap pvnew1: /dev/net/tun does not exist: load the tun module" in text, text
    assert "Traceback" not in text


def test_uplink_names_are_checked_before_anything_opens() -> None:
    assert parse_uplink("tap:pvtap0") == "pvtap0"
    with pytest.raises(ValueError, match="at most 15"):
        parse_uplink("tap:a-name-of-16-byte")
    with pytest.raises(ValueError, match="host tap device"):
        parse_uplink("bridge:br0")
    for bad in ("", "a/b", "a b", "..", "tap%d"):
        with pytest.raises(ValueError):
            check_ifname(bad)
    done = subprocess.run(
        [sys.executable, "-m", "pvcore.cli", "serve", "--hypervisor", "lpar",
         "net:socket=/nonexistent/x.sock,mac=52:54:00:00:00:0a,uplink=tap:sixteen-bytes-xx"],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode != 0
    assert "uplink" in done.stderr and "at most 15" in done.stderr and "Traceback" not in done.stderr
