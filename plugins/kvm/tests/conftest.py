"""Fixtures for the kvm plugin's tests: a background event loop and a plugin registry.

The tests run from a checkout (``python3 -m pytest plugins/kvm/tests`` in the
repository root) without installing the plugin: the plugin directory is put on
``sys.path`` when ``pvcore_kvm`` is not importable.
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
for needed, directory in (("pvcore", REPO_DIR), ("pvcore_kvm", PLUGIN_DIR)):
    if importlib.util.find_spec(needed) is None:
        sys.path.insert(0, str(directory))

import pvcore_kvm.plugin

from pvcore.registry import Registry
from pvcore.testing.loopthread import LoopThread

T = TypeVar("T")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "guest: boots a real Linux guest under QEMU TCG (slow; needs qemu-system-*)")


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
    """A registry with only the kvm plugin registered."""
    registry = Registry()
    record = registry.register(pvcore_kvm.plugin, name="kvm")
    assert record.error is None, record.error
    return registry
