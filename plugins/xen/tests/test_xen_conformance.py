"""The xen plugin passes the conformance kit (``pytest --pvcore-plugin=xen``) on the SIMULATED host."""

from __future__ import annotations

from pathlib import Path

from pvcore.testing.kit import run_kit


def test_xen_passes_the_conformance_kit(tmp_path: Path) -> None:
    run = run_kit("xen", tmp_path, peer="xen_conformance_peer:conformance_peer", pythonpath=[Path(__file__).parent])
    assert run.returncode == 0 and not run.failures(), run.output
    assert len(run.outcomes) == 16, run.output
    assert set(run.outcomes.values()) == {"passed"}, run.output
