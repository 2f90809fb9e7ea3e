"""``pvcore probe --connect URI``: what a connection holds, and why each device is or is not served.

For the connection: the libvirt driver and every plugin's detection (the
first one serves). For each domain: its state, whether its RAM is shared,
the devices pvcore owns (from metadata) with what is wrong with each (its
element missing, or what the plugin's check says the definition lacks), and
the devices pvcore could serve but does not own. The serving plugin's
libvirt XML (``pvcore_libvirt_xml``) reads the elements back; a plugin
without one is asked through its probe hook instead.
"""

from __future__ import annotations

import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

from pvcore.contract import DeviceConfig, DeviceSlot, HostContext, LibvirtXml
from pvcore.libvirt import LibvirtError, runlock
from pvcore.libvirt.connection import detections, driver_type, import_libvirt, is_local_uri
from pvcore.libvirt.devicexml import elements_by_socket, has_shared_memory, plugin_xml
from pvcore.libvirt.metadata import read_specs
from pvcore.config import parse_devices
from pvcore.registry import Registry

_STATES = {0: "no state", 1: "running", 2: "blocked", 3: "paused", 4: "shutting down", 5: "shut off", 6: "crashed",
           7: "suspended"}


def _socket_state(path: str) -> str:
    try:
        mode = Path(path).lstat().st_mode
    except FileNotFoundError:
        return "no socket (no backend listens)"
    except OSError as exc:
        return f"socket unreadable: {exc.strerror}"
    return "backend socket present" if stat.S_ISSOCK(mode) else "not a socket: something else is at that path"


def _who_serves(run_dir: Path, uuid: str) -> str:
    daemon = run_dir / runlock.DAEMON_LOCK
    if runlock.is_held(daemon):
        return f"host daemon ({runlock.holder(daemon)})"
    domain_lock = runlock.domain_lock_path(run_dir, uuid)
    if runlock.is_held(domain_lock):
        return f"one-domain server ({runlock.holder(domain_lock)})"
    return f"no pvcore daemon runs for {run_dir} (start one: pvcore daemon --connect URI)"


def _summary(problem: str) -> str:
    """A plugin check's problem in a few words: its first line up to the first ': ' (the fix follows)."""
    return problem.splitlines()[0].split(": ", 1)[0] if problem.strip() else problem


def _owned_lines(
    configs: Sequence[DeviceConfig], name: str, root: ElementTree.Element, xml: LibvirtXml | None, local: bool
) -> list[str]:
    lines = []
    for config in configs:
        socket = str(config.get("socket"))
        problems = []
        if xml is None:
            problems.append("the hypervisor plugin cannot read libvirt device XML (pvcore_libvirt_xml)")
        elif not elements_by_socket(root, [socket], xml.socket):
            problems.append("not in the domain definition (run pvcore deploy again, or pvcore undeploy)")
        if xml is not None:
            problems += [f"{_summary(p)} (see pvcore deploy's message)" for p in xml.check(name, root, [config])]
        state = _socket_state(socket) if local else "remote host: ask its pvcore probe or journal"
        lines.append(
            f"    {config.device_class} {config.name} socket {socket}: {state}"
            + (f"; {'; '.join(problems)}" if problems else "")
        )
    return lines


def probe(conn: Any, registry: Registry, uri: str, *, run_dir: Path) -> list[str]:
    """The report, as lines."""
    libvirt = import_libvirt()
    found = detections(registry, conn, uri)
    lines = [f"connection {uri}: libvirt driver {driver_type(conn)}, libvirt {_version(conn)}"]
    if found:
        chosen = found[0]
        lines.append(f"  hypervisor plugin: {chosen.hypervisor} ({chosen.evidence}; confidence {chosen.confidence})")
        lines += [f"  also answered: {d.hypervisor} ({d.evidence}; confidence {d.confidence})" for d in found[1:]]
    else:
        lines.append("  hypervisor plugin: none answers for this driver (install one, or pass --hypervisor to daemon/deploy)")
    slots: list[DeviceSlot] = []
    xml: LibvirtXml | None = None
    if found:
        try:
            xml = plugin_xml(registry, found[0].hypervisor)
            if xml is None:
                slots.extend(registry.call(found[0].hypervisor, "pvcore_probe", host=HostContext(libvirt=conn)) or ())
        except Exception as exc:  # a plugin's probe failure is reported, never a traceback
            lines.append(f"  probe by plugin {found[0].hypervisor} failed: {exc}")
    local = is_local_uri(uri)
    classes = registry.device_classes()
    options = registry.plugin_options(found[0].hypervisor) if found else None
    for domain in sorted(conn.listAllDomains(0), key=lambda d: d.name()):
        name = domain.name()
        root = ElementTree.fromstring(domain.XMLDesc(0))
        shared = has_shared_memory(root)
        active, persistent = bool(domain.isActive()), bool(domain.isPersistent())
        specs = read_specs(domain, libvirt.VIR_DOMAIN_AFFECT_LIVE, libvirt) if active else []
        if persistent:
            specs = list(dict.fromkeys([*specs, *read_specs(domain, libvirt.VIR_DOMAIN_AFFECT_CONFIG, libvirt)]))
        lines.append(
            f"domain {name}: {_STATES.get(domain.state()[0], 'unknown state')}"
            f"{'' if persistent else ', transient'}, shared memory: {'yes' if shared else 'no'}"
        )
        try:
            configs = parse_devices(specs, classes, options)
        except Exception as exc:
            raise LibvirtError(f"domain {name}: pvcore metadata holds a spec this pvcore cannot read: {exc}") from None
        if configs:
            served_by = _who_serves(run_dir, domain.UUIDString()) if local else "the pvcore daemon on the remote host"
            lines.append(f"  pvcore devices (served by {served_by}):")
            lines += _owned_lines(configs, name, root, xml, local)
        owned = {str(config.get("socket")) for config in configs}
        here = [slot for slot in slots if slot.domain == name]
        if xml is not None:
            try:
                here = xml.slots(name, root)
            except Exception as exc:  # a plugin's failure is reported, never a traceback
                lines.append(f"  probe by plugin {found[0].hypervisor} failed: {exc}")
        others = [slot for slot in here if slot.properties.get("socket") not in owned]
        if others:
            lines.append("  could serve (not deployed by pvcore):")
            lines += [f"    {slot.device_class} at {slot.address}" for slot in others]
        if not configs and not others:
            lines.append("  no devices pvcore serves or could serve")
    return lines


def _version(conn: Any) -> str:
    number = conn.getLibVersion()
    return f"{number // 1000000}.{number // 1000 % 1000}.{number % 1000}"
