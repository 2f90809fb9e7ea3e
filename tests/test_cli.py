"""The `pvcore` command: demo, serve argument errors, help."""

from __future__ import annotations

import subprocess
import sys


def pvcore(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pvcore.cli", *args], capture_output=True, text=True, timeout=timeout)


def test_loopback_demo_shows_what_the_guest_saw() -> None:
    done = pvcore("demo", "--loopback")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    md5_line = next(line for line in out.splitlines() if "read 1 MiB" in line)
    guest_md5, host_md5 = md5_line.split("md5 ")[1].split(" (host file ")
    assert guest_md5 == host_md5.rstrip(")")
    assert "in host file: True" in out
    assert "guest b received b'hello from guest a'" in out
    assert "(1 dropped)" in out
    assert "busybox login" in out
    assert "distinct: True" in out


def test_serve_errors_are_one_line_with_the_fix() -> None:
    done = pvcore("serve", "--hypervisor", "kvm", "disk:path=x")
    assert done.returncode == 2
    assert "unknown device class 'disk'; known classes: block, console, net, rng" in done.stderr
    assert "Traceback" not in done.stderr
    done = pvcore("serve", "--hypervisor", "nosuch", "rng:socket=/tmp/pvcore-test-none.sock")
    assert done.returncode == 2 and "no plugin serves hypervisor 'nosuch'" in done.stderr
    done = pvcore("serve", "--hypervisor", "kvm")
    assert done.returncode == 2 and "no devices given" in done.stderr


def test_serve_help_lists_device_keys() -> None:
    out = pvcore("serve", "--help").stdout
    for text in ("CLASS:key=value", "block:", "path (", "net:", "mac (", "rng:", "rate (", "console:", "log (", "SIGTERM"):
        assert text in out


def test_serve_help_and_plugins_verbose_list_each_plugins_own_keys() -> None:
    out = pvcore("serve", "--help").stdout
    plugins = out[out.index("Keys a hypervisor plugin adds"):]
    kvm, lpar, xen = (plugins.index(f"\n  {name}:\n") for name in ("kvm", "lpar", "xen"))
    assert kvm < lpar < xen
    assert "socket-mode (block, net): server" in plugins[kvm:lpar] and "protocol (rng): vhost-user" in plugins[kvm:lpar]
    assert "socket (rng): the FIFO QEMU's -object rng-random" in plugins[lpar:xen]
    assert "domain (block, net, console): DOMID/DEVID" in plugins[xen:] and "attach (block, net, console): on" in plugins[xen:]
    common = out[out.index("Keys every class takes:"):out.index("Device classes:")]
    assert "socket-mode" not in common and "protocol" not in common and "kvm" not in common and "lpar" not in common
    listed = pvcore("plugins", "-v").stdout
    kvm_block = listed[listed.index("kvm "):listed.index("\nlpar ")]
    assert "  device options:\n    socket-mode (block, net): server" in kvm_block
    assert "device options" not in pvcore("plugins").stdout


def test_serve_checks_each_device_against_the_keys_of_the_plugin_serving_it() -> None:
    done = pvcore("serve", "--hypervisor", "kvm", "--print-qemu-args", "rng:socket=/tmp/vm1-rng.sock,protocol=egd")
    assert done.returncode == 0, done.stderr
    assert "-object rng-egd,id=pvrng0r,chardev=pvrng0" in done.stdout
    done = pvcore("serve", "--hypervisor", "lpar", "--print-qemu-args", "rng:socket=/tmp/p1-rng.fifo,protocol=egd")
    assert done.returncode == 2
    assert "rng has no option 'protocol' when served by lpar; options: domain, hypervisor, name, rate, socket" in done.stderr
    done = pvcore("serve", "--hypervisor", "kvm", "--print-qemu-args",
                  "net:socket=/tmp/vm1-net.sock,mac=52:54:00:00:00:01,socket-mode=passive")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "socket-mode=passive: expected server (pvcore listens and QEMU connects" in done.stderr
    assert "or client (QEMU listens" in done.stderr


def test_print_qemu_args_gives_a_nic_the_qemu_7_2_tcg_workaround() -> None:
    done = pvcore("serve", "--hypervisor", "kvm", "--print-qemu-args", "net:socket=/tmp/vm1-net.sock,mac=52:54:00:00:00:01")
    assert done.returncode == 0, done.stderr
    assert "-device virtio-net-pci,netdev=pvnet0n,mac=52:54:00:00:00:01,vectors=0" in done.stdout


def test_print_qemu_args_for_a_partition() -> None:
    done = pvcore(
        "serve", "--hypervisor", "lpar", "--print-qemu-args",
        "console:socket=/tmp/p1-con.sock,log=/tmp/p1.log", "rng:socket=/tmp/p1-rng.fifo",
        "net:socket=/tmp/p1-net.sock,mac=52:54:00:00:00:05",
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("# p1 (lpar)\n-nodefaults ")
    assert "-device spapr-vty,chardev=vty0" in done.stdout
    assert "rng-random,id=rng0,filename=/tmp/p1-rng.fifo" in done.stdout
    assert "-device spapr-vlan,netdev=n0,mac=52:54:00:00:00:05" in done.stdout


def test_print_qemu_args_for_kvm_and_lpar_guests_of_one_daemon() -> None:
    done = pvcore(
        "serve", "--hypervisor", "kvm", "--print-qemu-args",
        "block:path=/etc/hostname,socket=/tmp/vm1-vda.sock,queues=2", "rng:socket=/tmp/vm1-rng.sock",
        "net:socket=/tmp/p1-net.sock,mac=52:54:00:00:00:09,hypervisor=lpar",
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "# vm1 (kvm)" and lines[2] == "# p1 (lpar)"
    assert "-device vhost-user-blk-pci,chardev=pvblock0,num-queues=2" in lines[1]
    assert "path=/tmp/vm1-vda.sock,reconnect=1" in lines[1]
    assert "-device vhost-user-rng-pci,chardev=pvrng0" in lines[1] and "vm1-rng.sock,reconnect" not in lines[1]
    assert "-device spapr-vlan,netdev=n0,mac=52:54:00:00:00:09" in lines[3]


def test_print_qemu_args_escapes_commas_in_values() -> None:
    done = pvcore(
        "serve", "--hypervisor", "kvm", "--print-qemu-args", "net:socket=/tmp/a,,b.sock,mac=52:54:00:00:00:01,,romfile=x",
    )
    assert done.returncode == 0, done.stderr
    assert "path=/tmp/a,,b.sock" in done.stdout
    assert "mac=52:54:00:00:00:01,,romfile=x" in done.stdout and ",romfile=x" not in done.stdout.replace(",,", "")
