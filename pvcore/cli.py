"""The ``pvcore`` command line.

``pvcore serve [--hypervisor NAME] DEVICE...`` is a contract that tools and
people script against: its shape does not change. ``pvcore probe``,
``deploy``, ``undeploy`` and ``daemon`` reach libvirt-managed hosts through a
libvirt connection URI (``--connect``, default ``$LIBVIRT_DEFAULT_URI`` or
qemu:///system); they need the optional libvirt-python (``pvcore[libvirt]``). Errors a user can fix are
printed as one line naming the thing and the fix, never as a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from pvcore import __version__
from pvcore.build import build_report
from pvcore.config import (
    COMMON_OPTIONS,
    ConfigError,
    build_configs,
    check_unique,
    read_config_file,
    split_devices,
)
from pvcore.contract import ContractError, DeviceConfig, HostContext, OptionSpec
from pvcore.devices.block.iopool import MAX_THREAD_BOUND, set_thread_bound
from pvcore.control import ControlError
from pvcore.daemon import Daemon, DaemonError, default_run_dir
from pvcore.metrics import MetricsAddress
from pvcore.libvirt import LibvirtError
from pvcore.registry import Registry, default_registry
from pvcore.spread import check_spread
from pvcore.virtio import DeviceError
from pvcore.workers import WorkerPool, default_worker_count, partition

LIBVIRT_EPILOG = """\
DEVICE is the syntax of `pvcore serve`; socket= is optional here (default
RUN_DIR/NAME.sock), name= defaults to DOMAIN-CLASSn, and relative paths are made
absolute. The hypervisor plugin writes each device's libvirt element and says
what the domain lacks. kvm: block is a <disk type='vhostuser'>, net an
<interface type='vhostuser'>, console a <console type='unix'> (virtio), rng an
<rng> with an EGD backend; vhost-user devices need the domain's RAM shared.

example:
  pvcore deploy --connect qemu:///system vm1 block:path=/srv/vm1.img rng:rate=4096/1s
"""

SERVE_EPILOG = """\
DEVICE is CLASS:key=value,... (a literal comma in a value is written ,,).
Keys every class takes: {common}.
{classes}

{plugins}Each socket is created 0600; pvcore listens and the hypervisor connects
(QEMU: -chardev socket,id=c0,path=SOCKET,reconnect=1). SIGTERM finishes
in-flight requests, flushes and removes the sockets; SIGHUP reopens logs.

example:
  pvcore serve --hypervisor kvm \\
    block:path=disk.img,socket=/run/pvcore/vm1-vda.sock \\
    net:socket=/run/pvcore/vm1-net.sock,mac=52:54:00:00:00:01,switch=lan0 \\
    rng:socket=/run/pvcore/vm1-rng.sock,rate=4096/1s \\
    console:socket=/run/pvcore/vm1-con.sock,log=vm1.log
