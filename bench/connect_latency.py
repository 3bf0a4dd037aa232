"""Runs in the client namespace: N connect() timings to one port, as JSON."""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("address")
    ap.add_argument("port", type=int)
    ap.add_argument("-n", type=int, default=1000)
    args = ap.parse_args()
    times = []
    failures = 0
    for _ in range(args.n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(1.0)
        t0 = time.perf_counter()
        try:
            s.connect((args.address, args.port))
            times.append((time.perf_counter() - t0) * 1e6)
        except OSError:
            failures += 1
        finally:
            s.close()
    print(json.dumps({"us": times, "failures": failures}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
