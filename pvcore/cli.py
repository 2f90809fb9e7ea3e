"""The ``pvcore`` command line.

``pvcore serve [--hypervisor NAME] DEVICE...`` is a contract that tools and
people script against: its shape does not change. Errors a user can fix are
printed as one line naming the thing and the fix, never as a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import shlex
import sys
from pathlib import Path

from pvcore.config import COMMON_OPTIONS, ConfigError, check_unique, load_config_file, parse_devices
from pvcore.contract import ContractError, DeviceConfig, HostContext
from pvcore.daemon import Daemon, DaemonError, default_run_dir
from pvcore.registry import Registry, default_registry
from pvcore.virtio import DeviceError

SERVE_EPILOG = """\
DEVICE is CLASS:key=value,... (a literal comma in a value is written ,,).
Keys every class takes: {common}.
{classes}
Each socket is created 0600; pvcore listens and the hypervisor connects
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


def _class_help(registry: Registry) -> str:
    lines = []
    for name, device_class in sorted(registry.device_classes().items()):
        keys = ", ".join(f"{key} ({spec.help})" for key, spec in device_class.options.items())
        lines.append(f"  {name}: {device_class.summary}. Keys: {keys}.")
    return "Device classes:\n" + "\n".join(lines) if lines else "No device classes are installed."


def build_parser(registry: Registry) -> argparse.ArgumentParser:
    """The argument parser, with device-class help taken from the installed plugins."""
    parser = argparse.ArgumentParser(prog="pvcore", description="Paravirtual device backends for every hypervisor.")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="serve devices to guests",
        description="Serve paravirtual devices to guests through one hypervisor plugin.",
        epilog=SERVE_EPILOG.format(common=", ".join(COMMON_OPTIONS), classes=_class_help(registry)),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument("--hypervisor", metavar="NAME", help="plugin to serve through (default: detected)")
    serve.add_argument("--config", type=Path, metavar="FILE", help="TOML file naming devices ([[device]] tables)")
    serve.add_argument("--run-dir", type=Path, metavar="DIR", help="directory for sockets (default: /run/pvcore)")
    serve.add_argument(
        "--print-qemu-args", action="store_true", help="print, per guest, the QEMU arguments that attach it, and exit"
    )
    serve.add_argument("devices", nargs="*", metavar="DEVICE", help="CLASS:key=value,...")

    commands.add_parser("plugins", help="list plugins: name, version, distribution, what they supply, state")

    console = commands.add_parser("console", help="attach to a guest's console (Ctrl-] detaches)")
    console.add_argument("name", help="console device name (name= of the console device)")
    console.add_argument("--run-dir", type=Path, metavar="DIR")
    console.add_argument("--send", metavar="TEXT", help="send TEXT (with \\n escapes) instead of attaching a terminal")
    console.add_argument("--read-for", type=float, default=1.0, metavar="SECONDS", help="with --send: how long to collect output")

    demo = commands.add_parser("demo", help="serve a guest's disk, NIC, console and entropy and show what it saw")
    demo.add_argument("--loopback", action="store_true", help="use the in-process reference driver instead of a real guest")
    return parser


def cmd_plugins(registry: Registry) -> int:
    """Print one block per plugin."""
    for record in registry.records:
        info = record.info
        print(f"{record.name} {record.version} ({record.distribution}): {record.state}")
        if info is not None:
            if info.hypervisor:
                print(f"  hypervisor: {info.hypervisor}")
            print(f"  primitives: {', '.join(sorted(info.primitives)) or '-'}")
            print(f"  device classes: {', '.join(sorted(info.device_classes)) or '-'}")
            print(f"  contract: {info.contract}")
    if not registry.records:
        print("no plugins installed (is pvcore installed? pip install -e .)")
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
    settings: dict[str, object] = {}
    configs = []
    if args.config:
        settings, configs = load_config_file(args.config, classes)
    configs = check_unique(configs + parse_devices(args.devices, classes))
    if not configs:
        raise UsageError("no devices given: pvcore serve [--hypervisor NAME] CLASS:key=value,... (see --help)")
    hypervisor = choose_hypervisor(registry, args.hypervisor or settings.get("hypervisor"))
    if args.print_qemu_args:
        return print_qemu_args(registry, hypervisor, configs)
    run_dir = args.run_dir or Path(str(settings.get("run_dir", default_run_dir())))
    daemon = Daemon(registry, hypervisor, configs, run_dir=run_dir)
    asyncio.run(daemon.serve_forever())
    return 0


def print_qemu_args(registry: Registry, hypervisor: str, configs: list[DeviceConfig]) -> int:
    """Print the QEMU arguments of each guest, grouped by the hypervisor serving its devices."""
    by_hypervisor: dict[str, list[DeviceConfig]] = {}
    for config in configs:
        by_hypervisor.setdefault(config.get("hypervisor") or hypervisor, []).append(config)
    for name, group in by_hypervisor.items():
        try:
            per_domain = registry.hook.pvcore_qemu_args(hypervisor=name, configs=group)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        if per_domain is None:
            raise UsageError(f"plugin {name!r} cannot print QEMU arguments (is it installed? see pvcore plugins)")
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
            return cmd_plugins(registry)
        if args.command == "serve":
            return cmd_serve(registry, args)
        if args.command == "console":
            return cmd_console(args)
        if args.command == "demo":
            from pvcore.demo import run_loopback_demo

            return run_loopback_demo()
    except (UsageError, ConfigError, DeviceError, DaemonError, ContractError) as exc:
        print(f"pvcore: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"pvcore: error: {exc}", file=sys.stderr)
        return 1
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
