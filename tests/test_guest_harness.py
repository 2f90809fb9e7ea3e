"""Tests for pvcore.testing.guest, the real-guest harness.

The unit tests are fast and need nothing but Python (the ``cpio`` binary is
used as a second opinion when installed).  The ``guest`` tests boot real
Debian kernels under QEMU TCG; they fetch the kernels into the pvcore cache
(``$PVCORE_CACHE`` or ``~/.cache/pvcore``) and fail, not skip, when QEMU is
missing.
"""

from __future__ import annotations

import gzip
import lzma
import os
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pytest

from pvcore.testing import guest as g
from pvcore.testing.guest import (
    CpioArchive,
    Guest,
    GuestError,
    GuestKernel,
    GuestResult,
    GuestTimeout,
    KernelFetchError,
    UnknownModuleError,
    build_initramfs,
    fetch_kernel,
    parse_results,
    read_modules_dep,
    resolve_modules,
    result_line,
    run_guest,
)
from pvcore.testing.guest.modules import module_name, python_depmod
from pvcore.testing.guest.results import parse_done


# ---------------------------------------------------------------- helpers


def read_newc(data: bytes) -> list[dict]:
    """A small independent newc reader: list of entries up to the trailer."""
    entries = []
    pos = 0
    while True:
        assert data[pos : pos + 6] == b"070701", f"bad magic at {pos}"
        fields = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        (ino, mode, uid, gid, nlink, mtime, size, dmaj, dmin, rmaj, rmin, namesize, check) = fields
        name_start = pos + 110
        name = data[name_start : name_start + namesize - 1].decode()
        assert data[name_start + namesize - 1] == 0
        pos = name_start + namesize
        pos += -pos % 4
        body = data[pos : pos + size]
        pos += size
        pos += -pos % 4
        if name == "TRAILER!!!":
            assert pos == len(data)
            return entries
        entries.append(
            dict(name=name, mode=mode, ino=ino, nlink=nlink, data=body, rdev=(rmaj, rmin), check=check)
        )


def make_fake_kernel(root: Path, arch: str = "x86_64") -> GuestKernel:
    """A synthetic kernel tree with a handful of (fake) modules."""
    version = "6.1.0-99-test"
    mdir = root / "lib" / "modules" / version
    files = {
        "kernel/drivers/virtio/virtio_ring.ko": b"RING",
        "kernel/drivers/virtio/virtio.ko": b"VIRTIO",
        "kernel/drivers/virtio/virtio_pci_modern_dev.ko": b"MODERN",
        "kernel/drivers/virtio/virtio_pci_legacy_dev.ko": b"LEGACY",
        "kernel/drivers/virtio/virtio_pci.ko": b"PCI",
        "kernel/drivers/block/virtio_blk.ko.xz": lzma.compress(b"BLK" * 100),
        "kernel/drivers/char/hw_random/virtio-rng.ko.gz": gzip.compress(b"RNG"),
        "kernel/net/core/failover.ko": b"FAILOVER",
        "kernel/drivers/net/net_failover.ko": b"NETFAILOVER",
        "kernel/drivers/net/virtio_net.ko": b"NET",
    }
    for rel, data in files.items():
        p = mdir / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    (mdir / "modules.dep").write_text(SYNTH_DEP)
    (mdir / "modules.builtin").write_text("kernel/drivers/tty/hvc/hvc_console.ko\nkernel/lib/crc32c.ko\n")
    (root / "boot").mkdir(parents=True, exist_ok=True)
    kernel = root / "boot" / f"vmlinuz-{version}"
    kernel.write_bytes(b"kernel")
    busybox = root / "bin" / "busybox"
    busybox.parent.mkdir(parents=True, exist_ok=True)
    busybox.write_bytes(b"\x7fELF fake busybox")
    return GuestKernel(arch=arch, kernel=kernel, modules_dir=mdir, busybox=busybox, version=version)


SYNTH_DEP = """\
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/drivers/virtio/virtio_pci_legacy_dev.ko:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_legacy_dev.ko kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/block/virtio_blk.ko.xz: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/char/hw_random/virtio-rng.ko.gz: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/net/core/failover.ko:
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
"""


def names_of(paths: list[str]) -> list[str]:
    return [module_name(p) for p in paths]


# ---------------------------------------------------------------- cpio


