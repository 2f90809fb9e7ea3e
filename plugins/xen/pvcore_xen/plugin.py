"""The xen plugin's hook implementations (entry point ``pvcore.plugins: xen``).

Xen specific, and nothing else: detect (``/sys/hypervisor/type`` is ``xen``,
a xenstore socket or xenbus device, or a libvirt connection of type Xen). The
xenstore client (:mod:`pvcore_xen.xenstore`) and the host interface
(:mod:`pvcore_xen.host`) are what probe, notification and memory are built on.
"""

from __future__ import annotations

import logging

from pvcore.contract import CONTRACT_VERSION, Detection, HostContext, PluginInfo
from pvcore.hookspecs import hookimpl

log = logging.getLogger("pvcore.xen")

HYPERVISOR = "xen"


@hookimpl
def pvcore_plugin_info() -> PluginInfo:
    """The xen plugin."""
    return PluginInfo(
        name="xen",
        contract=CONTRACT_VERSION,
        hypervisor=HYPERVISOR,
        primitives={"detect"},
        description="Xen: xenstore, event channels and grant-mapped memory",
    )


@hookimpl
def pvcore_detect(host: HostContext) -> Detection | None:
    """A libvirt connection of type Xen, ``/sys/hypervisor/type`` saying xen, or a xenstore endpoint."""
    if host.libvirt is not None:
        try:
            kind = host.libvirt.getType()
        except Exception as exc:  # libvirt raises its own libvirtError
            log.debug("libvirt getType failed: %s", exc)
        else:
            if kind == "Xen":
                return Detection(HYPERVISOR, 90, "libvirt connection type is Xen")
    try:
        hypervisor_type = host.path("/sys/hypervisor/type").read_text().strip()
    except OSError:
        hypervisor_type = ""
    if hypervisor_type == "xen":
        return Detection(HYPERVISOR, 80, "/sys/hypervisor/type is xen")
    for endpoint in ("/var/run/xenstored/socket", "/dev/xen/xenbus"):
        if host.path(endpoint).exists():
            return Detection(HYPERVISOR, 50, f"{endpoint} exists (but /sys/hypervisor/type does not say xen)")
    return None
