"""The net device class: the L2 switch, the virtio-net device and its factory."""

from __future__ import annotations

import struct

import pytest

from pvcore.devices.net import (
    MAX_FRAME_LEN,
    Port,
    Switch,
    VirtioNet,
    create_net_device,
    format_mac,
    get_switch,
    parse_mac,
)
from pvcore.devices.net.virtio_net import (
    NET_CONFIG,
    NET_HDR,
    RX_QUEUE,
    TX_QUEUE,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
)
from pvcore.testing.loopback import Loopback
from pvcore.virtio import TRANSPORT_FEATURES, VIRTIO_ID_NET, DeviceError, bit

MAC_A = parse_mac("52:54:00:00:00:0a")
MAC_B = parse_mac("52:54:00:00:00:0b")
MAC_C = parse_mac("52:54:00:00:00:0c")
BROADCAST = b"\xff" * 6
ETHERTYPE_ARP = b"\x08\x06"
ETHERTYPE_IP = b"\x08\x00"


def frame(dst: bytes, src: bytes, payload: bytes = b"hello", ethertype: bytes = ETHERTYPE_IP) -> bytes:
    """An Ethernet frame."""
    return dst + src + ethertype + payload


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class RecordingPort(Port):
    """A port that keeps what it is given, up to ``capacity`` frames."""

    def __init__(self, name: str, mac: bytes | None, capacity: int = 1000) -> None:
        super().__init__(name, mac)
        self.capacity = capacity
        self.frames: list[bytes] = []

    def deliver(self, frame: bytes) -> bool:
        """Keep the frame unless ``capacity`` frames are already kept."""
        if len(self.frames) >= self.capacity:
            return False
        self.frames.append(frame)
        return True


@pytest.fixture
def clock() -> Clock:
    """A hand-moved clock."""
    return Clock()


@pytest.fixture
def switch(clock: Clock) -> Switch:
    """A fresh switch on the hand-moved clock."""
    return Switch("test", ageing=300.0, clock=clock)


def attached(switch: Switch, *ports: RecordingPort) -> tuple[RecordingPort, ...]:
    """Attach ``ports`` to ``switch`` and return them."""
    for port in ports:
        switch.attach(port)
    return ports


# --- switch ---------------------------------------------------------------


def test_unicast_goes_only_to_the_owner_of_the_destination(switch: Switch) -> None:
    a, b, c = attached(switch, RecordingPort("a", MAC_A), RecordingPort("b", MAC_B), RecordingPort("c", MAC_C))
    sent = frame(MAC_B, MAC_A)
    assert a.send(sent) == 1
    assert b.frames == [sent]
    assert a.frames == [] and c.frames == []


def test_uplink_addresses_are_learned_from_their_source(switch: Switch) -> None:
    a, up1, up2 = attached(switch, RecordingPort("a", MAC_A), RecordingPort("up1", None), RecordingPort("up2", None))
    host = parse_mac("02:00:00:00:00:01")
    assert a.send(frame(host, MAC_A)) == 2  # unknown: flooded to both uplinks
    assert switch.lookup(host) is None
    up1.send(frame(MAC_A, host))
    assert switch.lookup(host) is up1
    assert switch.table()[format_mac(host)] == "up1"
    up1.frames.clear()
    up2.frames.clear()
    reply = frame(host, MAC_A, b"reply")
    assert a.send(reply) == 1
    assert up1.frames == [reply] and up2.frames == []
    up2.send(frame(MAC_A, host))  # the station moved
    assert switch.lookup(host) is up2


def test_broadcast_multicast_and_unknown_unicast_flood_to_all_other_ports(switch: Switch) -> None:
    a, b, c = attached(switch, RecordingPort("a", MAC_A), RecordingPort("b", MAC_B), RecordingPort("c", MAC_C))
    arp = frame(BROADCAST, MAC_A, b"who-has", ETHERTYPE_ARP)
    multicast = frame(parse_mac("01:00:5e:00:00:01"), MAC_A)
    unknown = frame(parse_mac("52:54:00:99:99:99"), MAC_A)
    for sent in (arp, multicast, unknown):
        assert a.send(sent) == 2
    assert b.frames == [arp, multicast, unknown]
    assert c.frames == [arp, multicast, unknown]
    assert a.frames == []


