"""The xen plugin passes the conformance kit (``pytest --pvcore-plugin=xen``) on the SIMULATED host."""

from __future__ import annotations

from pathlib import Path

from pvcore.testing.kit import run_kit

NOT_APPLICABLE = {
    "test_device_class_serves_end_to_end[rng]",
    "test_suppression_on_the_ring",
    "test_hostile_input_fails_one_device_not_the_daemon",
}
"""What may skip on xen: classes it does not claim, and the kit's virtio-ring checks (Xen's PV rings are not virtio)."""


def test_xen_passes_the_conformance_kit(tmp_path: Path) -> None:
    run = run_kit("xen", tmp_path, peer="xen_conformance_peer:conformance_peer", pythonpath=[Path(__file__).parent])
    assert run.returncode == 0 and not run.failures(), run.output
    assert len(run.outcomes) == 16, run.output
    skipped = {name for name, outcome in run.outcomes.items() if outcome == "skipped"}
    assert skipped <= NOT_APPLICABLE, run.output
    assert set(run.outcomes.values()) - {"passed", "skipped"} == set(), run.output
    for device_class in ("block", "net", "console"):
        assert run.outcomes[f"test_device_class_serves_end_to_end[{device_class}]"] == "passed", run.output
