"""Fixtures for the lpar plugin's tests: a background event loop, a registry, QEMU device trees.

The tests run from a checkout (``python3 -m pytest plugins/lpar/tests`` in the
repository root) without installing the plugin: the plugin directory is put on
``sys.path`` when ``pvcore_lpar`` is not importable.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

import pytest

PLUGIN_DIR = Path(__file__).resolve().parents[1]
REPO_DIR = PLUGIN_DIR.parents[1]
for needed, directory in (("pvcore", REPO_DIR), ("pvcore_lpar", PLUGIN_DIR)):
    if importlib.util.find_spec(needed) is None:
        sys.path.insert(0, str(directory))

from pvcore.devices import classes  # noqa: E402
from pvcore.registry import Registry  # noqa: E402
from pvcore.testing.loopthread import LoopThread  # noqa: E402

import pvcore_lpar.plugin  # noqa: E402

T = TypeVar("T")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "guest: boots a real Linux guest under QEMU TCG (slow; needs qemu-system-ppc64)")


@pytest.fixture
def loop_thread() -> Iterator[LoopThread]:
    """A fresh background event loop."""
    runner = LoopThread()
    try:
        yield runner
    finally:
        runner.close()


@pytest.fixture
def registry() -> Registry:
    """A registry with the core's four device classes and the lpar plugin."""
    registry = Registry()
    for name in ("block", "net", "console", "rng"):
        assert registry.register(getattr(classes, name), name=name).error is None
    record = registry.register(pvcore_lpar.plugin, name="lpar")
    assert record.error is None, record.error
    return registry
