"""Run inside a namespace: serve NFQUEUEs with :class:`nfknock.nfq.VerdictQueue`.

A stand-in for the daemon's packet loop, for the real-kernel tests: a priority queue
(unbatched) and/or a knock queue (DROPs batched), polled together, the priority
queue pumped first on every turn.  Decides by TCP/UDP destination port
(``--accept``, ``--reject``, ``--raise``: the decide function raises; anything else
is DROP; ``--decide-cost-us`` makes each decision slow).  Every pump has a deadline;
one that the deadline ended records how late it returned.  Exits on SIGTERM/SIGINT
and writes its counts as JSON to ``--result``.
"""

from __future__ import annotations

import argparse
import json
import select
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nfknock.events import Verdict
from nfknock.nfq import VerdictQueue

SOCKET_BYTES_PER_PACKET = 2048


def ports(text: str) -> frozenset[int]:
    out: set[int] = set()
    for part in filter(None, text.split(",")):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return frozenset(out)


class Counts:
    def __init__(self) -> None:
        self.accept = self.reject = self.drop = self.raised = 0


def decider(
    accept: frozenset[int],
    reject: frozenset[int],
    fail: frozenset[int],
    counts: Counts,
    cost: float = 0.0,
) -> Callable[[bytes], Verdict]:
    def decide(payload: bytes) -> Verdict:
        if cost:  # a slow decision: a flood then never lets the socket run dry
            until = time.perf_counter() + cost
            while time.perf_counter() < until:
                pass
        at = (payload[0] & 0x0F) * 4 + 2  # IPv4 (RFC 791): TCP/UDP destination port
        port = payload[at] << 8 | payload[at + 1]
        if port in accept:
            counts.accept += 1
            return Verdict.ACCEPT
        if port in reject:
            counts.reject += 1
            return Verdict.REJECT
        if port in fail:
            counts.raised += 1
            raise ValueError(f"decide failed on port {port} (on purpose)")
        counts.drop += 1
        return Verdict.DROP

    return decide


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--priority", type=int, default=None, help="priority queue number")
    ap.add_argument("--knock", type=int, default=None, help="knock queue number")
    ap.add_argument("--batch", type=int, default=64, help="knock queue DROP batch")
    ap.add_argument("--accept", type=ports, default=frozenset())
    ap.add_argument("--reject", type=ports, default=frozenset())
    ap.add_argument("--raise", dest="fail", type=ports, default=frozenset())
    ap.add_argument("--slice", type=int, default=256, help="packets per knock-queue pump")
    ap.add_argument("--deadline-ms", type=float, default=20.0, help="each pump's deadline")
    ap.add_argument("--decide-cost-us", type=float, default=0.0, help="busy time per packet")
    ap.add_argument("--max-len", type=int, default=8192)
    ap.add_argument("--reject-mark", type=lambda s: int(s, 0), default=0x4E4B0001)
    ap.add_argument("--result", type=Path, required=True)
    args = ap.parse_args()

    stop_at: list[float] = []
    counts: dict[str, Counts] = {}
    queues: list[tuple[str, VerdictQueue, int]] = []  # (name, queue, max packets per pump)
    for name, number, batch, limit in (
        ("priority", args.priority, 1, 1 << 30),
        ("knock", args.knock, args.batch, args.slice),
    ):
        if number is None:
            continue
        counts[name] = Counts()
        q = VerdictQueue.bind(
            number,
            decider(args.accept, args.reject, args.fail, counts[name], args.decide_cost_us / 1e6),
            max_len=args.max_len,
            copy_range=128,
            sock_len=args.max_len * SOCKET_BYTES_PER_PACKET,
            batch=batch,
            reject_mark=args.reject_mark,
        )
        queues.append((name, q, limit))

    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)
    signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop_at.append(time.monotonic()))
    poller = select.poll()
    for _, q, _ in queues:
        poller.register(q.fd, select.POLLIN)
    poller.register(wake_r.fileno(), select.POLLIN)
    print("bound", flush=True)

    late: list[float] = []  # seconds past the deadline, of pumps the deadline ended
    handled = dict.fromkeys(counts, 0)
    pumps = 0
    busy = False
    step = args.deadline_ms / 1000
    try:
        while not stop_at:
            poller.poll(0 if busy else 250)
            busy = False
            for name, q, limit in queues:  # priority first, on every turn
                deadline = time.monotonic() + step
                got = q.pump(limit, deadline)
                after = time.monotonic()
                pumps += 1
                handled[name] += got.handled
                if not got.drained:
                    busy = True
                    if got.handled < limit:
                        late.append(after - deadline)
            if stop_at:
                break
    finally:
        stopped = time.monotonic()
        for _, q, _ in queues:
            q.close()
    late.sort()
    result: dict[str, Any] = {
        "pumps": pumps,
        "stop_seconds": stopped - stop_at[0] if stop_at else None,
        "deadline_pumps": len(late),
        "late_max_ms": late[-1] * 1000 if late else None,
        "late_median_ms": late[len(late) // 2] * 1000 if late else None,
        "queues": {
            name: {
                "handled": handled[name],
                "accept": counts[name].accept,
                "reject": counts[name].reject,
                "drop": counts[name].drop,
                "raised": counts[name].raised,
                "batches_sent": q.batches_sent,
                "send_failures": q.send_failures,
            }
            for name, q, _ in queues
        },
    }
    args.result.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
