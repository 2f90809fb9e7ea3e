"""The plugin registry: one pluggy PluginManager fed from the ``pvcore.plugins`` entry points.

Every plugin — the core's own device classes, the in-tree kvm/xen/lpar
plugins, a third party's — is found the same way: an entry point in the group
:data:`ENTRY_POINT_GROUP` naming a module or object whose ``pvcore_*``
functions are hook implementations (see :mod:`pvcore.hookspecs`). Tests may
also register plugin objects explicitly with :meth:`Registry.register`.

A plugin that fails to import, implements a hook that does not exist, gives a
hook the wrong arguments, does not describe itself, or was written against a
contract version this core does not support is recorded as *broken* with its
distribution name and the reason (for an old contract, what changed since),
and is not registered; the others load.

Hypervisor hooks (see :mod:`pvcore.hookspecs`) are dispatched by name:
:meth:`Registry.call` calls the hook of the one plugin that serves the named
hypervisor (through pluggy's subset hook caller), so plugins never check
whether a call is theirs; :meth:`Registry.primitives` adds the core's default
memory and notification primitives behind the plugin's own.
"""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import attrs
import pluggy

from pvcore import hookspecs
from pvcore.config import PluginOptions
from pvcore.contract import (
    CONTRACT_CHANGES,
    SUPPORTED_CONTRACTS,
    ContractError,
    DeviceClass,
    DeviceConfig,
    Detection,
    HostContext,
    OptionSpec,
    PluginInfo,
)
from pvcore.primitives import HypervisorPrimitives

log = logging.getLogger("pvcore.registry")

ENTRY_POINT_GROUP = "pvcore.plugins"


@attrs.define
class PluginRecord:
    """One plugin as the registry saw it: where it came from and whether it loaded."""

    name: str
    distribution: str
    version: str
    plugin: Any = None
    info: PluginInfo | None = None
    error: str | None = None

    @property
    def state(self) -> str:
        """``ok``, or ``broken: <reason>``."""
        return "ok" if self.error is None else f"broken: {self.error}"


