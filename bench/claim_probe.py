"""Runs inside a namespace: N claims against a state store, each timed, as JSON.

``--state PATH``: the embedded SQLite store (fsynced transactions, as the daemon).
``--url URL``: Redis/Valkey through the Lua claim script (as the daemon).
Every claim is a new counter (so every one is WON and writes a grant): what the
daemon's store thread does once per completed knock sequence or SPA packet.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import time
from pathlib import Path

from nfknock.config import StateConfig
from nfknock.gate import ClaimRequest, CounterClaim, Outcome
from nfknock.store import StateStore
from nfknock.store.embedded import EmbeddedStore

KEY = bytes([198, 51, 100, 10, 198, 51, 100, 1])


def main() -> int:
    ap = argparse.ArgumentParser()
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--state", type=Path)
    where.add_argument("--url")
    ap.add_argument("-n", type=int, default=1000)
    args = ap.parse_args()
    store: StateStore
    if args.state is not None:
        store = EmbeddedStore(args.state)
    else:
        from nfknock.store.redis import RedisStore

        state = StateConfig("redis", args.url, prefix=f"bench{secrets.token_hex(4)}", timeout=2.0)
        store = RedisStore(state, origin="bench")
        store.begin()
    times, failures = [], 0
    wall = time.time()
    for i in range(args.n):
        # 10,000 counters per step at most: a new step every 5,000 claims.
        claim = CounterClaim("alice", 1000 + i // 5000, i % 5000, 2)
        request = ClaimRequest(i + 1, claim, KEY, "alice", frozenset({22}), 1, wall + 30, "knock")
        t0 = time.perf_counter()
        outcome = store.claim(request, wall)
        times.append((time.perf_counter() - t0) * 1e6)
        failures += outcome.outcome is not Outcome.WON
    store.close()
    print(json.dumps({"us": times, "failures": failures}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
