"""vhost-user (QEMU's ``docs/interop/vhost-user.rst``), back-end side: a core ring transport.

* :mod:`pvcore.transports.vhost_user.protocol`: the message codec, and the
  validation every message a front end sends passes before it is acted on;
* :mod:`pvcore.transports.vhost_user.backend`: :class:`VhostUserFrontDoor`, the
  :class:`~pvcore.contract.FrontDoor` that serves one
  :class:`~pvcore.virtio.VirtioDevice` on a Unix socket (server or client
  mode), and :class:`VhostUserConnection`, one front end's connection driving
  a ring session.

Guest memory (SET_MEM_TABLE) and the kick/call/err fds reach the session
through the :class:`~pvcore.contract.Primitives` the front door is given.
The front-end peer the tests drive it with is
:mod:`pvcore.testing.vhost_user_frontend`.
"""

from pvcore.transports.vhost_user.backend import (
    OFFERED_PROTOCOL_FEATURES,
    VhostUserConnection,
    VhostUserFrontDoor,
)
from pvcore.transports.vhost_user.protocol import ProtocolError

__all__ = ["OFFERED_PROTOCOL_FEATURES", "ProtocolError", "VhostUserConnection", "VhostUserFrontDoor"]
