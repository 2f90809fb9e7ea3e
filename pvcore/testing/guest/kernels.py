"""Debian kernels for real guests: which package, download, unpack, cache.

:func:`fetch_kernel` downloads the exact versioned kernel package that the
``linux-image-amd64`` (``x86_64``) or ``linux-image-powerpc64le`` (``ppc64``,
pseries) meta package depends on, plus ``busybox-static`` for the same
architecture, and unpacks them with ``dpkg -x``. The cache is
``$PVCORE_CACHE`` or ``~/.cache/pvcore`` (:func:`cache_dir`); it is safe to
call from several processes at once. :data:`ARCHES` also says how QEMU boots
each architecture.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import subprocess
import tempfile
import time
import warnings
from pathlib import Path
from typing import Iterator, Sequence

import attrs

from pvcore.testing.guest.errors import GuestError, KernelFetchError
from pvcore.testing.guest.modules import python_depmod

__all__ = ["ARCHES", "ArchSpec", "GuestKernel", "arch_spec", "cache_dir", "fetch_kernel"]

@attrs.frozen
class ArchSpec:
    """How to fetch and boot a guest of one architecture.

    ``name`` is the harness' name ("x86_64", "ppc64"), ``deb_arch`` the
    Debian architecture, ``meta_package`` the kernel meta package whose
    versioned dependency is fetched, ``kernel_glob`` the kernel image inside
    the package, ``qemu`` the QEMU binary, ``machine`` its ``-M`` value and
    ``console`` the kernel console device.
    """

    name: str
    deb_arch: str
    meta_package: str
    kernel_glob: str
    qemu: str
    machine: str
    console: str
    uname_m: str


ARCHES: dict[str, ArchSpec] = {
    "x86_64": ArchSpec(
        name="x86_64",
        deb_arch="amd64",
        meta_package="linux-image-amd64",
        kernel_glob="vmlinuz-*",
        qemu="qemu-system-x86_64",
        machine="q35",
        console="ttyS0",
        uname_m="x86_64",
    ),
    "ppc64": ArchSpec(
        name="ppc64",
        deb_arch="ppc64el",
        meta_package="linux-image-powerpc64le",
        kernel_glob="vmlinux-*",
        qemu="qemu-system-ppc64",
        machine="pseries",
        console="hvc0",
        uname_m="ppc64le",
    ),
}
"""Supported guest architectures, by harness name."""

_ARCH_ALIASES = {"amd64": "x86_64", "ppc64le": "ppc64", "ppc64el": "ppc64", "pseries": "ppc64"}


def arch_spec(arch: str) -> ArchSpec:
    """The :class:`ArchSpec` for ``arch``: a harness name or an alias (amd64, ppc64le, ppc64el, pseries).

    Raises :class:`GuestError` naming the supported ones for any other.
    """
    name = _ARCH_ALIASES.get(arch, arch)
    try:
        return ARCHES[name]
    except KeyError:
        raise GuestError(
            f"unsupported guest architecture {arch!r}; supported: {', '.join(ARCHES)}"
        ) from None


@attrs.frozen
class GuestKernel:
    """An unpacked Debian kernel plus a static busybox for one architecture.

    ``kernel`` is the image QEMU boots (bzImage ``vmlinuz`` on x86_64, ELF
    ``vmlinux`` on ppc64), ``modules_dir`` is ``.../lib/modules/VERSION``
    (holding ``modules.dep`` and ``modules.builtin``), ``busybox`` the static
    busybox binary for the same architecture, ``version`` the kernel release
    (what ``uname -r`` prints in the guest).
    """

    arch: str
    kernel: Path
    modules_dir: Path
    busybox: Path
    version: str


def cache_dir() -> Path:
    """Return the download cache: ``$PVCORE_CACHE`` or ``~/.cache/pvcore``."""
    env = os.environ.get("PVCORE_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "pvcore"


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _run(cmd: Sequence[str], *, cwd: Path | None = None, timeout: float = 1800) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(
            list(cmd),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            timeout=timeout,
        )
    except FileNotFoundError:
        raise KernelFetchError(
            f"{cmd[0]} not found: the real-guest harness fetches Debian kernels with "
            f"apt-get and dpkg; run it on Debian/Ubuntu (apt-get install -y apt dpkg)"
        ) from None
    except subprocess.TimeoutExpired:
        raise KernelFetchError(f"timed out after {timeout:.0f}s: {' '.join(cmd)}") from None


def _fmt_cmd(cmd: Sequence[str]) -> str:
    import shlex

    return " ".join(shlex.quote(c) for c in cmd)


class _Apt:
    """apt-get/apt-cache invocations for one Debian architecture."""

    def __init__(self, spec: ArchSpec, cache: Path) -> None:
        self.spec = spec
        self.cache = cache
        host = _host_deb_arch()
        self.foreign = spec.deb_arch != host
        self.opts: list[str] = ["-oAPT::Sandbox::User=root"]
        if self.foreign:
            root = cache / f"apt-{spec.deb_arch}"
            lists = root / "lists"
            acache = root / "cache"
            status = root / "status"
            (lists / "partial").mkdir(parents=True, exist_ok=True)
            (acache / "archives" / "partial").mkdir(parents=True, exist_ok=True)
            if not status.exists():
                status.write_text("")
            self.lists = lists
            self.opts += [
                f"-oAPT::Architecture={spec.deb_arch}",
                f"-oAPT::Architectures={spec.deb_arch}",
                f"-oDir::State::Lists={lists}",
                f"-oDir::Cache={acache}",
                f"-oDir::State::status={status}",
            ]
        else:
            self.lists = None

    def _check_tools(self) -> None:
        for tool in ("apt-get", "apt-cache", "dpkg"):
            if shutil.which(tool) is None:
                raise KernelFetchError(
                    f"{tool} not found: the real-guest harness fetches Debian's kernel "
                    f"packages with apt; run it on a Debian-like host (apt-get install -y apt dpkg)"
                )

    def update(self) -> str | None:
        """Run ``apt-get update``; retry once; return the error text or None.

        A partly failed update (one mirror out of sync) still leaves usable
        lists, so the caller decides whether the failure matters.
        """
        cmd = ["apt-get", *self.opts, "update"]
        err = None
        for attempt in range(2):
            r = _run(cmd)
            if r.returncode == 0:
                return None
            err = (
                f"apt-get update failed (rc={r.returncode}); run by hand to see why:\n  "
                f"{_fmt_cmd(cmd)}\n{r.stderr.strip()[-2000:]}"
            )
            time.sleep(2)
        return err

    def depends(self, package: str) -> str | None:
        """The ``linux-image-*`` package that ``package`` depends on, or None."""
        r = _run(["apt-cache", *self.opts, "depends", package], timeout=300)
        if r.returncode != 0:
            return None
        for line in r.stdout.splitlines():
            m = re.match(r"^\s*\|?Depends:\s*<?(linux-image-[A-Za-z0-9.+~-]+)>?\s*$", line)
            if m and m.group(1) != package:
                return m.group(1)
        return None

    def resolve_kernel_package(self) -> str:
        self._check_tools()
        meta = self.spec.meta_package
        err = None
        if self.foreign and not any(self.lists.glob("*_Packages*")):
            err = self.update()
        pkg = self.depends(meta)
        if pkg is None and err is None:
            err = self.update()
            pkg = self.depends(meta)
        if pkg is None:
            cmd = ["apt-cache", *self.opts, "depends", meta]
            raise KernelFetchError(
                f"cannot find the kernel package {meta} depends on for {self.spec.deb_arch}; "
                f"check with:\n  {_fmt_cmd(cmd)}" + (f"\n{err}" if err else "")
            )
        if err:
            warnings.warn(f"using {pkg} from partly updated apt lists: {err}", stacklevel=3)
        return pkg

    def download(self, package: str, dest: Path) -> Path:
        """Download ``package`` (an exact name) into ``dest``; return the .deb."""
        pattern = f"{package}_*_*.deb"
        existing = sorted(dest.glob(pattern))
        existing = [p for p in existing if p.name.split("_", 1)[0] == package]
        if existing:
            return existing[-1]
        dest.mkdir(parents=True, exist_ok=True)
        cmd = ["apt-get", *self.opts, "download", package]
        with tempfile.TemporaryDirectory(prefix=".dl-", dir=dest) as tmp:
            os.chmod(tmp, 0o755)
            r = _run(cmd, cwd=Path(tmp))
            if r.returncode != 0:
                raise KernelFetchError(
                    f"downloading {package} failed (rc={r.returncode}); run by hand to see why "
                    f"(in {dest}):\n  {_fmt_cmd(cmd)}\n{r.stderr.strip()[-2000:]}"
                )
            debs = [p for p in Path(tmp).glob("*.deb") if p.name.split("_", 1)[0] == package]
            if len(debs) != 1:
                raise KernelFetchError(
                    f"{_fmt_cmd(cmd)} produced {[p.name for p in Path(tmp).iterdir()]}, "
                    f"expected one {package}_*.deb"
                )
            final = dest / debs[0].name
            os.replace(debs[0], final)
            return final


def _host_deb_arch() -> str:
    try:
        r = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True, timeout=30)
        if r.returncode == 0 and r.stdout.strip():
            return r.stdout.strip()
    except (FileNotFoundError, subprocess.TimeoutExpired):
        pass
    m = os.uname().machine
    return {"x86_64": "amd64", "ppc64le": "ppc64el", "aarch64": "arm64"}.get(m, m)


def _find_kernel_tree(root: Path, spec: ArchSpec) -> GuestKernel:
    mods_parent = _modules_parent(root)
    versions = sorted(p for p in mods_parent.iterdir() if (p / "modules.dep").exists())
    if len(versions) != 1:
        raise KernelFetchError(f"expected one kernel version under {mods_parent}, found {versions}")
    mdir = versions[0]
    version = mdir.name
    kernel = root / "boot" / spec.kernel_glob.replace("*", version)
    if not kernel.exists():
        kernels = sorted((root / "boot").glob(spec.kernel_glob))
        if not kernels:
            raise KernelFetchError(f"no boot/{spec.kernel_glob} in unpacked kernel {root}")
        kernel = kernels[0]
    busybox = None
    for cand in (root / "bin" / "busybox", root / "usr" / "bin" / "busybox"):
        if cand.exists():
            busybox = cand
            break
    if busybox is None:
        raise KernelFetchError(f"no bin/busybox in unpacked busybox-static under {root}")
    return GuestKernel(arch=spec.name, kernel=kernel, modules_dir=mdir, busybox=busybox, version=version)


def _modules_parent(root: Path) -> Path:
    for cand in (root / "lib" / "modules", root / "usr" / "lib" / "modules"):
        if cand.is_dir():
            return cand
    raise KernelFetchError(f"no lib/modules in unpacked kernel {root}")

def _ensure_modules_dep(root: Path) -> None:
    """Create ``modules.dep`` (Debian generates it at install time, not in the .deb).

    Uses ``depmod -b`` when kmod is installed, else reads each module's
    ``depends=`` modinfo string in Python.
    """
    parent = _modules_parent(root)
    for mdir in parent.iterdir():
        if not mdir.is_dir() or (mdir / "modules.dep").exists():
            continue
        depmod = shutil.which("depmod") or next(
            (p for p in ("/usr/sbin/depmod", "/sbin/depmod") if os.path.exists(p)), None
        )
        if depmod:
            base = parent.parent if parent.parent.name != "usr" else parent.parent.parent
            r = _run([depmod, "-b", str(base), mdir.name], timeout=600)
            if r.returncode == 0 and (mdir / "modules.dep").exists():
                continue
        python_depmod(mdir)


def fetch_kernel(arch: str = "x86_64", cache: Path | None = None) -> GuestKernel:
    """Fetch (once) and unpack Debian's current kernel and busybox for ``arch``.

    ``arch`` is "x86_64" or "ppc64" (pseries, little endian).  The versioned
    package the meta package depends on (e.g. ``linux-image-6.1.0-N-amd64``)
    and ``busybox-static`` are downloaded with ``apt-get download`` into
    ``cache`` (default :func:`cache_dir`) and unpacked with ``dpkg -x`` into
    ``cache/extracted/ARCH/...``.  Foreign architectures use a private apt
    lists directory inside the cache.  Idempotent, and safe against several
    processes at once (a ``fcntl`` lock in the cache; unpacking goes to a
    temporary directory that is renamed into place).

    Raises :class:`KernelFetchError` with the command to run by hand when
    apt-get is missing or a download fails.
    """
    spec = arch_spec(arch)
    cache = Path(cache) if cache is not None else cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    with _file_lock(cache / f".lock-{spec.name}"):
        apt = _Apt(spec, cache)
        kpkg = apt.resolve_kernel_package()
        debs = cache / "debs" / spec.deb_arch
        extracted_parent = cache / "extracted" / spec.name
        final = extracted_parent / kpkg
        if final.is_dir():
            try:
                return _find_kernel_tree(final, spec)
            except KernelFetchError:
                shutil.rmtree(final, ignore_errors=True)
        kdeb = apt.download(kpkg, debs)
        bdeb = apt.download("busybox-static", debs)
        extracted_parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{kpkg}-", dir=extracted_parent))
        try:
            for deb in (kdeb, bdeb):
                cmd = ["dpkg", "-x", str(deb), str(tmp)]
                r = _run(cmd)
                if r.returncode != 0:
                    raise KernelFetchError(
                        f"unpacking {deb.name} failed (rc={r.returncode}); the .deb may be "
                        f"truncated: delete it and retry.\n  {_fmt_cmd(cmd)}\n{r.stderr.strip()[-2000:]}"
                    )
            _ensure_modules_dep(tmp)
            _find_kernel_tree(tmp, spec)  # validate before publishing
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return _find_kernel_tree(final, spec)
