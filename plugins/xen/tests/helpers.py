"""Shared helpers for the xen plugin's tests: a simulated xenstored with connected clients."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from pvcore_xen.testing.xenstored import SimulatedXenstored
from pvcore_xen.xenstore import XenstoreClient

T = TypeVar("T")


def run(coroutine_function: Callable[[], Awaitable[T]], timeout: float = 10.0) -> T:
    """Run an async test body on a fresh event loop, failing if it takes over ``timeout`` s."""

    async def bounded() -> T:
        return await asyncio.wait_for(coroutine_function(), timeout)

    return asyncio.run(bounded())


@contextlib.asynccontextmanager
async def simulated_store(directory: Path, *domids: int) -> AsyncIterator[tuple[SimulatedXenstored, dict[int, XenstoreClient]]]:
    """A simulated xenstored with one socket and one connected client per domain in ``domids``."""
    store = SimulatedXenstored()
    clients: dict[int, XenstoreClient] = {}
    try:
        for domid in domids:
            socket_path = directory / f"xenstored-dom{domid}.sock"
            await store.listen(socket_path, domid=domid)
            clients[domid] = await XenstoreClient.connect(socket_path, timeout=2.0)
        yield store, clients
    finally:
        for client in clients.values():
            await client.close()
        await store.close()
