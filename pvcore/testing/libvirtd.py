"""Start a system libvirtd with the QEMU driver on a test machine (root, no systemd needed).

Debian's libvirt packages install the daemon but, in a container or a fresh
CI machine, nothing that makes it start: the ``libvirt-qemu`` user and the
``kvm`` group may be missing, cgroups and mount namespaces are unavailable,
and there is no virtlogd. :func:`ensure_libvirtd` fixes exactly that, and is
idempotent, so a pytest fixture can call it every session:

* creates the groups ``kvm`` and ``libvirt-qemu`` and the user
  ``libvirt-qemu`` when missing (the daemon refuses to start without them);
* creates /var/log/libvirt and /var/run/libvirt;
* sets the keys of :data:`QEMU_CONF_SETTINGS` in /etc/libvirt/qemu.conf
  (replacing a key's active line, appending missing keys; comments stay);
* starts ``libvirtd -d`` unless it already answers, and waits for
  ``qemu:///system`` to open.

A libvirtd that already runs with a qemu.conf this function had to change
is not restarted behind the caller's back: :class:`LibvirtdSetupError` says
so and names the fix.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import subprocess
import time
from pathlib import Path

QEMU_CONF = Path("/etc/libvirt/qemu.conf")
SOCKET = Path("/var/run/libvirt/libvirt-sock")
SYSTEM_URI = "qemu:///system"

QEMU_CONF_SETTINGS: dict[str, str] = {
    "cgroup_controllers": "[ ]",
    "namespaces": "[ ]",
    "user": '"root"',
    "group": '"root"',
    "dynamic_ownership": "0",
    "security_driver": '"none"',
    "stdio_handler": '"file"',
    "remember_owner": "0",
}
"""What QEMU guests under TCG need here: no cgroups, no namespaces, no
ownership games, console logs written by libvirtd itself (no virtlogd)."""

PACKAGES = "libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients"


class LibvirtdSetupError(RuntimeError):
    """libvirtd cannot be made to run here; the message names the fix."""


def configure_qemu_conf(path: Path = QEMU_CONF) -> bool:
    """Set :data:`QEMU_CONF_SETTINGS` in ``path``; return True if the file changed."""
    text = path.read_text() if path.exists() else ""
    lines = text.splitlines()
    for key, value in QEMU_CONF_SETTINGS.items():
        wanted = f"{key} = {value}"
        active = re.compile(rf"^\s*{re.escape(key)}\s*=")
        found = [i for i, line in enumerate(lines) if active.match(line)]
        if found:
            for i in found:
                lines[i] = wanted
        else:
            lines.append(wanted)
    updated = "\n".join(lines) + "\n"
    if updated == text:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(updated)
    return True


def ensure_accounts() -> None:
    """Create the ``kvm`` and ``libvirt-qemu`` groups and the ``libvirt-qemu`` user if missing."""
    for group in ("kvm", "libvirt-qemu"):
        try:
            grp.getgrnam(group)
        except KeyError:
            _run(["groupadd", "--system", group])
    try:
        pwd.getpwnam("libvirt-qemu")
    except KeyError:
        _run(["useradd", "--system", "--no-create-home", "--gid", "libvirt-qemu", "--shell", "/usr/sbin/nologin",
              "libvirt-qemu"])


def libvirtd_answers(uri: str = SYSTEM_URI) -> bool:
    """Whether a libvirtd accepts a connection to ``uri`` right now."""
    import libvirt

    if not SOCKET.exists():
        return False
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError:
        return False
    conn.close()
    return True


def ensure_libvirtd(timeout: float = 30.0) -> str:
    """Make a libvirtd with the QEMU driver answer on ``qemu:///system``; return that URI."""
    if os.geteuid() != 0:
        raise LibvirtdSetupError("starting libvirtd needs root (run the guest tests as root, as CI does)")
    daemon = shutil.which("libvirtd") or ("/usr/sbin/libvirtd" if Path("/usr/sbin/libvirtd").exists() else None)
    if daemon is None:
        raise LibvirtdSetupError(f"libvirtd not found: apt-get install -y {PACKAGES}")
    ensure_accounts()
    for directory in ("/var/log/libvirt", "/var/run/libvirt"):
        Path(directory).mkdir(parents=True, exist_ok=True)
    changed = configure_qemu_conf()
    if libvirtd_answers():
        if changed:
            raise LibvirtdSetupError(
                f"libvirtd was already running when {QEMU_CONF} was changed; restart it (e.g. kill the pid in "
                "/var/run/libvirtd.pid, then libvirtd -d) so that QEMU guests start here"
            )
        return SYSTEM_URI
    _run([daemon, "-d"])
    deadline = time.monotonic() + timeout
    while not libvirtd_answers():
        if time.monotonic() > deadline:
            raise LibvirtdSetupError(
                f"libvirtd -d started but {SYSTEM_URI} did not answer within {timeout:.0f}s; "
                "see /var/log/libvirt/ and run `libvirtd -v` in a terminal"
            )
        time.sleep(0.1)
    return SYSTEM_URI


def _run(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise LibvirtdSetupError(f"{' '.join(command)} failed (rc {done.returncode}): {done.stderr.strip()}")
