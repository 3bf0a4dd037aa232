"""Runs in the server namespace for bench/batch_drain.py: bind a queue; on every "go"
line (sent once the benchmark has filled the queue) drain it and print the wall and
CPU time (user + system: the verdict syscalls' kernel work included) as JSON.

    --mode bare     netfilterqueue, one drop() per packet: bare_queue.py's callback
                    and socket sizes, run(block=False) instead of a blocking run()
    --mode reader   nfknock.nfq.VerdictQueue with --batch (1: one verdict per packet)
                    and a decide function that does what a knock-queue lookup costs
                    at least: a slice of the addresses and a dict lookup
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable

from nfknock.events import Verdict
from nfknock.nfq import VerdictQueue


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["bare", "reader"], required=True)
    ap.add_argument("--queue", type=int, default=0)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--max-len", type=int, default=8192)
    args = ap.parse_args()
    sock_len = args.max_len * 2048  # as bare_queue.py and nfknock run
    drain: Callable[[], int]
    close: Callable[[], None]
    if args.mode == "bare":
        from netfilterqueue import NetfilterQueue

        nfq = NetfilterQueue()
        nfq.bind(args.queue, lambda pkt: pkt.drop(), args.max_len, range=512, sock_len=sock_len)

        def drain_bare() -> int:
            nfq.run(block=False)  # returns when the socket is empty
            return -1  # not counted: counting would cost the bare loop a little

        drain, close = drain_bare, nfq.unbind
    else:
        known: dict[bytes, int] = {}

        def decide(payload: bytes) -> Verdict:
            known.get(payload[12:20])
            return Verdict.DROP

        vq = VerdictQueue.bind(
            args.queue,
            decide,
            max_len=args.max_len,
            copy_range=512,
            sock_len=sock_len,
            batch=args.batch,
            reject_mark=0x4E4B0001,
        )

        def drain_reader() -> int:
            handled = 0
            while True:
                got = vq.pump(1 << 30, float("inf"))
                handled += got.handled
                if got.drained:
                    return handled

        drain, close = drain_reader, vq.close
    print("bound", flush=True)
    try:
        while sys.stdin.readline().strip() == "go":  # once per fill of the queue
            c0, t0 = time.process_time(), time.perf_counter()
            handled = drain()
            seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
            print(json.dumps({"handled": handled, "seconds": seconds, "cpu": cpu}), flush=True)
    finally:
        close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
