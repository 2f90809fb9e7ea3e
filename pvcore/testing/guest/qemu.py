"""The QEMU runner: one TCG guest, its console captured, always under ``timeout -k``.

:class:`Guest` boots one QEMU (always ``-accel tcg``, always under
``timeout -k``) and collects the serial console; :class:`GuestResult` holds
the output and the ``PVCORE-RESULT key=value`` lines the guest script printed.
:func:`run_guest` fetches the kernel, builds the initramfs and boots the guest
in one call. The runner owns the machine, memory, kernel, initrd and accel
arguments; the arguments that attach pvcore's devices come from the serving
plugin (:func:`~pvcore.testing.guest.attach.plugin_qemu_args`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Mapping, Sequence

import attrs

from pvcore.testing.guest.errors import GuestError, GuestTimeout
from pvcore.testing.guest.initramfs import build_initramfs
from pvcore.testing.guest.kernels import ArchSpec, GuestKernel, arch_spec, fetch_kernel
from pvcore.testing.guest.results import GuestResult, console_tail, parse_done, parse_results

__all__ = ["Guest", "run_guest"]


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
        return arch_spec(self.kernel.arch)

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
        msg = f"guest {self.name}: {why}\n--- console tail ---\n{console_tail(self.output)}"
        if err:
            msg += f"\n--- qemu stderr ---\n{console_tail(err, 20)}"
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
        rc = parse_done(out)
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
