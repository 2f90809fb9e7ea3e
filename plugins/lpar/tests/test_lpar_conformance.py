"""The lpar plugin passes the conformance kit (``pytest --pvcore-plugin=lpar``), run in a subprocess."""

from __future__ import annotations

from pathlib import Path

from pvcore.testing.kit import run_kit

NOT_APPLICABLE = {
    "test_notification_in_both_directions",
    "test_memory_is_shared_and_bounds_checked",
    "test_suppression_on_the_ring",
}
"""QEMU pseries owns the PAPR queues: lpar supplies no memory or notification primitive and no ring."""


def test_lpar_passes_the_conformance_kit(tmp_path: Path) -> None:
    run = run_kit("lpar", tmp_path, peer="lpar_conformance_peer:conformance_peer", pythonpath=[Path(__file__).parent])
    assert run.returncode == 0 and not run.failures(), run.output
    skipped = {name for name, outcome in run.outcomes.items() if outcome == "skipped"}
    assert skipped == NOT_APPLICABLE, run.output
    assert len(run.outcomes) == 16, run.output
