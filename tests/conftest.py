"""Fixtures shared by the core's tests."""

from __future__ import annotations

from pvcore.testing.fixtures import loop_thread  # noqa: F401  (a fixture)
