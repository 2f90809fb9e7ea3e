"""Run fuzz targets with atheris (libFuzzer): ``python -m fuzz.run --seconds N [TARGET...]``.

Each target runs in its own process for N seconds over a scratch copy of
its seed corpus (``fuzz/corpus/<target>/``; new inputs are not written back
into the repository). The summary gives per target the executions, the
executions per second, the coverage libFuzzer reached (``cov``: edges of
the instrumented pvcore code, ``ft``: features) and the verdict; a crash,
a hang or a broken invariant leaves its input under ``--artifacts`` and
makes the exit status 1.

``python -m fuzz.run --one TARGET [libFuzzer options...]`` is one target's
process (what the summary spawns).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGETS = (
    "vhost_user_blk",
    "vhost_user_net",
    "vhost_user_rng",
    "virtqueue",
    "nbd",
    "egd",
    "netdev_stream",
    "chardev",
    "xenstore",
    "grants",
    "devicetree",
    "config",
    "libvirt_metadata",
)
"""Every target, one per parser (a module of :mod:`fuzz.targets`)."""

FUZZ_DIR = Path(__file__).resolve().parent
CORPUS_DIR = FUZZ_DIR / "corpus"
MAX_LEN = 65536


def run_one(target: str, libfuzzer_args: list[str]) -> None:
    """Instrument pvcore, import ``target`` and hand it to atheris (does not return).

    Always the pure-Python build of pvcore's hot modules (``PVCORE_PURE_PYTHON=1``,
    set before pvcore is imported): atheris instruments Python bytecode, and a
    compiled module would give libFuzzer no coverage to steer by.
    """
    os.environ["PVCORE_PURE_PYTHON"] = "1"
    import atheris

    with atheris.instrument_imports(include=["pvcore", "pvcore_xen", "pvcore_lpar"]):
        import importlib

        module = importlib.import_module(f"fuzz.targets.{target}")
    module.setup()
    atheris.Setup([sys.argv[0], *libfuzzer_args], module.one_input)
    atheris.Fuzz()


_DONE = re.compile(r"#(\d+)\s+DONE\s+cov: (\d+) ft: (\d+)")
_LAST = re.compile(r"#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+)")


def campaign(target: str, seconds: int, artifacts: Path) -> dict[str, object]:
    """Fuzz ``target`` for ``seconds`` in a child process; return its figures."""
    artifacts.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"pvcore-fuzz-{target}-") as scratch:
        work = Path(scratch) / "corpus"
        seeds = CORPUS_DIR / target
        shutil.copytree(seeds, work) if seeds.is_dir() else work.mkdir()
        command = [
            sys.executable, "-m", "fuzz.run", "--one", target, f"-max_total_time={seconds}", f"-max_len={MAX_LEN}",
            "-timeout=20", "-rss_limit_mb=4096", f"-artifact_prefix={artifacts}/{target}-", "-print_final_stats=1",
            str(work),
        ]
        started = time.monotonic()
        result = subprocess.run(
            command, cwd=FUZZ_DIR.parent, capture_output=True, text=True, timeout=seconds * 3 + 120,
            env={**os.environ, "PYTHONPATH": str(FUZZ_DIR.parent)},
        )
        elapsed = time.monotonic() - started
        corpus_size = len(list(work.iterdir()))
    output = result.stderr
    done = _DONE.search(output) or (list(_LAST.finditer(output)) or [None])[-1]
    runs = int(done.group(1)) if done else 0
    figures: dict[str, object] = {
        "target": target,
        "seconds": round(elapsed, 1),
        "executions": runs,
        "exec_per_s": round(runs / elapsed, 1) if elapsed else 0.0,
        "cov": int(done.group(2)) if done else None,
        "ft": int(done.group(3)) if done else None,
        "corpus": corpus_size,
        "ok": result.returncode == 0,
    }
    if result.returncode != 0:
        figures["log_tail"] = output[-4000:]
    return figures


def main(argv: list[str] | None = None) -> int:
    """Command line: a summary run over targets, or ``--one`` target's process."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--one"]:
        run_one(argv[1], argv[2:])
        return 0
    parser = argparse.ArgumentParser(prog="python -m fuzz.run", description=__doc__.splitlines()[0])
    parser.add_argument("targets", nargs="*", default=list(TARGETS), help="targets to run (default: all)")
    parser.add_argument("--seconds", type=int, default=int(os.environ.get("FUZZ_SECONDS", "60")))
    parser.add_argument("--artifacts", type=Path, default=Path(tempfile.gettempdir()) / "pvcore-fuzz-artifacts")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.targets) - set(TARGETS))
    if unknown:
        parser.error(f"unknown target(s) {', '.join(unknown)}; known: {', '.join(TARGETS)}")
    results = []
    print(f"{'target':18} {'s':>6} {'execs':>9} {'exec/s':>8} {'cov':>6} {'ft':>6} {'corpus':>6}  verdict", flush=True)
    for target in args.targets:
        figures = campaign(target, args.seconds, args.artifacts)
        results.append(figures)
        print(f"{target:18} {figures['seconds']:>6} {figures['executions']:>9} {figures['exec_per_s']:>8} "
              f"{figures['cov']!s:>6} {figures['ft']!s:>6} {figures['corpus']:>6}  "
              f"{'ok' if figures['ok'] else 'FINDING (input in ' + str(args.artifacts) + ')'}", flush=True)
        if not figures["ok"]:
            print(figures["log_tail"], file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0 if all(figures["ok"] for figures in results) else 1


if __name__ == "__main__":
    sys.exit(main())
