"""``pvcore deploy`` and ``pvcore undeploy``: add pvcore's devices to a domain, or take them away.

Deploy completes each DEVICE spec (``name`` defaults to ``DOMAIN-CLASSn``,
``socket`` to ``RUN_DIR/NAME.sock``, ``domain`` is the domain, relative paths
become absolute), has the hypervisor plugin check the definition (kvm: shared
memory) and write each device's element (its ``pvcore_libvirt_xml``), and then:

1. rewrites the persistent definition in one ``defineXML`` (what ``virsh
   edit`` does): the device elements and pvcore's metadata change together;
2. on a running domain, writes the live metadata too;
3. makes sure the backends are up (local URIs): the host daemon picks the
   change up from libvirt's events when it runs; otherwise a one-domain
   server (``pvcore daemon --domain``) is started that serves the domain
   until it stops. Deploy asks that daemon's control socket until it lists
   every new device as served (and says at once why one is not); when the
   socket refuses this user (the daemon runs as another), it waits until
   every new socket listens instead;
4. on a running domain, attaches the devices live (libvirt's attach-device).

For a remote URI the backends must run on that host: deploy records the
devices and the host's ``pvcore daemon`` serves them; a running domain gets
them at its next start (attaching live before the remote backend listens
would leave QEMU waiting for it).

Undeploy detaches pvcore's devices (the elements the plugin reads back as
connecting to their sockets; live and persistent), removes the metadata, and
(locally) waits until their sockets are gone: every device, or only those
named (the others stay deployed, in the definition and the record).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from xml.etree import ElementTree

import attrs

from pvcore.config import ConfigError, check_unique, parse_devices, split_spec
from pvcore.contract import DeviceConfig, LibvirtXml
from pvcore.control import ControlError, control_socket_path, request
from pvcore.libvirt import LibvirtError, runlock
from pvcore.libvirt.connection import (
    choose_hypervisor,
    import_libvirt,
    is_local_uri,
    lookup_domain,
)
from pvcore.libvirt.devicexml import elements_by_socket, insert_devices, remove_devices, require_xml
from pvcore.libvirt.follower import check_metadata_paths
from pvcore.libvirt.metadata import (
    format_spec,
    read_specs,
    set_in_definition,
    write_live_specs,
)
from pvcore.registry import Registry

PATH_KEYS = ("path", "log", "socket")
"""Options that name files: made absolute (deploy runs in the operator's directory, the daemon does not)."""

SOCKET_WAIT_SECONDS = 30.0


@attrs.frozen
class DeployedDevice:
    """One device deploy added: its parsed config, complete spec, and the domain element the plugin wrote."""

    config: DeviceConfig
    spec: str
    element: ElementTree.Element

    def describe(self) -> str:
        """``block vm1-block0: <disk TYPE> vda, socket /run/pvcore/vm1-block0.sock``."""
        return f"{self.config.device_class} {self.config.name}: {describe_element(self.element, self.config.get('socket'))}"


def describe_element(element: ElementTree.Element, socket: str | None) -> str:
    """A device element in a few words: its tag and type, target and ``socket``."""
    kind = element.get("type") or element.get("model") or ""
    text = f"<{element.tag}{f' {kind}' if kind else ''}>"
    target = element.find("target")
    if element.tag == "disk" and target is not None:
        text += f" {target.get('dev')}"
    mac = element.find("mac")
    if mac is not None:
        text += f" {mac.get('address')}"
    return f"{text}, socket {socket}"


def _definition(domain: Any, flags: int) -> ElementTree.Element:
    return ElementTree.fromstring(domain.XMLDesc(flags))


def _existing_configs(specs: Sequence[str], registry: Registry, domain: str, hypervisor: str) -> list[DeviceConfig]:
    try:
        return parse_devices(specs, registry.device_classes(), registry.plugin_options(hypervisor))
    except Exception as exc:
        raise LibvirtError(f"domain {domain}: pvcore metadata holds a spec this pvcore cannot read: {exc}") from None


def complete_specs(
    texts: Sequence[str],
    domain: str,
    existing: Sequence[DeviceConfig],
    *,
    run_dir: Path,
    local: bool,
    registry: Registry,
    hypervisor: str,
) -> list[tuple[str, DeviceConfig]]:
    """Fill in name, socket, domain and absolute paths of each DEVICE text; parse and check them
    (with the options of ``hypervisor``'s plugin)."""
    classes = registry.device_classes()
    options = registry.plugin_options(hypervisor)
    names = {config.name for config in existing}
    completed: list[tuple[str, DeviceConfig]] = []
    for text in texts:
        device_class, raw = split_spec(text)
        if raw.get("domain", domain) != domain:
            raise LibvirtError(f"device {text!r}: domain={raw['domain']} but it is deployed to {domain}")
        if "name" not in raw:
            index = 0
            while f"{domain}-{device_class}{index}" in names:
                index += 1
            raw["name"] = f"{domain}-{device_class}{index}"
        names.add(raw["name"])
        raw.setdefault("socket", str(run_dir / f"{raw['name']}.sock"))
        raw["domain"] = domain
        for key in PATH_KEYS:
            if key in raw and not Path(raw[key]).is_absolute():
                if not local:
                    raise LibvirtError(f"device {text!r}: {key}={raw[key]} must be an absolute path on the remote host")
                raw[key] = str(Path(raw[key]).resolve())
        spec = format_spec(device_class, raw)
        config = parse_devices([spec], classes, options)[0]
        if local:  # what the host daemon would refuse from metadata, refused now with the reason
            try:
                check_metadata_paths(config, run_dir)
            except ConfigError as exc:
                raise LibvirtError(f"device {text!r}: {exc}") from None
        completed.append((spec, config))
    check_unique([*existing, *(config for _, config in completed)])
    return completed


def _served_by(uri: str, run_dir: Path, uuid: str) -> tuple[str, Path] | None:
    """Who already serves the domain's devices on this host, and its control socket; or None."""
    daemon = run_dir / runlock.DAEMON_LOCK
    if runlock.is_held(daemon):
        return f"the host daemon ({runlock.holder(daemon)})", control_socket_path(run_dir)
    domain_lock = runlock.domain_lock_path(run_dir, uuid)
    if runlock.is_held(domain_lock):
        return f"a one-domain server ({runlock.holder(domain_lock)})", control_socket_path(run_dir, uuid)
    return None


def start_domain_server(uri: str, domain: str, uuid: str, run_dir: Path, hypervisor: str | None) -> str:
    """Start ``pvcore daemon --domain`` in the background for one domain; describe it."""
    run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    log_path = run_dir / f"server-{domain}.log"
    command = [sys.executable, "-m", "pvcore.cli", "daemon", "--connect", uri, "--domain", uuid, "--run-dir", str(run_dir)]
    if hypervisor:
        command += ["--hypervisor", hypervisor]
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, close_fds=True
        )
    return f"a one-domain server (pid {process.pid}, log {log_path}) until {domain} stops"