def test_learned_entries_age_out(switch: Switch, clock: Clock) -> None:
    a, up1, up2 = attached(switch, RecordingPort("a", MAC_A), RecordingPort("up1", None), RecordingPort("up2", None))
    host = parse_mac("02:00:00:00:00:01")
    up1.send(frame(MAC_A, host))
    clock.now += 299.0
    assert switch.lookup(host) is up1
    up1.send(frame(MAC_A, host))  # traffic refreshes the entry
    clock.now += 299.0
    assert a.send(frame(host, MAC_A)) == 1
    clock.now += 301.0
    assert switch.lookup(host) is None
    assert format_mac(host) not in switch.table()
    assert a.send(frame(host, MAC_A)) == 2  # flooded again
    assert switch.lookup(MAC_A) is a  # a port's own address never ages


def test_spoofed_source_is_dropped_and_counted(switch: Switch) -> None:
    a, b = attached(switch, RecordingPort("a", MAC_A), RecordingPort("b", MAC_B))
    assert a.send(frame(MAC_B, MAC_C)) == 0
    assert a.send(frame(BROADCAST, MAC_B)) == 0
    assert b.frames == []
    assert a.counters.dropped_spoof == 2
    assert a.counters.rx_frames == 0
    assert switch.lookup(MAC_C) is None
    assert switch.lookup(MAC_B) is b


def test_uplink_cannot_claim_a_port_owned_address(switch: Switch) -> None:
    a, b, up = attached(switch, RecordingPort("a", MAC_A), RecordingPort("b", MAC_B), RecordingPort("up", None))
    assert up.send(frame(MAC_B, MAC_A)) == 0
    assert up.counters.dropped_spoof == 1
    assert b.frames == []
    assert switch.lookup(MAC_A) is a


def test_malformed_frames_are_dropped_and_counted(switch: Switch) -> None:
    a, b, up = attached(switch, RecordingPort("a", MAC_A), RecordingPort("b", MAC_B), RecordingPort("up", None))
    assert a.send(frame(MAC_B, MAC_A)[:13]) == 0
    assert a.send(b"") == 0
    assert a.send(frame(MAC_B, MAC_A, bytes(MAX_FRAME_LEN - 13))) == 0
    assert a.counters.dropped_malformed == 3
    assert up.send(frame(MAC_B, BROADCAST)) == 0  # multicast source
    assert up.counters.dropped_malformed == 1
    assert b.frames == []
    largest = frame(MAC_B, MAC_A, bytes(MAX_FRAME_LEN - 14))
    assert a.send(largest) == 1
    assert b.frames == [largest]
    assert a.send(frame(MAC_B, MAC_A, b"")) == 1  # a bare header is a frame


def test_no_hairpin(switch: Switch) -> None:
    a, b, up = attached(switch, RecordingPort("a", MAC_A), RecordingPort("b", MAC_B), RecordingPort("up", None))
    assert a.send(frame(MAC_A, MAC_A)) == 0
    assert a.frames == []
    host = parse_mac("02:00:00:00:00:01")
    up.send(frame(BROADCAST, host))
    assert up.send(frame(host, parse_mac("02:00:00:00:00:02"))) == 0
    assert up.frames == []


def test_a_full_port_drops_without_blocking_the_others(switch: Switch) -> None:
    a, b, c = attached(
        switch, RecordingPort("a", MAC_A), RecordingPort("b", MAC_B, capacity=2), RecordingPort("c", MAC_C)
    )
    for i in range(5):
        a.send(frame(BROADCAST, MAC_A, bytes([i])))
    assert len(b.frames) == 2
    assert len(c.frames) == 5
    assert b.counters.dropped_full == 3
    assert b.counters.tx_frames == 2
    assert c.counters.dropped_full == 0


