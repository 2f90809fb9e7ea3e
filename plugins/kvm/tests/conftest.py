"""Fixtures for the kvm plugin's tests: a background event loop and a plugin registry."""

from __future__ import annotations

import pvcore_kvm.plugin
import pytest

from pvcore.registry import Registry
from pvcore.testing.fixtures import loop_thread  # noqa: F401  (a fixture)


@pytest.fixture
def registry() -> Registry:
    """A registry with only the kvm plugin registered."""
    registry = Registry()
    record = registry.register(pvcore_kvm.plugin, name="kvm")
    assert record.error is None, record.error
    return registry
