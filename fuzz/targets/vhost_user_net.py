"""vhost-user message sequences with fds into a real virtio-net NIC on a switch (see _vhost_user).

Beside the generic checks: every frame the switch delivered to the other
station (a capture port) carries the NIC's own source MAC.
"""

from __future__ import annotations

from fuzz.harness import InvariantError, loop_thread
from fuzz.targets._vhost_user import VhostTarget, record_session
from fuzz.targets.netdev_stream import MAC_B, CapturePort
from pvcore.devices.net.switch import get_switch
from pvcore.devices.net.virtio_net import NET_HDR, create_net_device
from pvcore.testing.vhost_user_frontend import VhostUserFrontend

NIC_MAC = "52:54:00:00:0c:0c"
_state: dict[str, object] = {}


def good_session(frontend: VhostUserFrontend) -> None:
    """QEMU's handshake, a receive buffer posted, one frame sent to the other station."""
    frontend.start(queue_size=64)
    frontend.submit(0, [], [NET_HDR.size + 1514])
    frame = MAC_B + bytes.fromhex(NIC_MAC.replace(":", "")) + b"\x08\x00" + b"pvcore" * 10
    frontend.request(1, [NET_HDR.pack(0, 0, 0, 0, 0, 0, 1), frame], [])


def _check_sources() -> None:
    nic = bytes.fromhex(NIC_MAC.replace(":", ""))
    capture = _state["capture"]
    frames = loop_thread().call(lambda: [capture.frames.pop() for _ in range(len(capture.frames))])
    for frame in frames:
        if frame[6:12] != nic:
            raise InvariantError(f"a frame from source {frame[6:12].hex()} left the NIC {NIC_MAC}")


def setup() -> None:
    """A NIC and a capture station on one switch; the NIC behind a vhost-user front door."""
    device = create_net_device({"mac": NIC_MAC, "switch": "fuzz-vhost"}, name="fuzz-nic")
    capture = CapturePort()
    loop_thread().call(get_switch("fuzz-vhost").attach, capture)
    _state["capture"] = capture
    _state["target"] = VhostTarget(device, good_session, after_input=_check_sources)


def one_input(data: bytes) -> None:
    """Replay one frontend session."""
    _state["target"].one_input(data)


def seeds() -> dict[str, bytes]:
    """The Python frontend's session as recorded."""
    device = create_net_device({"mac": NIC_MAC, "switch": "fuzz-record"}, name="record-nic")
    return {"qemu-session": record_session(good_session, device)}
