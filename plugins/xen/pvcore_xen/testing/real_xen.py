"""A REAL Xen hypervisor for tests: Debian's Xen 4.17 under QEMU TCG, pvcore in its dom0.

One boot runs many checks. :func:`boot` starts ``qemu-system-x86_64 -accel
tcg`` with Debian's Xen hypervisor, Debian's x86_64 kernel as a PV dom0 and
an initramfs built here; dom0 starts xenstored, ``xen-init-dom0`` and
xenconsoled, mounts the host's whole root read-only over 9p (``/mnt/root``)
and a writable work directory (``/mnt/work``, the host directory given to
:func:`boot`), then runs a fixed flow in which every :class:`Check` has its
say:

1. ``dom0_before`` of each check (dom0 shell, before the guest exists);
2. ``xl create -p`` of one PV guest named ``domU`` (256 MiB, one vCPU,
   console on xenconsoled, no disk or NIC of the toolstack's own unless a
   check adds lines to its xl config: ``xl_config``; a line setting a key
   of the base config, such as ``vcpus = 2``, replaces it);
3. one ``pvcore serve --hypervisor xen`` with the ``serve`` devices of every
   check, run from the host's checkout in a chroot of the host root, until
   every device logged ``up``;
4. ``xl unpause``: the guest's /init loads xen-blkfront and xen-netfront
   (with the parameters of a check's ``domu_module_options``, e.g.
   ``xen-blkfront max_ring_page_order=2``: they apply to the whole guest) and
   runs the ``domu`` shell of each check, in order, then powers off; at the
   same time dom0 runs the ``dom0_during`` shell of each check in the
   background;
5. ``dom0_after`` of each check, pvcore still serving; then pvcore gets
   SIGTERM and ``dom0_final`` of each check runs.

Every fragment's output and exit status are in the :class:`XenRun` that
:func:`boot` returns (``run.dom0["NAME.PHASE"]``, ``run.domu["NAME"]``), with
pvcore's log (``run.pvcore_log``), the guest's console (``run.guest_console``)
and the serial console of Xen and dom0 (``run.serial``).

The environment of dom0 fragments: ``$PVCORE`` runs the checkout's pvcore
(``$PVCORE ctl list --json``), ``$CHROOT`` runs any host command in the
chroot; ``$DOMID`` is the guest's domain id (from phase 2 on); ``$SCRATCH``
is a directory on dom0's tmpfs that is the same path inside and outside the
chroot (disk images go there: the host root is read-only); ``$OUT`` is the
work directory's ``out`` (as dom0 sees it); ``$RUN`` is pvcore's run
directory. Xen's tools (``xl``, ``xenstore-*``) are on the PATH. ``serve``
devices may use ``$DOMID`` and ``$SCRATCH``. pvcore's pid is in
``$SCRATCH/pvcore.pid`` and ``sh /mnt/work/serve.sh`` starts it again with the
same devices (appending to its log and rewriting the pid file): a check may
kill it and start it again under the running guest.

Adding checks to the same boot: write a :class:`Check` and add it to the
list the test module passes to :func:`boot` (``plugins/xen/tests/
test_real_xen.py`` builds one list, ``CHECKS``, boots once in a module
fixture, and each test reads its own check's outputs). A domU fragment must
not power the guest off or wait forever; a dom0 fragment gets its own shell.

What is downloaded: the Debian packages in :data:`XEN_PACKAGES` (``apt-get
download``, nothing installed on the host) into ``$PVCORE_CACHE/xen`` (or
``~/.cache/pvcore/xen``), unpacked there; the kernel comes from pvcore's
guest kit (:func:`~pvcore.testing.guest.kernels.fetch_kernel`).
"""

from __future__ import annotations

import fcntl
import gzip
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import attrs

from pvcore.testing.guest.errors import GuestError, KernelFetchError
from pvcore.testing.guest.initramfs import CpioArchive, build_initramfs
from pvcore.testing.guest.kernels import GuestKernel, cache_dir, fetch_kernel
from pvcore.testing.guest.modules import (
    decompress_module,
    module_name,
    read_builtin,
    read_modules_dep,
    resolve_modules,
    uncompressed_name,
)