def sample_archive() -> CpioArchive:
    arc = CpioArchive()
    arc.add_dir("bin")
    arc.add_file("bin/busybox", b"\x7fELF" + bytes(range(256)) * 3, 0o755)
    arc.add_symlink("bin/sh", "busybox")
    arc.add_chardev("dev/console", 5, 1)
    arc.add_file("etc/deep/nested/file.txt", b"hello\n")
    arc.add_file("empty", b"")
    arc.add_file("odd", b"x" * 5)
    return arc


def test_cpio_python_reader_roundtrip():
    arc = sample_archive()
    data = arc.to_bytes()
    assert len(data) % 4 == 0
    entries = {e["name"]: e for e in read_newc(data)}
    assert list(entries) == arc.names()
    # parents were added automatically, before their children
    order = arc.names()
    assert order.index("etc") < order.index("etc/deep") < order.index("etc/deep/nested/file.txt")
    assert order.index("dev") < order.index("dev/console")
    bb = entries["bin/busybox"]
    assert stat.S_ISREG(bb["mode"]) and stat.S_IMODE(bb["mode"]) == 0o755
    assert bb["data"] == b"\x7fELF" + bytes(range(256)) * 3
    sh = entries["bin/sh"]
    assert stat.S_ISLNK(sh["mode"]) and sh["data"] == b"busybox"
    con = entries["dev/console"]
    assert stat.S_ISCHR(con["mode"]) and con["rdev"] == (5, 1)
    assert stat.S_ISDIR(entries["etc/deep"]["mode"])
    assert entries["odd"]["data"] == b"xxxxx"
    assert entries["empty"]["data"] == b""
    assert len({e["ino"] for e in entries.values()}) == len(entries)
    assert all(e["check"] == 0 for e in entries.values())


def test_cpio_rejects_bad_paths():
    arc = CpioArchive()
    with pytest.raises(ValueError):
        arc.add_file("../etc/passwd", b"")
    arc.add_file("a", b"")
    with pytest.raises(ValueError):
        arc.add_file("/a", b"")  # duplicate once normalised
    arc.add_dir("d")
    arc.add_dir("d")  # directories may repeat


def test_cpio_binary_lists_and_extracts(tmp_path):
    assert shutil.which("cpio"), "the cpio binary is missing: apt-get install -y cpio (make test installs it)"
    arc = sample_archive()
    out = tmp_path / "a.cpio.gz"
    arc.write_gz(out)
    raw = gzip.decompress(out.read_bytes())
    listing = subprocess.run(["cpio", "-t", "--quiet"], input=raw, capture_output=True, check=True)
    assert listing.stdout.decode().split() == arc.names()
    dest = tmp_path / "x"
    dest.mkdir()
    # extract everything except the device node (patterns select members)
    subprocess.run(
        ["cpio", "-i", "-d", "--quiet", "--no-absolute-filenames", "bin/*", "etc/*", "odd"],
        input=raw, cwd=dest, check=True,
    )
    assert (dest / "bin/busybox").read_bytes() == b"\x7fELF" + bytes(range(256)) * 3
    assert os.readlink(dest / "bin/sh") == "busybox"
    assert (dest / "etc/deep/nested/file.txt").read_bytes() == b"hello\n"
    assert (dest / "odd").read_bytes() == b"xxxxx"
    assert os.stat(dest / "bin/busybox").st_mode & 0o777 == 0o755


# ---------------------------------------------------------------- modules


def test_read_modules_dep_normalises_names():
    dep = read_modules_dep(SYNTH_DEP)
    assert "virtio_rng" in dep and "virtio_blk" in dep
    assert dep["virtio_blk"][0] == "kernel/drivers/block/virtio_blk.ko.xz"
    assert dep["virtio_ring"][1] == []


def test_resolve_modules_dependency_order():
    dep = read_modules_dep(SYNTH_DEP)
    order = names_of(resolve_modules(["virtio_net", "virtio-rng", "virtio_blk", "hvc_console"], dep,
                                     ["hvc_console"]))
    # every module once, after its dependencies
    assert len(order) == len(set(order))
    assert set(order) == {"virtio_ring", "virtio", "failover", "net_failover", "virtio_net",
                          "virtio_rng", "virtio_blk"}
    for name, (_, deps) in dep.items():
        if name in order:
            for d in deps:
                assert order.index(module_name(d)) < order.index(name), (d, name)
    assert order[:2] == ["virtio_ring", "virtio"]
    assert order.index("failover") < order.index("net_failover") < order.index("virtio_net")


def test_resolve_modules_matches_notes_order():
    dep = read_modules_dep(SYNTH_DEP)
    order = names_of(resolve_modules(["virtio_pci"], dep))
    assert order == ["virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio_pci"]


