"""pvcore on a REAL Xen 4.17 (QEMU TCG): one boot, every check of ``CHECKS``.

The harness is :mod:`pvcore_xen.testing.real_xen` (its docstring says how a
boot runs). To add a check to the same boot, append a
:class:`~pvcore_xen.testing.real_xen.Check` to ``CHECKS`` and write tests that
read its outputs from the ``xen_run`` fixture (``xen_run.dom0["NAME.PHASE"]``,
``xen_run.domu["NAME"]``).
"""

from __future__ import annotations

import pytest

from pvcore_xen.testing.real_xen import Check, XenRun, boot, unavailable_reason
from real_xen_netif import (  # noqa: F401 (netif's tests run on this module's boot)
    NETIF,
    test_a_forged_mac_gets_nothing_through,
    test_netfront_frames_cross_pvcores_switch_both_ways,
)

pytestmark = pytest.mark.guest

HOST_LAYER = Check(
    name="dom0",
    dom0_before=r"""
cat /proc/xen/capabilities
ls /dev/xen
$PVCORE plugins
""",
)

CHECKS = [HOST_LAYER, NETIF]


@pytest.fixture(scope="module")
def xen_run(tmp_path_factory) -> XenRun:
    """Boot Xen once with every check of ``CHECKS``."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    run = boot(CHECKS, tmp_path_factory.mktemp("real-xen"))
    assert run.completed, f"the Xen boot did not finish in time\n{run.describe()}"
    return run


def test_pvcore_runs_in_dom0_of_a_real_xen(xen_run):
    before = xen_run.dom0["dom0.dom0_before"]
    assert before.rc == 0, before.output
    assert "control_d" in before.output
    assert "xen" in before.output and "ok" in before.output
    for node in ("evtchn", "gntdev", "xenbus"):
        assert node in before.output