XEN_PACKAGES = (
    "xen-hypervisor-4.17-amd64",
    "xen-utils-4.17",
    "xen-utils-common",
    "xenstore-utils",
    "libxencall1",
    "libxenevtchn1",
    "libxenforeignmemory1",
    "libxengnttab1",
    "libxenhypfs1",
    "libxenmisc4.17",
    "libxenstore4",
    "libxentoollog1",
    "libyajl2",
    "libxendevicemodel1",
    "libxentoolcore1",
)
"""Debian 12's Xen 4.17: the hypervisor, the toolstack and the libraries it loads."""

DOM0_MODULES = (
    "xenfs", "xen-evtchn", "xen-gntdev", "xen-gntalloc", "xen-privcmd", "xen-blkback", "xen-netback",
    "loop", "bridge", "tun", "virtio_pci", "9pnet_virtio", "9p",
)
DOMU_MODULES = ("xen-blkfront", "xen-netfront")

HOST_LIBRARIES = (
    "libgcc_s.so.1", "libc.so.6", "libuuid.so.1", "libz.so.1", "liblzma.so.5", "libzstd.so.1",
    "libtinfo.so.6", "libm.so.6", "libpthread.so.0", "libdl.so.2",
)
"""Host libraries the Xen tools, bash and flock load in dom0 (libgcc_s: xl's pthread_cancel)."""

DONE_MARKER = "PVCORE-XEN-SCENARIO-DONE"
PHASES = ("dom0_before", "dom0_during", "dom0_after", "dom0_final")
SCRATCH = "/run/pvcore-xen-test"
"""dom0's tmpfs, bind-mounted at the same path in the chroot: images, run directory, logs."""


@attrs.frozen
class Check:
    """One check's part of the boot: shell fragments for each phase and pvcore devices to serve."""

    name: str
    serve: tuple[str, ...] = ()
    xl_config: tuple[str, ...] = ()
    domu_module_options: tuple[str, ...] = ()
    dom0_before: str = ""
    dom0_during: str = ""
    domu: str = ""
    dom0_after: str = ""
    dom0_final: str = ""

    def __attrs_post_init__(self) -> None:
        if not re.fullmatch(r"[a-z][a-z0-9_]*", self.name):
            raise ValueError(f"check name {self.name!r}: use lower-case letters, digits and _")


@attrs.frozen
class Fragment:
    """What one shell fragment printed and its exit status (None: it never finished)."""

    output: str
    rc: int | None


@attrs.frozen
class XenRun:
    """Everything one boot left behind (see the module docstring)."""

    dom0: dict[str, Fragment]
    domu: dict[str, Fragment]
    pvcore_log: str
    guest_console: str
    serial: str
    elapsed: float
    completed: bool

    def describe(self) -> str:
        """The tails of the logs, for an assertion message."""
        return (
            f"--- serial (tail)\n{self.serial[-3000:]}\n--- pvcore log (tail)\n{self.pvcore_log[-3000:]}\n"
            f"--- guest console (tail)\n{self.guest_console[-3000:]}"
        )


@attrs.frozen
class XenTools:
    """Debian's Xen unpacked: ``root`` (the packages' files) and ``hypervisor`` (Xen as an ELF QEMU boots)."""

    root: Path
    hypervisor: Path


