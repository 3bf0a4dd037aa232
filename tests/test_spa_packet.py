"""The SPA packet parser: UDP datagrams and TCP SYNs with payload, IPv4 and IPv6."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nfknock.packet import MalformedPacket
from nfknock.spa.packet import PROTO_TCP, PROTO_UDP, SpaDatagram, parse_spa_packet

from .spa_support import DST, SRC, SRC6, ip

DST6 = ip("2001:db8::1")
PAYLOAD = b"Q" * 180


def udp(payload: bytes = PAYLOAD, dport: int = 62201, length: int | None = None) -> bytes:
    n = 8 + len(payload) if length is None else length
    return struct.pack("!HHHH", 40000, dport, n, 0) + payload


def tcp(payload: bytes = PAYLOAD, flags: int = 0x02, dport: int = 62201, doff: int = 5) -> bytes:
    header = struct.pack("!HHIIBBHHH", 40000, dport, 1, 0, doff << 4, flags, 64240, 0, 0)
    return header + b"\x00" * (doff * 4 - 20) + payload


def ipv4(l4: bytes, proto: int = PROTO_UDP, frag: int = 0, total: int | None = None) -> bytes:
    n = 20 + len(l4) if total is None else total
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, n, 1, frag, 64, proto, 0, SRC, DST) + l4


def ipv6(l4: bytes, nxt: int = PROTO_UDP, ext: bytes = b"") -> bytes:
    return struct.pack("!IHBB16s16s", 6 << 28, len(ext) + len(l4), nxt, 64, SRC6, DST6) + ext + l4


def hop(nxt: int, length8: int = 0) -> bytes:
    """A hop-by-hop / destination options header of (length8 + 1) * 8 bytes."""
    return bytes([nxt, length8]) + b"\x01\x04\x00\x00\x00\x00" + b"\x00" * (8 * length8)


def test_ipv4_udp_datagram() -> None:
    assert parse_spa_packet(ipv4(udp())) == SpaDatagram(SRC, DST, PROTO_UDP, 62201, PAYLOAD)


def test_ipv4_tcp_syn_with_payload_and_options() -> None:
    d = parse_spa_packet(ipv4(tcp(doff=8), PROTO_TCP))
    assert (d.proto, d.dport, d.payload) == (PROTO_TCP, 62201, PAYLOAD)


def test_ipv6_udp_behind_extension_headers() -> None:
    ext = hop(60) + hop(44, 1) + struct.pack("!BBHI", PROTO_UDP, 0, 0, 7)  # atomic fragment
    d = parse_spa_packet(ipv6(udp(), nxt=0, ext=ext))
    assert d == SpaDatagram(SRC6, DST6, PROTO_UDP, 62201, PAYLOAD)


def test_ipv6_tcp_syn() -> None:
    d = parse_spa_packet(ipv6(tcp(), PROTO_TCP))
    assert (d.src, d.proto, d.payload) == (SRC6, PROTO_TCP, PAYLOAD)


def test_link_padding_after_the_ip_length_is_not_payload() -> None:
    assert parse_spa_packet(ipv4(udp()) + b"\x00" * 6).payload == PAYLOAD
    assert parse_spa_packet(ipv4(tcp(), PROTO_TCP) + b"\x00" * 6).payload == PAYLOAD
    assert parse_spa_packet(ipv6(udp()) + b"\x00" * 6).payload == PAYLOAD


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (b"\x45" + b"\x00" * 10, "truncated"),
        (ipv4(udp())[:-1], "truncated"),  # shorter than its total length: copy range
        (ipv6(udp())[:-1], "truncated"),
        (b"\x75" + ipv4(udp())[1:], "not-ip"),
        (b"\x43" + ipv4(udp())[1:], "ipv4-header-length"),
        (ipv4(udp(), total=10), "ip-length"),
        (ipv4(udp(), frag=0x2000), "fragment"),
        (ipv4(udp(), frag=0x0010), "fragment"),
        (ipv4(udp(), proto=1), "not-udp-or-tcp"),
        (ipv6(udp(), nxt=58), "not-udp-or-tcp"),
        (ipv6(udp(), nxt=44, ext=struct.pack("!BBHI", PROTO_UDP, 0, 0x0008, 7)), "fragment"),
        (ipv6(udp(), nxt=0, ext=b"".join(hop(0) for _ in range(9)) + hop(17)), "extension-chain"),
        (ipv4(udp(length=4)), "udp-length"),
        (ipv4(udp(length=500)), "udp-length"),
        (ipv4(udp(b"")), "no-payload"),
        (ipv4(tcp(b""), PROTO_TCP), "no-payload"),
        (ipv4(tcp(flags=0x12), PROTO_TCP), "not-a-syn"),
        (ipv4(tcp(flags=0x10), PROTO_TCP), "not-a-syn"),
        (ipv4(tcp(flags=0x03), PROTO_TCP), "not-a-syn"),
        (ipv4(tcp(doff=4), PROTO_TCP), "tcp-header-length"),
        (ipv4(tcp(b"", doff=15), PROTO_TCP)[:-20], "truncated"),
    ],
)
def test_malformed_packets_name_their_reason(data: bytes, reason: str) -> None:
    with pytest.raises(MalformedPacket) as exc:
        parse_spa_packet(data)
    assert exc.value.reason == reason


@settings(max_examples=500)
@given(st.binary(max_size=200))
def test_any_bytes_parse_or_raise_malformed_packet(data: bytes) -> None:
    try:
        d = parse_spa_packet(data)
    except MalformedPacket as exc:
        assert exc.reason
    else:
        assert d.payload and len(d.src) in (4, 16)


@settings(max_examples=300)
@given(st.binary(max_size=120), st.sampled_from([4, 6]), st.sampled_from([PROTO_UDP, PROTO_TCP]))
def test_mutated_valid_packets_parse_or_raise_malformed_packet(
    noise: bytes, family: int, proto: int
) -> None:
    l4 = udp() if proto == PROTO_UDP else tcp()
    data = bytearray(ipv4(l4, proto) if family == 4 else ipv6(l4, proto))
    for i, b in enumerate(noise[::2]):
        data[noise[i * 2 + 1] % len(data) if i * 2 + 1 < len(noise) else 0] = b
    with contextlib.suppress(MalformedPacket):  # anything else fails the test
        parse_spa_packet(bytes(data))
