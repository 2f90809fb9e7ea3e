"""Small plugins, large common code: the in-tree plugins stay within their size budgets.

The hvc model pvcore follows has a large common layer and backends of a few
hundred lines. When a plugin outgrows its budget, something common is in the
wrong place: move it into the core rather than raise the number.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

BUDGETS = {
    "kvm": (REPO / "plugins/kvm/pvcore_kvm", (), 400),
    "lpar": (REPO / "plugins/lpar/pvcore_lpar", (), 400),
    "xen": (REPO / "plugins/xen/pvcore_xen", ("xenstore.py", "xs_wire.py"), 1500),
}
"""Per plugin: its package, the files outside the budget (xen's xenstore wire client), the most code lines.

xen's is larger because real Xen guests speak Xen's own PV protocols, not
virtio: the netif and blkif ring formats and their grant-copying back ends
are the plugin's by design (shared/DESIGN.md, "Real Xen speaks Xen's PV
protocols"); the switch, the block engine and the console engine behind
them stay the core's. 1450 became 1500 for blkif's multi-page rings and
multi-queue (about 40 lines: reading and checking ``ring-page-order``, the
``ring-refN`` and ``queue-N`` nodes, one gntdev mapping per ring, a ring
and channel per queue); the mapped ring is a region of the core's
GuestMemory, and the block engine behind the queues is the core's.
"""


def code_lines(path: Path) -> int:
    """Lines of ``path`` that are code: not blank, not a comment, not part of a docstring."""
    source = path.read_text()
    docstrings: set[int] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            docstrings.update(range(node.lineno, (node.end_lineno or node.lineno) + 1))
    return sum(
        1
        for number, line in enumerate(source.splitlines(), 1)
        if line.strip() and not line.strip().startswith("#") and number not in docstrings
    )


def serving_files(package: Path, excluded: tuple[str, ...]) -> list[Path]:
    """The plugin's serving modules: everything but its testing subpackage and ``excluded``."""
    return [
        path for path in sorted(package.rglob("*.py"))
        if "testing" not in path.relative_to(package).parts[:-1] and path.name != "testing.py"
        and path.name not in excluded
    ]


@pytest.mark.parametrize("plugin", sorted(BUDGETS))
def test_plugin_serving_code_stays_within_its_budget(plugin: str) -> None:
    package, excluded, budget = BUDGETS[plugin]
    sizes = {path.relative_to(package).as_posix(): code_lines(path) for path in serving_files(package, excluded)}
    total = sum(sizes.values())
    print(f"{plugin}: {total} code lines {sizes}")
    assert total < budget, f"plugin {plugin} has {total} code lines (budget {budget}): {sizes}"


def test_the_core_libvirt_layer_writes_no_hypervisor_xml() -> None:
    for path in (REPO / "pvcore/libvirt").rglob("*.py"):
        assert "vhostuser" not in path.read_text(), f"{path} holds QEMU/KVM device XML: it belongs to the plugin"


def test_core_transports_name_no_hypervisor() -> None:
    for path in (REPO / "pvcore/transports").rglob("*.py"):
        text = path.read_text().lower()
        for hypervisor in ("kvm", "pvcore_xen", "lpar"):
            assert hypervisor not in text, f"{path} mentions {hypervisor}: core transports are hypervisor-neutral"
