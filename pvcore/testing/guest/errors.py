"""The real-guest harness' errors: every failure is a :class:`GuestError`."""

from __future__ import annotations

__all__ = ["GuestError", "GuestTimeout", "KernelFetchError", "UnknownModuleError"]


class GuestError(RuntimeError):
    """Any failure of the real-guest harness (boot, fetch, initramfs)."""


class GuestTimeout(GuestError):
    """The guest did not reach the awaited point within the timeout."""


class KernelFetchError(GuestError):
    """The guest kernel or busybox could not be downloaded or unpacked."""


class UnknownModuleError(GuestError):
    """A requested kernel module is neither a module nor built in."""

