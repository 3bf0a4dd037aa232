"""The floor of any Python NFQUEUE filter: bind, drop every packet, nothing else.

Run inside the server namespace by the benchmark; exits on SIGTERM.
"""

from __future__ import annotations

import argparse
import signal
import sys

from netfilterqueue import NetfilterQueue


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--queue", type=int, default=0)
    ap.add_argument("--max-len", type=int, default=8192)
    args = ap.parse_args()
    nfq = NetfilterQueue()
    # The same queue and socket sizes as nfknock run.
    nfq.bind(
        args.queue,
        lambda pkt: pkt.drop(),
        max_len=args.max_len,
        range=512,
        sock_len=args.max_len * 2048,
    )
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print("bound", flush=True)
    try:
        nfq.run()
    finally:
        nfq.unbind()
    return 0


if __name__ == "__main__":
    sys.exit(main())
