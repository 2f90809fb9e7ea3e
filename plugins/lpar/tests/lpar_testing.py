"""Helpers shared by the lpar plugin's tests (a module name of its own, so that
every plugin's tests can run in one pytest session)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest


def dump_pseries_dtb(path: Path, *device_args: str) -> Path:
    """The device tree QEMU's pseries machine generates for ``device_args`` (``-M pseries,dumpdtb=``)."""
    qemu = shutil.which("qemu-system-ppc64")
    if qemu is None:
        pytest.fail("qemu-system-ppc64 not found: apt-get install -y qemu-system-ppc")
    command = ["timeout", "-k", "5", "60", qemu, "-M", f"pseries,dumpdtb={path}", "-accel", "tcg",
               "-nographic", "-m", "512", *device_args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=90)
    assert path.exists(), f"QEMU wrote no device tree (rc={result.returncode}): {result.stderr}"
    return path