def test_resolve_modules_builtin_and_unknown():
    dep = read_modules_dep(SYNTH_DEP)
    assert resolve_modules(["crc32c", "hvc-console"], dep, ["crc32c", "hvc_console"]) == []
    with pytest.raises(UnknownModuleError, match="virtio_blkk.*did you mean virtio_blk"):
        resolve_modules(["virtio_blkk"], dep)


def test_resolve_modules_cycle():
    dep = read_modules_dep("a.ko: b.ko\nb.ko: a.ko\n")
    with pytest.raises(GuestError, match="cycle"):
        resolve_modules(["a"], dep)


def test_python_depmod(tmp_path):
    mdir = tmp_path / "lib/modules/1.0"
    (mdir / "kernel").mkdir(parents=True)
    (mdir / "kernel/a.ko").write_bytes(b"\x7fELF..\x00license=GPL\x00depends=\x00name=a\x00")
    (mdir / "kernel/b.ko").write_bytes(b"\x7fELF..\x00depends=a\x00name=b\x00")
    (mdir / "kernel/c-d.ko.xz").write_bytes(lzma.compress(b"\x00depends=b,a\x00name=c_d\x00"))
    python_depmod(mdir)
    dep = read_modules_dep((mdir / "modules.dep").read_text())
    assert dep["a"] == ("kernel/a.ko", [])
    assert dep["b"] == ("kernel/b.ko", ["kernel/a.ko"])
    assert names_of(resolve_modules(["c-d"], dep)) == ["a", "b", "c_d"]


def test_build_initramfs_synthetic(tmp_path):
    kernel = make_fake_kernel(tmp_path / "k")
    script = 'echo "PVCORE-RESULT x=1"\nexit 3'
    out = build_initramfs(kernel, script, ["virtio_blk", "virtio-rng", "hvc_console"], tmp_path / "out",
                          files={"etc/hello": b"hi", "usr/bin/tool": b"#!/bin/sh\necho t\n"})
    assert out.exists() and out.parent == tmp_path / "out"
    entries = {e["name"]: e for e in read_newc(gzip.decompress(out.read_bytes()))}
    base = f"lib/modules/{kernel.version}"
    # compressed modules are stored decompressed under .ko names
    assert entries[f"{base}/kernel/drivers/block/virtio_blk.ko"]["data"] == b"BLK" * 100
    assert entries[f"{base}/kernel/drivers/char/hw_random/virtio-rng.ko"]["data"] == b"RNG"
    assert f"{base}/kernel/drivers/net/virtio_net.ko" not in entries
    assert entries["bin/busybox"]["data"] == b"\x7fELF fake busybox"
    assert stat.S_IMODE(entries["init"]["mode"]) == 0o755
    assert entries["pvcore/script.sh"]["data"] == script.encode() + b"\n"
    assert entries["etc/hello"]["data"] == b"hi"
    assert stat.S_IMODE(entries["etc/hello"]["mode"]) == 0o644
    assert stat.S_IMODE(entries["usr/bin/tool"]["mode"]) == 0o755
    init = entries["init"]["data"].decode()
    assert init.startswith("#!/bin/busybox sh\n")
    for needle in ("mount -t proc", "mount -t sysfs", "mount -t devtmpfs", "PVCORE-GUEST-READY",
                   "PVCORE-GUEST-DONE rc=$rc", "poweroff -f"):
        assert needle in init
    insmod_line = next(l for l in init.splitlines() if l.startswith("for m in"))
    loaded = [module_name(w.strip("';")) for w in insmod_line.split()[3:-1]]
    # virtio_pci transport added automatically, everything after its deps
    assert loaded[:2] == ["virtio_ring", "virtio"]
    assert set(loaded) == {"virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev",
                           "virtio_pci", "virtio_blk", "virtio_rng"}
    assert loaded.index("virtio_pci_modern_dev") < loaded.index("virtio_pci")
    assert init.index("PVCORE-GUEST-READY") < init.index("pvcore/script.sh") < init.index("PVCORE-GUEST-DONE")


def test_build_initramfs_unknown_module(tmp_path):
    kernel = make_fake_kernel(tmp_path / "k")
    with pytest.raises(UnknownModuleError, match="no_such_mod"):
        build_initramfs(kernel, "true", ["no_such_mod"], tmp_path / "out")


# ---------------------------------------------------------------- results


