"""The xenbus runner on the SIMULATED Xen host: bugs and noisy guests cost one device and a few log lines, no more."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys

import pytest
from helpers import run
from pvcore_xen.netif import XenNetBackend
from pvcore_xen.testing.netfront import SimulatedNetFrontend
from pvcore_xen.xenbus import XenbusBackend, XenbusState
from pvcore_xen.xenstore import XenstoreClient
from pvcore_xen.xs_wire import XenstoreError
from test_hostile import configs, healthy_neighbour
from world import xen_world

from pvcore.contract import HostContext
from pvcore.devices.net import NetEndpoint, get_switch

CONFIGS = configs()


def errors(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    """The xen plugin's ERROR messages that contain ``text``."""
    return [
        r.getMessage() for r in caplog.records
        if r.name == "pvcore.xen" and r.levelno == logging.ERROR and text in r.getMessage()
    ]


def test_bad_state_written_again_and_again_is_logged_once(tmp_path, caplog):
    async def body() -> None:
        async with xen_world(tmp_path, CONFIGS) as world:
            front = SimulatedNetFrontend(world.host.domains[1], world.clients[1], devid=0)
            for _ in range(50):
                await front.client.write(f"{front.path}/state", "connected!")
                await asyncio.sleep(0)
            assert await front.wait_backend(XenbusState.CLOSING) == XenbusState.CLOSING
            _, door = world.served("dom1-nic")
            while door._wake.is_set():
                await asyncio.sleep(0.01)
            await healthy_neighbour(world)

    run(body)
    assert len(errors(caplog, "is not a number")) == 1, caplog.text


def test_a_failing_xenstore_request_is_warned_about_once(tmp_path, caplog, monkeypatch):
    step = XenbusBackend._step

    async def failing_step(self: XenbusBackend) -> None:
        if self.domid == 1:
            raise XenstoreError("EAGAIN", f"READ {self.frontend_path}/state")
        await step(self)

    monkeypatch.setattr(XenbusBackend, "_step", failing_step)

    async def body() -> None:
        async with xen_world(tmp_path, CONFIGS) as world:
            front = SimulatedNetFrontend(world.host.domains[1], world.clients[1], devid=0)
            for _ in range(20):
                await front.client.write(f"{front.path}/state", "1")
                await asyncio.sleep(0)
            _, door = world.served("dom1-nic")
            while door._wake.is_set():
                await asyncio.sleep(0.01)
            await healthy_neighbour(world)

    run(body)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "xenstore request failed" in r.getMessage()]
    assert len(warnings) == 1, caplog.text


def test_unexpected_exception_fails_only_that_device(tmp_path, caplog, monkeypatch):
    map_memory = XenNetBackend.map_memory

    def buggy_map_memory(self: XenNetBackend):
        if self.domid == 1:
            raise RuntimeError("injected bug")
        return map_memory(self)

    monkeypatch.setattr(XenNetBackend, "map_memory", buggy_map_memory)

    async def body() -> None:
        async with xen_world(tmp_path, CONFIGS) as world:
            front = SimulatedNetFrontend(world.host.domains[1], world.clients[1], devid=0)
            await front.publish()
            assert await front.wait_backend(XenbusState.CLOSING) == XenbusState.CLOSING
            _, door = world.served("dom1-nic")
            assert not door.connected and "injected bug" in door.failure
            assert door.memory is None and door.channel is None
            await healthy_neighbour(world)

    run(body)
    assert any(r.exc_info and "injected bug" in str(r.exc_info[1]) for r in caplog.records), caplog.text
    assert len(errors(caplog, "failed: internal error: injected bug")) == 1, caplog.text


def test_stop_after_the_runner_died_still_closes_the_device(tmp_path, caplog, monkeypatch):
    async def broken(self: XenbusBackend, *args: object) -> None:
        raise RuntimeError(f"dom{self.domid} broken")

    monkeypatch.setattr(XenNetBackend, "connect", broken)
    monkeypatch.setattr(XenbusBackend, "_fail", broken)
    doors = []

    async def body() -> None:
        async with xen_world(tmp_path, CONFIGS[:1]) as world:
            front = SimulatedNetFrontend(world.host.domains[1], world.clients[1], devid=0)
            await front.publish()
            _, door = world.served("dom1-nic")
            doors.append(door)
            while not door._runner.done():
                await asyncio.sleep(0.01)

    run(body)
    assert doors[0].client is None
    assert "stopping its front door failed" not in caplog.text


def test_a_failed_second_watch_closes_the_xenstore_connection(tmp_path, monkeypatch):
    clients: list[XenstoreClient] = []
    connect, watch = XenstoreClient.connect.__func__, XenstoreClient.watch

    async def recording_connect(cls, *args: object, **kwargs: object) -> XenstoreClient:
        client = await connect(cls, *args, **kwargs)
        clients.append(client)
        return client

    async def second_watch_fails(self: XenstoreClient, path: str, callback: object = None):
        if path.startswith("/local/domain/1/device"):
            raise XenstoreError("EACCES", f"WATCH {path}")
        return await watch(self, path, callback)

    async def body() -> None:
        async with xen_world(tmp_path, []) as world:
            monkeypatch.setattr(XenstoreClient, "connect", classmethod(recording_connect))
            monkeypatch.setattr(XenstoreClient, "watch", second_watch_fails)
            endpoint = NetEndpoint("watchless", bytes.fromhex("00163e0000aa"), get_switch("watchless"))
            door = XenNetBackend(
                endpoint, primitives=world.registry.primitives("xen"), host=world.host,
                xenstore_path=world.plugin.xenstore_path, backend_domid=0, domid=1, devid=0, name="watchless",
            )
            with pytest.raises(XenstoreError):
                await door.start()
            assert door.client is None and door.port.switch is None
            assert len(clients) == 1 and clients[0]._read_task.done()

    run(body)


def test_probe_skips_a_backend_node_that_is_not_a_domain_id(tmp_path, caplog):
    async def body() -> None:
        async with xen_world(tmp_path, CONFIGS[:1]) as world:
            await world.clients[0].write("/local/domain/0/backend/vif/not-a-domid/0/state", "1")
            slots = await asyncio.get_running_loop().run_in_executor(
                None, lambda: world.plugin.pvcore_probe(host=HostContext(environ={}))
            )
            assert [(slot.device_class, slot.domain) for slot in slots] == [("net", "1")]

    run(body)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "not-a-domid" in r.getMessage()]
    assert len(warnings) == 1, caplog.text


def test_a_backend_domid_that_is_not_a_number_names_the_variable():
    result = subprocess.run(
        [sys.executable, "-c", "import pvcore_xen.plugin"],
        env={**os.environ, "PVCORE_XEN_DOMID": "dom0"}, capture_output=True, text=True, timeout=30,
    )
    assert result.returncode != 0
    assert "PVCORE_XEN_DOMID='dom0'" in result.stderr, result.stderr
