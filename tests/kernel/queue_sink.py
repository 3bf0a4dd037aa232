"""Run inside a namespace: bind NFQUEUE queues, record what lands on which, drop it all.

``queue_sink.py OUT Q [Q ...] --seconds S``: one JSON line per packet to OUT
(``{"queue", "src", "proto", "dport"}``), "ready" on stdout once every queue is bound; stops
after S seconds or on SIGTERM.  A test consumer, not the daemon: it shows where the
static rules send each packet.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import select
import signal
import time
from typing import Any


def _describe(data: bytes) -> dict[str, object]:
    if data[0] >> 4 == 4:
        src, proto, off = data[12:16], data[9], (data[0] & 0x0F) * 4
    else:  # IPv6 without extension headers (what the tests send)
        src, proto, off = data[8:24], data[6], 40
    return {
        "src": str(ipaddress.ip_address(src)),
        "proto": proto,
        "dport": int.from_bytes(data[off + 2 : off + 4], "big"),
    }


def main() -> None:
    from netfilterqueue import NetfilterQueue

    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("queues", type=int, nargs="+")
    ap.add_argument("--seconds", type=float, default=60)
    args = ap.parse_args()
    stop = False

    def on_term(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    with open(args.out, "a", buffering=1) as out:
        bound: dict[int, Any] = {}
        for number in args.queues:

            def record(pkt: Any, number: int = number) -> None:
                try:
                    seen = {"queue": number, **_describe(pkt.get_payload())}
                    out.write(json.dumps(seen) + "\n")
                finally:
                    pkt.drop()

            nfq = NetfilterQueue()
            nfq.bind(number, record)
            bound[nfq.get_fd()] = nfq
        print("ready", flush=True)
        poller = select.poll()
        for fd in bound:
            poller.register(fd, select.POLLIN)
        deadline = time.monotonic() + args.seconds
        try:
            while not stop and time.monotonic() < deadline:
                for fd, _ in poller.poll(100):
                    bound[fd].run(block=False)
        finally:
            for nfq in bound.values():
                nfq.unbind()


if __name__ == "__main__":
    main()
