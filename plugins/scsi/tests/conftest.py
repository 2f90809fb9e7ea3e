"""Fixtures of the scsi class's tests: a disc image and a CD-ROM target on a loopback ring."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from pvcore.contract import DeviceConfig
from pvcore.testing.loopback import Loopback
from pvcore_scsi.plugin import build_units, close_units
from pvcore_scsi.virtio_scsi import VirtioScsi
from scsi_driver import DISC_BLOCKS


@pytest.fixture
def disc(tmp_path: Path) -> Path:
    """A 64-block (128 KiB) disc image of random bytes."""
    path = tmp_path / "disc.iso"
    path.write_bytes(os.urandom(DISC_BLOCKS * 2048))
    return path


@pytest.fixture
def disk_image(tmp_path: Path) -> Path:
    """A 1 MiB raw disk image of random bytes."""
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(1 << 20))
    return path


@pytest.fixture
def target(disc: Path, disk_image: Path) -> Iterator[tuple[Loopback, VirtioScsi]]:
    """A target with a CD-ROM at LUN 0 and a disk at LUN 1, served on a loopback ring."""
    units = build_units(DeviceConfig("scsi", "t0", {"media": [str(disc)], "disk": [str(disk_image)]}))
    device = VirtioScsi(units, name="t0")
    try:
        with Loopback(device, name="t0") as lb:
            yield lb, device
    finally:
        close_units(units)
