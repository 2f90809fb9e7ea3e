"""The conformance kit: it passes the worked example, and it fails plugins that break the contract.

Each run is ``pytest --pvcore-plugin=NAME`` in a subprocess
(:func:`pvcore.testing.kit.run_kit`). The example is installed by unpacking
its wheel into a directory on ``PYTHONPATH``; the broken variants are small
modules re-exporting the example's hooks with one fault each, registered by
a hand-written ``.dist-info``.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from pvcore.testing.conformance.install import build_wheel
from pvcore.testing.kit import run_kit

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "pvcore-loophv"
EXAMPLE_PEER = "pvcore_loophv.testing:conformance_peer"

NOISY = '''
"""loophv, except that every completion interrupts the guest even when it suppressed interrupts."""
from pvcore.ring.session import VirtioSession
from pvcore_loophv import transport
from pvcore_loophv.plugin import *  # noqa: F403


class NoisySession(VirtioSession):
    def start_queue(self, index):
        queue = super().start_queue(index)
        publish = queue.flush

        def flush(**options):
            publish(**options)
            if queue.call is not None:
                queue.call.signal()

        queue.flush = flush
        return queue


transport.VirtioSession = NoisySession
'''

RUDE = '''
"""loophv, except that detect raises on a host without loophv and info claims a notification primitive it lacks."""
from pvcore.contract import Detection, PluginInfo
from pvcore.hookspecs import hookimpl
from pvcore_loophv import plugin
from pvcore_loophv.plugin import pvcore_front_door, pvcore_probe  # noqa: F401


@hookimpl
def pvcore_plugin_info():
    info = plugin.pvcore_plugin_info()
    return PluginInfo(name="rudehv", contract=info.contract, hypervisor=info.hypervisor,
                      primitives=info.primitives | {"notification"}, device_classes=info.device_classes)


@hookimpl
def pvcore_detect(host):
    host.path("/run/loophv").stat()
    return Detection("loophv", 70, "/run/loophv is there")
'''

TAPE = '''
"""A device-class plugin of a third party's: the tape class (never served: only its name matters here)."""
from pvcore.contract import CONTRACT_VERSION, DeviceClass, PluginInfo
from pvcore.hookspecs import hookimpl


@hookimpl
def pvcore_plugin_info():
    return PluginInfo(name="tape", contract=CONTRACT_VERSION, device_classes={"tape"})


@hookimpl
def pvcore_device_classes():
    return [DeviceClass("tape", "a tape drive", {}, None)]
'''

CLASSY = '''
"""loophv, also claiming the installed tape class and a disc class no plugin offers."""
from pvcore.contract import PluginInfo
from pvcore.hookspecs import hookimpl
from pvcore_loophv import plugin
from pvcore_loophv.plugin import pvcore_detect, pvcore_front_door, pvcore_probe  # noqa: F401


@hookimpl
def pvcore_plugin_info():
    info = plugin.pvcore_plugin_info()
    return PluginInfo(name="classyhv", contract=info.contract, hypervisor=info.hypervisor,
                      primitives=info.primitives, device_classes=info.device_classes | {"tape", "disc"})
'''


def register(site: Path, distribution: str, entry_points: dict[str, str]) -> None:
    """Make ``entry_points`` (group pvcore.plugins) visible to importlib.metadata from ``site``."""
    info = site / f"{distribution}-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {distribution}\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text(
        "[pvcore.plugins]\n" + "".join(f"{name} = {target}\n" for name, target in entry_points.items())
    )


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A directory holding the example plugin as its wheel installs it."""
    directory = tmp_path / "site"
    with zipfile.ZipFile(build_wheel(EXAMPLE, tmp_path / "wheels")) as wheel:
        wheel.extractall(directory)
    return directory


def test_the_worked_example_passes_every_test(site: Path, tmp_path: Path) -> None:
    run = run_kit("loophv", tmp_path, pythonpath=[site])
    assert run.returncode == 0 and not run.failures(), run.output
    assert len(run.outcomes) == 16 and set(run.outcomes.values()) == {"passed"}, run.output


def test_interrupts_despite_suppression_fail_the_kit(site: Path, tmp_path: Path) -> None:
    (site / "noisyhv.py").write_text(textwrap.dedent(NOISY))
    register(site, "noisyhv", {"noisyhv": "noisyhv"})
    run = run_kit("noisyhv", tmp_path, peer=EXAMPLE_PEER, pythonpath=[site])
    assert run.returncode == 1
    assert run.failures() == ["test_suppression_on_the_ring"], run.output
    assert "the device interrupted a guest that suppressed interrupts" in run.output


def test_broken_detect_and_a_false_claim_fail_the_kit(site: Path, tmp_path: Path) -> None:
    (site / "rudehv.py").write_text(textwrap.dedent(RUDE))
    register(site, "rudehv", {"rudehv": "rudehv"})
    run = run_kit("rudehv", tmp_path, peer=EXAMPLE_PEER, pythonpath=[site])
    assert run.failures() == ["test_detect_says_none_on_an_empty_host",
                              "test_plugin_describes_itself_within_the_contract"], run.output
    assert "primitive 'notification' is claimed but pvcore_open_notifier is not implemented" in run.output
    assert "FileNotFoundError" in run.output
    assert run.outcomes["test_device_class_serves_end_to_end[block]"] == "passed"


def test_a_class_an_installed_class_plugin_offers_may_be_claimed(site: Path, tmp_path: Path) -> None:
    (site / "tapeclass.py").write_text(textwrap.dedent(TAPE))
    (site / "classyhv.py").write_text(textwrap.dedent(CLASSY))
    register(site, "tapeclass", {"tape": "tapeclass"})
    register(site, "classyhv", {"classyhv": "classyhv"})
    run = run_kit("classyhv", tmp_path, peer=EXAMPLE_PEER, pythonpath=[site])
    assert run.failures() == ["test_plugin_describes_itself_within_the_contract"], run.output
    assert "claims unknown device classes ['disc']" in run.output


def test_a_plugin_without_a_peer_is_told_what_to_write(site: Path, tmp_path: Path) -> None:
    register(site, "bare", {"bare": "pvcore_loophv.plugin"})
    run = run_kit("bare", tmp_path, pythonpath=[site])
    assert "test_detect_finds_the_hypervisor_where_present" in run.failures()
    assert run.outcomes["test_detect_says_none_on_an_empty_host"] == "passed"
    assert "plugin bare has no conformance peer: write pvcore_bare.testing.conformance_peer" in run.output


def test_a_plugin_that_is_not_installed_is_reported(tmp_path: Path) -> None:
    run = run_kit("nosuchhv", tmp_path)
    assert "no entry point 'nosuchhv' in group pvcore.plugins: is the plugin installed" in run.output
    assert run.returncode == 1


def test_without_the_option_the_kit_adds_nothing(tmp_path: Path) -> None:
    (tmp_path / "test_own.py").write_text("def test_own():\n    assert True\n")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "pvcore.testing.kit", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
        env={"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1", "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed" in done.stdout