def test_counters(switch: Switch) -> None:
    a, b = attached(switch, RecordingPort("a", MAC_A), RecordingPort("b", MAC_B))
    first, second = frame(MAC_B, MAC_A, bytes(100)), frame(MAC_B, MAC_A, bytes(50))
    a.send(first)
    a.send(second)
    a.send(frame(MAC_B, MAC_C))
    a.send(b"short")
    assert a.counters.as_dict() == {
        "rx_frames": 2,
        "rx_bytes": len(first) + len(second),
        "tx_frames": 0,
        "tx_bytes": 0,
        "dropped_spoof": 1,
        "dropped_malformed": 1,
        "dropped_full": 0,
        "dropped_too_big": 0,
    }
    assert (b.counters.tx_frames, b.counters.tx_bytes, b.counters.rx_frames) == (2, len(first) + len(second), 0)


def test_attach_refuses_duplicate_names_and_macs(switch: Switch) -> None:
    attached(switch, RecordingPort("a", MAC_A))
    with pytest.raises(DeviceError, match="already attached"):
        switch.attach(RecordingPort("a", MAC_B))
    with pytest.raises(DeviceError, match="52:54:00:00:00:0a .*already used by port a"):
        switch.attach(RecordingPort("other", MAC_A))


def test_detach_forgets_the_port_and_its_addresses(switch: Switch) -> None:
    a, b, up = attached(switch, RecordingPort("a", MAC_A), RecordingPort("b", MAC_B), RecordingPort("up", None))
    host = parse_mac("02:00:00:00:00:01")
    up.send(frame(MAC_A, host))
    switch.detach(up)
    switch.detach(b)
    assert switch.lookup(host) is None and switch.lookup(MAC_B) is None
    assert a.send(frame(BROADCAST, MAC_A)) == 0
    assert b.send(frame(MAC_A, MAC_B)) == 0
    switch.attach(RecordingPort("b2", MAC_B))  # the address is free again


def test_table_size_is_bounded(clock: Clock) -> None:
    switch = Switch("small", max_entries=3, clock=clock)
    a, up = attached(switch, RecordingPort("a", MAC_A), RecordingPort("up", None))
    hosts = [parse_mac(f"02:00:00:00:00:{i:02x}") for i in range(1, 5)]
    for host in hosts:
        assert up.send(frame(MAC_A, host)) == 1
    assert len(switch.table()) == 3
    assert switch.lookup(hosts[3]) is None  # not learned: the table was full
    clock.now += 301.0
    up.send(frame(MAC_A, hosts[3]))  # expired entries make room
    assert switch.lookup(hosts[3]) is up


def test_registry_shares_switches_by_name() -> None:
    assert get_switch("test-registry-x") is get_switch("test-registry-x")
    assert get_switch("test-registry-x") is not get_switch("test-registry-y")


def test_mac_parsing() -> None:
    assert parse_mac("52:54:00:AB:cd:01") == bytes([0x52, 0x54, 0, 0xAB, 0xCD, 1])
    assert format_mac(bytes([0x52, 0x54, 0, 0xAB, 0xCD, 1])) == "52:54:00:ab:cd:01"
    bad_texts = ("52:54:00:ab:cd", "52:54:00:ab:cd:01:02", "52-54-00-ab-cd-01", "52:54:00:ab:cd:zz", " 52:54:00:ab:cd:01")
    for bad in bad_texts:
        with pytest.raises(ValueError):
            parse_mac(bad)
    with pytest.raises(ValueError, match="multicast"):
        RecordingPort("m", parse_mac("01:00:5e:00:00:01"))


# --- factory ----------------------------------------------------------------


def test_factory_builds_a_device_on_the_named_switch() -> None:
    one = create_net_device({"mac": "52:54:00:12:34:01", "switch": "factory-lan"}, name="nic1")
    two = create_net_device({"mac": "52:54:00:12:34:02", "switch": "factory-lan", "mtu": "9000"}, name="nic2")
    try:
        assert one.port.switch is two.port.switch is get_switch("factory-lan")
        assert one.mac == parse_mac("52:54:00:12:34:01")
        assert two.mtu == 9000 and one.mtu == 1500
        with pytest.raises(DeviceError, match="already used by port nic1"):
            create_net_device({"mac": "52:54:00:12:34:01", "switch": "factory-lan"}, name="nic3")
    finally:
        one.close()
        two.close()
    assert get_switch("factory-lan").ports == {}