def test_parse_results():
    out = (
        "noise\r\n"
        "PVCORE-RESULT kernel=6.1.0-56-amd64\r\n"
        "\x1b[2J#1 SMP Debian 6.PVCORE-RESULT glued=yes\r\n"
        "PVCORE-RESULT evil=$(rm -rf /); __import__('os')\r\n"
        "PVCORE-RESULT empty=\n"
        "PVCORE-RESULT kernel=later\r\n"
        "PVCORE-RESULT bad key=x\n"
        "PVCORE-RESULTnokey\n"
    )
    r = parse_results(out)
    assert r == {
        "kernel": "later",
        "glued": "yes",
        "evil": "$(rm -rf /); __import__('os')",
        "empty": "",
    }


def test_done_marker_and_result_object():
    out = "x\nPVCORE-GUEST-MODULE-FAILED kernel/x.ko\nPVCORE-GUEST-READY\nPVCORE-GUEST-DONE rc=7\r\n"
    assert parse_done(out) == 7
    res = GuestResult(output=out, returncode=7, results={})
    assert res.done
    assert res.failed_modules == ["kernel/x.ko"]
    with pytest.raises(GuestError, match="rc=7"):
        res.check()
    assert parse_done("PVCORE-GUEST-READY\n") is None


def test_result_line_runs_in_a_shell():
    sh = shutil.which("sh")
    assert sh
    script = "\n".join([
        result_line("kernel", "echo 6.1.0-test"),
        result_line("multi", "printf 'a\\nb\\n'"),
        result_line("quoted", "echo \"it's\""),
    ])
    out = subprocess.run([sh, "-c", script], capture_output=True, text=True, check=True).stdout
    assert parse_results(out) == {"kernel": "6.1.0-test", "multi": "a b", "quoted": "it's"}
    with pytest.raises(ValueError):
        result_line("bad key", "true")


# ---------------------------------------------------------------- command line / fetch errors


def test_guest_command_lines(tmp_path):
    k = make_fake_kernel(tmp_path / "k")
    cmd = Guest(k, tmp_path / "i.gz", ["-device", "virtio-rng-pci"], memory_mb=256,
                append="foo=1", max_runtime=99).command()
    assert cmd[:4] == ["timeout", "-k", "5", "99"]
    assert cmd[4] == "qemu-system-x86_64"
    assert cmd[cmd.index("-accel") + 1] == "tcg"
    assert "-nographic" in cmd and "-no-reboot" in cmd
    assert cmd[cmd.index("-m") + 1] == "256"
    assert cmd[cmd.index("-append") + 1] == "console=ttyS0 quiet panic=-1 foo=1"
    assert "memory-backend-memfd,id=mem,size=256M,share=on" in cmd
    assert cmd[-2:] == ["-device", "virtio-rng-pci"]

    kp = GuestKernel("ppc64", k.kernel, k.modules_dir, k.busybox, k.version)
    cmd = Guest(kp, tmp_path / "i.gz", [], shared_memory=False).command()
    assert cmd[4] == "qemu-system-ppc64"
    assert cmd[cmd.index("-M") + 1] == "pseries"
    assert "console=hvc0" in cmd[cmd.index("-append") + 1]
    assert not any("memory-backend" in c for c in cmd)


def test_fetch_kernel_without_apt(tmp_path, monkeypatch):
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(KernelFetchError, match="apt-get"):
        fetch_kernel("x86_64", cache=tmp_path / "cache")
    with pytest.raises(GuestError, match="unsupported"):
        fetch_kernel("sparc", cache=tmp_path / "cache")


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("PVCORE_CACHE", str(tmp_path / "c"))
    assert g.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("PVCORE_CACHE")
    assert g.cache_dir() == Path.home() / ".cache" / "pvcore"


# ---------------------------------------------------------------- real guests


def require_qemu(binary: str, package: str) -> None:
    if shutil.which(binary) is None:
        pytest.fail(f"{binary} is not installed; the guest tests need it: apt-get install -y {package}")


X86_MODULES = ["virtio_blk", "virtio_net", "virtio_console", "virtio_rng"]

GUEST_LIMIT = 300
"""Seconds one real guest may take from QEMU's start to its power-off.

A hang guard, not a speed claim: a TCG guest here boots in seconds on an idle
machine and several times slower on a busy 2-core one. A guest that misses it
fails with its console tail (the harness's timeouts include it), and QEMU runs
under ``timeout -k`` a little longer than this, so a hung one is always killed.
"""
QEMU_KILL_AFTER = GUEST_LIMIT + 30


