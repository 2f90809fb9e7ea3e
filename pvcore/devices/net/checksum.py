"""Completing a TCP or UDP checksum that a guest NIC left for the device to fill in.

A guest whose NIC offers checksum offload (Xen's netfront marks such frames
``NETTXF_csum_blank``) hands over frames whose TCP or UDP checksum is not
done. The switch carries only complete frames, so the NIC's port finishes the
checksum before switching the frame: :func:`complete_checksum` recomputes it
from the IPv4 pseudo-header and the segment, whatever the guest left in the
field. Only what a NIC can be asked to offload is handled: Ethernet (with at
most one 802.1Q tag), IPv4 without fragments, TCP or UDP. Anything else is
None, and the caller drops the frame.
"""

from __future__ import annotations

import struct

ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_VLAN = 0x8100
PROTOCOL_CHECKSUM_AT = {6: 16, 17: 6}
"""IP protocol (TCP, UDP) -> offset of the checksum field in its header."""


def internet_checksum(data: bytes | bytearray | memoryview) -> int:
    """The 16-bit ones' complement of the ones' complement sum of ``data`` (RFC 1071)."""
    if len(data) % 2:
        data = bytes(data) + b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def complete_checksum(frame: bytes | bytearray) -> bytes | None:
    """``frame`` with its TCP or UDP checksum computed, or None if it is not a frame that could carry one."""
    l3 = 14
    if len(frame) < l3 + 20:
        return None
    ethertype = int.from_bytes(frame[12:14], "big")
    if ethertype == ETHERTYPE_VLAN:
        l3 += 4
        ethertype = int.from_bytes(frame[16:18], "big")
    if ethertype != ETHERTYPE_IPV4 or len(frame) < l3 + 20 or frame[l3] >> 4 != 4:
        return None
    header_len = (frame[l3] & 0xF) * 4
    total_len = int.from_bytes(frame[l3 + 2 : l3 + 4], "big")
    fragment = int.from_bytes(frame[l3 + 6 : l3 + 8], "big")
    at = PROTOCOL_CHECKSUM_AT.get(frame[l3 + 9])
    l4, end = l3 + header_len, l3 + total_len
    if at is None or header_len < 20 or fragment & 0x3FFF or not l4 + at + 2 <= end <= len(frame):
        return None
    result = bytearray(frame)
    result[l4 + at : l4 + at + 2] = b"\0\0"
    pseudo = bytes(frame[l3 + 12 : l3 + 20]) + struct.pack("!BBH", 0, frame[l3 + 9], end - l4)
    checksum = internet_checksum(pseudo + bytes(result[l4:end]))
    if checksum == 0 and frame[l3 + 9] == 17:
        checksum = 0xFFFF  # UDP: 0 means "no checksum"
    result[l4 + at : l4 + at + 2] = checksum.to_bytes(2, "big")
    return bytes(result)