"""


class UsageError(Exception):
    """Bad command-line use; the message says what to do."""


def _keys(options: dict[str, OptionSpec]) -> str:
    return ", ".join(f"{key} ({spec.help})" for key, spec in options.items())


def _class_help(registry: Registry) -> str:
    lines = []
    for name, device_class in sorted(registry.device_classes().items()):
        lines.append(f"  {name}: {device_class.summary}. Keys: {_keys(dict(device_class.options))}.")
    return "Device classes:\n" + "\n".join(lines) if lines else "No device classes are installed."


def plugin_option_lines(registry: Registry, hypervisor: str, indent: str = "  ") -> list[str]:
    """The device options the plugin serving ``hypervisor`` declares: one line per key and help, naming its classes.

    A plugin whose ``pvcore_device_options`` fails gets one line saying why.
    """
    try:
        declared = registry.device_options(hypervisor)
    except Exception as exc:  # a broken plugin must not break --help or `pvcore plugins`
        return [f"{indent}(its options cannot be listed: {exc})"]
    classes_of: dict[tuple[str, str], list[str]] = {}
    for device_class, options in declared.items():
        for key, spec in options.items():
            classes_of.setdefault((key, spec.help), []).append(device_class)
    return [f"{indent}{key} ({', '.join(classes)}): {text}" for (key, text), classes in classes_of.items()]


def _plugin_help(registry: Registry) -> str:
    lines = []
    for hypervisor in sorted(registry.hypervisors()):
        option_lines = plugin_option_lines(registry, hypervisor, indent="    ")
        if option_lines:
            lines += [f"  {hypervisor}:", *option_lines]
    if not lines:
        return ""
    heading = "Keys a hypervisor plugin adds for the devices it serves (through --hypervisor or hypervisor=):"
    return heading + "\n" + "\n".join(lines) + "\n\n"


class VersionAction(argparse.Action):
    """``--version``: pvcore's version and which build of each hot module is loaded (:mod:`pvcore.build`)."""

    def __init__(self, option_strings: list[str], dest: str, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser: argparse.ArgumentParser, *args: object) -> None:
        print(f"pvcore {__version__}")
        print("\n".join(build_report()))
        parser.exit()