def test_factory_default_switch() -> None:
    device = create_net_device({"mac": "52:54:00:12:34:03"}, name="nic-default")
    try:
        assert device.port.switch is get_switch("default")
    finally:
        device.close()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "mac=... is required"),
        ({"mac": "52:54:00:12:34"}, r"mac=52:54:00:12:34: .*not a MAC address"),
        ({"mac": "hello"}, "not a MAC address"),
        ({"mac": "01:00:5e:00:00:01"}, "multicast"),
        ({"mac": "ff:ff:ff:ff:ff:ff"}, "multicast"),
        ({"mac": "00:00:00:00:00:00"}, "not a usable MAC"),
        ({"mac": "52:54:00:12:34:04", "colour": "blue"}, "unknown option.*colour"),
        ({"mac": "52:54:00:12:34:04", "mtu": "big"}, "mtu=big: not a number"),
        ({"mac": "52:54:00:12:34:04", "mtu": "20"}, "mtu 20 is outside"),
        ({"mac": "52:54:00:12:34:04", "switch": "a b"}, "switch name"),
        ({"mac": "52:54:00:12:34:04", "switch": ""}, "switch name"),
    ],
)
def test_factory_rejects_bad_options(options: dict[str, str], message: str) -> None:
    with pytest.raises(DeviceError, match=message) as info:
        create_net_device(options, name="bad-nic")
    assert "net device bad-nic" in str(info.value)


# --- virtio-net device ------------------------------------------------------


def test_device_identity_features_and_config(switch: Switch) -> None:
    device = VirtioNet(name="nic", mac=MAC_A, switch=switch, mtu=1400)
    assert device.device_id == VIRTIO_ID_NET == 1
    assert device.num_queues() == 2
    offered = device.features()
    for feature in (3, 5, 15, 16):  # MTU, MAC, MRG_RXBUF, STATUS
        assert offered & bit(feature)
    for feature in (0, 1, 7, 11, 17, 22):  # CSUM, GUEST_CSUM, GUEST_TSO4, HOST_TSO4, CTRL_VQ, MQ
        assert not offered & bit(feature)
    assert NET_CONFIG.unpack(device.config()) == (MAC_A, 1, 1, 1400)


def test_device_without_a_session_refuses_frames(switch: Switch) -> None:
    device = VirtioNet(name="nic", mac=MAC_B, switch=switch)
    a = attached(switch, RecordingPort("a", MAC_A))[0]
    assert a.send(frame(MAC_B, MAC_A)) == 0
    assert device.port.counters.dropped_full == 1


HDR_LEN = NET_HDR.size


def tx_packet(payload: bytes, flags: int = 0) -> bytes:
    """A virtio-net header (no offloads) followed by ``payload``."""
    return NET_HDR.pack(flags, 0, 0, 0, 0, 0, 0) + payload


def num_buffers(data: bytes) -> int:
    """The num_buffers field of the virtio-net header at the start of ``data``."""
    return NET_HDR.unpack(data[:HDR_LEN])[6]


