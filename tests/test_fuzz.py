"""Every fuzz target (fuzz/, docs/fuzzing.md) runs for a short fixed time in CI and must find nothing.

``make fuzz`` runs them for FUZZ_SECONDS each; here each gets
:data:`CI_SECONDS` over its seed corpus, which is enough to replay the
seeds and a few hundred to many thousand mutations per target.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fuzz.harness import Baseline, InvariantError
from fuzz.run import CORPUS_DIR, TARGETS
from fuzz.targets.egd import _check_reply

ROOT = Path(__file__).resolve().parent.parent
CI_SECONDS = 4


@pytest.mark.parametrize("target", TARGETS)
def test_fuzz_target_finds_nothing_in_a_short_run(target, tmp_path):
    assert any((CORPUS_DIR / target).iterdir()), f"{target} has no seed corpus; run python -m fuzz.seeds {target}"
    result = subprocess.run(
        [sys.executable, "-m", "fuzz.run", "--seconds", str(CI_SECONDS), "--artifacts", str(tmp_path),
         "--json", str(tmp_path / "figures.json"), target],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    figures = json.loads((tmp_path / "figures.json").read_text())[0]
    assert figures["ok"], f"{target} found something:\n{result.stdout}\n{figures.get('log_tail', '')}"
    assert figures["executions"] > 0 and figures["cov"], f"{target} did not run: {figures}"


def test_leak_check_names_a_leaked_fd():
    baseline = Baseline(settle=0.1)
    fd = os.open(os.devnull, os.O_RDONLY)
    try:
        with pytest.raises(InvariantError, match="fds"):
            baseline.check()
    finally:
        os.close(fd)
    baseline.check()


def test_egd_reply_model_refuses_a_short_or_long_reply():
    _check_reply(b"\x02\x04\x00", b"abcd" + b"\0\0\0\x10")
    with pytest.raises(InvariantError):
        _check_reply(b"\x02\x04", b"abc")
    with pytest.raises(InvariantError):
        _check_reply(b"\x01\x04", b"\x05abcde")
