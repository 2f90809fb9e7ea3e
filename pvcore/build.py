"""Which build of the hot modules runs: compiled by Cython, or the pure-Python source.

The request path (ring walk and validation, the session's pass, virtio-blk,
-net and -rng request handling, the block backend's ``serve_now``, used-ring
writes and notification, the vhost-user door) is plain Python
written so that Cython 3 compiles it unchanged (pure-Python mode; see
``setup.py``). An install compiles :data:`COMPILED_MODULES` into extension
modules beside their ``.py`` files when it can, and goes on without them when
it cannot: the ``.py`` files are always there and are the fallback.

Python would import an extension module before a ``.py`` file of the same
name. :func:`install_source_finder` (run by ``pvcore/__init__.py``) puts a
finder before the path finder on ``sys.meta_path`` that imports the ``.py``
file instead when

* ``PVCORE_PURE_PYTHON=1`` is set (forcing the pure-Python build), or
* the ``.py`` file is not the one the extension module was compiled from
  (its SHA-256 differs from the one ``setup.py`` recorded in
  :data:`MANIFEST_NAME`): an edited source is never shadowed by a stale build.

:func:`loaded_builds` says, module by module, which one is loaded
(``pvcore --version`` and ``pvcore plugins`` print it). This module uses the
standard library only: ``setup.py`` loads it to learn the module list.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

COMPILED_MODULES: tuple[str, ...] = (
    "pvcore.ring.memory",
    "pvcore.ring.virtqueue",
    "pvcore.ring.session",
    "pvcore.ring.notify",
    "pvcore.devices.block.virtio_blk",
    "pvcore.devices.block.backend",
    "pvcore.devices.block.store",
    "pvcore.devices.net.virtio_net",
    "pvcore.devices.rng",
    "pvcore.transports.vhost_user.backend",
)
"""The modules ``setup.py`` compiles, and the only ones the finder ever redirects.

Not ``pvcore.streams.nbd``: compiled, its request/reply loop (asyncio
streams and coroutines) cost more CPU per request than as Python
(docs/performance.md).
"""

PURE_ENV = "PVCORE_PURE_PYTHON"
"""Set to ``1`` to import the pure-Python source of every compiled module."""

MANIFEST_NAME = "_compiled.json"
"""File in the ``pvcore`` package: ``{module: SHA-256 of the .py it was compiled from}``, written by ``setup.py``."""

PACKAGE_DIR = Path(__file__).resolve().parent


def pure_forced() -> bool:
    """Whether ``PVCORE_PURE_PYTHON=1`` asks for the pure-Python build."""
    return os.environ.get(PURE_ENV, "") == "1"


def source_digest(path: Path) -> str:
    """SHA-256 of a source file, as the manifest records it."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _read_manifest() -> dict[str, str]:
    try:
        manifest = json.loads((PACKAGE_DIR / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return {}
    return manifest if isinstance(manifest, dict) else {}


class SourceFinder(importlib.abc.MetaPathFinder):
    """Imports a compiled module's ``.py`` file when the pure build is forced or the build is stale.

    ``fallbacks`` records why each redirected module runs pure Python.
    """

    def __init__(self, *, forced: bool, manifest: dict[str, str]) -> None:
        self.forced = forced
        self.manifest = manifest
        self.fallbacks: dict[str, str] = {}
        self._changed: list[str] | None = None

    def changed(self) -> list[str]:
        """The compiled modules whose ``.py`` differs from the one they were compiled from (read once)."""
        if self._changed is None:
            root = PACKAGE_DIR.parent
            sources = {name: root / f"{name.replace('.', '/')}.py" for name in self.manifest}
            self._changed = [
                name for name, source in sources.items()
                if source.is_file() and source_digest(source) != self.manifest[name]
            ]
        return self._changed

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        """The spec of ``fullname``'s ``.py`` file if it must not load compiled; None lets the usual finders run."""
        if fullname not in COMPILED_MODULES or path is None:
            return None
        leaf = fullname.rpartition(".")[2]
        for entry in path:
            source = Path(entry) / f"{leaf}.py"
            if not source.is_file():
                continue
            extension = any((Path(entry) / f"{leaf}{suffix}").is_file()
                            for suffix in importlib.machinery.EXTENSION_SUFFIXES)
            if not extension:
                return None
            if self.forced:
                self.fallbacks[fullname] = f"{PURE_ENV}=1"
            elif fullname not in self.manifest:
                self.fallbacks[fullname] = "the last build did not compile it"
            elif self.changed():
                # The compiled modules cimport each other's typed classes: one stale module makes them all pure.
                self.fallbacks[fullname] = f"{', '.join(self.changed())} changed since the build (rebuild: make setup)"
            else:
                return None
            return importlib.util.spec_from_file_location(fullname, source)
        return None


_finder: SourceFinder | None = None


def install_source_finder() -> SourceFinder:
    """Put the :class:`SourceFinder` on ``sys.meta_path`` just before the path finder (once); return it.

    Not first: finders that wrap the loaders of the ones after them (atheris
    instruments the bytecode of what it loads) must still see its ``.py``.
    """
    global _finder
    if _finder is None:
        _finder = SourceFinder(forced=pure_forced(), manifest=_read_manifest())
        path_finder = importlib.machinery.PathFinder
        position = next((i for i, finder in enumerate(sys.meta_path) if finder is path_finder), len(sys.meta_path))
        sys.meta_path.insert(position, _finder)
    return _finder


def module_build(module: ModuleType) -> str:
    """``compiled`` if ``module`` was loaded from an extension module, else ``pure``."""
    origin = getattr(module.__spec__, "origin", None) or ""
    return "compiled" if origin.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)) else "pure"


def loaded_builds() -> dict[str, str]:
    """Each compiled-list module, imported, and which build of it is loaded."""
    return {name: module_build(importlib.import_module(name)) for name in COMPILED_MODULES}


def build_report() -> list[str]:
    """Lines saying which build runs: a summary, then one indented line per module (with why, if pure)."""
    builds = loaded_builds()
    fallbacks = install_source_finder().fallbacks
    compiled = sum(build == "compiled" for build in builds.values())
    if compiled == len(builds):
        summary = "compiled"
    elif compiled:
        summary = "partly compiled"
    else:
        summary = "pure Python"
    lines = [f"hot path: {summary} ({compiled} of {len(builds)} modules compiled)"]
    for name, build in builds.items():
        reason = fallbacks.get(name)
        if build == "pure" and reason is None:
            reason = "no compiled module installed"
        lines.append(f"  {name}: {build}" + (f" ({reason})" if build == "pure" else ""))
    return lines


def log_build() -> None:
    """Log which build a starting daemon runs: one info line, or a warning naming each pure-Python module and why."""
    summary, *modules = build_report()
    pure = [line.strip() for line in modules if ": pure" in line]
    logging.getLogger("pvcore.build").log(logging.WARNING if pure else logging.INFO, "%s", "; ".join([summary, *pure]))
