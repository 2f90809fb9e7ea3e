"""Third-party installation for tests: build a plugin's wheel and install it into a fresh virtual environment.

:func:`build_wheel` writes a PEP 427 wheel of a project from its
``pyproject.toml`` (``[project]`` metadata, entry points and scripts, the
packages ``[tool.setuptools.packages.find] include`` names) with the
standard library only, so no build backend or network is needed.
:class:`FreshEnvironment` is a new ``venv`` without pip into which wheels are
installed with this interpreter's pip (``pip --python``), exactly as a user
installs a plugin; the libraries pvcore needs (pluggy, attrs, and pytest for
the kit) are borrowed read-only from this environment through a ``.pth``
file, so the fresh one holds no pvcore and no plugin but what is installed
into it.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import importlib.machinery
import importlib.metadata
import importlib.util
import os
import re
import subprocess
import sys
import sysconfig
import tomllib
import venv
import zipfile
from collections.abc import Sequence
from pathlib import Path

BORROWED = (
    "pluggy", "attr", "attrs", "prometheus_client", "pytest", "_pytest", "iniconfig", "packaging", "pygments", "py",
)
"""Top-level modules a fresh environment borrows from this one (pvcore's dependencies and pytest's)."""


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"sha256={digest}"


def _project_files(project: Path, include: Sequence[str]) -> list[Path]:
    files = []
    for package in sorted(path.parent for path in project.glob("*/__init__.py")):
        if any(fnmatch.fnmatch(package.name, pattern) for pattern in include):
            files += [path for path in sorted(package.rglob("*")) if path.is_file()
                      and "__pycache__" not in path.parts and not path.name.endswith(".pyc")]
    return files


def _wheel_tag(contents: dict[str, bytes]) -> tuple[str, str]:
    """The wheel's tag and Root-Is-Purelib: this interpreter's and platform's if it carries extension modules."""
    if not any(name.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)) for name in contents):
        return "py3-none-any", "true"
    python = f"cp{sys.version_info.major}{sys.version_info.minor}"
    platform = re.sub(r"[-.]", "_", sysconfig.get_platform())
    return f"{python}-{python}-{platform}", "false"


def build_wheel(project: Path, destination: Path) -> Path:
    """A wheel of ``project`` written to ``destination``; its path.

    Pure Python (``py3-none-any``) unless the project's packages hold
    extension modules already built in place (pvcore's compiled hot path,
    see :mod:`pvcore.build`): those are carried too, and the wheel is tagged
    for this interpreter and platform.
    """
    pyproject = tomllib.loads((project / "pyproject.toml").read_text())
    meta = pyproject["project"]
    distribution = re.sub(r"[-_.]+", "_", meta["name"])
    dist_info = f"{distribution}-{meta['version']}.dist-info"
    include = pyproject.get("tool", {}).get("setuptools", {}).get("packages", {}).get("find", {}).get("include", ["*"])
    metadata = ["Metadata-Version: 2.1", f"Name: {meta['name']}", f"Version: {meta['version']}"]
    metadata += [f"Requires-Python: {meta['requires-python']}"] if "requires-python" in meta else []
    metadata += [f"Requires-Dist: {requirement}" for requirement in meta.get("dependencies", [])]
    groups = dict(meta.get("entry-points", {}))
    if meta.get("scripts"):
        groups["console_scripts"] = meta["scripts"]
    entry_points = "".join(
        f"[{group}]\n" + "".join(f"{name} = {target}\n" for name, target in entries.items()) + "\n"
        for group, entries in groups.items()
    )
    contents = {str(path.relative_to(project)): path.read_bytes() for path in _project_files(project, include)}
    tag, purelib = _wheel_tag(contents)
    contents[f"{dist_info}/METADATA"] = ("\n".join(metadata) + "\n").encode()
    contents[f"{dist_info}/WHEEL"] = (
        f"Wheel-Version: 1.0\nGenerator: pvcore.testing\nRoot-Is-Purelib: {purelib}\nTag: {tag}\n".encode()
    )
    contents[f"{dist_info}/entry_points.txt"] = entry_points.encode()
    record = "".join(f"{name},{_record_hash(data)},{len(data)}\n" for name, data in contents.items())
    contents[f"{dist_info}/RECORD"] = (record + f"{dist_info}/RECORD,,\n").encode()
    destination.mkdir(parents=True, exist_ok=True)
    wheel = destination / f"{distribution}-{meta['version']}-{tag}.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in contents.items():
            archive.writestr(name, data)
    return wheel


def _borrow_metadata(distribution: str, borrowed: Path) -> None:
    """Link ``distribution``'s ``.dist-info`` into ``borrowed`` (pytest reads its dependencies' versions)."""
    for file in importlib.metadata.distribution(distribution).files or ():
        if file.parts[0].endswith(".dist-info"):
            located = Path(str(file.locate()))
            while located.name != file.parts[0]:
                located = located.parent
            if not (borrowed / located.name).exists():
                (borrowed / located.name).symlink_to(located)
            return


class FreshEnvironment:
    """A new virtual environment at ``path`` that holds only what is installed into it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        venv.EnvBuilder(with_pip=False).create(path)
        self.python = path / "bin" / "python"
        site = Path(self.run_python("import sysconfig; print(sysconfig.get_path('purelib'))").stdout.strip())
        borrowed = path / "borrowed"
        borrowed.mkdir()
        owners = importlib.metadata.packages_distributions()
        for module in BORROWED:
            spec = importlib.util.find_spec(module)
            if spec is None or spec.origin is None:
                continue
            origin = Path(spec.origin)
            source = origin.parent if origin.name == "__init__.py" else origin
            (borrowed / source.name).symlink_to(source)
            for distribution in owners.get(module, []):
                _borrow_metadata(distribution, borrowed)
        (site / "pvcore-borrowed.pth").write_text(f"{borrowed}\n")

    def run_python(self, code: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
        """Run ``code`` with the environment's interpreter."""
        return self.run([str(self.python), "-c", code], **kwargs)

    def run(self, command: Sequence[str], timeout: float = 120, **kwargs: object) -> subprocess.CompletedProcess[str]:
        """Run ``command`` with the environment's ``bin`` first on PATH, no PYTHONPATH, in ``cwd`` (default: the environment)."""
        kwargs.setdefault("cwd", self.path)
        environment = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
        environment["PATH"] = f"{self.path / 'bin'}{os.pathsep}{environment.get('PATH', '')}"
        return subprocess.run(list(command), capture_output=True, text=True, timeout=timeout, env=environment, **kwargs)

    def pip(self, *arguments: str) -> subprocess.CompletedProcess[str]:
        """This interpreter's pip acting on the fresh environment (offline: ``--no-index``)."""
        return self.run([sys.executable, "-m", "pip", "--python", str(self.python), "--disable-pip-version-check",
                         *arguments])

    def install(self, *wheels: Path) -> None:
        """``pip install --no-index --no-deps`` the wheels (dependencies are borrowed)."""
        done = self.pip("install", "--no-index", "--no-deps", *map(str, wheels))
        if done.returncode:
            raise RuntimeError(f"pip install {' '.join(map(str, wheels))} failed:\n{done.stdout}{done.stderr}")

    def uninstall(self, distribution: str) -> None:
        """``pip uninstall -y``."""
        done = self.pip("uninstall", "-y", distribution)
        if done.returncode:
            raise RuntimeError(f"pip uninstall {distribution} failed:\n{done.stdout}{done.stderr}")
