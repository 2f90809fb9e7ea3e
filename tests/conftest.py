"""Fixtures shared by the core's tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pvcore.testing.loopthread import LoopThread


@pytest.fixture
def loop_thread() -> Iterator[LoopThread]:
    """A fresh background event loop, as the daemon's loop would run a front door."""
    runner = LoopThread()
    try:
        yield runner
    finally:
        runner.close()