class Lan:
    """Three virtio-net guests (a, b, c) on one switch, all served on one event loop."""

    def __init__(self, *, queue_size: int = 64, features: int | None = None) -> None:
        self.switch = Switch("lan0")
        self.devices = {
            name: VirtioNet(name=name, mac=mac, switch=self.switch)
            for name, mac in (("a", MAC_A), ("b", MAC_B), ("c", MAC_C))
        }
        self.a = Loopback(self.devices["a"], name="a", queue_size=queue_size, features=features)
        try:
            self.b = Loopback(self.devices["b"], name="b", queue_size=queue_size, features=features, loop=self.a.loop)
            self.c = Loopback(self.devices["c"], name="c", queue_size=queue_size, features=features, loop=self.a.loop)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Close the loopbacks, the owner of the loop last."""
        for name in ("c", "b", "a"):
            lb = getattr(self, name, None)
            if lb is not None:
                lb.close()

    def settle(self) -> None:
        """Let every callback already scheduled on the loop (publication of used chains) run."""
        self.a.run_in_loop(lambda: None)
        self.a.run_in_loop(lambda: None)

    def counters(self, name: str) -> dict[str, int]:
        """The switch counters of guest ``name``'s port, read on the loop."""
        return self.a.run_in_loop(self.devices[name].port.counters.as_dict)

    def transmit(self, lb: Loopback, packet: bytes) -> None:
        """Send one packet on the guest's transmit queue and wait until it is used."""
        used = lb.request(TX_QUEUE, [packet], [])
        assert used.written == 0

    def post_rx(self, lb: Loopback, count: int, size: int = 2048) -> None:
        """Post ``count`` receive buffers of ``size`` bytes."""
        for _ in range(count):
            lb.submit(RX_QUEUE, [], [size])


@pytest.fixture
def lan():
    """Three guests on one switch, closed after the test."""
    lan = Lan()
    yield lan
    lan.close()


def test_unicast_reaches_only_the_destination_guest(lan: Lan) -> None:
    for lb in (lan.b, lan.c):
        lan.post_rx(lb, 4)
    sent = frame(MAC_B, MAC_A, b"unicast payload")
    lan.transmit(lan.a, tx_packet(sent))
    (used,) = lan.b.wait_used(RX_QUEUE, 1)
    assert used.written == HDR_LEN + len(sent)
    assert used.data[HDR_LEN:] == sent
    assert NET_HDR.unpack(used.data[:HDR_LEN]) == (0, 0, 0, 0, 0, 0, 1)
    lan.settle()
    assert lan.c.queues[RX_QUEUE].used() == []
    assert lan.counters("c")["tx_frames"] == 0
    assert lan.counters("a")["rx_frames"] == 1
    assert lan.counters("b")["tx_bytes"] == len(sent)


def test_spoofed_source_from_a_guest_reaches_nobody(lan: Lan) -> None:
    for lb in (lan.b, lan.c):
        lan.post_rx(lb, 4)
    lan.transmit(lan.a, tx_packet(frame(MAC_B, MAC_C, b"forged")))
    lan.transmit(lan.a, tx_packet(frame(BROADCAST, MAC_B, b"forged")))
    lan.settle()
    assert lan.b.queues[RX_QUEUE].used() == []
    assert lan.c.queues[RX_QUEUE].used() == []
    assert lan.counters("a")["dropped_spoof"] == 2
    assert lan.counters("b")["tx_frames"] == 0


def test_broadcast_is_flooded_to_every_other_guest(lan: Lan) -> None:
    for lb in (lan.a, lan.b, lan.c):
        lan.post_rx(lb, 4)
    arp = frame(BROADCAST, MAC_A, b"who-has 10.0.0.2 tell 10.0.0.1".ljust(28, b"\0"), ETHERTYPE_ARP)
    lan.transmit(lan.a, tx_packet(arp))
    for lb in (lan.b, lan.c):
        (used,) = lb.wait_used(RX_QUEUE, 1)
        assert used.data[HDR_LEN:] == arp
    lan.settle()
    assert lan.a.queues[RX_QUEUE].used() == []


def test_mergeable_rx_buffers_carry_num_buffers(lan: Lan) -> None:
    assert lan.b.features & bit(VIRTIO_NET_F_MRG_RXBUF)
    lan.post_rx(lan.b, 8, size=512)
    sent = frame(MAC_B, MAC_A, bytes(range(256)) * 5 + b"tail")
    lan.transmit(lan.a, tx_packet(sent))
    used = lan.b.wait_used(RX_QUEUE, 3)
    assert [u.written for u in used] == [512, 512, HDR_LEN + len(sent) - 1024]
    assert num_buffers(used[0].data) == 3
    assert b"".join(u.data for u in used)[HDR_LEN:] == sent
    small = frame(MAC_B, MAC_A, b"small")
    lan.transmit(lan.a, tx_packet(small))
    (used_small,) = lan.b.wait_used(RX_QUEUE, 1)
    assert num_buffers(used_small.data) == 1
    assert used_small.data[HDR_LEN:] == small