def build_parser(registry: Registry) -> argparse.ArgumentParser:
    """The argument parser, with device-class help taken from the installed plugins."""
    parser = argparse.ArgumentParser(prog="pvcore", description="Paravirtual device backends for every hypervisor.")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--version", action=VersionAction, help="print the version and, module by module, whether the "
                        "hot path runs compiled or in pure Python (PVCORE_PURE_PYTHON=1 forces pure), and exit")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="serve devices to guests",
        description="Serve paravirtual devices to guests through one hypervisor plugin.",
        epilog=SERVE_EPILOG.format(
            common=_keys(dict(COMMON_OPTIONS)), classes=_class_help(registry), plugins=_plugin_help(registry)
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument("--hypervisor", metavar="NAME", help="plugin to serve through (default: detected)")
    serve.add_argument("--config", type=Path, metavar="FILE", help="TOML file naming devices ([[device]] tables)")
    serve.add_argument("--run-dir", type=Path, metavar="DIR", help="directory for sockets (default: /run/pvcore)")
    serve.add_argument("--metrics", type=metrics_address, metavar="HOST:PORT", help=METRICS_HELP)
    serve.add_argument(
        "--workers", type=worker_count, metavar="N",
        help="worker processes to spread the devices over (default: the number of CPUs; 1: serve in this "
        "process). NICs of one switch, disks of one throttle group and rng devices of one domain share a worker; "
        "never more workers than such sets, unless a disk is spread over them (spread=on)",
    )
    serve.add_argument("--io-threads", type=io_thread_count, metavar="N", help=IO_THREADS_HELP)
    serve.add_argument(
        "--print-qemu-args", action="store_true", help="print, per guest, the QEMU arguments that attach it, and exit"
    )
    serve.add_argument("devices", nargs="*", metavar="DEVICE", help="CLASS:key=value,...")

    plugins = commands.add_parser("plugins", help="list plugins: name, version, distribution, what they supply, state")
    plugins.add_argument("-v", "--verbose", action="store_true", help="also list the device options each plugin declares")

    console = commands.add_parser("console", help="attach to a guest's console (Ctrl-] detaches)")
    console.add_argument("name", help="console device name (name= of the console device)")
    console.add_argument("--run-dir", type=Path, metavar="DIR")
    console.add_argument("--send", metavar="TEXT", help="send TEXT (with \\n escapes) instead of attaching a terminal")
    console.add_argument("--read-for", type=float, default=1.0, metavar="SECONDS", help="with --send: how long to collect output")

    add_libvirt_commands(commands)

    ctl = commands.add_parser(
        "ctl",
        help="list, add or remove the devices of a running daemon, change their limits, an rng's rate or a disk's file",
        description="Talk to the control socket (RUN_DIR/control.sock) of a running `pvcore serve` or `pvcore daemon`; "
        "see docs/operations.md (Control socket).",
    )
    ctl.add_argument("--run-dir", type=Path, metavar="DIR", help="the daemon's run directory (default: /run/pvcore)")
    ctl_commands = ctl.add_subparsers(dest="ctl_command", required=True, metavar="ACTION")
    ctl_list = ctl_commands.add_parser("list", help="every device with its state and counters")
    ctl_list.add_argument("--json", action="store_true", help="print the daemon's JSON answer")
    ctl_commands.add_parser("add", help="serve one more device").add_argument("device", metavar="DEVICE", help="CLASS:key=value,...")
    ctl_commands.add_parser("remove", help="drain and remove a device").add_argument("name", metavar="NAME")
    set_limits = ctl_commands.add_parser(
        "set-limits", help="change a block device's I/O limits (its group's, if it has one) or a NIC's rate"
    )
    set_limits.add_argument("name", metavar="NAME")
    set_limits.add_argument("limits", metavar="LIMITS", help="e.g. iops=500,bps=50M (block), rate=100M (net), or off")
    set_rate = ctl_commands.add_parser("set-rate", help="change the rate limit of an rng device's domain")
    set_rate.add_argument("name", metavar="NAME")
    set_rate.add_argument("rate", metavar="BYTES/PERIOD", help="e.g. 4096/1s")
    swap_media = ctl_commands.add_parser(
        "swap-media", help="change a block device's backing file (a media change; no request is in flight at the switch)"
    )
    swap_media.add_argument("name", metavar="NAME")
    swap_media.add_argument("path", type=Path, metavar="FILE", help="the new backing file, of the device's size")

    top = commands.add_parser("top", help="a live view of every device of a running daemon (its control socket)")
    top.add_argument("--run-dir", type=Path, metavar="DIR", help="the daemon's run directory (default: /run/pvcore)")
    top.add_argument("--interval", type=float, default=1.0, metavar="SECONDS", help="refresh period (default: 1)")
    top.add_argument("--once", action="store_true", help="print one table over one interval and exit")

    demo = commands.add_parser(
        "demo",
        help="boot a QEMU guest whose disk, NIC, console and entropy pvcore serves, and show what it saw",
        description="Start `pvcore serve --hypervisor kvm`, boot two Debian guests under QEMU TCG on one pvcore "
        "switch, and print what the first saw: disk checksum, /dev/hwrng bytes, a ping, its console transcript.",
    )
    demo.add_argument("--loopback", action="store_true", help="no QEMU: the in-process reference driver plays the guest")

    new_plugin = commands.add_parser("new-plugin", help="write the skeleton of a hypervisor plugin (docs/porting.md)")
    new_plugin.add_argument("name", help="the hypervisor's name: lower-case letters, digits and _")
    new_plugin.add_argument("--directory", type=Path, metavar="DIR", help="where to write pvcore-NAME/ (default: here)")
    return parser


METRICS_HELP = "serve Prometheus metrics at http://HOST:PORT/metrics (see docs/operations.md)"
IO_THREADS_HELP = (
    f"the most block I/O threads a process runs for waiting requests, 1..{MAX_THREAD_BOUND}; with --workers, each "
    "worker's (default: 4 per CPU of the process's share, at least 8, at most 64; see docs/performance.md)"
)


def metrics_address(text: str) -> MetricsAddress:
    """argparse type of ``--metrics``: a :class:`MetricsAddress`, or a usage error saying what is wrong."""
    try:
        return MetricsAddress.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _default_uri() -> str:
    return os.environ.get("LIBVIRT_DEFAULT_URI") or "qemu:///system"


def add_libvirt_commands(commands: Any) -> None:
    """The subcommands that work through a libvirt connection."""
    connect = {"metavar": "URI", "default": _default_uri(), "help": "libvirt URI (default: %(default)s)"}
    run_dir = {"type": Path, "metavar": "DIR", "help": "sockets and locks (default: /run/pvcore for root)"}
    probe = commands.add_parser("probe", help="show a libvirt host's hypervisor plugin, domains and their devices")
    probe.add_argument("--connect", **connect)
    probe.add_argument("--run-dir", **run_dir)
    probe.add_argument(
        "--hypervisor", metavar="NAME",
        help="no libvirt: list the device slots plugin NAME finds on this host (xen: its xenstore backend tree)",
    )

    deploy = commands.add_parser(
        "deploy",
        help="add devices served by pvcore to a libvirt domain",
        description="Start the backends and add the matching devices to DOMAIN's definition (and live, when it runs).",
        epilog=LIBVIRT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    deploy.add_argument("--connect", **connect)
    deploy.add_argument("--hypervisor", metavar="NAME", help="plugin to serve through (default: detected from the connection)")
    deploy.add_argument("--run-dir", **run_dir)
    deploy.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS", help="how long to wait for the backends")
    deploy.add_argument("domain", metavar="DOMAIN", help="domain name or UUID")
    deploy.add_argument("devices", nargs="+", metavar="DEVICE", help="CLASS:key=value,...")

    undeploy = commands.add_parser(
        "undeploy", help="remove the devices pvcore deployed from a libvirt domain (every one, or those named)"
    )
    undeploy.add_argument("--connect", **connect)
    undeploy.add_argument("--hypervisor", metavar="NAME", help="plugin whose elements to remove (default: detected from the connection)")
    undeploy.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS", help="how long to wait for the sockets to go")
    undeploy.add_argument("domain", metavar="DOMAIN", help="domain name or UUID")
    undeploy.add_argument("names", nargs="*", metavar="NAME", help="only these devices (name= of each; default: all)")

    daemon = commands.add_parser(
        "daemon",
        help="serve the pvcore devices of every libvirt domain, following their lifecycles",
        description="Serve the devices recorded in each domain's pvcore metadata; follow libvirt's events. "
        "SIGTERM releases everything; QEMU reconnects to the next daemon.",
    )
    daemon.add_argument("--connect", **connect)
    daemon.add_argument("--hypervisor", metavar="NAME", help="plugin to serve through (default: detected from the connection)")
    daemon.add_argument("--run-dir", **run_dir)
    daemon.add_argument("--metrics", type=metrics_address, metavar="HOST:PORT", help=METRICS_HELP)
    daemon.add_argument("--domain", metavar="DOMAIN", help="serve only DOMAIN, until it stops (what deploy starts without a daemon)")
    daemon.add_argument(
        "--workers", type=worker_count, metavar="N",
        help="worker processes to serve the devices in, libvirt followed in this one (default: the number of CPUs; "
        "with --domain: 1; 1: serve in this process). Devices sharing a switch, a throttle group or a domain's rng "
        "share a worker; the others go to the worker with the fewest",
    )
    daemon.add_argument("--io-threads", type=io_thread_count, metavar="N", help=IO_THREADS_HELP)


def cmd_probe_host(registry: Registry, hypervisor: str) -> int:
    """probe --hypervisor NAME: the plugin's own probe of this host, one line per device slot."""
    from pvcore.contract import HostContext

    try:
        slots = registry.call(hypervisor, "pvcore_probe", host=HostContext()) or []
    except LookupError:
        raise UsageError(f"no plugin serves hypervisor {hypervisor!r} (pvcore plugins lists them)") from None
    for slot in slots:
        properties = " ".join(f"{key}={value}" for key, value in sorted(slot.properties.items()))
        print(f"{slot.device_class:8} {slot.address} {properties}")
    if not slots:
        print(f"{hypervisor}: no device slots found")
    return 0


def cmd_libvirt(registry: Registry, args: argparse.Namespace) -> int:
    """probe, deploy, undeploy and daemon: open the connection, do the command, print its report."""
    from pvcore.libvirt.connection import libvirt_errors, open_connection

    run_dir = getattr(args, "run_dir", None) or default_run_dir()
    with libvirt_errors(args.connect):
        if args.command == "daemon":
            from pvcore.libvirt.follower import HostDaemon

            workers = args.workers or (1 if args.domain else default_worker_count())
            set_thread_bound(args.io_threads)
            host_daemon = HostDaemon(
                registry, args.connect, run_dir=run_dir, hypervisor=args.hypervisor, only_domain=args.domain,
                metrics=args.metrics, workers=workers,
            )
            asyncio.run(host_daemon.run())
            return 0
        conn = open_connection(args.connect)
        try:
            if args.command == "probe":
                from pvcore.libvirt.probe import probe

                lines = probe(conn, registry, args.connect, run_dir=run_dir)
            elif args.command == "deploy":
                from pvcore.libvirt.deploy import deploy

                lines = list(
                    deploy(
                        conn, registry, args.connect, args.domain, args.devices,
                        run_dir=run_dir, hypervisor=args.hypervisor, timeout=args.timeout,
                    ).lines
                )
            else:
                from pvcore.libvirt.deploy import undeploy

                lines = list(
                    undeploy(
                        conn, registry, args.connect, args.domain, args.names, hypervisor=args.hypervisor, timeout=args.timeout
                    ).lines
                )
        finally:
            conn.close()
    print("\n".join(lines))
    return 0


def cmd_plugins(registry: Registry, verbose: bool = False) -> int:
    """Print one block per plugin; with ``verbose``, a hypervisor plugin's device options too."""
    for record in registry.records:
        info = record.info
        print(f"{record.name} {record.version} ({record.distribution}): {record.state}")
        if info is not None:
            if info.hypervisor:
                print(f"  hypervisor: {info.hypervisor}")
            print(f"  primitives: {', '.join(sorted(info.primitives)) or '-'}")
            print(f"  device classes: {', '.join(sorted(info.device_classes)) or '-'}")
            print(f"  contract: {info.contract}")
            if verbose and info.hypervisor:
                option_lines = plugin_option_lines(registry, info.hypervisor, indent="    ")
                print("  device options:" + ("" if option_lines else " -"))
                for line in option_lines:
                    print(line)
    if not registry.records:
        print("no plugins installed (is pvcore installed? pip install -e .)")
    print("\n".join(build_report()))
    return 0 if all(r.error is None for r in registry.records) else 1


def choose_hypervisor(registry: Registry, requested: str | None) -> str:
    """``--hypervisor`` if given, else the most confident detection."""
    if requested:
        return requested
    detections = registry.detect(HostContext())
    if not detections:
        available = ", ".join(sorted(registry.hypervisors())) or "none installed"
        raise UsageError(f"no hypervisor detected here; pass --hypervisor NAME (installed: {available})")
    return detections[0].hypervisor


def cmd_serve(registry: Registry, args: argparse.Namespace) -> int:
    """Run the daemon until SIGTERM."""
    classes = registry.device_classes()
    settings, from_file = read_config_file(args.config) if args.config else ({}, [])
    # The keys a device takes depend on the plugin serving it, so the hypervisor is chosen
    # (lazily: detection runs only when a device needs it) before the keys are checked.
    options = registry.plugin_options(lambda: choose_hypervisor(registry, args.hypervisor or settings.get("hypervisor")))
    configs = check_unique(
        build_configs(from_file, classes, options) + build_configs(split_devices(args.devices), classes, options)
    )
    if not configs:
        raise UsageError("no devices given: pvcore serve [--hypervisor NAME] CLASS:key=value,... (see --help)")
    hypervisor = options.serving()
    if args.print_qemu_args:
        return print_qemu_args(registry, hypervisor, configs)
    run_dir = args.run_dir or Path(str(settings.get("run_dir", default_run_dir())))
    metrics = args.metrics
    if metrics is None and "metrics" in settings:
        try:
            metrics = MetricsAddress.parse(settings["metrics"])
        except ValueError as exc:
            raise ConfigError(f"config {args.config}: {exc}") from None
    workers = args.workers
    if workers is None and "workers" in settings:
        try:
            workers = worker_count(str(settings["workers"]))
        except argparse.ArgumentTypeError as exc:
            raise ConfigError(f"config {args.config}: {exc}") from None
    io_threads = args.io_threads
    if "io_threads" in settings:
        raise ConfigError(f"config {args.config}: the setting is spelled io-threads, as the option --io-threads")
    if io_threads is None and "io-threads" in settings:
        try:
            io_threads = io_thread_count(str(settings["io-threads"]))
        except argparse.ArgumentTypeError as exc:
            raise ConfigError(f"config {args.config}: {exc}") from None
    set_thread_bound(io_threads)  # with workers: each worker's (WorkerPool passes it on)
    for config in configs:
        try:
            check_spread(config.name, config.options)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    shares = partition(configs, workers or default_worker_count())
    if len(shares) > 1:
        pool = WorkerPool(registry, hypervisor, shares, run_dir=run_dir, metrics=metrics)
        asyncio.run(pool.serve_forever())
        return 0
    daemon = Daemon(registry, hypervisor, configs, run_dir=run_dir, metrics=metrics)
    asyncio.run(daemon.serve_forever())
    return 0


def worker_count(text: str) -> int:
    """``--workers N``: a whole number of at least 1."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"workers={text!r}: expected a whole number of at least 1")
    return int(text)


def io_thread_count(text: str) -> int:
    """``--io-threads N``: a whole number from 1 to :data:`~pvcore.devices.block.iopool.MAX_THREAD_BOUND`."""
    value = text.strip()
    if not (value.isascii() and value.isdigit()) or not 1 <= int(value) <= MAX_THREAD_BOUND:
        raise argparse.ArgumentTypeError(
            f"io-threads={text!r}: expected a whole number from 1 to {MAX_THREAD_BOUND}"
        )
    return int(value)


def print_qemu_args(registry: Registry, hypervisor: str, configs: list[DeviceConfig]) -> int:
    """Print the QEMU arguments of each guest, grouped by the hypervisor serving its devices."""
    by_hypervisor: dict[str, list[DeviceConfig]] = {}
    for config in configs:
        by_hypervisor.setdefault(config.get("hypervisor") or hypervisor, []).append(config)
    for name, group in by_hypervisor.items():
        try:
            per_domain = registry.qemu_args(name, group)
        except (ValueError, LookupError) as exc:
            raise UsageError(str(exc)) from None
        for domain, arguments in per_domain.items():
            print(f"# {domain} ({name})")
            print(shlex.join(arguments))
    return 0


def cmd_console(args: argparse.Namespace) -> int:
    """Attach the terminal (or a script) to a console's attach socket."""
    from pvcore.devices.console import ConsoleAttachError, attach_console, console_exchange, console_socket_path

    path = console_socket_path(args.run_dir or default_run_dir(), args.name)
    if not path.exists():
        raise UsageError(
            f"console {args.name}: no attach socket at {path}; is `pvcore serve` running with console:name={args.name}?"
        )
    try:
        if args.send is not None:
            data = args.send.encode().decode("unicode_escape").encode("latin-1")
            sys.stdout.buffer.write(console_exchange(path, data, duration=args.read_for))
            sys.stdout.flush()
            return 0
        print(f"pvcore: attached to console {args.name}; Ctrl-] detaches", file=sys.stderr)
        reason = attach_console(path, sys.stdin, sys.stdout)
    except ConsoleAttachError as exc:
        raise UsageError(str(exc)) from None
    print(f"\r\npvcore: console {args.name}: {reason.value}", file=sys.stderr)
    return 0


def cmd_ctl(args: argparse.Namespace) -> int:
    """One request to a daemon's control socket; print its answer."""
    import json

    from pvcore.control import request

    run_dir = args.run_dir or default_run_dir()
    if args.ctl_command == "list":
        body: dict[str, str] = {"command": "list"}
    elif args.ctl_command == "add":
        body = {"command": "add", "device": args.device}
    elif args.ctl_command == "remove":
        body = {"command": "remove", "device": args.name}
    elif args.ctl_command == "swap-media":
        body = {"command": "swap-media", "device": args.name, "path": str(args.path.absolute())}
    elif args.ctl_command == "set-limits":
        body = {"command": "set-limits", "device": args.name, "limits": args.limits}
    else:
        body = {"command": "set-rate", "device": args.name, "rate": args.rate}
    answer = request(run_dir, body)
    if not answer.get("ok"):
        raise UsageError(str(answer.get("error")))
    if args.ctl_command == "list":
        if args.json:
            print(json.dumps(answer["devices"], indent=2))
        for device in [] if args.json else answer["devices"]:
            counts = " ".join(f"{key}={value}" for key, value in device["counters"].items() if not isinstance(value, dict))
            worker = f", worker {device['worker']}" if "worker" in device else ""
            print(f"{device['name']} ({device['class']}, domain {device['domain']}, {device['hypervisor']}{worker}): "
                  f"{device['door']}")
            print(f"  {counts or 'no counters yet'}")
    elif args.ctl_command == "add":
        print(f"added {answer['device']}")
    elif args.ctl_command == "remove":
        print(f"removed {args.name}")
    elif args.ctl_command == "swap-media":
        print(f"{args.name}: now {body['path']} (was {answer['old']})")
    elif args.ctl_command == "set-limits":
        print(f"{args.name}: limits {answer['limits']}" + (f" (group {answer['group']})" if answer["group"] else ""))
    else:
        print(f"{args.name}: rate {answer['rate']}")
    return 0


def cmd_top(args: argparse.Namespace) -> int:
    """The live view of a daemon's devices, until Ctrl-C (or one table with --once)."""
    from pvcore.top import run_top

    if not args.interval > 0:
        raise UsageError(f"--interval {args.interval}: must be a positive number of seconds")
    try:
        run_top(args.run_dir or default_run_dir(), interval=args.interval, once=args.once)
    except KeyboardInterrupt:
        pass
    return 0


def cmd_new_plugin(args: argparse.Namespace) -> int:
    """Write a plugin skeleton and say what to run next."""
    from pvcore.scaffold import ScaffoldError, new_plugin, next_steps

    try:
        root = new_plugin(args.name, args.directory or Path.cwd())
    except ScaffoldError as exc:
        raise UsageError(str(exc)) from None
    print(next_steps(root, args.name), end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``pvcore`` command."""
    registry = default_registry()
    parser = build_parser(registry)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()), format="%(asctime)s pvcore %(name)s: %(message)s", stream=sys.stderr
    )
    try:
        if args.command == "plugins":
            return cmd_plugins(registry, verbose=args.verbose)
        if args.command == "serve":
            return cmd_serve(registry, args)
        if args.command == "console":
            return cmd_console(args)
        if args.command == "ctl":
            return cmd_ctl(args)
        if args.command == "top":
            return cmd_top(args)
        if args.command == "probe" and args.hypervisor:
            return cmd_probe_host(registry, args.hypervisor)
        if args.command in ("probe", "deploy", "undeploy", "daemon"):
            return cmd_libvirt(registry, args)
        if args.command == "demo":
            from pvcore.demo import run_demo

            return run_demo(loopback=args.loopback)
        if args.command == "new-plugin":
            return cmd_new_plugin(args)
    except (UsageError, ConfigError, DeviceError, DaemonError, ContractError, LibvirtError, ControlError) as exc:
        print(f"pvcore: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"pvcore: error: {exc}", file=sys.stderr)
        return 1
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
