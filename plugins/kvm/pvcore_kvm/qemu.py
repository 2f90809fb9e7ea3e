"""The QEMU (x86, vhost-user) arguments that attach a guest to pvcore's devices.

``pvcore serve --print-qemu-args`` prints them per domain. The guest also needs
its RAM shared with pvcore (``-object memory-backend-memfd,id=mem,size=RAM,share=on
-machine memory-backend=mem``), whose size only the guest's own ``-m`` knows;
docs/hypervisors/kvm.md says so next to these lines.

The arguments carry the workarounds for the QEMU 7.2 bugs in kvm.md's table,
so that what ``--print-qemu-args`` prints is what ``pvcore demo`` boots (it
asks this hook too): a vhost-user NIC without MSI-X (``vectors=0``), a
vhost-user-rng chardev without ``reconnect=``, a disk's ``num-queues`` equal
to pvcore's ``queues=``, and a console on virtio-serial (no vhost-user
console in QEMU 7.2).
"""

from __future__ import annotations

from collections.abc import Sequence

from pvcore.contract import DeviceConfig
from pvcore.qemu import arguments_per_domain, option_value


def _chardev(ident: str, config: DeviceConfig, socket: str, *, reconnect: bool = True) -> list[str]:
    if config.get("socket-mode", "server") == "client":
        return ["-chardev", f"socket,id={ident},path={option_value(socket)},server=on,wait=off"]
    return ["-chardev", f"socket,id={ident},path={option_value(socket)}" + (",reconnect=1" if reconnect else "")]


def _device_arguments(config: DeviceConfig, socket: str, index: int) -> list[str]:
    kind = config.device_class
    ident = f"pv{kind}{index}"
    if kind == "block":
        queues = option_value(config.get("queues", "1"))
        return _chardev(ident, config, socket) + ["-device", f"vhost-user-blk-pci,chardev={ident},num-queues={queues}"]
    if kind == "net":
        return _chardev(ident, config, socket) + [
            "-netdev", f"vhost-user,id={ident}n,chardev={ident}",
            # vectors=0 (INTx): QEMU 7.2 segfaults in vhost_net_start with MSI-X under TCG
            "-device", f"virtio-net-pci,netdev={ident}n,mac={option_value(config.get('mac'))},vectors=0",
        ]
    if kind == "rng" and config.get("protocol") == "egd":
        return _chardev(ident, config, socket) + [
            "-object", f"rng-egd,id={ident}r,chardev={ident}", "-device", f"virtio-rng-pci,rng={ident}r",
        ]
    if kind == "scsi":
        return _chardev(ident, config, socket, reconnect=False) + [
            "-device", f"vhost-user-scsi-pci,chardev={ident},num_queues={option_value(str(config.get('queues', 1)))}",
        ]
    if kind == "rng":
        # QEMU 7.2's vhost-user-rng-pci asserts when its chardev has reconnect=
        return _chardev(ident, config, socket, reconnect=False) + ["-device", f"vhost-user-rng-pci,chardev={ident}"]
    if kind == "console":
        # QEMU 7.2 has no vhost-user console: a virtconsole on a chardev socket
        return _chardev(ident, config, socket) + [
            "-device", f"virtio-serial-pci,id={ident}s", "-device", f"virtconsole,chardev={ident},bus={ident}s.0",
        ]
    raise ValueError(f"{config.name}: kvm cannot attach a {kind} device")


def qemu_arguments(configs: Sequence[DeviceConfig]) -> dict[str, list[str]]:
    """Per domain, the ``-chardev``/``-device`` arguments for each of its devices."""
    return arguments_per_domain(configs, _device_arguments)