def test_frames_wait_for_rx_buffers_in_a_bounded_backlog(lan: Lan) -> None:
    backlog = lan.devices["b"].rx_backlog
    sent = [frame(MAC_B, MAC_A, i.to_bytes(4, "big")) for i in range(backlog + 3)]
    for one in sent:
        lan.transmit(lan.a, tx_packet(one))
    assert lan.counters("b")["dropped_full"] == 3
    assert lan.counters("b")["tx_frames"] == backlog
    lan.post_rx(lan.b, 16)
    used = lan.b.wait_used(RX_QUEUE, 16)
    assert [u.data[HDR_LEN:] for u in used] == sent[:16]


def test_bad_transmit_headers_and_sizes_are_dropped(lan: Lan) -> None:
    lan.post_rx(lan.b, 4)
    good = frame(MAC_B, MAC_A)
    lan.transmit(lan.a, tx_packet(good, flags=VIRTIO_NET_HDR_F_NEEDS_CSUM))
    lan.transmit(lan.a, NET_HDR.pack(0, 1, 0, 0, 0, 0, 0) + good)  # GSO_TCPV4, never offered
    lan.transmit(lan.a, tx_packet(good[:10]))
    lan.transmit(lan.a, good[:8])
    lan.transmit(lan.a, tx_packet(frame(MAC_B, MAC_A, bytes(1500 + 4 + 1))))  # over the negotiated MTU
    lan.settle()
    assert lan.b.queues[RX_QUEUE].used() == []
    assert lan.counters("a")["dropped_malformed"] == 5
    split = tx_packet(good)
    lan.a.request(TX_QUEUE, [split[:5], split[5:20], split[20:]], [])  # header and frame over three buffers
    (used,) = lan.b.wait_used(RX_QUEUE, 1)
    assert used.data[HDR_LEN:] == good
    assert lan.counters("a")["dropped_malformed"] == 5


def test_rx_buffers_are_returned_unused_when_the_queue_stops(lan: Lan) -> None:
    lan.post_rx(lan.b, 3)
    lan.settle()
    next_avail = lan.b.run_in_loop(lan.b.session.stop_queue, RX_QUEUE)
    assert next_avail == 3
    used = lan.b.wait_used(RX_QUEUE, 3)
    assert [u.written for u in used] == [0, 0, 0]
    lan.transmit(lan.a, tx_packet(frame(MAC_B, MAC_A)))
    assert lan.counters("b")["dropped_full"] == 1


def test_rx_buffer_too_small_for_a_header_is_returned(lan: Lan) -> None:
    lan.b.submit(RX_QUEUE, [], [HDR_LEN - 1])
    (used,) = lan.b.wait_used(RX_QUEUE, 1)
    assert used.written == 0
    assert lan.b.run_in_loop(lambda: lan.devices["b"].stats.rx_bad_buffers) == 1


def test_frame_larger_than_the_whole_rx_ring_is_dropped() -> None:
    lan = Lan(queue_size=4)
    try:
        lan.post_rx(lan.b, 4, size=64)
        lan.transmit(lan.a, tx_packet(frame(MAC_B, MAC_A, bytes(500))))
        small = frame(MAC_B, MAC_A, b"fits")
        lan.transmit(lan.a, tx_packet(small))
        (used,) = lan.b.wait_used(RX_QUEUE, 1)
        assert used.data[HDR_LEN:] == small
        counters = lan.counters("b")
        assert (counters["dropped_too_big"], counters["tx_frames"], counters["tx_bytes"]) == (1, 1, len(small))
    finally:
        lan.close()


