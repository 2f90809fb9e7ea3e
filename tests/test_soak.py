"""The soak (bench/soak.py) for 60 s in CI: 16 devices on kvm and lpar doors under mixed load and misbehaving clients,
and a real guest checking what it writes to a 17th.

``make soak`` runs it for 10 minutes. It fails if the daemon dies, a
well-behaved client sees an error or wrong data, the daemon logs a
traceback, or RSS or fds grow in the second half.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CI_SECONDS = 60


def test_soak_for_a_minute_serves_every_client_with_flat_memory_and_fds(tmp_path):
    figures_file = tmp_path / "soak.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "soak.py"), "--seconds", str(CI_SECONDS), "--interval", "10",
         "--json", str(figures_file), "--guest"],
        capture_output=True, text=True, timeout=CI_SECONDS + 240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    figures = json.loads(figures_file.read_text())
    assert figures["devices"] == 17 and figures["daemon_alive"]
    guest = figures["guest"]
    assert guest["returncode"] == 0 and guest["bad"] == "0" and int(guest["rounds"]) > 0, guest
    moved = figures["totals_mb"]
    for kind in ("vhost-blk", "vhost-net", "vhost-rng", "nbd", "stream", "egd", "fifo", "chardev"):
        assert moved.get(kind, 0) > 0, f"no {kind} traffic in the soak: {moved}"