def unavailable_reason() -> str | None:
    """Why a real Xen boot cannot run on this host, or None if it can."""
    if os.uname().machine != "x86_64":
        return f"the real Xen boot needs an x86_64 host (QEMU TCG of x86_64 with 9p), this is {os.uname().machine}"
    for tool in ("qemu-system-x86_64", "apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (scripts/ensure-debian-packages installs it)"
    return None


def fetch_xen(cache: Path | None = None) -> XenTools:
    """Download (once) and unpack :data:`XEN_PACKAGES` into ``cache/xen`` (several processes may ask at once)."""
    base = (cache or cache_dir()) / "xen"
    base.mkdir(parents=True, exist_ok=True)
    with open(base / ".lock", "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        return _fetch_xen(base)


def _fetch_xen(base: Path) -> XenTools:
    root = base / "root"
    hypervisor = base / "xen.elf"
    if hypervisor.exists() and (root / "usr/lib/xen-4.17/bin/xl").exists():
        return XenTools(root, hypervisor)
    debs = base / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    missing = [p for p in XEN_PACKAGES if not list(debs.glob(f"{p}_*.deb"))]
    if missing:
        result = subprocess.run(["apt-get", "download", *missing], cwd=debs, capture_output=True, text=True, timeout=900)
        if result.returncode != 0 and os.geteuid() == 0:  # empty or stale apt lists (a fresh CI machine): update once
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True, timeout=900)
            result = subprocess.run(["apt-get", "download", *missing], cwd=debs, capture_output=True, text=True, timeout=900)
        if result.returncode != 0:
            raise KernelFetchError(
                f"apt-get download of Xen's packages failed (rc={result.returncode}; run apt-get update?):\n"
                f"  cd {debs} && apt-get download {' '.join(missing)}\n{result.stderr[-2000:]}"
            )
    staging = Path(tempfile.mkdtemp(prefix=".root-", dir=base))
    try:
        for package in XEN_PACKAGES:
            (deb,) = sorted(debs.glob(f"{package}_*.deb"))[-1:]
            subprocess.run(["dpkg-deb", "-x", str(deb), str(staging)], check=True, timeout=300)
        shutil.rmtree(root, ignore_errors=True)
        os.rename(staging, root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    (image,) = sorted(root.glob("boot/xen-4.17-amd64.gz"))
    partial = hypervisor.with_suffix(".part")
    partial.write_bytes(gzip.decompress(image.read_bytes()))
    os.replace(partial, hypervisor)
    return XenTools(root, hypervisor)


def _add_tree(archive: CpioArchive, source: Path, target: str) -> None:
    """Copy a host directory tree into the archive (symlinks as symlinks, modes kept)."""
    for path in sorted(source.rglob("*")):
        name = f"{target}/{path.relative_to(source).as_posix()}"
        if path.is_symlink():
            archive.add_symlink(name, os.readlink(path))
        elif path.is_dir():
            archive.add_dir(name)
        else:
            archive.add_file(name, path.read_bytes(), path.stat().st_mode & 0o7777)


def _add_modules(archive: CpioArchive, kernel: GuestKernel, modules: Sequence[str]) -> list[str]:
    """Put ``modules`` and what they depend on in the archive; their paths, in insmod order."""
    directory = kernel.modules_dir
    order = resolve_modules(modules, read_modules_dep((directory / "modules.dep").read_text(errors="replace")), read_builtin(directory))
    paths = []
    for relative in order:
        path = f"lib/modules/{kernel.version}/{uncompressed_name(relative)}"
        archive.add_file(path, decompress_module(directory / relative))
        paths.append(f"/{path}")
    return paths


DOM0_INIT = r"""#!/bin/sh
/bin/busybox --install -s
export PATH=/usr/lib/xen-4.17/bin:/usr/bin:/usr/sbin:/bin:/sbin LD_LIBRARY_PATH=/lib/x86_64-linux-gnu
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm; mount -t devpts devpts /dev/pts
ln -sf /proc/self/fd /dev/fd; ln -sf /proc/self/fd/0 /dev/stdin; ln -sf /proc/self/fd/1 /dev/stdout; ln -sf /proc/self/fd/2 /dev/stderr
mount -t tmpfs tmpfs /run; mount -t tmpfs tmpfs /tmp; ln -sfn /run /var/run
mkdir -p /run/xen /run/xenstored /var/lib/xen /var/log/xen/console /var/lib/xenstored /run/lock
for m in @MODULES@; do insmod $m || echo "DOM0: insmod $m failed"; done
mount -t xenfs xenfs /proc/xen
echo "DOM0: capabilities $(cat /proc/xen/capabilities)"
xenstored --pid-file /run/xenstored.pid
xen-init-dom0
xenconsoled --pid-file=/run/xenconsoled.pid --log=guest --log-dir=/var/log/xen/console
mkdir -p /mnt/root /mnt/work
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=loose hostroot /mnt/root || echo "DOM0: no host root"
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 work /mnt/work || echo "DOM0: no work share"
for d in proc sys dev dev/pts run; do mount -o bind /$d /mnt/root/$d; done
mount -t xenfs xenfs /mnt/root/proc/xen
echo "DOM0: base ready, uptime $(cut -d' ' -f1 /proc/uptime)"
sh /mnt/work/scenario.sh > /mnt/work/out/scenario.log 2>&1
echo "DOM0: scenario rc=$?, uptime $(cut -d' ' -f1 /proc/uptime)"
sync
echo @DONE@
poweroff -f
"""


def build_dom0(kernel: GuestKernel, tools: XenTools, out: Path) -> Path:
    """dom0's initramfs: busybox, the modules, Xen's tools and libraries, bash and flock for its scripts."""
    archive = CpioArchive()
    for directory in ("bin", "sbin", "usr/bin", "usr/sbin", "usr/lib", "etc", "proc", "sys", "dev", "run", "tmp",
                      "root", "var", "var/lib", "var/log", "mnt", "lib", "lib64", "lib/x86_64-linux-gnu"):
        archive.add_dir(directory)
    archive.add_chardev("dev/console", 5, 1)
    archive.add_file("bin/busybox", kernel.busybox.read_bytes(), 0o755)
    archive.add_symlink("bin/sh", "busybox")
    modules = _add_modules(archive, kernel, DOM0_MODULES)
    _add_tree(archive, tools.root / "usr/lib/xen-4.17", "usr/lib/xen-4.17")
    _add_tree(archive, tools.root / "etc/xen", "etc/xen")
    for library in sorted((tools.root / "usr/lib/x86_64-linux-gnu").glob("*.so*")):
        archive.add_file(f"lib/x86_64-linux-gnu/{library.name}", library.read_bytes(), 0o755)
    for binary in sorted((tools.root / "usr/bin").glob("xenstore*")):
        if binary.is_symlink():
            archive.add_symlink(f"usr/bin/{binary.name}", os.readlink(binary))
        else:
            archive.add_file(f"usr/bin/{binary.name}", binary.read_bytes(), 0o755)
    for library in HOST_LIBRARIES:
        archive.add_file(f"lib/x86_64-linux-gnu/{library}", Path("/lib/x86_64-linux-gnu", library).read_bytes(), 0o755)
    archive.add_file("lib64/ld-linux-x86-64.so.2", Path("/lib64/ld-linux-x86-64.so.2").read_bytes(), 0o755)
    archive.add_file("bin/bash", Path("/bin/bash").read_bytes(), 0o755)
    archive.add_file("usr/bin/flock", Path("/usr/bin/flock").read_bytes(), 0o755)
    init = DOM0_INIT.replace("@MODULES@", " ".join(modules)).replace("@DONE@", DONE_MARKER)
    archive.add_file("init", init.encode(), 0o755)
    path = out / "dom0.cpio.gz"
    archive.write_gz(path, compresslevel=1)
    return path


def _module_options(checks: Sequence[Check]) -> dict[str, str]:
    """``{module name: parameters}`` from every check's ``domu_module_options`` (``"MODULE PARAM=VALUE ..."``)."""
    options = {}
    for check in checks:
        for entry in check.domu_module_options:
            module, _, parameters = entry.partition(" ")
            options[module_name(module)] = f"{options.get(module_name(module), '')} {parameters}".strip()
    return options


def _domu_modules(kernel: GuestKernel, options: dict[str, str]) -> tuple[list[str], dict[str, bytes], str]:
    """The modules /init loads, the archive files of those loaded with parameters, and the lines loading them."""
    plain = [module for module in DOMU_MODULES if module_name(module) not in options]
    directory = kernel.modules_dir
    order = resolve_modules(list(options), read_modules_dep((directory / "modules.dep").read_text(errors="replace")),
                            read_builtin(directory)) if options else []
    files, lines = {}, []
    for relative in order:
        path = f"lib/modules/{kernel.version}/{uncompressed_name(relative)}"
        files[path] = decompress_module(directory / relative)
        name = module_name(relative)
        lines.append(f"insmod /{path} {options.get(name, '')} || echo 'DOMU: insmod {name} failed'")
    return plain, files, "".join(f"{line}\n" for line in lines)


def _domu_script(checks: Sequence[Check]) -> str:
    lines = []
    for check in checks:
        if check.domu:
            lines += [
                f"echo '=== DOMU-PART {check.name} BEGIN'",
                f"( {check.domu.strip()}\n) 2>&1",
                f"echo \"=== DOMU-PART {check.name} END rc=$?\"",
            ]
    return "\n".join(lines) + "\n"


def _scenario(checks: Sequence[Check], pvcore: str, timeout: float) -> str:
    """The dom0 flow of the module docstring, as a shell script run from /init."""
    serve = " ".join(device for check in checks for device in check.serve)

    def phase(name: str, background: bool = False) -> list[str]:
        lines = []
        for check in checks:
            if getattr(check, name):
                key = f"{check.name}.{name}"
                run = f"sh /mnt/work/parts/{key}.sh > $OUT/{key}.log 2>&1; echo $? > $OUT/{key}.rc"
                lines += [f"( {run} ) &", 'BG="$BG $!"'] if background else [run]
        return lines

    chroot = (
        "chroot /mnt/root /usr/bin/env -i PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin HOME=$SCRATCH"
        " TMPDIR=$SCRATCH PYTHONDONTWRITEBYTECODE=1"
    )
    lines = [
        "set -u",
        'BG=""',
        f"export SCRATCH={SCRATCH} OUT=/mnt/work/out RUN={SCRATCH}/run",
        f'export CHROOT="{chroot}"',
        f"export PVCORE=\"$CHROOT {shlex.quote(pvcore)}\"",
        "mkdir -p $SCRATCH $RUN",
        "T0=$(cut -d' ' -f1 /proc/uptime)",
        "stamp() { echo \"[$(cut -d' ' -f1 /proc/uptime)] $*\"; }",
        "stamp before",
        *phase("dom0_before"),
        "stamp xl create",
        "xl create -p /mnt/work/domU.cfg > $OUT/xl-create.log 2>&1 || stamp 'xl create failed'",
        "export DOMID=$(xl domid domU)",
        "stamp domid $DOMID",
        f"if [ -n '{serve}' ]; then",
        f"  printf '%s\\n' '$PVCORE --log-level debug serve --hypervisor xen --run-dir $RUN {serve} >> $SCRATCH/pvcore.log 2>&1 &'"
        " 'echo $! > $SCRATCH/pvcore.pid' > /mnt/work/serve.sh",
        "  sh /mnt/work/serve.sh",
        f"  want=$(echo {serve} | wc -w); i=0",
        "  while [ $(grep -c ' up: ' $SCRATCH/pvcore.log) -lt $want ] && kill -0 $(cat $SCRATCH/pvcore.pid) 2>/dev/null"
        " && [ $i -lt 1500 ]; do sleep 0.2; i=$((i+1)); done",
        "  stamp pvcore serving",
        "fi",
        "xl unpause domU",
        *phase("dom0_during", background=True),
        "i=0",
        "copy_logs() { cp $SCRATCH/pvcore.log $OUT/pvcore.log 2>/dev/null;"
        " cp /var/log/xen/console/guest-domU.log $OUT/guest-console.log 2>/dev/null; }",
        f"while xl domid domU > /dev/null 2>&1 && [ $i -lt {int(timeout)} ]; do"
        " sleep 1; i=$((i+1)); [ $((i % 5)) = 0 ] && copy_logs; done",
        "stamp guest gone",
        "xl destroy domU > /dev/null 2>&1",
        "for pid in $BG; do i=0; while kill -0 $pid 2>/dev/null && [ $i -lt 300 ]; do sleep 0.2; i=$((i+1)); done; done",
        *phase("dom0_after"),
        "stamp after",
        "if [ -f $SCRATCH/pvcore.pid ]; then PID=$(cat $SCRATCH/pvcore.pid); kill -TERM $PID; i=0;"
        " while kill -0 $PID 2>/dev/null && [ $i -lt 300 ]; do sleep 0.2; i=$((i+1)); done; fi",
        "stamp pvcore stopped",
        *phase("dom0_final"),
        "copy_logs",
        "stamp done",
    ]
    return "\n".join(lines) + "\n"


DOMU_CONFIG = """name = "domU"
type = "pv"
memory = 256
vcpus = 1
kernel = "/mnt/work/vmlinuz"
ramdisk = "/mnt/work/domU.cpio.gz"
extra = "console=hvc0 rdinit=/init loglevel=4"
on_poweroff = "destroy"
on_crash = "destroy"
"""


def _fragments(out: Path, keys: Sequence[str]) -> dict[str, Fragment]:
    found = {}
    for key in keys:
        log = out / f"{key}.log"
        rc = out / f"{key}.rc"
        text = log.read_text(errors="replace") if log.exists() else ""
        code = rc.read_text().strip() if rc.exists() else ""
        found[key] = Fragment(text, int(code) if code.lstrip("-").isdigit() else None)
    return found


def _domu_fragments(console: str, checks: Sequence[Check]) -> dict[str, Fragment]:
    found = {}
    for check in checks:
        if not check.domu:
            continue
        match = re.search(
            rf"=== DOMU-PART {check.name} BEGIN\r?\n(.*?)(?:=== DOMU-PART {check.name} END rc=(-?\d+)|\Z)", console, re.S
        )
        if match is None:
            found[check.name] = Fragment("", None)
        else:
            found[check.name] = Fragment(match.group(1).replace("\r", ""), int(match.group(2)) if match.group(2) else None)
    return found


def checkout_pvcore() -> str:
    """The ``pvcore`` command of the running virtual environment (the same path in dom0's chroot)."""
    candidate = Path(sys.executable).parent / "pvcore"
    if not candidate.exists():
        raise GuestError(f"{candidate} does not exist: install pvcore in this virtual environment (make setup)")
    return str(candidate)


def boot(checks: Sequence[Check], work: Path, *, timeout: float = 900.0, guest_timeout: float = 240.0) -> XenRun:
    """Boot Xen once with every check's part (see the module docstring); ``work`` is an empty host directory.

    ``timeout`` bounds the whole boot (QEMU is killed after it), ``guest_timeout`` the guest's run; both
    are generous because a machine shared with other work makes TCG several times slower. The
    guest's console and pvcore's log are copied to ``work/out`` every 5 s while the guest runs, so a
    boot that times out still shows how far it got.
    """
    names = [check.name for check in checks]
    if len(set(names)) != len(names):
        raise ValueError(f"check names must be unique: {names}")
    kernel = fetch_kernel("x86_64")
    tools = fetch_xen()
    work = Path(work).resolve()
    out = work / "out"
    parts = work / "parts"
    out.mkdir(parents=True)
    parts.mkdir()
    for check in checks:
        for name in PHASES:
            text = getattr(check, name)
            if text:
                (parts / f"{check.name}.{name}.sh").write_text(text.strip() + "\n")
    (work / "scenario.sh").write_text(_scenario(checks, checkout_pvcore(), guest_timeout))
    extra = [line for check in checks for line in check.xl_config]
    replaced = {line.partition("=")[0].strip() for line in extra}
    base = [line for line in DOMU_CONFIG.splitlines() if line.partition("=")[0].strip() not in replaced]
    (work / "domU.cfg").write_text("".join(f"{line}\n" for line in base + extra))
    shutil.copyfile(kernel.kernel, work / "vmlinuz")
    plain, files, loading = _domu_modules(kernel, _module_options(checks))
    build_initramfs(kernel, loading + _domu_script(checks), plain, work, files, name="domU.cpio.gz", auto_virtio_pci=False)
    dom0 = build_dom0(kernel, tools, work)
    serial = work / "serial.log"
    command = [
        "timeout", "-k", "5", str(int(timeout)),
        "qemu-system-x86_64", "-accel", "tcg", "-cpu", "qemu64,+svm,+npt", "-m", "3072", "-smp", "2",
        "-display", "none", "-monitor", "none", "-no-reboot", "-serial", f"file:{serial}",
        "-kernel", str(tools.hypervisor),
        "-append", "loglvl=all guest_loglvl=all console=com1 com1=115200,8n1 noreboot dom0_mem=1024M,max:1024M",
        "-initrd", f"{kernel.kernel} console=hvc0 earlyprintk=xen loglevel=4,{dom0}",
        "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,id=hostroot,readonly=on,multidevs=remap",
        "-virtfs", f"local,path={work},mount_tag=work,security_model=none,id=work",
    ]
    started = time.monotonic()
    with open(work / "qemu.log", "wb") as qemu_log:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=qemu_log, stderr=subprocess.STDOUT)
        completed = False
        try:
            while process.poll() is None:
                if serial.exists() and DONE_MARKER.encode() in serial.read_bytes():
                    completed = True
                    break
                time.sleep(1)
        finally:
            if process.poll() is None:
                time.sleep(2)
                process.terminate()
            process.wait(30)
    elapsed = time.monotonic() - started
    text = serial.read_bytes().decode(errors="replace").replace("\x00", "") if serial.exists() else ""
    completed = completed or DONE_MARKER in text
    console = (out / "guest-console.log").read_text(errors="replace") if (out / "guest-console.log").exists() else ""
    keys = [f"{check.name}.{name}" for check in checks for name in PHASES if getattr(check, name)]
    return XenRun(
        dom0=_fragments(out, keys),
        domu=_domu_fragments(console, checks),
        pvcore_log=(out / "pvcore.log").read_text(errors="replace") if (out / "pvcore.log").exists() else "",
        guest_console=console,
        serial=text + "\n--- dom0 scenario\n" + ((out / "scenario.log").read_text(errors="replace") if (out / "scenario.log").exists() else ""),
        elapsed=elapsed,
        completed=completed,
    )
