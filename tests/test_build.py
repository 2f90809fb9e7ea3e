"""The compiled hot path and its pure-Python fallback (pvcore.build, setup.py).

In a normal run (``make test``) every hot module must be the compiled one: a
build that silently failed, or a stale one, fails here rather than letting the
whole suite pass on the pure-Python modules. ``make test`` then runs the ring,
device and front-door tests again with ``PVCORE_PURE_PYTHON=1``, which
includes this file: there every module must be the ``.py`` source.
"""

from __future__ import annotations

import importlib.machinery
import os
import subprocess
import sys
from pathlib import Path

import pvcore
from pvcore.build import COMPILED_MODULES, PURE_ENV, SourceFinder, build_report, loaded_builds, pure_forced, source_digest

RING = Path(pvcore.__file__).parent / "ring"


def test_every_hot_module_is_the_build_this_run_asked_for() -> None:
    builds = loaded_builds()
    wanted = "pure" if pure_forced() else "compiled"
    assert set(builds) == set(COMPILED_MODULES)
    assert all(build == wanted for build in builds.values()), (
        f"{PURE_ENV}={os.environ.get(PURE_ENV, '')!r} but:\n" + "\n".join(build_report())
        + "\n(the install's compile failed or is stale: see `make setup`'s warnings)"
    )
    for name in COMPILED_MODULES:
        origin = sys.modules[name].__spec__.origin
        assert origin.endswith(".py") if wanted == "pure" else not origin.endswith(".py"), (name, origin)


def run_version(pure: bool) -> str:
    env = {key: value for key, value in os.environ.items() if key != PURE_ENV}
    if pure:
        env[PURE_ENV] = "1"
    done = subprocess.run([sys.executable, "-m", "pvcore.cli", "--version"], capture_output=True, text=True,
                          env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_pure_python_env_imports_every_py_and_version_says_so() -> None:
    out = run_version(pure=True)
    assert out.startswith(f"pvcore {pvcore.__version__}\nhot path: pure Python (0 of {len(COMPILED_MODULES)}")
    for name in COMPILED_MODULES:
        assert f"  {name}: pure ({PURE_ENV}=1)\n" in out


def test_version_without_the_env_reports_every_module_compiled() -> None:
    out = run_version(pure=False)
    assert f"hot path: compiled ({len(COMPILED_MODULES)} of {len(COMPILED_MODULES)} modules compiled)\n" in out, out
    for name in COMPILED_MODULES:
        assert f"  {name}: compiled\n" in out, out


def test_finder_takes_the_source_when_the_build_is_missing_or_stale() -> None:
    """Only with an extension module beside it (none in a pure install) does the finder have anything to decide."""
    name = "pvcore.ring.virtqueue"
    if not any((RING / f"virtqueue{suffix}").is_file() for suffix in importlib.machinery.EXTENSION_SUFFIXES):
        assert SourceFinder(forced=True, manifest={}).find_spec(name, [str(RING)]) is None
        return
    digest = source_digest(RING / "virtqueue.py")
    current = SourceFinder(forced=False, manifest={name: digest})
    assert current.find_spec(name, [str(RING)]) is None and not current.fallbacks
    for finder, reason in (
        (SourceFinder(forced=False, manifest={}), "the last build did not compile it"),
        (SourceFinder(forced=False, manifest={name: "0" * 64}), f"{name} changed since the build"),
        # session.pxd cimports Virtqueue: a stale virtqueue.py must not leave session compiled against the old class
        (SourceFinder(forced=False, manifest={name: digest, "pvcore.ring.session": "0" * 64}), "pvcore.ring.session changed"),
        (SourceFinder(forced=True, manifest={name: digest}), f"{PURE_ENV}=1"),
    ):
        spec = finder.find_spec(name, [str(RING)])
        assert spec is not None and spec.origin == str(RING / "virtqueue.py")
        assert finder.fallbacks[name].startswith(reason)
    assert SourceFinder(forced=True, manifest={}).find_spec("pvcore.ring.barrier", [str(RING)]) is None
