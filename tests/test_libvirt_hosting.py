"""pvcore.libvirt.hosting.LocalDevices: the host daemon's devices in its own process (``--workers 1``).

Each set added is a daemon of its own; a name already served is refused
(names are unique on a host, as the worker pool has them); a set removed
takes its socket with it, the others stay.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from pvcore.config import ConfigError, parse_devices
from pvcore.control import ControlError
from pvcore.libvirt.hosting import LocalDevices
from pvcore.registry import default_registry


def test_local_devices_serve_each_set_alone_and_refuse_a_name_already_served(tmp_path: Path) -> None:
    registry = default_registry()
    run_dir = tmp_path / "run"

    def configs(*specs: str):
        return parse_devices(list(specs), registry.device_classes(), registry.plugin_options("kvm"))

    async def scenario() -> None:
        host = LocalDevices(registry, "kvm", run_dir=run_dir)
        await host.start()
        try:
            await host.add(configs(f"rng:name=r0,socket={run_dir}/r0.sock,domain=vm1,rate=4096/1s"))
            await host.add(configs(f"console:name=c0,socket={run_dir}/c0.sock,domain=vm1"))
            with pytest.raises(ConfigError, match="r0 is already served"):
                await host.add(configs(f"rng:name=r0,socket={run_dir}/other.sock,domain=vm2"))
            assert not (run_dir / "other.sock").exists()
            assert sorted(d["name"] for d in await host.describe_devices()) == ["c0", "r0"]
            assert await host.set_rng_rate("r0", "1024/1s") == "1024/1000ms"
            with pytest.raises(ControlError, match="no device named 'nope' is served; devices: c0, r0"):
                await host.set_limits("nope", "iops=5")
            await host.remove(["r0"])
            assert not (run_dir / "r0.sock").exists() and (run_dir / "c0.sock").is_socket()
            assert [d["name"] for d in await host.describe_devices()] == ["c0"]
        finally:
            await host.stop()
        assert not (run_dir / "c0.sock").exists() and host.daemons == {}

    asyncio.run(scenario())