def wait_until_served(
    run_dir: Path, control: Path, devices: Sequence[DeviceConfig], *, timeout: float, why: str
) -> list[str]:
    """Ask the daemon at ``control`` until it lists every device of ``devices`` as served; a line for each.

    A device it lists as not served raises at once with its reason. If the
    control socket refuses this user (the daemon runs as another), wait for
    the devices' sockets instead (:func:`wait_for_sockets`).
    """
    names = [config.name for config in devices]
    deadline = time.monotonic() + timeout
    while True:
        try:
            answer = request(run_dir, {"command": "list"}, timeout=timeout, path=control)
        except ControlError:
            answer = {}  # not listening yet (a one-domain server just started)
        if answer.get("ok") is False and "may not control" in str(answer.get("error")):
            wait_for_sockets([str(c.get("socket")) for c in devices], present=True, timeout=timeout, why=why)
            return [f"  {name}: its socket listens (the control socket is not this user's)" for name in names]
        listed = {d.get("name"): d for d in answer.get("devices", []) if d.get("name") in names}
        for name, device in listed.items():
            if device.get("state") == "not served":
                raise LibvirtError(
                    f"{name} is recorded in the domain but not served: {device.get('error')} "
                    "(fix it, or take it away with pvcore undeploy)"
                )
        if len(listed) == len(names):
            return [f"  {name}: served, {listed[name].get('door')}" for name in names]
        if time.monotonic() > deadline:
            missing = ", ".join(n for n in names if n not in listed)
            raise LibvirtError(f"{missing} not served within {timeout:.0f} s; {why}")
        time.sleep(0.1)


def wait_for_sockets(paths: Sequence[str], *, present: bool, timeout: float, why: str) -> None:
    """Wait until every path exists (``present``) or none does; a timeout raises with ``why``."""
    deadline = time.monotonic() + timeout
    while any(os.path.exists(p) != present for p in paths):
        if time.monotonic() > deadline:
            missing = [p for p in paths if os.path.exists(p) != present]
            state = "did not appear" if present else "are still there"
            raise LibvirtError(f"sockets {', '.join(missing)} {state} within {timeout:.0f} s; {why}")
        time.sleep(0.05)


