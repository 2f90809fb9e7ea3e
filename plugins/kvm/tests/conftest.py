"""Fixtures for the kvm plugin's tests: a background event loop and a plugin registry."""

from __future__ import annotations

from collections.abc import Iterator

import pvcore_kvm.plugin
import pytest

from pvcore.registry import Registry
from pvcore.testing.loopthread import LoopThread


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
