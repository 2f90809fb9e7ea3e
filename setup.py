"""Compiles pvcore's hot modules with Cython 3 (pure-Python mode); never fails an install for it.

Metadata lives in pyproject.toml; this file only adds the extension modules
that :mod:`pvcore.build` lists. Each ``.py`` is compiled as it is, beside
itself (an editable install builds in place), and the SHA-256 of every source
compiled goes into ``pvcore/_compiled.json`` so that an edited ``.py`` is
imported instead of a stale build. Without Cython, a compiler or Python's
headers, or if one module fails to compile, the install goes on and pvcore
runs (that module) in pure Python: ``pvcore --version`` says which.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("_pvcore_build", ROOT / "pvcore" / "build.py")
assert _spec is not None and _spec.loader is not None
pvcore_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pvcore_build)

DIRECTIVES = {
    "language_level": 3,
    "binding": True,
    "annotation_typing": False,  # annotations stay documentation: Python's semantics exactly, typing only by cython.locals
    "embedsignature": True,
}


def warn(message: str) -> None:
    print(f"pvcore: WARNING: {message}; pvcore will run it in pure Python", file=sys.stderr)


DIGESTS: dict[str, str] = {}
"""SHA-256 of each source as it was when the build started (a later edit must not pass for compiled)."""


def extensions() -> list:
    """The extension modules, or none (with a warning) when Cython is missing."""
    try:
        from Cython.Build import cythonize
    except ImportError:
        warn("Cython 3 is not installed, the hot modules are not compiled")
        return []
    sources = [str(Path(*name.split(".")).with_suffix(".py")) for name in pvcore_build.COMPILED_MODULES]
    for name, source in zip(pvcore_build.COMPILED_MODULES, sources):  # before Cython reads them
        DIGESTS[name] = pvcore_build.source_digest(ROOT / source)
    try:
        extensions = cythonize(sources, compiler_directives=DIRECTIVES, build_dir="build/cython", quiet=True,
                               nthreads=os.cpu_count() or 1)
    except Exception as exc:  # a Cython error in one module must not fail the install
        warn(f"Cython could not translate the hot modules ({exc})")
        return []
    for extension in extensions:
        extension.extra_compile_args = ["-g0"]  # no debug info: a shorter compile, the same code
    return extensions


class TolerantBuildExt(build_ext):
    """build_ext that warns and goes on when a module does not compile, and records what did."""

    def finalize_options(self) -> None:
        super().finalize_options()
        if self.parallel is None:
            self.parallel = os.cpu_count() or 1
        self.failed: list[str] = []

    def run(self) -> None:
        if self.inplace:
            self._remove_dropped()
        try:
            super().run()
        except Exception as exc:
            warn(f"building the compiled modules failed ({exc})")
        self._write_manifest()

    def _remove_dropped(self) -> None:
        """Delete in-place builds of modules no longer compiled: Python would import them before the .py."""
        built = {ext.name for ext in self.extensions}
        suffixes = importlib.machinery.EXTENSION_SUFFIXES  # the most specific first
        for path in (ROOT / "pvcore").rglob("*"):
            suffix = next((suffix for suffix in suffixes if path.name.endswith(suffix)), None)
            if suffix is not None and ".".join(path.relative_to(ROOT).parts)[: -len(suffix)] not in built:
                path.unlink()

    def build_extension(self, ext) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:
            warn(f"{ext.name} did not compile ({exc})")
            self.failed.append(ext.name)

    def _write_manifest(self) -> None:
        failed = set(self.failed)
        manifest = {ext.name: DIGESTS[ext.name] for ext in self.extensions if ext.name not in failed}
        target = (ROOT if self.inplace else Path(self.build_lib)) / "pvcore" / pvcore_build.MANIFEST_NAME
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


setup(ext_modules=extensions(), cmdclass={"build_ext": TolerantBuildExt})
