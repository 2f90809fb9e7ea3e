"""Fixtures for the lpar plugin's tests: a background event loop, a registry, QEMU device trees."""

from __future__ import annotations

import pvcore_lpar.plugin
import pvcore_scsi.plugin
import pytest

from pvcore.devices import classes
from pvcore.registry import Registry
from pvcore.testing.fixtures import loop_thread  # noqa: F401  (a fixture)


@pytest.fixture
def registry() -> Registry:
    """A registry with the core's four device classes, the scsi class plugin and the lpar plugin."""
    registry = Registry()
    for name in ("block", "net", "console", "rng"):
        assert registry.register(getattr(classes, name), name=name).error is None
    assert registry.register(pvcore_scsi.plugin, name="scsi").error is None
    record = registry.register(pvcore_lpar.plugin, name="lpar")
    assert record.error is None, record.error
    return registry
