"""SPA verification alone: payloads verified per second, in process, no kernel.

    .venv/bin/python -m bench.spa_verify            # 1, 100 and 1,000 fwknop users
    .venv/bin/python -m bench.spa_verify --smoke    # tiny, proves it runs

Workloads, each against verifiers of 1, 100 and 1,000 fwknop users (SHA-256 HMAC,
CBC, distinct random keys):

* ``junk``: random base64 text of a real packet's length (passes the shape checks,
  so every user's HMAC is tried -- the cost of a flood of garbage);
* ``wrong_hmac``: well-formed fwknop packets under keys no user has (the same HMAC
  trials; what a flood of someone else's packets costs);
* ``valid_last``: a valid packet of the *last* user in name order (every
  other user's HMAC tried first, then one decryption: the worst legitimate case).

Bounded: each cell runs ``seconds`` of wall time (default 0.5 s), single thread.
``run()`` returns plain data and ``table()`` a Markdown table, for ``python -m bench``.
"""

from __future__ import annotations

import argparse
import json
import random
import secrets
import time
from typing import Any

from nfknock.config import SpaConfig, User
from nfknock.spa.encode import ClientKeys, encode_access
from nfknock.spa.keys import SpaKeys
from nfknock.spa.verify import Verifier

SRC = bytes([198, 51, 100, 10])
DST = bytes([198, 51, 100, 1])
WALL = 1_800_000_000
ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def users(n: int) -> list[tuple[User, ClientKeys]]:
    out = []
    for i in range(n):
        key, hmac_key = secrets.token_bytes(32), secrets.token_bytes(64)
        user = User(f"u{i:05d}", b"", spa=SpaKeys(key=key, hmac_key=hmac_key))
        out.append((user, ClientKeys(key, hmac_key)))
    return out


def packet(keys: ClientKeys) -> bytes:
    return encode_access(keys, username="bench", timestamp=WALL, allow_ip="198.51.100.10")


def rate(verifier: Verifier, payloads: list[bytes], seconds: float) -> tuple[float, str]:
    """Payloads verified per second (cycling through ``payloads``) and the last code."""
    done, code = 0, ""
    verify = verifier.verify
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for p in payloads:
            code = verify(SRC, DST, p, WALL).code
        done += len(payloads)
        now = time.perf_counter()
        if now >= deadline:
            return done / (now - start), code


def run(user_counts: tuple[int, ...] = (1, 100, 1000), seconds: float = 0.5) -> dict[str, Any]:
    rng = random.Random(7)
    strangers = [packet(ClientKeys(secrets.token_bytes(32), secrets.token_bytes(64)))]
    strangers += [packet(ClientKeys(secrets.token_bytes(32), secrets.token_bytes(64)))]
    length = len(strangers[0])
    junk = [bytes(rng.choice(ALPHABET) for _ in range(length)) for _ in range(64)]
    results: dict[str, Any] = {"payload_bytes": length, "seconds_per_cell": seconds, "users": {}}
    for n in user_counts:
        population = users(n)
        t0 = time.perf_counter()
        verifier = Verifier([u for u, _ in population], SpaConfig(), frozenset({22}))
        build_ms = (time.perf_counter() - t0) * 1000
        valid = [packet(population[-1][1])]
        row: dict[str, Any] = {"build_ms": round(build_ms, 1)}
        for name, load in (("junk", junk), ("wrong_hmac", strangers), ("valid_last", valid)):
            per_s, code = rate(verifier, load, seconds)
            row[name] = {"verified_per_s": round(per_s), "us_each": round(1e6 / per_s, 1)}
            row[name]["code"] = code
        results["users"][str(n)] = row
    return results


def table(results: dict[str, Any]) -> str:
    lines = [
        "| fwknop users | random junk (valid shape) /s | wrong-HMAC packets /s | "
        "valid packet of the last user /s |",
        "|---:|---:|---:|---:|",
    ]
    for n, row in results["users"].items():
        cells = [
            f"{row[k]['verified_per_s']:,} ({row[k]['us_each']} µs)"
            for k in ("junk", "wrong_hmac", "valid_last")
        ]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines.append(
        f"\n{results['payload_bytes']}-byte payloads, one thread, "
        f"{results['seconds_per_cell']} s per cell."
    )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes (figures mean nothing)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    res = run((1, 10), 0.05) if args.smoke else run()
    print(json.dumps(res, indent=1) if args.json else table(res))


if __name__ == "__main__":
    main()
