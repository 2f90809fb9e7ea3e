"""pytest fixtures the core's and the plugins' test suites share; a ``conftest.py`` imports the ones it uses."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pvcore.testing.loopthread import LoopThread


@pytest.fixture
def loop_thread() -> Iterator[LoopThread]:
    """A fresh background event loop, as the daemon's loop would run a front door; closed after the test."""
    runner = LoopThread()
    try:
        yield runner
    finally:
        runner.close()
