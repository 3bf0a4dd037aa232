"""Run inside the client namespace: a bounded flood of SPA-shaped UDP datagrams.

``spa_flood.py DST --rate PPS --seconds S --count N [--port 62201]
[--sources doc4|fixed:ADDR]``: hand-built IPv4/UDP datagrams from a raw socket,
alternately *random* (base64 text of a real packet's length: passes the shape
checks, so the daemon tries every user's HMAC) and *stranger* (well-formed fwknop
packets under keys no user has: authenticated by nobody).  Sources are spoofed only
from the documentation ranges 192.0.2.0/24 and 203.0.113.0/24 (``doc4``, a
different one each packet) or one fixed address.  Bounded by ``--count`` packets
and ``--seconds`` (at most 60), paced in 1 ms slices.  Prints one JSON line:
``{"sent": N, "seconds": S}``.
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import struct
import time

from nfknock.spa.encode import ClientKeys, encode_access

ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
DOC4 = ("192.0.2.", "203.0.113.")
MAX_SECONDS = 60.0


def payloads(rng: random.Random, n: int = 32) -> list[bytes]:
    out = []
    for i in range(n):
        keys = ClientKeys(rng.randbytes(32), rng.randbytes(64))
        packet = encode_access(keys, username="flood", timestamp=int(time.time()))
        if i % 2:
            packet = bytes(rng.choice(ALPHABET) for _ in range(len(packet)))
        out.append(packet)
    return out


def datagram(src: bytes, dst: bytes, sport: int, dport: int, payload: bytes) -> bytes:
    """IPv4 + UDP; the kernel fills the IP checksum, the UDP checksum is 0 (none,
    RFC 768: allowed over IPv4)."""
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0, src, dst)
    return ip + udp


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dst")
    ap.add_argument("--port", type=int, default=62201)
    ap.add_argument("--rate", type=float, required=True)
    ap.add_argument("--seconds", type=float, required=True)
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--sources", default="doc4")
    args = ap.parse_args()
    seconds = min(args.seconds, MAX_SECONDS)
    rng = random.Random(11)
    pool = payloads(rng)
    if args.sources.startswith("fixed:"):
        fixed: bytes | None = socket.inet_aton(args.sources.split(":", 1)[1])
    elif args.sources == "doc4":
        fixed = None
    else:
        raise SystemExit("--sources: doc4 or fixed:ADDR")
    dst = socket.inet_aton(args.dst)
    sent = 0
    start = time.monotonic()
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as s:
        while sent < args.count:
            elapsed = time.monotonic() - start
            if elapsed >= seconds:
                break
            due = min(args.count, int(args.rate * elapsed) + 1)
            while sent < due:
                src = fixed or socket.inet_aton(rng.choice(DOC4) + str(rng.randrange(1, 255)))
                pkt = datagram(src, dst, rng.randrange(1024, 65536), args.port, pool[sent % 32])
                s.sendto(pkt, (args.dst, 0))
                sent += 1
            time.sleep(0.001)
    print(json.dumps({"sent": sent, "seconds": round(time.monotonic() - start, 3)}))


if __name__ == "__main__":
    main()
