"""The conformance suite: what every hypervisor plugin must do (run by ``pytest --pvcore-plugin=NAME``).

Each test names the contract it checks; a failure message says what the
plugin (or its conformance peer) got wrong. Fixtures come from
:mod:`pvcore.testing.kit`.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

import pytest

from pvcore.contract import DEVICE_CLASSES, SUPPORTED_CONTRACTS, Detection, DeviceSlot, HostContext
from pvcore.devices.block.virtio_blk import REQUEST_HEADER, VIRTIO_BLK_T_IN
from pvcore.devices.net.virtio_net import NET_HDR
from pvcore.ring.memory import GuestMemory, GuestMemoryError
from pvcore.ring.notify import Notifier
from pvcore.streams.nbd import NbdFrontDoor
from pvcore.streams.netdev_stream import NetdevStreamFrontDoor
from pvcore.testing.conformance import PeerMissing
from pvcore.testing.conformance.guests import SECTOR, stream_guest
from pvcore.registry import Registry
from pvcore.testing.kit import KitDevice, KitSession, entry_point

HOOK_OF_PRIMITIVE = {
    "detect": "pvcore_detect",
    "probe": "pvcore_probe",
    "memory": "pvcore_map_memory",
    "notification": "pvcore_open_notifier",
    "stream": "pvcore_front_door",
}
"""The hook that supplies each primitive a PluginInfo may claim."""

BROADCAST = b"\xff" * 6
ETHERTYPE = struct.pack("!H", 0x88B5)
SETTLE = 0.05
"""How long to let a late interrupt arrive before counting."""


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {timeout}s")
        time.sleep(0.01)


def readable(fd: int, timeout: float = 2.0) -> bool:
    """Whether ``fd`` polls readable within ``timeout`` seconds."""
    return bool(select.select([fd], [], [], timeout)[0])


def claimed(kit: KitSession, device_class: str) -> None:
    """Skip unless the plugin claims ``device_class``."""
    if device_class not in kit.info.device_classes:
        pytest.skip(f"{kit.plugin_name} does not claim the {device_class} class")


def test_plugin_describes_itself_within_the_contract(pvcore_kit: KitSession) -> None:
    info = pvcore_kit.info
    assert info.contract in SUPPORTED_CONTRACTS
    assert isinstance(info.hypervisor, str) and info.hypervisor.strip(), "PluginInfo.hypervisor names no hypervisor"
    assert info.device_classes, "the plugin claims no device class"
    known = set(DEVICE_CLASSES) | set(pvcore_kit.registry.device_classes())
    assert info.device_classes <= known, f"claims unknown device classes {sorted(info.device_classes - known)}"
    for primitive, hook in HOOK_OF_PRIMITIVE.items():
        implemented = pvcore_kit.hook(hook) is not None
        assert implemented == (primitive in info.primitives), (
            f"primitive {primitive!r} is {'not ' if primitive not in info.primitives else ''}claimed "
            f"but {hook} is {'' if implemented else 'not '}implemented"
        )
    assert "stream" in info.primitives, "a hypervisor plugin must supply front doors (pvcore_front_door)"


def test_entry_point_loads_alone(pvcore_kit: KitSession) -> None:
    found = entry_point(pvcore_kit.plugin_name)
    assert found is not None, f"no entry point {pvcore_kit.plugin_name!r} in group pvcore.plugins: is the plugin installed?"
    registry = Registry()
    registry.load_entry_points([found])
    (record,) = registry.records
    assert record.error is None, f"entry point {found.value}: {record.error}"
    assert record.info is not None and record.info.hypervisor == pvcore_kit.hypervisor


def test_detect_says_none_on_an_empty_host(pvcore_kit: KitSession, tmp_path) -> None:
    detect = pvcore_kit.hook("pvcore_detect")
    if detect is None:
        pytest.skip(f"{pvcore_kit.plugin_name} does not supply detect")
    assert detect(host=HostContext(root=tmp_path, environ={})) is None


def test_detect_finds_the_hypervisor_where_present(pvcore_kit: KitSession, tmp_path) -> None:
    detect = pvcore_kit.hook("pvcore_detect")
    if detect is None:
        pytest.skip(f"{pvcore_kit.plugin_name} does not supply detect")
    host = pvcore_kit.require_peer().present_host(tmp_path)
    if host is None:
        pytest.skip("the peer cannot fake a host where the hypervisor is present")
    found = detect(host=host)
    assert isinstance(found, Detection), f"pvcore_detect returned {found!r}, not a Detection"
    assert found.hypervisor == pvcore_kit.hypervisor
    assert 0 < found.confidence <= 100, f"confidence {found.confidence} is not in 1..100"
    assert isinstance(found.evidence, str) and found.evidence.strip(), "a Detection must say what was seen"
    assert pvcore_kit.registry.detect(host)[0] == found


def check_slots(pvcore_kit: KitSession, slots: Any) -> None:
    """``slots`` is a list of DeviceSlot in the documented shape."""
    assert isinstance(slots, list), f"pvcore_probe returned {type(slots).__name__}, not a list"
    for slot in slots:
        assert isinstance(slot, DeviceSlot), f"{slot!r} is not a DeviceSlot"
        assert slot.hypervisor == pvcore_kit.hypervisor, f"{slot}: hypervisor {slot.hypervisor!r}"
        assert slot.device_class in pvcore_kit.info.device_classes, f"{slot}: class the plugin does not claim"
        assert isinstance(slot.address, str) and slot.address, f"{slot}: a slot needs an address"
        assert isinstance(slot.domain, str), f"{slot}: domain must be a string"
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in slot.properties.items()), (
            f"{slot}: properties must map strings to strings"
        )


def test_probe_lists_device_slots(pvcore_kit: KitSession, tmp_path) -> None:
    probe = pvcore_kit.hook("pvcore_probe")
    if probe is None:
        pytest.skip(f"{pvcore_kit.plugin_name} does not supply probe")
    slots = probe(host=pvcore_kit.require_peer().probe_host(tmp_path))
    check_slots(pvcore_kit, slots)
    assert slots, "the peer's probe host shows devices, but pvcore_probe found none"


def test_probe_of_a_corrupt_source_is_a_clean_error(pvcore_kit: KitSession, tmp_path) -> None:
    probe = pvcore_kit.hook("pvcore_probe")
    host = pvcore_kit.require_peer().hostile_probe_host(tmp_path) if probe is not None else None
    if host is None:
        pytest.skip("the peer offers no corrupt device source")
    try:
        slots = probe(host=host)
    except Exception as exc:  # the contract: an exception whose message names the source
        assert str(exc).strip(), f"{type(exc).__name__} without a message naming the corrupt source"
    else:
        check_slots(pvcore_kit, slots)


def test_primitives_refuse_what_is_not_theirs(pvcore_kit: KitSession) -> None:
    primitives = pvcore_kit.registry.primitives(pvcore_kit.hypervisor)
    with pytest.raises(ValueError):
        primitives.map_memory(object())
    with pytest.raises(ValueError):
        primitives.open_notifier(object())


def test_hooks_are_called_for_this_hypervisor_only(pvcore_kit: KitSession) -> None:
    other = f"not-{pvcore_kit.hypervisor}"
    with pytest.raises(LookupError, match=other):
        pvcore_kit.registry.call(other, "pvcore_front_door", device=None, context=None)


def peer_channel(kit: KitSession, primitive: str, make: Callable[[], Any]) -> Any:
    """What the peer's ``make`` returns; a plugin that claims ``primitive`` needs it, one that does not may skip.

    A plugin whose front doors are all streams (no ring transport) has no
    guest memory or notification channels: its peer need not describe any.
    """
    try:
        return make()
    except PeerMissing as exc:
        if primitive in kit.info.primitives:
            raise
        pytest.skip(f"{kit.plugin_name} claims no {primitive} primitive and its peer describes none ({exc})")


def test_notification_in_both_directions(pvcore_kit: KitSession) -> None:
    """Through the plugin's notification primitive, or the core's default (eventfds) where it has none."""
    open_notifier = pvcore_kit.registry.primitives(pvcore_kit.hypervisor).open_notifier
    peer = pvcore_kit.require_peer()
    for direction in ("guest to backend", "backend to guest"):
        channel, guest_end = peer_channel(pvcore_kit, "notification", peer.notification_channel)
        notifier = open_notifier(channel)
        try:
            assert isinstance(notifier, Notifier), f"pvcore_open_notifier returned {notifier!r}, not a Notifier"
            assert notifier.consume() == 0, "a fresh channel has a signal pending"
            if direction == "guest to backend":
                guest_end.signal()
                assert readable(notifier.fileno()), "the guest's signal did not make the notifier readable"
                assert notifier.consume() >= 1 and notifier.consume() == 0
            else:
                notifier.signal()
                assert readable(guest_end.fileno()), "the backend's signal did not reach the guest"
                assert guest_end.consume() >= 1
        finally:
            notifier.close()
            getattr(guest_end, "close", lambda: None)()
    hostile = peer.hostile_channel()
    if hostile is not None:
        with pytest.raises((ValueError, OSError)):
            open_notifier(hostile)


def test_memory_is_shared_and_bounds_checked(pvcore_kit: KitSession) -> None:
    """Through the plugin's memory primitive, or the core's default (fd regions) where it has none."""
    layout, ram = peer_channel(pvcore_kit, "memory", pvcore_kit.require_peer().memory_layout)
    memory = pvcore_kit.registry.primitives(pvcore_kit.hypervisor).map_memory(layout)
    assert isinstance(memory, GuestMemory), f"pvcore_map_memory returned {memory!r}, not a GuestMemory"
    try:
        address = ram.alloc(64)
        ram.memory.write(address, b"written by the guest")
        assert memory.read(address, 20) == b"written by the guest"
        memory.write(address + 32, b"by the backend")
        assert ram.memory.read(address + 32, 14) == b"by the backend"
        for outside in (ram.guest_addr + ram.size, ram.guest_addr + ram.size - 8, 2**64 - 8):
            with pytest.raises(GuestMemoryError):
                memory.read(outside, 16)
        ram.free(address)
    finally:
        getattr(memory, "close", lambda: None)()


def check_block(kit: KitSession, devices: list[KitDevice]) -> None:
    """Reads see the image; a flushed write reaches the host file and reads back."""
    (disk,) = devices
    assert disk.image is not None
    assert disk.guest.read(8, 2) == bytes([8]) * SECTOR + bytes([9]) * SECTOR
    data = os.urandom(2 * SECTOR)
    disk.guest.write(16, data)
    disk.guest.flush()
    assert disk.image.read_bytes()[16 * SECTOR : 18 * SECTOR] == data
    assert disk.guest.read(16, 2) == data


def check_rng(kit: KitSession, devices: list[KitDevice]) -> None:
    """Two reads give fresh bytes."""
    (rng,) = devices
    first, second = rng.guest.read(32), rng.guest.read(32)
    assert 0 < len(first) <= 32 and 0 < len(second) <= 32 and first != second


class Person:
    """Someone attached to a console: records what the guest wrote."""

    def __init__(self) -> None:
        self.seen = bytearray()

    def deliver(self, data: bytes) -> None:
        """Guest output reaches the person."""
        self.seen += data

    def hangup(self, reason: str) -> None:
        """The console went away."""


def check_console(kit: KitSession, devices: list[KitDevice]) -> None:
    """Guest output reaches the log and an attached person; what the person types reaches the guest."""
    (console,) = devices
    stream, loop = console.instance.engine, kit.context.loop
    person = Person()
    assert loop.call(stream.attach, person)
    try:
        console.guest.send(b"hello from the conformance kit\n")
        wait_for(lambda: b"hello from the conformance kit\n" in person.seen, "guest output reaching the console")
        log = console.instance.config.get("log")
        wait_for(lambda: b"conformance kit" in open(log, "rb").read(), "guest output reaching the log")
        assert loop.call(stream.input, person, b"typed by a person\n")
        assert console.guest.receive(18, 5.0) == b"typed by a person\n"
    finally:
        loop.call(stream.detach, person)


def frame(destination: bytes, source: bytes, text: bytes) -> bytes:
    """An Ethernet frame of a local experimental ethertype, padded to the minimum size."""
    return (destination + source + ETHERTYPE + text).ljust(60, b"\0")


def check_net(kit: KitSession, devices: list[KitDevice]) -> None:
    """Two NICs on one switch: a broadcast from one reaches the other, and a unicast answer comes back."""
    first, second = devices
    hello = frame(BROADCAST, first.mac, b"hello from the first NIC")
    first.guest.send(hello)
    assert second.guest.receive(5.0) == hello
    answer = frame(first.mac, second.mac, b"answer from the second NIC")
    second.guest.send(answer)
    assert first.guest.receive(5.0) == answer


CHECKS = {"block": (check_block, 1), "rng": (check_rng, 1), "console": (check_console, 1), "net": (check_net, 2)}
"""Device class -> (end-to-end check, how many devices it needs)."""


@pytest.mark.parametrize("device_class", DEVICE_CLASSES)
def test_device_class_serves_end_to_end(pvcore_kit: KitSession, device_class: str) -> None:
    claimed(pvcore_kit, device_class)
    check, count = CHECKS[device_class]
    with pvcore_kit.serving([device_class] * count) as devices:
        check(pvcore_kit, devices)


PING: dict[str, tuple[int, list[bytes], list[int]]] = {
    "rng": (0, [], [16]),
    "block": (0, [REQUEST_HEADER.pack(VIRTIO_BLK_T_IN, 0, 0)], [SECTOR, 1]),
    "console": (1, [b"."], []),
    "net": (1, [bytes(NET_HDR.size) + frame(BROADCAST, b"\x52\x54\x00\x6b\xff\xff", b"ping")], []),
}
"""Per class, a harmless request on a ring: (queue, readable buffers, writable lengths)."""


def ring_served(pvcore_kit: KitSession) -> list[str]:
    """The classes the plugin claims, in the order the ring tests try them."""
    return [name for name in ("rng", "block", "console", "net") if name in pvcore_kit.info.device_classes]


def test_suppression_on_the_ring(pvcore_kit: KitSession) -> None:
    for device_class in ring_served(pvcore_kit):
        with pvcore_kit.serving([device_class]) as (device,):
            ring = device.ring
            if ring is None:
                continue
            index, readable_buffers, writable = PING[device_class]
            queue = ring.queues[index]
            for _ in range(3):
                time.sleep(SETTLE)  # idle: past any polling window (a polling device wants no kick while it polls)
                kicks = ring.kicks[index]
                ring.request(index, readable_buffers, writable)
                assert ring.kicks[index] == kicks + 1, "an idle device did not ask for a kick (the guest would hang)"
            for _ in range(16):
                ring.submit(index, readable_buffers, writable)
            ring.wait_used(index, 16)
            time.sleep(SETTLE)
            if queue.event_idx:
                queue.defer_interrupts(queue.size)
            else:
                queue.set_no_interrupt(True)
            baseline = ring.count_interrupts(index)
            for _ in range(4):
                ring.request(index, readable_buffers, writable)
            time.sleep(SETTLE)
            assert ring.count_interrupts(index) == baseline, "the device interrupted a guest that suppressed interrupts"
            if queue.event_idx:
                queue.defer_interrupts(1)
            else:
                queue.set_no_interrupt(False)
            ring.request(index, readable_buffers, writable)
            wait_for(lambda: ring.count_interrupts(index) > baseline, "an interrupt once the guest wanted one again")
            return
    pytest.skip(f"{pvcore_kit.plugin_name} serves no device over a ring: its hypervisor's device model notifies")


def exercise(device: KitDevice) -> None:
    """One ordinary request on ``device``'s guest."""
    if device.device_class == "block":
        assert device.guest.read(1, 1) == bytes([1]) * SECTOR
    elif device.device_class == "rng":
        assert device.guest.read(8)
    elif device.device_class == "console":
        device.guest.send(b"still here\n")
    else:
        device.guest.send(frame(BROADCAST, device.mac, b"still here"))


