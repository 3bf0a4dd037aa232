"""The lean parser: well-formed SYNs parse; anything else has a stable reason."""

from __future__ import annotations

import struct

import dpkt
import pytest
from hypothesis import given
from hypothesis import strategies as st

from nfknock.netlab.craft import tcp_syn, v4, v6
from nfknock.packet import MalformedPacket, parse_syn

S4, D4 = bytes([198, 51, 100, 10]), bytes([198, 51, 100, 1])
S6, D6 = bytes.fromhex("20010db8" + "0" * 22 + "10"), bytes.fromhex("20010db8" + "0" * 22 + "01")
PAD6 = b"\x01\x04\x00\x00\x00\x00"


def test_ipv4_syn_parses() -> None:
    assert parse_syn(v4(S4, D4, tcp_syn(S4, D4, 5000))) == (S4, D4, 5000)


def test_ipv4_syn_with_options_parses() -> None:
    assert parse_syn(v4(S4, D4, tcp_syn(S4, D4, 22), options=b"\x01" * 8)) == (S4, D4, 22)


def test_ipv6_syn_parses() -> None:
    assert parse_syn(v6(S6, D6, [], tcp_syn(S6, D6, 2222))) == (S6, D6, 2222)


def test_ipv6_syn_behind_extension_headers_parses() -> None:
    pkt = v6(S6, D6, [(0, PAD6), (43, PAD6), (60, PAD6)], tcp_syn(S6, D6, 7000))
    assert parse_syn(pkt) == (S6, D6, 7000)


def test_ipv6_atomic_fragment_parses() -> None:
    pkt = v6(S6, D6, [(44, b"\x00\x00\x00\x00\x00\x01")], tcp_syn(S6, D6, 7000))
    assert parse_syn(pkt)[2] == 7000


_UDP = struct.pack("!HHHH", 40000, 62201, 16, 0) + b"payload!"
UDP6 = struct.pack("!IHBB16s16s", 6 << 28, len(_UDP), 17, 64, S6, D6) + _UDP
UDP6_BEHIND_HOP_BY_HOP = (
    struct.pack("!IHBB16s16s", 6 << 28, 8 + len(_UDP), 0, 64, S6, D6) + b"\x11\x00" + PAD6 + _UDP
)


@pytest.mark.parametrize(
    ("packet", "reason"),
    [
        (b"", "empty"),
        (b"\x45" + b"\x00" * 10, "truncated"),
        (v4(S4, D4, tcp_syn(S4, D4, 5000))[:30], "truncated"),
        (bytes([0x43]) + v4(S4, D4, tcp_syn(S4, D4, 5000))[1:], "ipv4-header-length"),
        (v4(S4, D4, tcp_syn(S4, D4, 5000), proto=17), "not-tcp"),
        (v4(S4, D4, tcp_syn(S4, D4, 5000), frag=0x2000), "fragment"),
        (v4(S4, D4, tcp_syn(S4, D4, 5000), frag=5), "fragment"),
        (v4(S4, D4, tcp_syn(S4, D4, 5000, dpkt.tcp.TH_SYN | dpkt.tcp.TH_ACK)), "not-a-syn"),
        (v4(S4, D4, tcp_syn(S4, D4, 5000, dpkt.tcp.TH_RST)), "not-a-syn"),
        (b"\x20" + b"\x00" * 60, "not-ip"),
        (v6(S6, D6, [(60, PAD6)] * 9, tcp_syn(S6, D6, 5000)), "extension-chain"),
        (v6(S6, D6, [(253, PAD6)], tcp_syn(S6, D6, 5000)), "extension-chain"),
        (UDP6, "not-tcp"),  # an SPA datagram: the daemon hands it to the SPA parser
        (UDP6_BEHIND_HOP_BY_HOP, "not-tcp"),
        (v6(S6, D6, [(44, b"\x00\x01\x00\x00\x00\x02")], tcp_syn(S6, D6, 5000)), "fragment"),
        (v6(S6, D6, [], tcp_syn(S6, D6, 5000))[:50], "truncated"),
        (struct.pack("!IHBB16s16s", 6 << 28, 2, 60, 64, S6, D6) + b"\x06\x05", "truncated"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_malformed_packets_raise_with_a_stable_reason(packet: bytes, reason: str) -> None:
    with pytest.raises(MalformedPacket) as info:
        parse_syn(packet)
    assert info.value.reason == reason


@given(st.binary(max_size=120))
def test_random_bytes_either_parse_or_raise_malformed(data: bytes) -> None:
    try:
        src, dst, port = parse_syn(data)
    except MalformedPacket:
        return
    assert len(src) == len(dst) in (4, 16)
    assert 0 <= port <= 65535


def _outcome(fn: object, data: bytes) -> object:
    try:
        return fn(data)  # type: ignore[operator]
    except MalformedPacket as exc:
        return ("refused", exc.reason)


_IPV4_SYN_PREFIX = bytes.fromhex("4500002800004000400600")


@given(
    st.one_of(
        st.binary(max_size=80),
        # Mostly well-formed IPv4 SYN headers with arbitrary bytes after the common
        # prefix: flags, fragment bits, TCP flags and short packets all vary.
        st.builds(lambda tail: _IPV4_SYN_PREFIX + tail, st.binary(max_size=60)),
        st.builds(
            lambda head, tail: bytes([0x45]) + head + tail,
            st.binary(min_size=8, max_size=8),
            st.binary(max_size=60),
        ),
    )
)
def test_the_ipv4_fast_path_of_parse_key_agrees_with_the_full_header_walk(data: bytes) -> None:
    from nfknock.packet import _parse_key_walk, parse_key

    assert _outcome(parse_key, data) == _outcome(_parse_key_walk, data)


def test_parse_key_takes_a_plain_ipv4_syn_and_refuses_a_syn_ack() -> None:
    from nfknock.packet import parse_key

    syn = bytearray(_IPV4_SYN_PREFIX + bytes(29))
    syn[12:20] = bytes([198, 51, 100, 7, 198, 51, 100, 1])
    syn[22:24] = (4321).to_bytes(2, "big")
    syn[33] = 0x02
    assert parse_key(bytes(syn)) == (bytes(syn[12:20]), 4321)
    syn[33] = 0x12
    with pytest.raises(MalformedPacket) as err:
        parse_key(bytes(syn))
    assert err.value.reason == "not-a-syn"
