"""Real-guest harness: boot a Debian Linux guest under QEMU TCG.

The tests, the demo and the benchmarks use this module to boot a real Linux
guest whose devices are served by pvcore backends (vhost-user sockets,
chardevs, ...).  Everything it needs is fetched from Debian's archive and
kept in a cache outside the checkout:

* :func:`fetch_kernel` downloads the exact versioned kernel package that the
  ``linux-image-amd64`` (``x86_64``) or ``linux-image-powerpc64le``
  (``ppc64``, pseries) meta package depends on, plus ``busybox-static`` for
  the same architecture, and unpacks them with ``dpkg -x``.  The cache is
  ``$PVCORE_CACHE`` or ``~/.cache/pvcore``; it is safe to call from several
  processes at once.
* :func:`build_initramfs` writes a gzip'ed newc cpio (in pure Python) with
  busybox, the requested kernel modules plus their dependencies (from the
  kernel's ``modules.dep``, decompressed if needed) and an ``/init`` that
  mounts proc/sysfs/devtmpfs, loads the modules, prints
  ``PVCORE-GUEST-READY``, runs the caller's shell script, prints
  ``PVCORE-GUEST-DONE rc=N`` and powers off.
* :class:`Guest` boots one QEMU (always ``-accel tcg``, always under
  ``timeout -k``) and collects the serial console; :class:`GuestResult`
  holds the output and the ``PVCORE-RESULT key=value`` lines the guest
  script printed (see :func:`result_line`).
* :func:`run_guest` does all of the above in one call.

Example::

    from pvcore.testing.guest import run_guest, result_line

    res = run_guest(
        "x86_64",
        script=result_line("kernel", "uname -r"),
        modules=["virtio_blk"],
        qemu_args=["-chardev", "socket,id=c0,path=/tmp/blk.sock",
                   "-device", "vhost-user-blk-pci,chardev=c0"],
    )
    res.check()
    print(res.results["kernel"])

Guest output is treated as untrusted text: it is only ever matched with
regular expressions, never evaluated.
"""

from __future__ import annotations

import contextlib
import difflib
import fcntl
import gzip
import io
import lzma
import os
import re
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import attrs

__all__ = [
    "ARCHES",
    "READY_MARKER",
    "DONE_MARKER",
    "RESULT_PREFIX",
    "ArchSpec",
    "CpioArchive",
    "Guest",
    "GuestError",
    "GuestKernel",
    "GuestResult",
    "GuestTimeout",
    "KernelFetchError",
    "UnknownModuleError",
    "build_initramfs",
    "cache_dir",
    "fetch_kernel",
    "parse_results",
    "read_modules_dep",
    "resolve_modules",
    "result_line",
    "run_guest",
]

READY_MARKER = "PVCORE-GUEST-READY"
"""Line printed by ``/init`` once the modules are loaded, before the script."""

DONE_MARKER = "PVCORE-GUEST-DONE"
"""Prefix of the line ``PVCORE-GUEST-DONE rc=N`` printed after the script."""

RESULT_PREFIX = "PVCORE-RESULT"
"""Prefix of the ``PVCORE-RESULT key=value`` lines parsed into results."""

MODULE_FAILED_MARKER = "PVCORE-GUEST-MODULE-FAILED"
"""Printed by ``/init`` (followed by the module name) when insmod fails."""

# Markers are searched anywhere in a line: the serial console often glues
# them to a partial kernel line or to terminal escape sequences.
_DONE_RE = re.compile(r"PVCORE-GUEST-DONE rc=(-?\d+)\s*$")
_RESULT_RE = re.compile(r"PVCORE-RESULT ([A-Za-z0-9_.-]+)=(.*)$")
_KEY_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
_MODULE_SUFFIXES = (".ko.xz", ".ko.zst", ".ko.gz", ".ko")


# --------------------------------------------------------------------------
# errors


class GuestError(RuntimeError):
    """Any failure of the real-guest harness (boot, fetch, initramfs)."""


class GuestTimeout(GuestError):
    """The guest did not reach the awaited point within the timeout."""


class KernelFetchError(GuestError):
    """The guest kernel or busybox could not be downloaded or unpacked."""


class UnknownModuleError(GuestError):
    """A requested kernel module is neither a module nor built in."""


# --------------------------------------------------------------------------
# architectures


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


