"""vhost-user message sequences with fds into a real virtio-rng device (see _vhost_user)."""

from __future__ import annotations

from fuzz.harness import InvariantError
from fuzz.targets._vhost_user import VhostTarget, record_session
from pvcore.devices.rng import create_rng_device
from pvcore.testing.vhost_user_frontend import VhostUserFrontend

_state: dict[str, object] = {}


def good_session(frontend: VhostUserFrontend) -> None:
    """QEMU's handshake and two entropy requests."""
    frontend.start(queue_size=64)
    for size in (64, 16):
        used = frontend.request(0, [], [size])
        if used.written != size:
            raise InvariantError(f"a {size}-byte entropy request got {used.written} bytes")


def setup() -> None:
    """An rng device behind a vhost-user front door."""
    _state["target"] = VhostTarget(create_rng_device({}, name="fuzz-rng"), good_session)


def one_input(data: bytes) -> None:
    """Replay one frontend session."""
    _state["target"].one_input(data)


def seeds() -> dict[str, bytes]:
    """The Python frontend's session as recorded."""
    return {"qemu-session": record_session(good_session, create_rng_device({}, name="record-rng"))}
