"""pvcore in the toolstack's role: write a device's xenstore nodes, as ``xl block-attach`` does.

With ``attach=on`` a xen device does not wait for the toolstack: when its
backend directory does not exist, :func:`attach` creates both halves in one
transaction — the backend's (``frontend``, ``frontend-id``, ``online``,
``state`` Initialising; owned by the backend domain, readable by the guest)
and the frontend's (``backend``, ``backend-id``, ``state`` Initialising and
the class's own nodes such as ``virtual-device``; owned by the guest,
readable by the backend). The guest's xenbus sees a new device and probes
it, at boot or hot-plugged. The backend type is pvcore's own
(``pvcore-vbd`` for a disk) so that no kernel backend of the backend domain
(blkback watches ``backend/vbd``) claims the device.

The nodes stay when pvcore stops (a restarted pvcore picks the device up).
The frontend half goes with the domain (the toolstack removes
``/local/domain/<domid>``); the backend half stays, Closed, until removed
(``xenstore-rm``).
"""

from __future__ import annotations

from collections.abc import Mapping

from pvcore_xen.xenstore import Transaction, XenstoreClient
from pvcore_xen.xs_wire import Access, Permission

INITIALISING = "1"


async def attach(
    client: XenstoreClient,
    *,
    backend_path: str,
    frontend_path: str,
    backend_domid: int,
    domid: int,
    backend_nodes: Mapping[str, str] = {},
    frontend_nodes: Mapping[str, str] = {},
) -> bool:
    """Create the device's nodes unless its backend directory exists; True if they were written."""

    async def write(tx: Transaction) -> bool:
        if await tx.exists(backend_path):
            return False
        backend_perms = [Permission(backend_domid, Access.NONE), Permission(domid, Access.READ)]
        frontend_perms = [Permission(domid, Access.NONE), Permission(backend_domid, Access.READ)]
        backend = {
            "frontend": frontend_path, "frontend-id": str(domid), "online": "1", "state": INITIALISING,
            **backend_nodes,
        }
        frontend = {"backend": backend_path, "backend-id": str(backend_domid), "state": INITIALISING, **frontend_nodes}
        for path, nodes, perms in ((backend_path, backend, backend_perms), (frontend_path, frontend, frontend_perms)):
            await tx.mkdir(path)
            await tx.set_perms(path, perms)
            for name, value in nodes.items():
                await tx.write(f"{path}/{name}", value)
                await tx.set_perms(f"{path}/{name}", perms)
        return True

    return await client.transaction(write)