def _arch_spec(arch: str) -> ArchSpec:
    name = _ARCH_ALIASES.get(arch, arch)
    try:
        return ARCHES[name]
    except KeyError:
        raise GuestError(
            f"unsupported guest architecture {arch!r}; supported: {', '.join(ARCHES)}"
        ) from None


# --------------------------------------------------------------------------
# kernel fetch


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


_DEPENDS_RE = re.compile(rb"(?:^|\x00)depends=([^\x00]*)\x00")


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
        _python_depmod(mdir)


def _python_depmod(mdir: Path) -> None:
    """Write ``modules.dep`` from the modules' ``depends=`` strings (no kmod)."""
    paths: dict[str, str] = {}
    direct: dict[str, list[str]] = {}
    for f in sorted(mdir.rglob("*.ko*")):
        if not f.name.endswith(_MODULE_SUFFIXES):
            continue
        rel = f.relative_to(mdir).as_posix()
        name = _module_name(rel)
        paths[name] = rel
        m = _DEPENDS_RE.search(_decompress_module(f))
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
    spec = _arch_spec(arch)
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


# --------------------------------------------------------------------------
# newc cpio


class CpioArchive:
    """A minimal writer for the cpio "newc" (SVR4, ``070701``) format.

    Entries are kept in insertion order; parents of every path are added
    automatically as directories.  :meth:`to_bytes` returns the archive
    including the ``TRAILER!!!`` record; :meth:`write_gz` writes it gzip'ed,
    which is what the Linux kernel accepts as an initramfs.
    """

    def __init__(self) -> None:
        self._entries: list[tuple[str, int, bytes, int, int]] = []
        self._names: set[str] = set()

    @staticmethod
    def _norm(path: str) -> str:
        parts = [p for p in path.strip("/").split("/") if p not in ("", ".")]
        if not parts or ".." in parts:
            raise ValueError(f"bad archive path {path!r}")
        return "/".join(parts)

    def _add(self, path: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        name = self._norm(path)
        parent = name.rpartition("/")[0]
        if parent and parent not in self._names:
            self.add_dir(parent)
        if name in self._names:
            if stat.S_ISDIR(mode):
                return
            raise ValueError(f"duplicate archive path {name!r}")
        self._names.add(name)
        self._entries.append((name, mode, data, rdev[0], rdev[1]))

    def add_dir(self, path: str, mode: int = 0o755) -> None:
        """Add a directory (and its parents)."""
        self._add(path, stat.S_IFDIR | mode)

    def add_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        """Add a regular file with the given contents and permission bits."""
        self._add(path, stat.S_IFREG | mode, bytes(data))

    def add_symlink(self, path: str, target: str) -> None:
        """Add a symbolic link ``path -> target``."""
        self._add(path, stat.S_IFLNK | 0o777, target.encode())

    def add_chardev(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        """Add a character device node."""
        self._add(path, stat.S_IFCHR | mode, b"", (major, minor))

    def names(self) -> list[str]:
        """The archive's paths, in order."""
        return [e[0] for e in self._entries]

    def write(self, out: io.RawIOBase | io.BufferedIOBase) -> None:
        """Write the uncompressed archive to a binary stream."""
        ino = 1000
        for name, mode, data, rmaj, rmin in self._entries:
            ino += 1
            nlink = 2 if stat.S_ISDIR(mode) else 1
            self._record(out, name, ino, mode, nlink, data, rmaj, rmin)
        self._record(out, "TRAILER!!!", 0, 0, 1, b"", 0, 0)

    @staticmethod
    def _record(out, name: str, ino: int, mode: int, nlink: int, data: bytes, rmaj: int, rmin: int) -> None:
        bname = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rmaj, rmin, len(bname), 0)
        hdr = b"070701" + b"".join(b"%08X" % f for f in fields)
        out.write(hdr)
        out.write(bname)
        out.write(b"\0" * (-(len(hdr) + len(bname)) % 4))
        out.write(data)
        out.write(b"\0" * (-len(data) % 4))

    def to_bytes(self) -> bytes:
        """The uncompressed archive."""
        buf = io.BytesIO()
        self.write(buf)
        return buf.getvalue()

    def write_gz(self, path: Path, compresslevel: int = 6) -> None:
        """Write the gzip-compressed archive to ``path`` (atomically)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as raw, gzip.GzipFile(
                filename="", mode="wb", fileobj=raw, compresslevel=compresslevel, mtime=0
            ) as gz:
                self.write(gz)
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()


# --------------------------------------------------------------------------
# modules


def _module_name(path: str) -> str:
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
        out[_module_name(path)] = (path, deps.split())
    return out


def _read_builtin(modules_dir: Path) -> set[str]:
    f = modules_dir / "modules.builtin"
    if not f.exists():
        return set()
    return {_module_name(l.strip()) for l in f.read_text(errors="replace").splitlines() if l.strip()}


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
            dep = by_path.get(dep_path) or _module_name(dep_path)
            if dep in modules_dep:
                visit(dep, chain + (name,))
            elif dep not in builtin_set:
                raise UnknownModuleError(f"module {name} depends on {dep_path}, missing from modules.dep")
        visiting.discard(name)
        done.add(name)
        order.append(path)

    for req in requested:
        name = _module_name(req.strip())
        if name in modules_dep:
            visit(name, ())
        elif name in builtin_set:
            continue
        else:
            close = difflib.get_close_matches(name, list(modules_dep), n=5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise UnknownModuleError(f"unknown kernel module {req!r}: not in modules.dep nor modules.builtin{hint}")
    return order


def _decompress_module(path: Path) -> bytes:
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


def _uncompressed_name(rel: str) -> str:
    for suf in (".ko.xz", ".ko.zst", ".ko.gz"):
        if rel.endswith(suf):
            return rel[: -len(suf)] + ".ko"
    return rel


# --------------------------------------------------------------------------
# initramfs


def _shell_quote(s: str) -> str:
    return "'" + s.replace("'", "'\\''") + "'"


_INIT_TEMPLATE = """#!/bin/busybox sh
# pvcore real-guest /init (generated by pvcore.testing.guest)
/bin/busybox mkdir -p /bin /sbin /usr/bin /usr/sbin /proc /sys /dev /tmp /run
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
export HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null || mdev -s
mkdir -p /dev/pts && mount -t devpts devpts /dev/pts 2>/dev/null
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
for m in {modules}; do
    insmod "/lib/modules/{version}/$m" || echo "{failed} $m"
done
echo {ready}
cd /
sh /pvcore/script.sh
rc=$?
sync
echo "{done} rc=$rc"
poweroff -f
sleep 5
"""


def build_initramfs(
    kernel: GuestKernel,
    script: str,
    modules: Sequence[str],
    out_dir: Path,
    files: Mapping[str, bytes] | None = None,
    *,
    name: str = "initramfs.cpio.gz",
    auto_virtio_pci: bool = True,
) -> Path:
    """Build a gzip'ed newc initramfs for ``kernel`` and return its path.

    The archive holds busybox (applet links are made at boot by
    ``busybox --install -s``), the requested ``modules`` plus everything they
    depend on (from the kernel's ``modules.dep``; compressed modules are
    decompressed here), ``/pvcore/script.sh`` (the caller's ``script``, a
    shell script body run with busybox ``sh``), any extra ``files``
    (``{"path/in/guest": contents}``; files starting with ``#!`` are made
    executable) and ``/init``, which mounts proc, sysfs and devtmpfs, loads
    the modules in dependency order, prints ``PVCORE-GUEST-READY``, runs the
    script, prints ``PVCORE-GUEST-DONE rc=N`` and runs ``poweroff -f``.  A
    module whose insmod fails is reported as
    ``PVCORE-GUEST-MODULE-FAILED path``.

    Module names may use dashes or underscores; built-in modules are
    skipped, unknown ones raise :class:`UnknownModuleError`.  When
    ``auto_virtio_pci`` is true (default) and a virtio driver is loaded,
    the ``virtio_pci`` transport is loaded too if it is a module, since no
    virtio-pci device would appear otherwise.

    The archive is written (atomically) to ``out_dir / name``.
    """
    mdir = kernel.modules_dir
    dep_text = (mdir / "modules.dep").read_text(errors="replace")
    dep = read_modules_dep(dep_text)
    builtin = _read_builtin(mdir)
    wanted = list(modules)
    if auto_virtio_pci:
        first = resolve_modules(wanted, dep, builtin)
        names = {_module_name(p) for p in first}
        if "virtio" in names and "virtio_pci" in dep and "virtio_pci" not in names:
            wanted = ["virtio_pci", *wanted]
    order = resolve_modules(wanted, dep, builtin)

    arc = CpioArchive()
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "tmp", "run", "root", "etc", "pvcore"):
        arc.add_dir(d)
    arc.add_chardev("dev/console", 5, 1)
    arc.add_chardev("dev/null", 1, 3, 0o666)
    arc.add_file("bin/busybox", kernel.busybox.read_bytes(), 0o755)
    arc.add_symlink("bin/sh", "busybox")
    base = f"lib/modules/{kernel.version}"
    arc.add_dir(base)
    insmod_paths = []
    for rel in order:
        data = _decompress_module(mdir / rel)
        target = _uncompressed_name(rel)
        arc.add_file(f"{base}/{target}", data, 0o644)
        insmod_paths.append(target)
    for extra in ("modules.dep", "modules.builtin", "modules.order"):
        if (mdir / extra).exists():
            arc.add_file(f"{base}/{extra}", (mdir / extra).read_bytes())
    arc.add_file("pvcore/script.sh", script.encode() + (b"" if script.endswith("\n") else b"\n"), 0o755)
    for path, data in (files or {}).items():
        mode = 0o755 if bytes(data[:2]) == b"#!" else 0o644
        arc.add_file(path, bytes(data), mode)
    init = _INIT_TEMPLATE.format(
        modules=" ".join(_shell_quote(p) for p in insmod_paths) if insmod_paths else "",
        version=kernel.version,
        ready=READY_MARKER,
        done=DONE_MARKER,
        failed=MODULE_FAILED_MARKER,
    )
    arc.add_file("init", init.encode(), 0o755)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / name
    arc.write_gz(out)
    return out


# --------------------------------------------------------------------------
# results


def result_line(key: str, shell_expr: str) -> str:
    """Return a shell line that reports ``key`` with the output of a command.

    ``result_line("kernel", "uname -r")`` gives a line that prints
    ``PVCORE-RESULT kernel=<output of uname -r>``; newlines in the output are
    turned into spaces.  A script may equally print
    ``echo PVCORE-RESULT key=value`` itself.
    """
    if not _KEY_RE.match(key):
        raise ValueError(f"result key must match [A-Za-z0-9_.-]+, got {key!r}")
    return f"printf '%s\\n' \"{RESULT_PREFIX} {key}=$( ( {shell_expr} ) | tr '\\n' ' ' | sed 's/ *$//')\""


def parse_results(output: str) -> dict[str, str]:
    """Parse ``PVCORE-RESULT key=value`` lines of guest output into a dict.

    The marker may appear anywhere in a line (the console glues it to
    partial kernel lines); the value runs to the end of the line.  Carriage
    returns and surrounding whitespace are stripped; a later line for the
    same key wins.  Nothing is evaluated.
    """
    results: dict[str, str] = {}
    for line in output.replace("\r", "\n").split("\n"):
        m = _RESULT_RE.search(line.strip())
        if m:
            results[m.group(1)] = m.group(2).strip()
    return results


def _parse_done(output: str) -> int | None:
    rc = None
    for line in output.replace("\r", "\n").split("\n"):
        m = _DONE_RE.search(line.strip())
        if m:
            rc = int(m.group(1))
    return rc


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


@attrs.frozen
class GuestResult:
    """What a finished guest produced.

    ``output`` is the whole console text (carriage returns removed),
    ``returncode`` the exit status of the guest script taken from the
    ``PVCORE-GUEST-DONE rc=N`` line (-1 if the guest never got there),
    ``results`` the parsed ``PVCORE-RESULT key=value`` lines,
    ``qemu_returncode`` QEMU's own exit status (124/137 when ``timeout``
    killed it) and ``elapsed`` the wall time from start to exit in seconds.
    """

    output: str
    returncode: int
    results: dict[str, str]
    qemu_returncode: int = 0
    elapsed: float = 0.0

    @property
    def done(self) -> bool:
        """True if the guest printed ``PVCORE-GUEST-DONE``."""
        return _parse_done(self.output) is not None

    @property
    def failed_modules(self) -> list[str]:
        """Modules whose insmod failed in the guest."""
        out = []
        for line in self.output.split("\n"):
            _, sep, rest = line.partition(MODULE_FAILED_MARKER + " ")
            if sep:
                out.append(rest.strip())
        return out

    def check(self) -> "GuestResult":
        """Raise :class:`GuestError` (with the output tail) unless rc == 0."""
        if self.returncode != 0:
            raise GuestError(
                f"guest script failed: rc={self.returncode} (qemu rc={self.qemu_returncode}); "
                f"console tail:\n{_tail(self.output)}"
            )
        return self


# --------------------------------------------------------------------------
# Guest


@attrs.define
class Guest:
    """One QEMU TCG guest booting ``kernel`` with ``initramfs``.

    ``qemu_args`` are appended to the command line (devices, chardevs,
    netdevs...).  ``memory_mb`` is the guest RAM; with ``shared_memory``
    (default) it is a shared memfd backend, which vhost-user needs.
    ``append`` is added to the kernel command line.  ``max_runtime`` is the
    hard limit passed to ``timeout -k 5`` so that a hung QEMU always dies.

    Use as a context manager (QEMU is always killed on exit)::

        with Guest(kernel, initrd, ["-device", "virtio-rng-pci"]) as g:
            g.wait_for("PVCORE-GUEST-READY", 60)
            result = g.wait(60)
    """

    kernel: GuestKernel
    initramfs: Path
    qemu_args: list[str] = attrs.field(factory=list, converter=list)
    memory_mb: int = 512
    shared_memory: bool = True
    append: str = ""
    name: str = "guest"
    max_runtime: float = 600.0
    smp: int = 1
    _proc: subprocess.Popen | None = attrs.field(default=None, init=False, repr=False)
    _buf: bytearray = attrs.field(factory=bytearray, init=False, repr=False)
    _err: bytearray = attrs.field(factory=bytearray, init=False, repr=False)
    _cond: threading.Condition = attrs.field(factory=threading.Condition, init=False, repr=False)
    _eof: bool = attrs.field(default=False, init=False, repr=False)
    _threads: list[threading.Thread] = attrs.field(factory=list, init=False, repr=False)
    _t0: float = attrs.field(default=0.0, init=False, repr=False)
    _t1: float | None = attrs.field(default=None, init=False, repr=False)

    @property
    def spec(self) -> ArchSpec:
        """The architecture description for this guest's kernel."""
        return _arch_spec(self.kernel.arch)

    def command(self) -> list[str]:
        """The full command line (including ``timeout``) that :meth:`start` runs."""
        spec = self.spec
        append = f"console={spec.console} quiet panic=-1 {self.append}".strip()
        cmd = [
            "timeout", "-k", "5", f"{int(self.max_runtime)}",
            spec.qemu, "-accel", "tcg", "-M", spec.machine,
            "-m", str(self.memory_mb), "-smp", str(self.smp),
            "-nographic", "-no-reboot",
            "-kernel", str(self.kernel.kernel),
            "-initrd", str(self.initramfs),
            "-append", append,
        ]
        if self.shared_memory:
            cmd += [
                "-object", f"memory-backend-memfd,id=mem,size={self.memory_mb}M,share=on",
                "-machine", "memory-backend=mem",
            ]
        return cmd + [str(a) for a in self.qemu_args]

    def start(self) -> "Guest":
        """Launch QEMU; returns self.  Raises :class:`GuestError` if QEMU is missing."""
        if self._proc is not None:
            raise GuestError(f"guest {self.name} already started")
        qemu = self.spec.qemu
        if shutil.which(qemu) is None:
            pkg = "qemu-system-x86" if self.spec.name == "x86_64" else "qemu-system-ppc"
            raise GuestError(f"{qemu} not found: apt-get install -y {pkg}")
        if shutil.which("timeout") is None:
            raise GuestError("timeout (coreutils) not found")
        self._t0 = time.monotonic()
        self._proc = subprocess.Popen(
            self.command(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        t_out = threading.Thread(target=self._reader, args=(self._proc.stdout, self._buf, True),
                                 name=f"{self.name}-console", daemon=True)
        t_err = threading.Thread(target=self._reader, args=(self._proc.stderr, self._err, False),
                                 name=f"{self.name}-stderr", daemon=True)
        self._threads = [t_out, t_err]
        t_out.start()
        t_err.start()
        return self

    def _reader(self, stream, buf: bytearray, console: bool) -> None:
        fd = stream.fileno()
        try:
            while True:
                try:
                    chunk = os.read(fd, 65536)
                except OSError:
                    break
                if not chunk:
                    break
                with self._cond:
                    buf.extend(chunk)
                    if len(buf) > 64 << 20:  # hostile guest: keep the last 64 MiB
                        del buf[: len(buf) - (64 << 20)]
                    self._cond.notify_all()
        finally:
            with self._cond:
                if console:
                    self._eof = True
                self._cond.notify_all()

    @property
    def output(self) -> str:
        """All console text so far (decoded leniently, carriage returns removed)."""
        with self._cond:
            data = bytes(self._buf)
        return data.decode("utf-8", errors="replace").replace("\r", "")

    @property
    def stderr(self) -> str:
        """QEMU's own stderr so far."""
        with self._cond:
            data = bytes(self._err)
        return data.decode("utf-8", errors="replace")

    @property
    def running(self) -> bool:
        """True while QEMU is running."""
        return self._proc is not None and self._proc.poll() is None

    def _describe(self, why: str) -> str:
        err = self.stderr.strip()
        msg = f"guest {self.name}: {why}\n--- console tail ---\n{_tail(self.output)}"
        if err:
            msg += f"\n--- qemu stderr ---\n{_tail(err, 20)}"
        return msg

    def wait_for(self, text: str, timeout: float) -> str:
        """Block until the console output contains ``text``; return the output.

        Raises :class:`GuestError` if QEMU exits first and
        :class:`GuestTimeout` after ``timeout`` seconds, both with the tail of
        the output.  QEMU keeps running in the timeout case.
        """
        if self._proc is None:
            raise GuestError(f"guest {self.name} not started")
        deadline = time.monotonic() + timeout
        needle = text.replace("\r", "")
        while True:
            out = self.output
            if needle in out:
                return out
            with self._cond:
                if self._eof:
                    out = self.output
                    if needle in out:
                        return out
                    self._proc.wait()
                    raise GuestError(self._describe(
                        f"QEMU exited (rc={self._proc.returncode}) before {text!r} appeared"))
                left = deadline - time.monotonic()
                if left <= 0:
                    raise GuestTimeout(self._describe(f"{text!r} did not appear within {timeout:.0f}s"))
                self._cond.wait(min(left, 1.0))

    def wait(self, timeout: float) -> GuestResult:
        """Wait for QEMU to exit and return a :class:`GuestResult`.

        On timeout QEMU is killed and :class:`GuestTimeout` is raised with the
        tail of the output.
        """
        if self._proc is None:
            raise GuestError(f"guest {self.name} not started")
        try:
            qrc = self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise GuestTimeout(self._describe(f"did not power off within {timeout:.0f}s")) from None
        self._t1 = time.monotonic()
        for t in self._threads:
            t.join(10)
        out = self.output
        rc = _parse_done(out)
        return GuestResult(
            output=out,
            returncode=-1 if rc is None else rc,
            results=parse_results(out),
            qemu_returncode=qrc,
            elapsed=self._t1 - self._t0,
        )

    def kill(self) -> None:
        """Kill QEMU (and its ``timeout`` wrapper) if it is still running."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        for t in self._threads:
            t.join(5)
        for s in (proc.stdout, proc.stderr):
            if s is not None:
                with contextlib.suppress(OSError):
                    s.close()

    def __enter__(self) -> "Guest":
        if self._proc is None:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.kill()


def run_guest(
    arch: str,
    script: str,
    modules: Sequence[str] = (),
    qemu_args: Sequence[str] = (),
    *,
    timeout: float = 120.0,
    memory_mb: int = 512,
    shared_memory: bool = True,
    append: str = "",
    files: Mapping[str, bytes] | None = None,
    name: str = "guest",
    work_dir: Path | None = None,
    cache: Path | None = None,
    check: bool = False,
) -> GuestResult:
    """Fetch the kernel, build an initramfs, boot one guest, return its result.

    ``script`` is the shell script body run in the guest (print results with
    :func:`result_line` or ``echo PVCORE-RESULT key=value``); ``modules``
    are loaded (with their dependencies) before it.  ``timeout`` bounds the
    whole boot; on expiry QEMU is killed and :class:`GuestTimeout` raised.
    The initramfs goes to ``work_dir`` (a temporary directory by default).
    With ``check=True`` a non-zero script status raises :class:`GuestError`.
    """
    kernel = fetch_kernel(arch, cache)
    with contextlib.ExitStack() as stack:
        if work_dir is None:
            work_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f"pvcore-{name}-")))
        initrd = build_initramfs(kernel, script, list(modules), Path(work_dir), files,
                                 name=f"{name}-initramfs.cpio.gz")
        guest = Guest(kernel, initrd, list(qemu_args), memory_mb=memory_mb, shared_memory=shared_memory,
                      append=append, name=name, max_runtime=timeout + 10)
        with guest:
            result = guest.wait(timeout)
    if check:
        result.check()
    return result
