"""Run inside a namespace: send malformed and unusual SYNs from raw sockets.

For the robustness test: truncated headers, IP options, fragments, odd flag sets,
long and bogus IPv6 extension chains.  Prints the names of what it sent.
"""

from __future__ import annotations

import argparse
import socket
import struct

import dpkt


def tcp_syn(src: bytes, dst: bytes, dport: int, flags: int = dpkt.tcp.TH_SYN) -> bytes:
    seg = dpkt.tcp.TCP(sport=40000, dport=dport, seq=1, flags=flags, win=1024)
    seg.off = 5
    fam = 4 if len(src) == 4 else 6
    if fam == 4:
        ip = dpkt.ip.IP(src=src, dst=dst, p=6, data=seg)
        ip.len = len(ip)
        seg.sum = 0
        bytes(ip)  # dpkt fills the TCP checksum when packing the IP packet
        return bytes(ip.data)
    ip6 = dpkt.ip6.IP6(src=src, dst=dst, nxt=6, hlim=64, data=seg)
    ip6.plen = len(seg)
    bytes(ip6)
    return bytes(ip6.data)


def v4(
    src: bytes,
    dst: bytes,
    payload: bytes,
    *,
    options: bytes = b"",
    frag: int = 0,
    proto: int = 6,
    total: int | None = None,
) -> bytes:
    ihl = 5 + len(options) // 4
    length = total if total is not None else ihl * 4 + len(payload)
    hdr = struct.pack(
        "!BBHHHBBH4s4s", (4 << 4) | ihl, 0, length, 0x1234, frag, 64, proto, 0, src, dst
    )
    hdr += options
    csum = dpkt.in_cksum(hdr)
    hdr = hdr[:10] + struct.pack("!H", csum) + hdr[12:]
    return hdr + payload


def v6(src: bytes, dst: bytes, chain: list[tuple[int, bytes]], payload: bytes) -> bytes:
    """``chain``: (header type, body) pairs; each body padded to 8n-2 bytes."""
    types = [t for t, _ in chain] + [6]
    ext = b""
    for i, (_t, body) in enumerate(chain):
        ext += bytes([types[i + 1], (len(body) + 2) // 8 - 1]) + body
    first = types[0]
    return (
        struct.pack("!IHBB16s16s", 6 << 28, len(ext) + len(payload), first, 64, src, dst)
        + ext
        + payload
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("src4")
    ap.add_argument("dst4")
    ap.add_argument("src6")
    ap.add_argument("dst6")
    ap.add_argument("--knock-port", type=int, default=5000)
    ap.add_argument("--protected", type=int, default=22)
    args = ap.parse_args()
    s4, d4 = socket.inet_aton(args.src4), socket.inet_aton(args.dst4)
    s6, d6 = (
        socket.inet_pton(socket.AF_INET6, args.src6),
        socket.inet_pton(socket.AF_INET6, args.dst6),
    )
    kp, pp = args.knock_port, args.protected
    syn4, syn6 = tcp_syn(s4, d4, kp), tcp_syn(s6, d6, kp)
    nop_opts = b"\x01\x01\x01\x00"
    packets4 = {
        "ipv4-options-knock": v4(s4, d4, syn4, options=nop_opts),
        "ipv4-options-protected": v4(s4, d4, tcp_syn(s4, d4, pp), options=nop_opts * 2),
        "ipv4-truncated-tcp": v4(s4, d4, syn4[:10]),
        "ipv4-short-total-length": v4(s4, d4, syn4, total=30),
        "ipv4-first-fragment": v4(s4, d4, syn4[:8], frag=0x2000),
        "ipv4-fragment-pair-1": v4(s4, d4, syn4[:8], frag=0x2000),
        "ipv4-fragment-pair-2": v4(s4, d4, syn4[8:], frag=1),
        "ipv4-later-fragment": v4(s4, d4, syn4[8:], frag=3),
        "ipv4-syn-fin": v4(s4, d4, tcp_syn(s4, d4, kp, dpkt.tcp.TH_SYN | dpkt.tcp.TH_FIN)),
        "ipv4-syn-ack": v4(s4, d4, tcp_syn(s4, d4, pp, dpkt.tcp.TH_SYN | dpkt.tcp.TH_ACK)),
        "ipv4-bad-ihl": v4(s4, d4, syn4)[:0] + bytes([0x43]) + v4(s4, d4, syn4)[1:],
    }
    pad6 = b"\x01\x04\x00\x00\x00\x00"  # a PadN option filling 6 bytes
    packets6 = {
        "ipv6-hop-by-hop-and-dstopts": v6(s6, d6, [(0, pad6), (60, pad6)], syn6),
        "ipv6-atomic-fragment": v6(s6, d6, [(44, b"\x00\x00\x00\x00\x00\x01")], syn6),
        "ipv6-nine-dstopts": v6(s6, d6, [(60, pad6)] * 9, syn6),
        "ipv6-first-fragment": v6(s6, d6, [(44, b"\x00\x01\x00\x00\x00\x02")], syn6[:8]),
        "ipv6-unknown-header": v6(s6, d6, [(253, pad6)], syn6),
        "ipv6-truncated-tcp": v6(s6, d6, [], syn6[:6]),
        "ipv6-chain-past-end": struct.pack("!IHBB16s16s", 6 << 28, 8, 60, 64, s6, d6)
        + b"\x06\x05"
        + bytes(6),
    }
    send_all(socket.AF_INET, args.dst4, packets4)
    send_all(socket.AF_INET6, args.dst6, packets6)


def send_all(family: int, dst: str, packets: dict[str, bytes]) -> None:
    """Each packet once from a raw socket that takes whole IP packets; prints names."""
    with socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_RAW) as s:
        for name, pkt in packets.items():
            try:
                s.sendto(pkt, (dst, 0))
                print(name, flush=True)
            except OSError as exc:
                print(f"{name}: not sent ({exc.strerror})", flush=True)


if __name__ == "__main__":
    main()
