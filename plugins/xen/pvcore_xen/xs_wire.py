"""The xenstore wire format (Xen's ``xen/include/public/io/xs_wire.h``).

Every message, in both directions, is a 16-byte ``struct xsd_sockmsg`` header
— ``type``, ``req_id``, ``tx_id``, ``len``, four 32-bit integers in the host's
byte order (little-endian on every host Xen runs dom0 on: x86 and Arm) —
followed by ``len`` bytes of payload, at most :data:`PAYLOAD_MAX`. Payload
arguments are NUL-terminated strings; a reply repeats the request's type,
``req_id`` and ``tx_id``, or has type :attr:`MessageType.ERROR` and an errno
name (``"ENOENT\\0"``). Watch events are unsolicited messages of type
:attr:`MessageType.WATCH_EVENT` carrying ``path\\0token\\0``.

This module is shared by the client (:mod:`pvcore_xen.xenstore`) and the
simulated xenstored (:mod:`pvcore_xen.testing.xenstored`).
"""

from __future__ import annotations

import enum
import errno
import re
import struct

import attrs

HEADER = struct.Struct("<IIII")
"""``struct xsd_sockmsg``: type, req_id, tx_id, len."""

PAYLOAD_MAX = 4096
"""``XENSTORE_PAYLOAD_MAX``: the largest payload either side may send."""

ABS_PATH_MAX = 3072
"""``XENSTORE_ABS_PATH_MAX``: the longest absolute node path."""

REL_PATH_MAX = 2048
"""``XENSTORE_REL_PATH_MAX``: the longest path relative to a domain's home."""

OK = b"OK\0"
"""The payload of a successful reply that carries no value."""


class MessageType(enum.IntEnum):
    """``enum xsd_sockmsg_type``."""

    DEBUG = 0
    DIRECTORY = 1
    READ = 2
    GET_PERMS = 3
    WATCH = 4
    UNWATCH = 5
    TRANSACTION_START = 6
    TRANSACTION_END = 7
    INTRODUCE = 8
    RELEASE = 9
    GET_DOMAIN_PATH = 10
    WRITE = 11
    MKDIR = 12
    RM = 13
    SET_PERMS = 14
    WATCH_EVENT = 15
    ERROR = 16
    IS_DOMAIN_INTRODUCED = 17
    RESUME = 18
    SET_TARGET = 19
    RESET_WATCHES = 21
    DIRECTORY_PART = 22


ERROR_NAMES = (
    "EINVAL", "EACCES", "EEXIST", "EISDIR", "ENOENT", "ENOMEM", "ENOSPC", "EIO",
    "ENOTEMPTY", "ENOSYS", "EROFS", "EBUSY", "EAGAIN", "EISCONN", "E2BIG", "EPERM",
)
"""``xsd_errors``: the errno names an ERROR reply may carry."""


class XenstoreError(OSError):
    """xenstored answered a request with an ERROR reply.

    ``name`` is the errno name on the wire (``"ENOENT"``); ``errno`` is its
    number; ``request`` says what was asked (``"READ /local/domain/0/name"``).
    """

    def __init__(self, name: str, request: str) -> None:
        super().__init__(getattr(errno, name, errno.EIO), f"xenstore {request}: {name}")
        self.name = name
        self.request = request


class XenstoreProtocolError(ConnectionError):
    """The peer broke the wire protocol (oversized, truncated or malformed message)."""


class Access(enum.Enum):
    """One permission letter: none, read, write, or both."""

    NONE = "n"
    READ = "r"
    WRITE = "w"
    BOTH = "b"

    @property
    def can_read(self) -> bool:
        """Whether this access allows reading."""
        return self in (Access.READ, Access.BOTH)

    @property
    def can_write(self) -> bool:
        """Whether this access allows writing."""
        return self in (Access.WRITE, Access.BOTH)


@attrs.frozen
class Permission:
    """One entry of a node's permission list: ``r1`` is read access for domain 1.

    The first entry of a list names the node's owner (who always has full
    access) and the access of every domain not listed after it.
    """

    domid: int
    access: Access

    @classmethod
    def parse(cls, text: str) -> Permission:
        """Parse ``"b0"``; raise ``ValueError`` naming the bad text."""
        if len(text) < 2 or not text[1:].isdigit() or not text[1:].isascii():
            raise ValueError(f"bad xenstore permission {text!r}: expected a letter n/r/w/b and a domain id")
        try:
            access = Access(text[0])
        except ValueError:
            raise ValueError(f"bad xenstore permission {text!r}: access must be one of n, r, w, b") from None
        domid = int(text[1:])
        if domid > 0xFFFF:
            raise ValueError(f"bad xenstore permission {text!r}: domain id out of range")
        return cls(domid, access)

    def __str__(self) -> str:
        return f"{self.access.value}{self.domid}"


_PATH_CHARS = re.compile(r"[A-Za-z0-9\-/_@]+")


def check_path(path: str) -> None:
    """Raise ``ValueError`` unless ``path`` is a node path xenstored accepts.

    Absolute (``/local/domain/1``) or relative to the caller's domain home
    (``device/vbd``); the characters ``A-Za-z0-9-/_@``; no empty component;
    no trailing slash except the root itself; within the length limits.
    Watch-only names (``@releaseDomain``) are checked by the watch code.
    """
    limit = ABS_PATH_MAX if path.startswith("/") else REL_PATH_MAX
    if not path or len(path) > limit:
        raise ValueError(f"xenstore path of length {len(path)}: must be 1..{limit}")
    if not _PATH_CHARS.fullmatch(path):
        raise ValueError(f"xenstore path {path!r}: only A-Za-z0-9-/_@ are allowed")
    if path != "/" and (path.endswith("/") or "//" in path):
        raise ValueError(f"xenstore path {path!r}: empty path component")


def join_strings(*parts: str | bytes) -> bytes:
    """Encode ``parts`` as NUL-terminated strings, concatenated."""
    out = bytearray()
    for part in parts:
        out += part.encode() if isinstance(part, str) else part
        out += b"\0"
    return bytes(out)


def split_strings(payload: bytes) -> list[str]:
    """Split a payload of NUL-terminated ASCII strings; raise ``ValueError`` if malformed."""
    if not payload.endswith(b"\0"):
        raise ValueError("payload is not NUL-terminated")
    try:
        return payload[:-1].decode("ascii").split("\0")
    except UnicodeDecodeError:
        raise ValueError("payload holds non-ASCII bytes") from None
