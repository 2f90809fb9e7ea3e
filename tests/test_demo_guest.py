"""`pvcore demo`: the README's main job, end to end with real QEMU guests (about 15 s).

The demo starts `pvcore serve`, boots two guests and must report every device
as checked; afterwards no work directory, daemon or QEMU of the demo may be
left. Without QEMU on PATH it must fail with one line naming the apt-get
command.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import pytest


def pvcore_demo(env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pvcore.cli", "demo"], capture_output=True, text=True, timeout=timeout, env=env
    )


def test_demo_without_qemu_names_the_package() -> None:
    done = pvcore_demo(env=dict(os.environ, PATH="/nonexistent"), timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "pvcore demo: error: qemu-system-x86_64 not found: "
        "install it with `sudo apt-get install -y qemu-system-x86` (make demo does)"
    )


@pytest.mark.guest
def test_demo_guest_sees_every_device_served_and_cleans_up() -> None:
    done = pvcore_demo()
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    report = {line.split()[0]: line.split()[1] for line in out.split("What vm1 saw")[1].splitlines()[1:5]}
    assert report == {"disk": "ok", "entropy": "ok", "network": "ok", "console": "ok"}, out
    assert "pvcore serve --hypervisor kvm" in out
    assert "| vm1: goodbye" in out
    work = out.split("work directory ")[1].split(";")[0]
    assert work.startswith("/tmp/pvcore-demo-") and not glob.glob(work)
    leftover = subprocess.run(["pgrep", "-f", work], capture_output=True, text=True).stdout
    assert leftover == ""