def test_without_mergeable_buffers_one_chain_must_hold_the_frame() -> None:
    offered = TRANSPORT_FEATURES | VirtioNet(name="probe", mac=MAC_A, switch=Switch("probe")).features()
    lan = Lan(features=offered & ~bit(VIRTIO_NET_F_MRG_RXBUF))
    try:
        lan.post_rx(lan.b, 2, size=256)
        lan.transmit(lan.a, tx_packet(frame(MAC_B, MAC_A, bytes(300))))
        fits = frame(MAC_B, MAC_A, bytes(200))
        lan.transmit(lan.a, tx_packet(fits))
        (used,) = lan.b.wait_used(RX_QUEUE, 1)
        assert used.data[HDR_LEN:] == fits
        assert num_buffers(used.data) == 1
        counters = lan.counters("b")
        assert (counters["dropped_too_big"], counters["tx_frames"], counters["tx_bytes"]) == (1, 1, len(fits))
    finally:
        lan.close()


def test_a_guest_that_breaks_its_memory_fails_only_its_own_device(lan: Lan) -> None:
    lan.post_rx(lan.b, 2)
    lan.post_rx(lan.c, 2)
    lan.settle()

    def break_b() -> None:
        """Replace b's guest memory with none at all, so its next receive write fails."""
        lan.b.session.set_memory(type(lan.b.ram.memory)())

    lan.b.run_in_loop(break_b)
    arp = frame(BROADCAST, MAC_A, b"who-has", ETHERTYPE_ARP)
    lan.transmit(lan.a, tx_packet(arp))
    (used,) = lan.c.wait_used(RX_QUEUE, 1)
    assert used.data[HDR_LEN:] == arp
    assert lan.b.session.broken is not None
    assert lan.a.session.broken is None and lan.c.session.broken is None
    lan.transmit(lan.a, tx_packet(arp))
    assert lan.counters("b")["dropped_full"] == 1
    lan.b.run_in_loop(lan.b.session.close)  # the frontend resets the broken device


def test_header_layout() -> None:
    assert NET_HDR.size == 12
    assert struct.calcsize("<6sHHH") == NET_CONFIG.size == 12


def test_frames_larger_than_the_negotiated_mtu_are_dropped_not_sent() -> None:
    switch = Switch("mtu-test")
    device = VirtioNet(name="small", mac=MAC_A, switch=switch, mtu=1500)
    peer = RecordingPort("peer", MAC_B)
    switch.attach(peer)
    try:
        with Loopback(device, name="small") as guest:  # every offered feature, MTU included
            guest.submit(0, [], [4096])
            assert guest.run_in_loop(peer.send, frame(MAC_A, MAC_B, b"x" * 2000)) == 0
            assert guest.run_in_loop(peer.send, frame(MAC_A, MAC_B, b"y" * 100)) == 1
            used = guest.wait_used(0, 1)[0]
            assert used.data[12 + 14 :] == b"y" * 100
            counters = guest.run_in_loop(device.port.counters.as_dict)
    finally:
        device.close()
    assert counters["dropped_too_big"] == 1
    assert (counters["tx_frames"], counters["tx_bytes"], counters["dropped_full"]) == (1, 14 + 100, 0)


def test_the_switch_counts_frames_over_a_ports_limit_as_dropped(switch: Switch) -> None:
    class SmallPort(RecordingPort):
        max_frame_len = 100

    a, small, c = attached(switch, RecordingPort("a", MAC_A), SmallPort("small", MAC_B), RecordingPort("c", MAC_C))
    big = frame(BROADCAST, MAC_A, bytes(200))
    assert a.send(big) == 1  # flooded: c takes it, the small port does not
    assert a.send(frame(MAC_B, MAC_A, bytes(200))) == 0
    assert small.frames == [] and c.frames == [big]
    assert small.counters.dropped_too_big == 2
    assert (small.counters.tx_frames, small.counters.dropped_full) == (0, 0)
    fits = frame(MAC_B, MAC_A, bytes(50))
    assert a.send(fits) == 1 and small.frames == [fits]
