"""How fast a pre-filled queue drains: the bare per-packet drop loop against
``nfknock.nfq.VerdictQueue`` with DROPs batched, in the same run.

    sudo .venv/bin/python -m bench.batch_drain [--n 20000] [--runs 3]

Each measurement: a consumer binds the flood queue (bench.kernel.FLOOD_QUEUE) and
does not read; a bounded flood (bench/synflood.c, spoofed documentation sources)
fills the queue with ``n`` SYNs; then the consumer is told to go and times how
long it takes to answer all of them (bench/drain_consumer.py), ``fills`` times per
consumer process (the median counts).
Only the consumer's side is timed: the kernel queued the packets before the clock
started, so the sender is not the ceiling here.  Rates by wall clock and by the
consumer's CPU time (user + system, so the verdict syscalls count); on a machine
shared with other work the CPU figure is the steadier one.  The consumer is pinned
to CPU 1.  Consumers:

* ``bare``: netfilterqueue, one ``drop()`` per packet (bench/bare_queue.py's loop);
* ``batch64``: VerdictQueue, a slice and a dict lookup per packet, DROPs in batches
  of 64 (one ``NFQNL_MSG_VERDICT_BATCH`` message each);
* ``reader1``: the same reader with batch 1 (one verdict per packet): what the
  reader costs without batching.

The order of the consumers rotates from run to run.  Reports each run's rates and the
ratios to ``bare`` of the same run; on a shared machine the ratios are the figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.kernel import FILTER_CPU, FLOOD_QUEUE, HERE, KNOCK_RANGE, Bench
from nfknock.netlab import PY, can_run

CONSUMERS = {
    "bare": ["--mode", "bare"],
    "batch64": ["--mode", "reader", "--batch", "64"],
    "reader1": ["--mode", "reader", "--batch", "1"],
}


def _settled_waiting(b: Bench, timeout: float = 10.0) -> int:
    """The queue's length once the flood's last packets have been queued."""
    last = -1
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        waiting = b.queue()["waiting"]
        if waiting == last:
            return waiting
        last = waiting
        time.sleep(0.1)
    return last


def drain(b: Bench, name: str, n: int, fills: int) -> dict[str, Any]:
    """One consumer process, ``fills`` times: fill the queue with ``n`` SYNs, drain it.
    The median of the fills' rates, by wall clock and by the consumer's CPU time."""
    argv = [
        *("ip", "netns", "exec", b.lab.server, "taskset", "-c", FILTER_CPU, PY),
        *(str(HERE / "drain_consumer.py"), *CONSUMERS[name], "--max-len", str(n)),
        *("--queue", str(FLOOD_QUEUE)),
    ]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    wall, cpu = [], []
    try:
        if proc.stdout.readline().strip() != "bound":
            raise RuntimeError(f"{name}: the consumer did not bind")
        for _ in range(fills):
            b.flood(0, 30, count=n)
            filled = _settled_waiting(b)
            if filled < n * 0.9:
                raise RuntimeError(f"{name}: only {filled} of {n} packets were queued")
            proc.stdin.write("go\n")
            proc.stdin.flush()
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"{name}: the consumer died")
            result = json.loads(line)
            if b.queue()["waiting"]:
                raise RuntimeError(f"{name}: the queue was not drained")
            wall.append(filled / result["seconds"])
            cpu.append(filled / result["cpu"])
        proc.stdin.close()
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    return {
        "wall_pps": round(statistics.median(wall)),
        "cpu_pps": round(statistics.median(cpu)),
        "wall_spread": round(max(wall) / min(wall), 2),
    }


def run(b: Bench, n: int, runs: int, fills: int) -> dict[str, Any]:
    b.reset_firewall()
    b.lab.sh(
        b.lab.server,
        *("iptables", "-A", "INPUT", "-p", "tcp", "--syn"),
        *("--dport", KNOCK_RANGE.replace("-", ":")),
        *("-j", "NFQUEUE", "--queue-num", str(FLOOD_QUEUE)),
    )
    names = list(CONSUMERS)
    out: list[dict[str, Any]] = []
    for i in range(runs):
        order = names[i % len(names) :] + names[: i % len(names)]
        one = {name: drain(b, name, n, fills) for name in order}
        ratios = {
            key: {
                name: round(one[name][f"{key}_pps"] / one["bare"][f"{key}_pps"], 3)
                for name in names
            }
            for key in ("wall", "cpu")
        }
        out.append({"order": order, "consumers": one, "ratio_to_bare": ratios})
        print(json.dumps(out[-1]), flush=True)
    summary: dict[str, dict[str, Any]] = {"wall": {}, "cpu": {}}
    for key, per in summary.items():
        for name in names:
            values = [r["ratio_to_bare"][key][name] for r in out]
            per[name] = {
                "median": round(statistics.median(values), 3),
                "min": min(values),
                "max": max(values),
            }
    return {"n": n, "fills": fills, "runs": out, "ratio_to_bare": summary}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.batch_drain")
    ap.add_argument("--n", type=int, default=20_000, help="packets per fill")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--fills", type=int, default=5, help="fills per consumer and run")
    ap.add_argument("--out", type=Path, default=None, help="write the JSON here")
    args = ap.parse_args(argv)
    why = can_run()
    if why is not None:
        print(f"bench: cannot run here: {why}", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="nfknock-drain-") as tmp:
        b = Bench(Path(tmp))
        try:
            res = run(b, args.n, args.runs, args.fills)
        finally:
            b.close()
    print("drain rate / the bare loop's, by wall clock and by CPU time:")
    print(json.dumps(res["ratio_to_bare"], indent=1))
    if args.out:
        args.out.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