@attrs.frozen
class DeployReport:
    """What deploy or undeploy did, as lines for the operator."""

    lines: tuple[str, ...]


def deploy(
    conn: Any,
    registry: Registry,
    uri: str,
    domain_name: str,
    texts: Sequence[str],
    *,
    run_dir: Path,
    hypervisor: str | None = None,
    timeout: float = SOCKET_WAIT_SECONDS,
) -> DeployReport:
    """Add the devices ``texts`` describe to the domain and see them served (see the module doc)."""
    libvirt = import_libvirt()
    if not texts:
        raise LibvirtError("no devices given: pvcore deploy --connect URI DOMAIN CLASS:key=value,... (see --help)")
    plugin = choose_hypervisor(registry, conn, uri, hypervisor)
    xml = require_xml(registry, plugin)
    domain = lookup_domain(conn, domain_name)
    name, uuid = domain.name(), domain.UUIDString()
    active, persistent, local = bool(domain.isActive()), bool(domain.isPersistent()), is_local_uri(uri)
    inactive_flags = libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE
    config_root = _definition(domain, inactive_flags) if persistent else None
    live_root = _definition(domain, 0) if active else None
    config_specs = read_specs(domain, libvirt.VIR_DOMAIN_AFFECT_CONFIG, libvirt) if persistent else []
    live_specs = read_specs(domain, libvirt.VIR_DOMAIN_AFFECT_LIVE, libvirt) if active else []
    existing = _existing_configs(list(dict.fromkeys([*live_specs, *config_specs])), registry, name, plugin)
    completed = complete_specs(
        texts, name, existing, run_dir=run_dir, local=local, registry=registry, hypervisor=plugin
    )
    configs = [config for _, config in completed]
    for root in (config_root, live_root):
        problems = xml.check(name, root, configs) if root is not None else []
        if problems:
            raise LibvirtError("\n".join(problems))
    devices = _write_elements(xml, completed, [r for r in (config_root, live_root) if r is not None])
    new_specs = [device.spec for device in devices]
    lines = [f"domain {name} ({'running' if active else 'shut off'}; plugin {plugin}): deploying {len(devices)} device(s)"]
    lines += [f"  {device.describe()}" for device in devices]
    if config_root is not None:
        insert_devices(config_root, [device.element for device in devices])
        set_in_definition(config_root, [*config_specs, *new_specs])
        conn.defineXML(ElementTree.tostring(config_root, encoding="unicode"))
        lines.append("  persistent definition: updated")
    attach_live = active and local
    if attach_live:
        write_live_specs(domain, [*live_specs, *new_specs], libvirt)
    if local:
        served_by, control = _served_by(uri, run_dir, uuid) or (
            start_domain_server(uri, name, uuid, run_dir, hypervisor), control_socket_path(run_dir, uuid)
        )
        lines.append(f"  served by: {served_by}")
        lines += wait_until_served(
            run_dir, control, [device.config for device in devices], timeout=timeout, why=f"see the log of {served_by}"
        )
    else:
        host = urlsplit(uri).hostname or uri
        lines.append(f"  served by: the pvcore daemon on {host} (it must run there: systemctl enable --now pvcore-daemon)")
    if attach_live:
        lines.append(f"  live: {_attach_live(domain, devices, live_specs, libvirt)}")
    elif active:
        lines.append("  live: not attached (remote host); the devices appear at the domain's next start")
    return DeployReport(tuple(lines))


def _write_elements(
    xml: LibvirtXml, completed: Sequence[tuple[str, DeviceConfig]], roots: Sequence[ElementTree.Element]
) -> list[DeployedDevice]:
    """The plugin's element for each device; each sees the definitions' devices and the elements written before it."""
    scratch = copy.deepcopy(roots[0]) if roots else ElementTree.Element("domain")
    for other in roots[1:]:
        insert_devices(scratch, [copy.deepcopy(child) for child in other.iterfind("devices/*")])
    devices = []
    for spec, config in completed:
        try:
            element = xml.element(config, scratch)
        except ValueError as exc:
            raise LibvirtError(str(exc)) from None
        insert_devices(scratch, [copy.deepcopy(element)])
        devices.append(DeployedDevice(config, spec, element))
    return devices


