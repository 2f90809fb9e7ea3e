"""Real-guest harness: boot a Debian Linux guest under QEMU TCG.

The tests, the demo and the benchmarks use this package to boot a real Linux
guest whose devices are served by pvcore backends (vhost-user sockets,
chardevs, ...). Everything it needs is fetched from Debian's archive and
kept in a cache outside the checkout. One module per concern:

* :mod:`~pvcore.testing.guest.kernels`: :func:`fetch_kernel` downloads and
  unpacks Debian's kernel and busybox for an architecture (:data:`ARCHES`)
  into :func:`cache_dir`;
* :mod:`~pvcore.testing.guest.modules`: module names, ``modules.dep`` and
  the load order (:func:`resolve_modules`), a depmod without kmod;
* :mod:`~pvcore.testing.guest.initramfs`: :func:`build_initramfs` writes a
  newc cpio (:class:`CpioArchive`) with busybox, the modules and an
  ``/init`` that runs the caller's script;
* :mod:`~pvcore.testing.guest.results`: the console markers,
  :func:`result_line`, :func:`parse_results` and :class:`GuestResult`;
* :mod:`~pvcore.testing.guest.qemu`: :class:`Guest` boots one QEMU (always
  ``-accel tcg``, always under ``timeout -k``) and captures its console;
  :func:`run_guest` does everything in one call;
* :mod:`~pvcore.testing.guest.attach`: :func:`plugin_qemu_args`, the
  arguments that attach a guest to pvcore's devices, asked of the plugin that
  serves them.

Example::

    from pvcore.testing.guest import plugin_qemu_args, result_line, run_guest

    (qemu_args,) = plugin_qemu_args("kvm", ["block:path=/tmp/disk.img,socket=/tmp/blk.sock"]).values()
    res = run_guest(
        "x86_64",
        script=result_line("kernel", "uname -r"),
        modules=["virtio_blk"],
        qemu_args=qemu_args,
    )
    res.check()
    print(res.results["kernel"])

Guest output is treated as untrusted text: it is only ever matched with
regular expressions, never evaluated.
"""

from __future__ import annotations

from pvcore.testing.guest.attach import plugin_qemu_args
from pvcore.testing.guest.errors import GuestError, GuestTimeout, KernelFetchError, UnknownModuleError
from pvcore.testing.guest.initramfs import CpioArchive, build_initramfs
from pvcore.testing.guest.kernels import ARCHES, ArchSpec, GuestKernel, cache_dir, fetch_kernel
from pvcore.testing.guest.modules import read_modules_dep, resolve_modules
from pvcore.testing.guest.qemu import Guest, run_guest
from pvcore.testing.guest.results import (
    DONE_MARKER,
    MODULE_FAILED_MARKER,
    READY_MARKER,
    RESULT_PREFIX,
    GuestResult,
    parse_results,
    result_line,
)

__all__ = [
    "ARCHES",
    "READY_MARKER",
    "DONE_MARKER",
    "MODULE_FAILED_MARKER",
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
    "plugin_qemu_args",
    "read_modules_dep",
    "resolve_modules",
    "result_line",
    "run_guest",
]
