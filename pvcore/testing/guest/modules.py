"""Kernel modules: their names, ``modules.dep``, load order, and a depmod without kmod.

:func:`resolve_modules` gives the order ``modprobe`` would load modules in;
:func:`python_depmod` writes ``modules.dep`` from each module's modinfo
``depends=`` string where kmod's ``depmod`` is not installed.
"""

from __future__ import annotations

import difflib
import gzip
import lzma
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Iterable, Mapping

from pvcore.testing.guest.errors import GuestError, UnknownModuleError

__all__ = [
    "decompress_module",
    "module_name",
    "python_depmod",
    "read_builtin",
    "read_modules_dep",
    "resolve_modules",
    "uncompressed_name",
]

_MODULE_SUFFIXES = (".ko.xz", ".ko.zst", ".ko.gz", ".ko")
_DEPENDS_RE = re.compile(rb"(?:^|\x00)depends=([^\x00]*)\x00")


def module_name(path: str) -> str:
    """The module name of a path or name: no directory, no ``.ko*`` suffix, ``-`` as ``_``."""
    base = path.rsplit("/", 1)[-1]
    for suf in _MODULE_SUFFIXES:
        if base.endswith(suf):
            base = base[: -len(suf)]
            break
    return base.replace("-", "_")


def read_modules_dep(text: str) -> dict[str, tuple[str, list[str]]]:
    """Parse ``modules.dep`` text.

    Returns ``{normalised_name: (relative_path, [dependency paths])}`` where
    names use underscores (``virtio-rng`` -> ``virtio_rng``).
    """
    out: dict[str, tuple[str, list[str]]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or ":" not in line:
            continue
        path, _, deps = line.partition(":")
        path = path.strip()
        out[module_name(path)] = (path, deps.split())
    return out


def read_builtin(modules_dir: Path) -> set[str]:
    """The names of the modules built into the kernel (its ``modules.builtin``; empty if none)."""
    f = modules_dir / "modules.builtin"
    if not f.exists():
        return set()
    return {module_name(l.strip()) for l in f.read_text(errors="replace").splitlines() if l.strip()}


def resolve_modules(
    requested: Iterable[str],
    modules_dep: Mapping[str, tuple[str, list[str]]],
    builtin: Iterable[str] = (),
) -> list[str]:
    """Return the module paths to insmod, dependencies first.

    ``requested`` names may use dashes or underscores.  Built-in modules are
    skipped silently; a name that is neither a module nor built in raises
    :class:`UnknownModuleError`.  Each module appears once, after all of the
    modules it depends on (the order ``modprobe`` would use).
    """
    builtin_set = {b.replace("-", "_") for b in builtin}
    by_path = {path: name for name, (path, _) in modules_dep.items()}
    order: list[str] = []
    done: set[str] = set()
    visiting: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in done:
            return
        if name in visiting:
            raise GuestError(f"module dependency cycle: {' -> '.join(chain + (name,))}")
        visiting.add(name)
        path, deps = modules_dep[name]
        # modules.dep lists the deepest dependency last: load it first.
        for dep_path in reversed(deps):
            dep = by_path.get(dep_path) or module_name(dep_path)
            if dep in modules_dep:
                visit(dep, chain + (name,))
            elif dep not in builtin_set:
                raise UnknownModuleError(f"module {name} depends on {dep_path}, missing from modules.dep")
        visiting.discard(name)
        done.add(name)
        order.append(path)

    for req in requested:
        name = module_name(req.strip())
        if name in modules_dep:
            visit(name, ())
        elif name in builtin_set:
            continue
        else:
            close = difflib.get_close_matches(name, list(modules_dep), n=5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise UnknownModuleError(f"unknown kernel module {req!r}: not in modules.dep nor modules.builtin{hint}")
    return order


def decompress_module(path: Path) -> bytes:
    """The contents of module ``path``, decompressed (``.ko.xz``, ``.ko.gz``, ``.ko.zst``) if it is compressed."""
    data = path.read_bytes()
    name = path.name
    if name.endswith(".ko"):
        return data
    if name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if name.endswith(".ko.gz"):
        return gzip.decompress(data)
    if name.endswith(".ko.zst"):
        try:
            import zstandard  # type: ignore[import-not-found]

            return zstandard.ZstdDecompressor().decompressobj().decompress(data)
        except ImportError:
            pass
        if shutil.which("zstd"):
            r = subprocess.run(["zstd", "-dc", str(path)], capture_output=True, timeout=120)
            if r.returncode == 0:
                return r.stdout
        raise GuestError(f"cannot decompress {path}: install the zstandard Python package or zstd")
    raise GuestError(f"not a kernel module: {path}")


def uncompressed_name(rel: str) -> str:
    """``rel`` with a compressed module suffix replaced by ``.ko``."""
    for suf in (".ko.xz", ".ko.zst", ".ko.gz"):
        if rel.endswith(suf):
            return rel[: -len(suf)] + ".ko"
    return rel


def python_depmod(mdir: Path) -> None:
    """Write ``modules.dep`` from the modules' ``depends=`` strings (no kmod)."""
    paths: dict[str, str] = {}
    direct: dict[str, list[str]] = {}
    for f in sorted(mdir.rglob("*.ko*")):
        if not f.name.endswith(_MODULE_SUFFIXES):
            continue
        rel = f.relative_to(mdir).as_posix()
        name = module_name(rel)
        paths[name] = rel
        m = _DEPENDS_RE.search(decompress_module(f))
        deps = m.group(1).decode(errors="replace") if m else ""
        direct[name] = [d.replace("-", "_") for d in deps.split(",") if d]
    lines = []
    for name, rel in paths.items():
        closure: list[str] = []
        seen: set[str] = set()

        def walk(n: str) -> None:
            for d in direct.get(n, []):
                if d in seen or d not in paths:
                    continue
                seen.add(d)
                closure.append(d)
                walk(d)

        walk(name)
        lines.append(f"{rel}: {' '.join(paths[d] for d in closure)}".rstrip() + "\n")
    tmp = mdir / ".modules.dep.tmp"
    tmp.write_text("".join(lines))
    os.replace(tmp, mdir / "modules.dep")
