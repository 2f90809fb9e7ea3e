"""Xen's own C xenstore tools (Debian xenstore-utils) against the SIMULATED xenstored.

They are real Xen clients (libxenstore), so they check the simulation's wire
protocol from the other side. They find the server through ``XENSTORED_PATH``.
"""

from __future__ import annotations

import asyncio
import os
import shutil

import pytest

from helpers import run, simulated_store
from pvcore_xen.xs_wire import Access, Permission

TOOLS = ("xenstore-write", "xenstore-read", "xenstore-ls", "xenstore-rm", "xenstore-chmod", "xenstore-list", "xenstore-exists", "xenstore-watch")


@pytest.fixture(autouse=True)
def _require_tools() -> None:
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} not found: install the Debian package xenstore-utils (scripts/ensure-debian-packages)")


async def tool(socket_path, *arguments: str) -> tuple[int, str]:
    """Run one xenstore tool against ``socket_path``; return its exit status and stdout."""
    process = await asyncio.create_subprocess_exec(
        *arguments,
        env={**os.environ, "XENSTORED_PATH": str(socket_path)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), 5)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise AssertionError(f"{' '.join(arguments)} hung against the simulated xenstored") from None
    return process.returncode, stdout.decode() + stderr.decode()


def test_c_tools_write_read_list_chmod_rm(tmp_path):
    async def body():
        async with simulated_store(tmp_path, 0) as (store, clients):
            socket_path = tmp_path / "xenstored-dom0.sock"
            dom0 = clients[0]
            watch = await dom0.watch("/vm")
            await watch.get()

            assert await tool(socket_path, "xenstore-write", "/vm/1/name", "guest", "/vm/1/uuid", "u-1") == (0, "")
            assert store.read_value("/vm/1/name") == b"guest"
            assert {(await watch.get()).path, (await watch.get()).path} == {"/vm/1/name", "/vm/1/uuid"}
            assert await tool(socket_path, "xenstore-read", "/vm/1/name") == (0, "guest\n")
            assert await tool(socket_path, "xenstore-list", "/vm/1") == (0, "name\nuuid\n")

            status, listing = await tool(socket_path, "xenstore-ls", "/vm")
            assert status == 0
            assert listing.splitlines()[0].startswith("1 = \"\"")
            assert 'name = "guest"' in listing and 'uuid = "u-1"' in listing

            assert await tool(socket_path, "xenstore-chmod", "/vm/1/name", "n1", "r2") == (0, "")
            assert await dom0.get_perms("/vm/1/name") == [Permission(1, Access.NONE), Permission(2, Access.READ)]
            status, with_perms = await tool(socket_path, "xenstore-ls", "-p", "/vm/1")
            assert status == 0 and "(n1,r2)" in with_perms

            await dom0.write("/vm/1/memory", "512")
            assert await tool(socket_path, "xenstore-read", "/vm/1/memory") == (0, "512\n")
            assert (await tool(socket_path, "xenstore-exists", "/vm/1/memory"))[0] == 0
            assert await tool(socket_path, "xenstore-rm", "/vm/1/memory") == (0, "")
            assert store.read_value("/vm/1/memory") is None
            assert (await tool(socket_path, "xenstore-exists", "/vm/1/memory"))[0] == 1
            status, output = await tool(socket_path, "xenstore-read", "/vm/1/memory")
            assert status == 1 and "couldn't read path" in output

    run(body, timeout=30)


def test_c_watch_tool_sees_changes_made_by_the_python_client(tmp_path):
    async def body():
        async with simulated_store(tmp_path, 0) as (_store, clients):
            socket_path = tmp_path / "xenstored-dom0.sock"
            process = await asyncio.create_subprocess_exec(
                "xenstore-watch", "-n", "2", "/backend",
                env={**os.environ, "XENSTORED_PATH": str(socket_path)},
                stdout=asyncio.subprocess.PIPE,
            )
            assert process.stdout is not None
            assert await asyncio.wait_for(process.stdout.readline(), 5) == b"/backend\n"
            await clients[0].write("/backend/vbd/3/51712/state", "4")
            assert await asyncio.wait_for(process.stdout.readline(), 5) == b"/backend/vbd/3/51712/state\n"
            assert await asyncio.wait_for(process.wait(), 5) == 0

    run(body, timeout=30)