def _attach_live(domain: Any, devices: Sequence[DeployedDevice], live_specs: Sequence[str], libvirt: Any) -> str:
    attached: list[DeployedDevice] = []
    for device in devices:
        try:
            domain.attachDeviceFlags(ElementTree.tostring(device.element, encoding="unicode"), libvirt.VIR_DOMAIN_AFFECT_LIVE)
        except libvirt.libvirtError as exc:
            write_live_specs(domain, [*live_specs, *(d.spec for d in attached)], libvirt)
            done = f"{len(attached)} attached; " if attached else ""
            return (
                f"{done}{device.config.name} could not be attached ({exc.get_error_message()}); "
                "it and the devices after it appear at the domain's next start"
            )
        attached.append(device)
    return "attached"


def _wait_detached(domain: Any, sockets: Sequence[str], xml: LibvirtXml, timeout: float) -> list[str]:
    """Wait until the running domain has no element connecting to ``sockets`` (the guest released
    them: a PCI unplug waits for the guest); the sockets still attached after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        attached = [xml.socket(e) or "" for e in elements_by_socket(_definition(domain, 0), sockets, xml.socket)]
        if not attached or time.monotonic() > deadline:
            return attached
        time.sleep(0.1)


def undeploy(
    conn: Any,
    registry: Registry,
    uri: str,
    domain_name: str,
    names: Sequence[str] = (),
    *,
    hypervisor: str | None = None,
    timeout: float = SOCKET_WAIT_SECONDS,
) -> DeployReport:
    """Detach the devices pvcore owns from the domain (only those ``names`` if given), take them out of
    the metadata, see their sockets go."""
    libvirt = import_libvirt()
    domain = lookup_domain(conn, domain_name)
    name = domain.name()
    active, persistent = bool(domain.isActive()), bool(domain.isPersistent())
    config_specs = read_specs(domain, libvirt.VIR_DOMAIN_AFFECT_CONFIG, libvirt) if persistent else []
    live_specs = read_specs(domain, libvirt.VIR_DOMAIN_AFFECT_LIVE, libvirt) if active else []
    specs = list(dict.fromkeys([*live_specs, *config_specs]))
    if not specs:
        return DeployReport((f"domain {name}: pvcore owns no devices there; nothing to do",))
    plugin = choose_hypervisor(registry, conn, uri, hypervisor)
    xml = require_xml(registry, plugin)
    configs = dict(zip(specs, _existing_configs(specs, registry, name, plugin)))
    if names:
        unknown = sorted(set(names) - {config.name for config in configs.values()})
        if unknown:
            owned = ", ".join(config.name for config in configs.values())
            raise LibvirtError(f"domain {name}: pvcore owns no device named {', '.join(unknown)} (it owns {owned})")
        specs = [spec for spec, config in configs.items() if config.name in names]
    sockets = [str(configs[spec].get("socket")) for spec in specs]
    lines = [f"domain {name}: undeploying {len(specs)} device(s)"]
    if active:
        problems = []
        for element in elements_by_socket(_definition(domain, 0), sockets, xml.socket):
            try:
                domain.detachDeviceFlags(ElementTree.tostring(element, encoding="unicode"), libvirt.VIR_DOMAIN_AFFECT_LIVE)
            except libvirt.libvirtError as exc:
                problems.append(f"{describe_element(element, xml.socket(element))}: {exc.get_error_message()}")
        attached = _wait_detached(domain, sockets, xml, timeout)
        if attached:
            problems.append(f"still attached after {timeout:.0f} s (the guest has not released them; their backends "
                            f"stay until it does and the domain stops): {', '.join(attached)}")
            sockets = [socket for socket in sockets if socket not in attached]
        kept = [spec for spec in specs if str(configs[spec].get("socket")) in attached]
        write_live_specs(domain, [s for s in live_specs if s not in specs or s in kept], libvirt)
        lines.append(f"  live: {'detach requested; ' + '; '.join(problems) if problems else 'detached'}")
    if persistent:
        root = _definition(domain, libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE)
        remove_devices(root, elements_by_socket(root, sockets, xml.socket))
        set_in_definition(root, [s for s in config_specs if s not in specs])
        conn.defineXML(ElementTree.tostring(root, encoding="unicode"))
        lines.append("  persistent definition: devices and metadata removed")
    if is_local_uri(uri):
        wait_for_sockets(sockets, present=False, timeout=timeout, why="is a pvcore daemon for this run dir stuck? see its log")
        lines.append("  backends: released, sockets removed")
    return DeployReport(tuple(lines))