@pytest.mark.guest
def test_x86_64_guest_boots_with_virtio_modules(tmp_path):
    require_qemu("qemu-system-x86_64", "qemu-system-x86")
    kernel = fetch_kernel("x86_64")
    assert kernel.version.endswith("-amd64")
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\xab" * (1 << 20))
    script = "\n".join([
        result_line("kernel", "uname -r"),
        result_line("machine", "uname -m"),
        result_line("modules", "cut -d' ' -f1 /proc/modules | sort"),
        result_line("blocks", "ls /sys/block"),
        result_line("vda_sectors", "cat /sys/block/vda/size"),
        result_line("hwrng", "cat /sys/class/misc/hw_random/rng_current"),
        "rc=0",
        "for m in " + " ".join(X86_MODULES) + "; do",
        '  grep -q "^$m " /proc/modules || { echo "missing module $m"; rc=1; }',
        "done",
        "exit $rc",
    ])
    initrd = build_initramfs(kernel, script, X86_MODULES, tmp_path)
    qemu_args = [
        "-drive", f"file={disk},format=raw,if=none,id=d0",
        "-device", "virtio-blk-pci,drive=d0",
        "-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0",
        "-device", "virtio-serial-pci",
        "-device", "virtio-rng-pci",
    ]
    t0 = time.monotonic()
    with Guest(kernel, initrd, qemu_args, name="x86", max_runtime=QEMU_KILL_AFTER) as vm:
        vm.wait_for("PVCORE-GUEST-READY", timeout=GUEST_LIMIT)
        ready = time.monotonic() - t0
        res = vm.wait(timeout=max(GUEST_LIMIT - ready, 1))
    print(f"x86_64 {kernel.version}: ready after {ready:.1f}s, done after {res.elapsed:.1f}s")
    assert res.qemu_returncode == 0, res.output[-2000:]
    assert res.failed_modules == []
    res.check()
    r = res.results
    assert r["kernel"] == kernel.version
    assert r["machine"] == "x86_64"
    mods = set(r["modules"].split())
    assert {"virtio_blk", "virtio_net", "virtio_console", "virtio_rng", "virtio_pci",
            "virtio", "virtio_ring", "net_failover", "failover"} <= mods
    assert "vda" in r["blocks"].split()
    assert r["vda_sectors"] == "2048"
    assert r["hwrng"].startswith("virtio_rng")
    assert res.elapsed < GUEST_LIMIT, res.output[-2000:]


@pytest.mark.guest
def test_ppc64_pseries_guest_boots(tmp_path):
    require_qemu("qemu-system-ppc64", "qemu-system-ppc")
    script = "\n".join([
        result_line("kernel", "uname -r"),
        result_line("machine", "uname -m"),
        result_line("vdevice", "test -d /proc/device-tree/vdevice && ls /proc/device-tree/vdevice"),
        result_line("rng_bytes", "dd if=/dev/hwrng bs=16 count=1 2>/dev/null | wc -c"),
        "test -d /proc/device-tree/vdevice",
    ])
    res = run_guest(
        "ppc64", script, ["pseries-rng"],
        ["-object", "rng-random,id=rng0,filename=/dev/urandom", "-device", "spapr-rng,rng=rng0"],
        timeout=GUEST_LIMIT, work_dir=tmp_path, name="ppc64",
    )
    print(f"ppc64 {res.results.get('kernel')}: done after {res.elapsed:.1f}s")
    res.check()
    r = res.results
    assert r["machine"] == "ppc64le"
    assert r["kernel"].endswith("-powerpc64le")
    assert "vty@71000000" in r["vdevice"].split()
    assert r["rng_bytes"] == "16"
    assert res.elapsed < GUEST_LIMIT, res.output[-2000:]


@pytest.mark.guest
def test_guest_wait_for_reports_exit(tmp_path):
    """wait_for raises with the console tail when QEMU exits first."""
    require_qemu("qemu-system-x86_64", "qemu-system-x86")
    kernel = fetch_kernel("x86_64")
    initrd = build_initramfs(kernel, "echo bye-from-guest", [], tmp_path)
    with Guest(kernel, initrd, [], memory_mb=256, shared_memory=False, max_runtime=QEMU_KILL_AFTER) as vm:
        with pytest.raises(GuestError) as info:
            vm.wait_for("never-printed-text", timeout=GUEST_LIMIT)
        assert not isinstance(info.value, GuestTimeout), f"QEMU did not exit first: {info.value}"
        assert "bye-from-guest" in str(info.value)
        res = vm.wait(10)
    assert res.returncode == 0 and res.done
