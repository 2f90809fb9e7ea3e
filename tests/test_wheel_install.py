"""Third-party installation: the example plugin's wheel installed into a fresh environment beside pvcore.

pvcore and the plugin are installed from wheels with pip, exactly as a user
would (their dependencies are borrowed from this environment, see
:mod:`pvcore.testing.conformance.install`): ``pvcore plugins`` lists the
plugin, it serves a device, the kit runs through pvcore's ``pytest11`` entry
point, uninstalling removes it, and a plugin built for another contract
version is reported and not loaded.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pvcore.build import COMPILED_MODULES
from pvcore.contract import SUPPORTED_CONTRACTS
from pvcore.testing.conformance.install import FreshEnvironment, build_wheel

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "pvcore-loophv"


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FreshEnvironment]:
    """A new virtual environment with pvcore installed from a wheel of this checkout."""
    directory = tmp_path_factory.mktemp("fresh")
    environment = FreshEnvironment(directory / "venv")
    environment.install(build_wheel(REPO, directory / "wheels"))
    yield environment


def plugins(fresh: FreshEnvironment) -> subprocess.CompletedProcess[str]:
    """``pvcore plugins`` in the fresh environment."""
    return fresh.run(["pvcore", "plugins"])


def test_fresh_environment_holds_only_pvcore(fresh: FreshEnvironment) -> None:
    done = plugins(fresh)
    assert done.returncode == 0, done.stderr
    assert [line.split()[0] for line in done.stdout.splitlines() if not line.startswith((" ", "hot path:"))] == [
        "block", "console", "net", "rng"]
    located = fresh.run_python("import pvcore; print(pvcore.__file__)").stdout
    assert str(fresh.path) in located and str(REPO) not in located


def test_wheel_carries_the_compiled_hot_path_and_loads_it(fresh: FreshEnvironment) -> None:
    """The known trap: a wheel whose tests silently run the pure-Python modules. Each must load compiled from the wheel."""
    version = fresh.run(["env", "-u", "PVCORE_PURE_PYTHON", "pvcore", "--version"])
    assert version.returncode == 0, version.stderr
    assert f"hot path: compiled ({len(COMPILED_MODULES)} of {len(COMPILED_MODULES)} modules compiled)" in version.stdout, (
        version.stdout)
    assert "hot path: compiled" in fresh.run(["env", "-u", "PVCORE_PURE_PYTHON", "pvcore", "plugins"]).stdout
    origins = fresh.run([
        "env", "-u", "PVCORE_PURE_PYTHON", str(fresh.python), "-c",
        "import importlib, pvcore.build as b; print('\\n'.join(importlib.import_module(m).__file__ for m in b.COMPILED_MODULES))",
    ]).stdout.split()
    assert len(origins) == len(COMPILED_MODULES)
    for origin in origins:
        assert origin.startswith(str(fresh.path)) and origin.endswith(".so"), origin
    forced = fresh.run(["env", "PVCORE_PURE_PYTHON=1", "pvcore", "--version"])
    assert f"hot path: pure Python (0 of {len(COMPILED_MODULES)} modules compiled)" in forced.stdout, forced.stdout


def serve_and_request(fresh: FreshEnvironment, directory: Path) -> bytes:
    """Run ``pvcore serve --hypervisor loophv`` in the fresh environment; read entropy through its socket as a guest."""
    sys.path.insert(0, str(EXAMPLE))
    try:
        from pvcore_loophv.testing import connect_guest
    finally:
        sys.path.remove(str(EXAMPLE))
    socket_path = directory / "vm1-rng.sock"
    daemon = subprocess.Popen(
        [str(fresh.path / "bin" / "pvcore"), "serve", "--hypervisor", "loophv", "--run-dir", str(directory / "run"),
         f"rng:socket={socket_path}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 15
        while not socket_path.exists():
            assert daemon.poll() is None, daemon.communicate()[1]
            assert time.monotonic() < deadline, "the daemon never created its socket"
            time.sleep(0.05)
        guest = connect_guest(socket_path)
        try:
            entropy = guest.request(0, [], [32]).data
        finally:
            guest.close()
    finally:
        daemon.send_signal(signal.SIGTERM)
        _, stderr = daemon.communicate(timeout=15)
    assert daemon.returncode == 0, stderr
    assert "device vm1-rng (rng) up: loophv socket" in stderr
    assert not socket_path.exists(), "SIGTERM must remove the socket"
    return entropy


def test_install_list_serve_kit_uninstall(fresh: FreshEnvironment, tmp_path: Path) -> None:
    fresh.install(build_wheel(EXAMPLE, tmp_path / "wheels"))
    try:
        listed = plugins(fresh)
        assert listed.returncode == 0, listed.stderr
        assert "loophv 0.1.0 (pvcore-loophv): ok\n  hypervisor: loophv\n" in listed.stdout

        entropy = serve_and_request(fresh, tmp_path)
        assert len(entropy) == 32 and entropy != bytes(32)

        kit = fresh.run([str(fresh.python), "-m", "pytest", "--pvcore-plugin=loophv", "-q", "-p", "no:cacheprovider",
                         f"--rootdir={tmp_path}"], cwd=tmp_path)
        assert kit.returncode == 0, kit.stdout + kit.stderr
        assert "16 passed" in kit.stdout, kit.stdout
    finally:
        fresh.uninstall("pvcore-loophv")
    listed = plugins(fresh)
    assert listed.returncode == 0 and "loophv" not in listed.stdout
    refused = fresh.run(["pvcore", "serve", "--hypervisor", "loophv", f"rng:socket={tmp_path}/x.sock"])
    assert refused.returncode == 2 and "no plugin serves hypervisor 'loophv'" in refused.stderr


def test_plugin_built_for_another_contract_is_reported_not_loaded(fresh: FreshEnvironment, tmp_path: Path) -> None:
    other = max(SUPPORTED_CONTRACTS) + 1
    project = tmp_path / "pvcore-oldhv"
    (project / "pvcore_oldhv").mkdir(parents=True)
    (project / "pyproject.toml").write_text(textwrap.dedent("""\
        [project]
        name = "pvcore-oldhv"
        version = "2.0.0"
        [project.entry-points."pvcore.plugins"]
        oldhv = "pvcore_oldhv"
        [tool.setuptools.packages.find]
        include = ["pvcore_oldhv*"]
    """))
    (project / "pvcore_oldhv" / "__init__.py").write_text(textwrap.dedent(f"""\
        from pvcore.contract import PluginInfo
        from pvcore.hookspecs import hookimpl

        @hookimpl
        def pvcore_plugin_info():
            return PluginInfo(name="oldhv", contract={other}, hypervisor="oldhv", primitives={{"stream"}})
    """))
    fresh.install(build_wheel(project, tmp_path / "wheels"))
    try:
        listed = plugins(fresh)
        assert listed.returncode == 1
        assert (f"oldhv 2.0.0 (pvcore-oldhv): broken: written for contract {other}; "
                f"this pvcore supports {sorted(SUPPORTED_CONTRACTS)}") in listed.stdout
        assert "rng 0.1.0 (pvcore): ok" in listed.stdout, "the other plugins still load"
        refused = fresh.run(["pvcore", "serve", "--hypervisor", "oldhv", f"rng:socket={tmp_path}/x.sock"])
        assert refused.returncode == 2 and "no plugin serves hypervisor 'oldhv'" in refused.stderr
    finally:
        fresh.uninstall("pvcore-oldhv")
