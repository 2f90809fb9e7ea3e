"""What a guest tells the harness: the console markers, ``PVCORE-RESULT`` lines, :class:`GuestResult`.

The ``/init`` that :mod:`~pvcore.testing.guest.initramfs` writes prints the
markers; the guest script prints ``PVCORE-RESULT key=value`` lines (see
:func:`result_line`). Guest output is treated as untrusted text: it is only
ever matched with regular expressions, never evaluated.
"""

from __future__ import annotations

import re

import attrs

from pvcore.testing.guest.errors import GuestError

__all__ = [
    "DONE_MARKER",
    "MODULE_FAILED_MARKER",
    "READY_MARKER",
    "RESULT_PREFIX",
    "GuestResult",
    "console_tail",
    "parse_done",
    "parse_results",
    "result_line",
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


def parse_done(output: str) -> int | None:
    """The script's exit status from the last ``PVCORE-GUEST-DONE rc=N`` line of ``output``, or None."""
    rc = None
    for line in output.replace("\r", "\n").split("\n"):
        m = _DONE_RE.search(line.strip())
        if m:
            rc = int(m.group(1))
    return rc


def console_tail(text: str, lines: int = 40) -> str:
    """The last ``lines`` lines of ``text``, for error messages."""
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
        return parse_done(self.output) is not None

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
                f"console tail:\n{console_tail(self.output)}"
            )
        return self

