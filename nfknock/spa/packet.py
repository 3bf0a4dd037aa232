"""An SPA packet as the priority queue delivers it -> :class:`SpaDatagram`.

The static rules queue two forms to the ``[spa] ports`` (issue 10 item 1): a UDP
datagram, and a TCP SYN carrying the payload (fwknop's ``-P tcpraw``).  IPv4
(RFC 791) and IPv6 with extension headers (RFC 8200 section 4), UDP (RFC 768),
TCP (RFC 9293).  The payload ends where the IP header's length says, never at
the end of the buffer (link padding), and a packet shorter than its stated length
(a copy range too small) is refused, not guessed at.

Failures raise ``nfknock.packet.MalformedPacket`` with a stable reason, the same
type the knock parser raises, so the daemon has one path for both.  This module
does not share code with ``nfknock.packet.parse_key``: that one is the knock hot
path, specialised for TCP, and stays as lean as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

from nfknock.packet import TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, MalformedPacket

PROTO_TCP = 6
PROTO_UDP = 17
_EXT_SKIPPABLE = frozenset({0, 43, 60})  # hop-by-hop, routing, destination options
_EXT_FRAGMENT = 44
MAX_EXT_HEADERS = 8


@dataclass(frozen=True, slots=True)
class SpaDatagram:
    src: bytes  # packed, 4 or 16 bytes
    dst: bytes
    proto: int  # PROTO_UDP or PROTO_TCP (a SYN)
    dport: int
    payload: bytes


def parse_spa_packet(data: bytes) -> SpaDatagram:
    """Parse a UDP datagram or a TCP SYN with payload; MalformedPacket otherwise."""
    if not data:
        raise MalformedPacket("empty")
    version = data[0] >> 4
    if version == 4:
        if len(data) < 20:
            raise MalformedPacket("truncated")
        ihl = (data[0] & 0x0F) * 4
        if ihl < 20:
            raise MalformedPacket("ipv4-header-length")
        total = (data[2] << 8) | data[3]
        if total < ihl:
            raise MalformedPacket("ip-length")
        if len(data) < total:
            raise MalformedPacket("truncated")
        # MF set or a non-zero offset: a fragment (conntrack normally reassembles).
        if (data[6] & 0x3F) or data[7]:
            raise MalformedPacket("fragment")
        proto, off, end = data[9], ihl, total
        src, dst = data[12:16], data[16:20]
    elif version == 6:
        if len(data) < 40:
            raise MalformedPacket("truncated")
        end = 40 + ((data[4] << 8) | data[5])
        if len(data) < end:
            raise MalformedPacket("truncated")
        proto, off = _ipv6_upper(data, end)
        src, dst = data[8:24], data[24:40]
    else:
        raise MalformedPacket("not-ip")
    if proto == PROTO_UDP:
        if end < off + 8:
            raise MalformedPacket("truncated")
        length = (data[off + 4] << 8) | data[off + 5]
        if length < 8 or off + length > end:
            raise MalformedPacket("udp-length")
        payload = data[off + 8 : off + length]
    elif proto == PROTO_TCP:
        if end < off + 20:
            raise MalformedPacket("truncated")
        if data[off + 13] & (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN) != TCP_SYN:
            raise MalformedPacket("not-a-syn")
        doff = (data[off + 12] >> 4) * 4
        if doff < 20 or off + doff > end:
            raise MalformedPacket("tcp-header-length")
        payload = data[off + doff : end]
    else:
        raise MalformedPacket("not-udp-or-tcp")
    if not payload:
        raise MalformedPacket("no-payload")
    return SpaDatagram(src, dst, proto, (data[off + 2] << 8) | data[off + 3], payload)


def _ipv6_upper(data: bytes, end: int) -> tuple[int, int]:
    """(upper-layer protocol, its offset) after the extension headers."""
    nxt, off = data[6], 40
    for _ in range(MAX_EXT_HEADERS + 1):
        if nxt in (PROTO_UDP, PROTO_TCP):
            return nxt, off
        if end < off + 8:
            raise MalformedPacket("truncated")
        if nxt in _EXT_SKIPPABLE:
            nxt, off = data[off], off + (data[off + 1] + 1) * 8
        elif nxt == _EXT_FRAGMENT:
            if ((data[off + 2] << 8) | data[off + 3]) & 0xFFF9:  # offset != 0 or M set
                raise MalformedPacket("fragment")
            nxt, off = data[off], off + 8
        else:
            raise MalformedPacket("not-udp-or-tcp")
    raise MalformedPacket("extension-chain")
