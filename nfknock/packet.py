"""The lean per-packet parser: an IP packet from NFQUEUE -> (src, dst, dport) of a SYN.

Only what the verdict needs is read, with explicit offsets (RFC 791 for IPv4,
RFC 8200 for IPv6 and its extension headers, RFC 9293 for TCP).  Anything that is
not a well-formed first SYN raises :class:`MalformedPacket` with a machine-readable
``reason``; the daemon turns that into DROP plus an event.
"""

from __future__ import annotations

PROTO_TCP = 6
PROTO_UDP = 17
# IPv6 extension headers that may precede TCP (RFC 8200 section 4.1).
_EXT_HOP_BY_HOP = 0
_EXT_ROUTING = 43
_EXT_FRAGMENT = 44
_EXT_DEST_OPTS = 60
_EXT_SKIPPABLE = frozenset({_EXT_HOP_BY_HOP, _EXT_ROUTING, _EXT_DEST_OPTS})
MAX_EXT_HEADERS = 8
TCP_SYN = 0x02
TCP_ACK = 0x10
TCP_RST = 0x04
TCP_FIN = 0x01
_SYN_MASK = TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN
# How many bytes the daemon asks the kernel to copy: enough for a full IPv4 header
# (60) or IPv6 with a few extension headers, plus 14 bytes of TCP.
COPY_RANGE = 512


class MalformedPacket(Exception):
    """Not a well-formed first TCP SYN.  ``reason`` is stable; tests assert on it."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def parse_syn(data: bytes) -> tuple[bytes, bytes, int]:
    """Return (packed src, packed dst, destination port) of a TCP SYN."""
    key, port = parse_key(data)
    half = len(key) // 2
    return key[:half], key[half:], port


def parse_key(data: bytes) -> tuple[bytes, int]:
    """Return (packed src + packed dst, destination port) of a TCP SYN.

    The hot path: both headers keep source and destination adjacent (IPv4 bytes
    12-19, IPv6 bytes 8-39), so the engine's table key is a single slice."""
    # The common case first, in one test: IPv4 without options, TCP, not a fragment
    # (MF clear, offset 0), flags SYN without ACK/RST/FIN.  Anything else takes the
    # full walk below, which accepts or refuses it with a reason.
    if (
        len(data) >= 34
        and data[0] == 0x45
        and data[9] == PROTO_TCP
        and not (data[6] & 0x3F or data[7])
        and data[33] & _SYN_MASK == TCP_SYN
    ):
        return data[12:20], (data[22] << 8) | data[23]
    return _parse_key_walk(data)


def _parse_key_walk(data: bytes) -> tuple[bytes, int]:
    """:func:`parse_key` for every packet: IPv4 with options, IPv6 and its extension
    headers, and a precise reason for whatever is refused."""
    if not data:
        raise MalformedPacket("empty")
    version = data[0] >> 4
    if version == 4:
        ihl = (data[0] & 0x0F) * 4
        if ihl < 20:
            raise MalformedPacket("ipv4-header-length")
        if len(data) < ihl + 14:
            raise MalformedPacket("truncated")
        if data[9] != PROTO_TCP:
            raise MalformedPacket("not-tcp")
        # flags+fragment offset: MF set or a non-zero offset means a fragment.
        if (data[6] & 0x3F) or data[7]:
            raise MalformedPacket("fragment")
        key, off = data[12:20], ihl
    elif version == 6:
        if len(data) < 40:
            raise MalformedPacket("truncated")
        nxt, off = data[6], 40
        for _ in range(MAX_EXT_HEADERS):
            if nxt == PROTO_TCP:
                break
            if len(data) < off + 8:
                raise MalformedPacket("truncated")
            if nxt in _EXT_SKIPPABLE:
                nxt, off = data[off], off + (data[off + 1] + 1) * 8
            elif nxt == _EXT_FRAGMENT:
                frag = (data[off + 2] << 8) | data[off + 3]
                if frag & 0xFFF9:  # offset != 0 or more fragments
                    raise MalformedPacket("fragment")
                nxt, off = data[off], off + 8
            elif nxt == PROTO_UDP:
                # As for IPv4: the caller routes "not-tcp" to the SPA parser.
                raise MalformedPacket("not-tcp")
            else:
                raise MalformedPacket("extension-chain")
        else:
            raise MalformedPacket("extension-chain")
        if nxt != PROTO_TCP:
            raise MalformedPacket("extension-chain")
        if len(data) < off + 14:
            raise MalformedPacket("truncated")
        key = data[8:40]
    else:
        raise MalformedPacket("not-ip")
    if data[off + 13] & (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN) != TCP_SYN:
        raise MalformedPacket("not-a-syn")
    return key, (data[off + 2] << 8) | data[off + 3]


def parse_isn(data: bytes) -> int:
    """The TCP sequence number (the ISN of a SYN) of a packet that
    :func:`parse_key` accepted.  Read only when some user knocks with ISNs (the
    knock path stays as lean as it is otherwise): it walks the headers again."""
    if data[0] >> 4 == 4:
        off = (data[0] & 0x0F) * 4
    else:
        nxt, off = data[6], 40
        for _ in range(MAX_EXT_HEADERS):  # the chain parse_key checked
            if nxt == PROTO_TCP:
                break
            if nxt == _EXT_FRAGMENT:
                nxt, off = data[off], off + 8
            else:
                nxt, off = data[off], off + (data[off + 1] + 1) * 8
        if nxt != PROTO_TCP:
            raise MalformedPacket("extension-chain")
    if len(data) < off + 8:
        raise MalformedPacket("truncated")
    return int.from_bytes(data[off + 4 : off + 8], "big")
