"""The Xen PV console front door: ``struct xencons_interface`` fed to the core's console engine.

The frontend (Linux's hvc_xen) grants one page holding the ring and publishes
``ring-ref`` (its grant ref) and ``port`` (an event channel it allocated for
the backend) in ``device/console/<devid>``, then goes Initialised. The page
(Xen's ``io/console.h``)::

    char in[1024];  char out[2048];
    uint32 in_cons, in_prod, out_cons, out_prod;

``out`` carries guest output (the guest produces, the backend consumes),
``in`` carries input to the guest. Indexes are free-running 32-bit counters
(a slot is ``index & (size - 1)``); the backend reads them from the page each
time and never believes them: a producer more than a ring size ahead of its
consumer fails the console. Guest output goes to
:meth:`~pvcore.devices.console.stream.ConsoleStream.output`; input from the
stream's ``on_input`` is queued (up to :data:`INPUT_BACKLOG` bytes, the rest
dropped and counted) until the guest makes room.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from pvcore.devices.console.stream import ConsoleStream
from pvcore.ring.barrier import full_barrier, write_barrier
from pvcore.ring.memory import GuestMemoryError
from pvcore_xen.grants import GrantMemory, grant_address
from pvcore_xen.host import EventChannel
from pvcore_xen.xenbus import XenbusBackend, XenDeviceError, require_number
from pvcore_xen.xenstore import XenstoreClient

log = logging.getLogger("pvcore.xen")

IN_SIZE = 1024
OUT_SIZE = 2048
IN_OFFSET = 0
OUT_OFFSET = IN_SIZE
IN_CONS, IN_PROD, OUT_CONS, OUT_PROD = (IN_SIZE + OUT_SIZE + 4 * i for i in range(4))
INTERFACE_SIZE = OUT_PROD + 4
INPUT_BACKLOG = 64 * 1024
"""Bytes of input kept for a guest that is not reading, before input is dropped."""

MAX_GRANT_REF = 0xFFFFFFFF


class XenConsoleBackend(XenbusBackend):
    """Serves one guest's PV console ring to a :class:`ConsoleStream`."""

    kind = "console"

    def __init__(self, stream: ConsoleStream, **where: Any) -> None:
        super().__init__(**where)
        self.stream = stream
        self.memory: GrantMemory | None = None
        self.channel: EventChannel | None = None
        self.base = 0
        self.input_dropped = 0
        self._input = bytearray()
        self._broken = False

    async def announce(self, client: XenstoreClient) -> None:
        """The console backend publishes nothing but its state."""

    async def connect(self, client: XenstoreClient, *, resume: bool = False) -> None:
        """Map the ring page, bind the event channel, take the stream's input, drain what is there.

        A pick-up (``resume``) is the same: the indexes are in the page, so
        output the guest wrote while no backend ran is drained now; the guest
        is signalled once, in case it waits for room.
        """
        ref = await require_number(client, f"{self.frontend_path}/ring-ref", limit=MAX_GRANT_REF)
        port = await require_number(client, f"{self.frontend_path}/port", limit=MAX_GRANT_REF)
        self.memory = self.map_memory()
        self.base = grant_address(ref)
        try:
            self.memory.check(self.base, INTERFACE_SIZE, write=True)
        except GuestMemoryError as exc:
            await self.disconnect()
            raise XenDeviceError(f"ring-ref {ref}: {exc}") from None
        try:
            self.channel = self.open_channel(port, "console")
        except XenDeviceError:
            await self.disconnect()
            raise
        self._broken = False
        asyncio.get_running_loop().add_reader(self.channel.fileno(), self._on_event)
        self.stream.on_input = self._to_guest
        self._service()
        if resume and self.channel is not None:
            self.channel.signal()

    async def disconnect(self) -> None:
        """Release the ring page and the event channel; input goes nowhere until the next connect."""
        if self.stream.on_input == self._to_guest:
            self.stream.on_input = None
        if self.channel is not None:
            asyncio.get_running_loop().remove_reader(self.channel.fileno())
            self.channel.close()
            self.channel = None
        if self.memory is not None:
            self.memory.close()
            self.memory = None
        self._input.clear()

    def _on_event(self) -> None:
        if self.channel is not None:
            self.channel.consume()
            self._service()

    def _to_guest(self, data: bytes) -> None:
        room = INPUT_BACKLOG - len(self._input)
        if room < len(data):
            self.input_dropped += len(data) - max(room, 0)
            data = data[: max(room, 0)]
        self._input += data
        self._service()

    def _service(self) -> None:
        """Drain guest output and push queued input; fail the console on bad indexes."""
        if self.memory is None or self.channel is None or self._broken:
            return
        try:
            moved = self._drain_output(self.memory) | self._push_input(self.memory)
        except (GuestMemoryError, XenDeviceError) as exc:
            self._broken = True
            self.fail(str(exc))
            return
        if moved:
            self.channel.signal()

    def _indexes(self, memory: GrantMemory, cons_at: int, prod_at: int, size: int, ring: str) -> tuple[int, int]:
        cons = memory.read_u32(self.base + cons_at)
        prod = memory.read_u32(self.base + prod_at)
        if (prod - cons) & 0xFFFFFFFF > size:
            raise XenDeviceError(f"{ring} ring: producer {prod:#x} is more than {size} bytes ahead of consumer {cons:#x}")
        return cons, prod

    def _drain_output(self, memory: GrantMemory) -> bool:
        cons, prod = self._indexes(memory, OUT_CONS, OUT_PROD, OUT_SIZE, "out")
        pending = (prod - cons) & 0xFFFFFFFF
        if not pending:
            return False
        full_barrier()
        start = cons & (OUT_SIZE - 1)
        first = min(pending, OUT_SIZE - start)
        data = memory.read(self.base + OUT_OFFSET + start, first) + memory.read(self.base + OUT_OFFSET, pending - first)
        full_barrier()
        memory.write_u32(self.base + OUT_CONS, prod)
        self.stream.output(data)
        return True

    def _push_input(self, memory: GrantMemory) -> bool:
        if not self._input:
            return False
        cons, prod = self._indexes(memory, IN_CONS, IN_PROD, IN_SIZE, "in")
        count = min(IN_SIZE - ((prod - cons) & 0xFFFFFFFF), len(self._input))
        if not count:
            return False
        full_barrier()
        start = prod & (IN_SIZE - 1)
        first = min(count, IN_SIZE - start)
        memory.write(self.base + IN_OFFSET + start, self._input[:first])
        memory.write(self.base + IN_OFFSET, self._input[first:count])
        write_barrier()
        memory.write_u32(self.base + IN_PROD, prod + count)
        del self._input[:count]
        return True