def closed_by_peer(sock: socket.socket, timeout: float = 5.0) -> bool:
    """Whether the other end closes ``sock`` (reading what it sends meanwhile) within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if readable(sock.fileno(), 0.1):
            try:
                if not sock.recv(65536):
                    return True
            except ConnectionError:
                return True
    return False


HOSTILE_STREAMS = {NbdFrontDoor: b"\xde\xad\xbe\xef" * 8, NetdevStreamFrontDoor: b"\xff\xff\xff\xff" + b"x" * 28}
"""Core stream front doors and bytes that break their protocol."""


def break_device(victim: KitDevice) -> bool:
    """Send ``victim`` hostile input; True when the kit knew how and the device reported it."""
    if victim.ring is not None:
        queue = victim.ring.queues[0]
        queue.post_head(queue.size + 3)
        victim.ring.kick(0)
        wait_for(victim.ring.failed, "the device reporting a broken ring (needs reset)")
        return True
    for door_type, garbage in HOSTILE_STREAMS.items():
        if isinstance(victim.door, door_type):
            with socket.socket(socket.AF_UNIX) as sock:
                sock.connect(str(victim.door.socket_path))
                sock.sendall(garbage)
                assert closed_by_peer(sock), f"{victim.door.description}: a protocol violation did not close the connection"
            fresh = stream_guest(victim.door)
            try:
                exercise(KitDevice(victim.instance, victim.door, fresh, None, victim.image, victim.mac))
            finally:
                fresh.close()
            return True
    return False


def test_hostile_input_fails_one_device_not_the_daemon(pvcore_kit: KitSession) -> None:
    for device_class in ring_served(pvcore_kit):
        with pvcore_kit.serving([device_class, device_class]) as (victim, bystander):
            if not break_device(victim):
                continue
            exercise(bystander)
            return
    pytest.skip(f"the kit knows no hostile input for {pvcore_kit.plugin_name}'s front doors")
