"""The kvm plugin passes the conformance kit (``pytest --pvcore-plugin=kvm``), run in a subprocess."""

from __future__ import annotations

from pathlib import Path

from pvcore.testing.kit import run_kit

EXPECTED_TESTS = 16


def test_kvm_passes_the_conformance_kit(tmp_path: Path) -> None:
    run = run_kit("kvm", tmp_path, peer="kvm_conformance_peer:conformance_peer", pythonpath=[Path(__file__).parent])
    assert run.returncode == 0 and not run.failures(), run.output
    assert len(run.outcomes) == EXPECTED_TESTS, run.output
    assert set(run.outcomes.values()) == {"passed"}, run.output
