"""vhost-user message sequences with fds into a real virtio-blk device over a 1 MiB file (see _vhost_user)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from fuzz.harness import InvariantError
from fuzz.targets._vhost_user import VhostTarget, record_session
from pvcore.devices.block import create_block_device
from pvcore.devices.block.virtio_blk import (
    REQUEST_HEADER,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
)
from pvcore.testing.vhost_user_frontend import VhostUserFrontend

SIZE = 1 << 20
_state: dict[str, object] = {}


def _device(name: str):
    image = Path(tempfile.mkdtemp(prefix="pvcore-fuzz-blk-")) / "disk.img"
    image.write_bytes(os.urandom(SIZE))
    _backend, device = create_block_device({"path": str(image)}, name=name)
    return image, device


def good_session(frontend: VhostUserFrontend) -> None:
    """QEMU's handshake, then a write, a read of it back, a flush and GET_ID."""
    frontend.start(queue_size=64, inflight=True)
    data = bytes(range(256)) * 16
    write = frontend.request(0, [REQUEST_HEADER.pack(VIRTIO_BLK_T_OUT, 0, 8), data], [1])
    read = frontend.request(0, [REQUEST_HEADER.pack(VIRTIO_BLK_T_IN, 0, 8)], [4096, 1])
    frontend.request(0, [REQUEST_HEADER.pack(VIRTIO_BLK_T_FLUSH, 0, 0)], [1])
    frontend.request(0, [REQUEST_HEADER.pack(VIRTIO_BLK_T_GET_ID, 0, 0)], [20, 1])
    if write.data != bytes([VIRTIO_BLK_S_OK]) or read.data != data + bytes([VIRTIO_BLK_S_OK]):
        raise InvariantError("a well-behaved frontend's write and read back did not round-trip")


def _check_size() -> None:
    if _state["image"].stat().st_size != SIZE:
        raise InvariantError(f"the disk file grew to {_state['image'].stat().st_size} bytes (capacity {SIZE})")


def setup() -> None:
    """A block device on a 1 MiB file behind a vhost-user front door."""
    image, device = _device("fuzz-blk")
    _state["image"] = image
    _state["target"] = VhostTarget(device, good_session, after_input=_check_size)


def one_input(data: bytes) -> None:
    """Replay one frontend session."""
    _state["target"].one_input(data)


def seeds() -> dict[str, bytes]:
    """The Python frontend's session (QEMU's handshake with inflight, the requests) as recorded."""
    _image, device = _device("record-blk")
    return {"qemu-session": record_session(good_session, device)}
