"""The QEMU (x86, vhost-user) arguments that attach a guest to pvcore's devices.

``pvcore serve --print-qemu-args`` prints them per domain. The guest also needs
its RAM shared with pvcore (``-object memory-backend-memfd,id=mem,size=RAM,share=on
-machine memory-backend=mem``), whose size only the guest's own ``-m`` knows;
docs/hypervisors/kvm.md says so next to these lines.
"""

from __future__ import annotations

from collections.abc import Sequence

from pvcore.contract import DeviceConfig


def _chardev(ident: str, config: DeviceConfig, *, reconnect: bool = True) -> list[str]:
    path = str(config.get("socket")).replace(",", ",,")
    if config.get("socket-mode", "server") == "client":
        return ["-chardev", f"socket,id={ident},path={path},server=on,wait=off"]
    return ["-chardev", f"socket,id={ident},path={path}" + (",reconnect=1" if reconnect else "")]


def _device_arguments(index: int, config: DeviceConfig) -> list[str]:
    ident = f"pv{index}"
    kind = config.device_class
    if kind == "block":
        queues = config.get("queues", "1")
        return _chardev(ident, config) + ["-device", f"vhost-user-blk-pci,chardev={ident},num-queues={queues}"]
    if kind == "net":
        return _chardev(ident, config) + [
            "-netdev", f"vhost-user,id={ident}n,chardev={ident}",
            "-device", f"virtio-net-pci,netdev={ident}n,mac={config.get('mac')}",
        ]
    if kind == "rng" and config.get("protocol") == "egd":
        return _chardev(ident, config) + [
            "-object", f"rng-egd,id={ident}r,chardev={ident}", "-device", f"virtio-rng-pci,rng={ident}r",
        ]
    if kind == "rng":
        # QEMU 7.2's vhost-user-rng-pci asserts when its chardev has reconnect=
        return _chardev(ident, config, reconnect=False) + ["-device", f"vhost-user-rng-pci,chardev={ident}"]
    if kind == "console":
        return _chardev(ident, config) + ["-device", "virtio-serial-pci", "-device", f"virtconsole,chardev={ident}"]
    raise ValueError(f"{config.name}: kvm cannot attach a {kind} device")


def qemu_arguments(configs: Sequence[DeviceConfig]) -> dict[str, list[str]]:
    """Per domain, the ``-chardev``/``-device`` arguments for each of its devices."""
    per_domain: dict[str, list[str]] = {}
    for index, config in enumerate(configs):
        if not config.get("socket"):
            raise ValueError(f"{config.name}: socket= is required to print QEMU arguments")
        per_domain.setdefault(config.get("domain") or config.name, []).extend(_device_arguments(index, config))
    return per_domain