class Registry:
    """The single PluginManager of a pvcore process, with a record of every plugin."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.records: list[PluginRecord] = []

    @property
    def hook(self) -> Any:
        """The hook relay (``registry.hook.pvcore_detect(host=...)``)."""
        return self.pm.hook

    def load_entry_points(self, entry_points: Iterable[importlib.metadata.EntryPoint] | None = None) -> None:
        """Load every plugin advertised in the ``pvcore.plugins`` entry-point group."""
        if entry_points is None:
            entry_points = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
        for entry_point in sorted(entry_points, key=lambda ep: ep.name):
            dist = entry_point.dist
            distribution = dist.metadata["Name"] if dist is not None else "?"
            version = dist.version if dist is not None else "?"
            try:
                plugin = entry_point.load()
            except Exception as exc:  # a broken plugin must not take the others down
                self._broken(entry_point.name, distribution, version, f"import failed: {type(exc).__name__}: {exc}")
                continue
            self.register(plugin, name=entry_point.name, distribution=distribution, version=version)

    def register(self, plugin: Any, *, name: str, distribution: str = "(registered)", version: str = "") -> PluginRecord:
        """Validate and register one plugin object or module; return its record."""
        if self.pm.get_plugin(name) is not None or any(r.name == name for r in self.records):
            return self._broken(name, distribution, version, f"another plugin is already registered as {name!r}")
        unknown = sorted(
            attr for attr in dir(plugin) if attr.startswith("pvcore_") and not hasattr(hookspecs, attr)
        )
        if unknown:
            return self._broken(name, distribution, version, f"implements unknown hook(s): {', '.join(unknown)}")
        describe = getattr(plugin, "pvcore_plugin_info", None)
        if describe is None:
            return self._broken(name, distribution, version, "does not implement pvcore_plugin_info")
        try:
            info = describe()
            if not isinstance(info, PluginInfo):
                raise ContractError(f"pvcore_plugin_info returned {type(info).__name__}, not PluginInfo")
            if info.contract not in SUPPORTED_CONTRACTS:
                change = CONTRACT_CHANGES.get(info.contract)
                raise ContractError(
                    f"written for contract {info.contract}; this pvcore supports {sorted(SUPPORTED_CONTRACTS)}"
                    + (f": {change}" if change else "")
                )
            if info.hypervisor and info.hypervisor in self.hypervisors():
                raise ContractError(
                    f"hypervisor {info.hypervisor!r} is already served by plugin {self.hypervisors()[info.hypervisor].name}"
                )
        except Exception as exc:
            return self._broken(name, distribution, version, str(exc))
        try:
            self.pm.register(plugin, name)
        except (pluggy.PluginValidationError, ValueError) as exc:
            return self._broken(name, distribution, version, f"invalid hook implementation: {exc}")
        record = PluginRecord(name, distribution, version, plugin=plugin, info=info)
        self.records.append(record)
        return record

    def _broken(self, name: str, distribution: str, version: str, reason: str) -> PluginRecord:
        log.warning("plugin %s (%s): %s", name, distribution, reason)
        record = PluginRecord(name, distribution, version, error=reason)
        self.records.append(record)
        return record

    def call_each(self, hook_name: str, **kwargs: Any) -> list[tuple[PluginRecord, Any]]:
        """Call one hook on each plugin separately, so that one plugin's exception
        is returned as its answer instead of aborting the others."""
        results: list[tuple[PluginRecord, Any]] = []
        for record in self.records:
            if record.error is not None:
                continue
            function: Callable[..., Any] | None = getattr(record.plugin, hook_name, None)
            if function is None:
                continue
            try:
                results.append((record, function(**kwargs)))
            except Exception as exc:
                log.warning("plugin %s: %s failed: %s", record.name, hook_name, exc)
                results.append((record, exc))
        return results

    def device_classes(self) -> dict[str, DeviceClass]:
        """Every device class offered by a loaded plugin, by name.

        Two plugins offering one name is a :class:`~pvcore.contract.ContractError`.
        """
        classes: dict[str, DeviceClass] = {}
        owners: dict[str, str] = {}
        for record, answer in self.call_each("pvcore_device_classes"):
            if isinstance(answer, Exception):
                continue
            for device_class in answer or ():
                if device_class.name in classes:
                    raise ContractError(
                        f"device class {device_class.name!r} offered by both {owners[device_class.name]} and {record.name}"
                    )
                classes[device_class.name] = device_class
                owners[device_class.name] = record.name
        return classes

    def hypervisors(self) -> dict[str, PluginRecord]:
        """Loaded plugins that serve a hypervisor, by hypervisor name."""
        return {r.info.hypervisor: r for r in self.records if r.info is not None and r.info.hypervisor}

    def serving(self, hypervisor: str) -> PluginRecord:
        """The loaded plugin that serves ``hypervisor``; ``LookupError`` naming the ones there are."""
        record = self.hypervisors().get(hypervisor)
        if record is None:
            available = ", ".join(sorted(self.hypervisors())) or "none installed"
            raise LookupError(f"no plugin serves hypervisor {hypervisor!r} (available: {available})")
        return record

    def call(self, hypervisor: str, hook_name: str, **kwargs: Any) -> Any:
        """Call hypervisor hook ``hook_name`` on the plugin that serves ``hypervisor`` only.

        Returns its answer, or None when the plugin does not implement the hook.
        ``LookupError`` when no plugin serves ``hypervisor``.
        """
        record = self.serving(hypervisor)
        others = [plugin for plugin in self.pm.get_plugins() if plugin is not record.plugin]
        return self.pm.subset_hook_caller(hook_name, remove_plugins=others)(**kwargs)

    def qemu_args(self, hypervisor: str, configs: Sequence[DeviceConfig]) -> Mapping[str, list[str]]:
        """Per domain, the QEMU arguments the plugin serving ``hypervisor`` gives for ``configs``.

        ``LookupError`` when no plugin serves ``hypervisor`` or its plugin has
        no ``pvcore_qemu_args``; a device it cannot attach raises its ``ValueError``.
        """
        arguments = self.call(hypervisor, "pvcore_qemu_args", configs=list(configs))
        if arguments is None:
            raise LookupError(
                f"the {hypervisor} plugin gives no QEMU arguments (no pvcore_qemu_args); see `pvcore plugins`"
            )
        return arguments

    def primitives(self, hypervisor: str) -> HypervisorPrimitives:
        """The memory and notification primitives of ``hypervisor``: its plugin's, then the core's defaults."""
        self.serving(hypervisor)
        return HypervisorPrimitives(hypervisor, lambda hook_name, **kwargs: self.call(hypervisor, hook_name, **kwargs))

    def device_options(self, hypervisor: str) -> dict[str, dict[str, OptionSpec]]:
        """The device options the plugin serving ``hypervisor`` declares, by class (empty if none).

        An answer that is not a mapping of class names to mappings of keys to
        :class:`~pvcore.contract.OptionSpec` is a :class:`~pvcore.contract.ContractError`.
        """
        declared = self.call(hypervisor, "pvcore_device_options") or {}
        plugin = self.serving(hypervisor).name
        if not isinstance(declared, Mapping):
            raise ContractError(f"plugin {plugin}: pvcore_device_options returned {type(declared).__name__}, not a mapping")
        checked: dict[str, dict[str, OptionSpec]] = {}
        for device_class, options in declared.items():
            if not isinstance(options, Mapping) or not all(
                isinstance(key, str) and isinstance(spec, OptionSpec) for key, spec in options.items()
            ):
                raise ContractError(
                    f"plugin {plugin}: pvcore_device_options[{device_class!r}] must map option names to OptionSpec"
                )
            checked[str(device_class)] = dict(options)
        return checked

    def plugin_options(self, default: str | Callable[[], str]) -> PluginOptions:
        """What :func:`pvcore.config.parse_devices` needs to accept plugins' own keys.

        ``default`` is the hypervisor of devices without ``hypervisor=`` (a
        name, or a function called once when first needed, e.g. detection).
        """
        return PluginOptions(self.device_options, default)

    def detect(self, host: HostContext) -> list[Detection]:
        """Every plugin's detection on ``host``, most confident first."""
        found = [answer for _, answer in self.call_each("pvcore_detect", host=host) if isinstance(answer, Detection)]
        return sorted(found, key=lambda d: -d.confidence)


def default_registry() -> Registry:
    """A registry with every installed plugin loaded from entry points."""
    registry = Registry()
    registry.load_entry_points()
    return registry
