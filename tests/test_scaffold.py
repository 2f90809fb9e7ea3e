"""``pvcore new-plugin NAME``: a skeleton that installs, registers, runs the kit and fails where work is left."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pvcore.scaffold import ScaffoldError, new_plugin, next_steps
from pvcore.testing.conformance.install import build_wheel
from pvcore.testing.kit import run_kit

LEFT_TO_DO = {
    "test_detect_says_none_on_an_empty_host": "pvcore_detect is not written yet (docs/porting.md, step 4: detect)",
    "test_detect_finds_the_hypervisor_where_present": "does not implement present_host",
    "test_probe_lists_device_slots": "does not implement probe_host",
}
"""What the kit reports for a fresh skeleton: the author's own work, and nothing else."""

NOT_APPLICABLE = {
    "test_probe_of_a_corrupt_source_is_a_clean_error",
    "test_notification_in_both_directions",
    "test_memory_is_shared_and_bounds_checked",
    "test_suppression_on_the_ring",
}

DETECT_AND_PROBE = '''
@hookimpl
def pvcore_detect(host: HostContext) -> Detection | None:
    """The host runs seahv when /etc/seahv exists."""
    return Detection(HYPERVISOR, 50, "/etc/seahv exists") if host.path("/etc/seahv").exists() else None


@hookimpl
def pvcore_probe(host: HostContext) -> list[DeviceSlot]:
    """One console per name listed in /etc/seahv."""
    names = host.path("/etc/seahv").read_text().split()
    return [DeviceSlot(HYPERVISOR, "console", f"/run/seahv/{name}.sock", name) for name in names]
'''

PEER_HOSTS = '''
    def present_host(self, root: Path) -> HostContext:
        """/etc/seahv exists."""
        (root / "etc").mkdir(exist_ok=True)
        (root / "etc" / "seahv").write_text("vm1\\n")
        return HostContext(root=root, environ={})

    def probe_host(self, root: Path) -> HostContext:
        """/etc/seahv lists a guest."""
        return self.present_host(root)
'''


def install(project: Path, target: Path) -> None:
    """pip-install ``project``'s wheel into ``target`` (offline, no dependencies)."""
    wheel = build_wheel(project, target.parent / "wheels")
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target",
                           str(target), str(wheel)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_names_are_checked(tmp_path: Path) -> None:
    for bad in ("Bad", "1hv", "with-dash", "class", "kvm", "rng", ""):
        with pytest.raises(ScaffoldError):
            new_plugin(bad, tmp_path)
    new_plugin("seahv", tmp_path)
    with pytest.raises(ScaffoldError, match="exists already"):
        new_plugin("seahv", tmp_path)


def test_skeleton_installs_registers_and_fails_the_kit_only_where_work_is_left(tmp_path: Path) -> None:
    root = new_plugin("seahv", tmp_path)
    assert "pytest --pvcore-plugin=seahv" in next_steps(root, "seahv")
    assert sorted(str(path.relative_to(root)) for path in root.rglob("*") if path.is_file()) == [
        "README.md", "pvcore_seahv/__init__.py", "pvcore_seahv/plugin.py", "pvcore_seahv/testing.py", "pyproject.toml"]
    site = tmp_path / "site"
    install(root, site)

    listed = subprocess.run([sys.executable, "-m", "pvcore.cli", "plugins"], capture_output=True, text=True, timeout=60,
                            env=dict(os.environ, PYTHONPATH=str(site)), cwd=tmp_path)
    assert "seahv 0.1.0 (pvcore-seahv): ok\n  hypervisor: seahv\n" in listed.stdout, listed.stdout + listed.stderr

    run = run_kit("seahv", tmp_path, pythonpath=[site])
    assert set(run.failures()) == set(LEFT_TO_DO), run.output
    for message in LEFT_TO_DO.values():
        assert message in run.output
    assert {name for name, outcome in run.outcomes.items() if outcome == "skipped"} == NOT_APPLICABLE, run.output
    assert run.outcomes["test_device_class_serves_end_to_end[block]"] == "passed"

    plugin = root / "pvcore_seahv" / "plugin.py"
    text = plugin.read_text()
    start, end = text.index("@hookimpl\ndef pvcore_detect"), text.index("@hookimpl\ndef pvcore_front_door")
    plugin.write_text(text[:start] + DETECT_AND_PROBE.lstrip() + "\n\n" + text[end:])
    testing = root / "pvcore_seahv" / "testing.py"
    text = testing.read_text().replace("from pvcore.testing", "from pvcore.contract import HostContext\nfrom pvcore.testing")
    marker = "\n\nconformance_peer = Peer()"
    testing.write_text(text.replace(marker, PEER_HOSTS.rstrip() + "\n" + marker))
    done = tmp_path / "done"
    done.mkdir()
    install(root, done / "site")
    finished = run_kit("seahv", done, pythonpath=[done / "site"])
    assert finished.returncode == 0 and not finished.failures(), finished.output
