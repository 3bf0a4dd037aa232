"""Runs in the client namespace: knock-and-connect timings, one run per "go" line.

The benchmark writes a line to stdin for each run (after resetting the server
side where needed) and reads one JSON line back:
{"ok": bool, "ms": float}  -- ms from the first knock packet to an established
connection to the protected port.  Systems:

* ``nfknock``: the client library in-process (knocks via connect(), then connect;
  a reset means "behind": advance the counter and knock again, as nfknock-client);
  ``--doors LO-HI``: connect to the forwarded door the sequence opens, not the
  protected port; ``--isn``: raw knocks carrying their ISNs (root), ``--length``
  knocks;
* ``knockd``: knockd's own ``knock`` client with the same 32 ports, then connect;
* ``fwknop``: ``fwknop`` (SPA, HMAC), then connect -- against fwknopd or nfknock;
* ``nfknock-spa``: nfknock-client's SPA packet built and sent in-process (the
  same encoder and UDP send as ``nfknock-client spa``), then connect.

Connecting: a new non-blocking connect() every 2 ms, all kept open, until one is
established or ``--timeout``: a SYN the filter drops costs nothing, and the first
SYN the filter lets through completes however long its verdict took.
"""

from __future__ import annotations

import argparse
import base64
import errno
import json
import resource
import select
import socket
import subprocess
import sys
import time

from nfknock.schemes import V1, make_scheme, step_for
from nfknock.sequence import door_port, isns, parse_base32
from nfknock.spa.encode import ClientKeys, encode_access
from nfknock_client.knock import send_connect_knocks, send_raw_knocks
from nfknock_client.spa import send_udp

ATTEMPT_EVERY = 0.002


def connect_until(address: str, port: int, deadline: float) -> str:
    """ "open", "reset" (a TCP reset: behind) or "timeout"."""
    pending: list[socket.socket] = []
    poller = select.poll()
    by_fd: dict[int, socket.socket] = {}
    try:
        while time.perf_counter() < deadline:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            s.connect_ex((address, port))
            pending.append(s)
            by_fd[s.fileno()] = s
            poller.register(s, select.POLLOUT)
            for fd, _ev in poller.poll(ATTEMPT_EVERY * 1000):
                err = by_fd[fd].getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err == 0:
                    return "open"
                if err == errno.ECONNREFUSED:
                    return "reset"
                poller.unregister(fd)
        return "timeout"
    finally:
        for s in pending:
            s.close()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("system", choices=["nfknock", "knockd", "fwknop", "nfknock-spa"])
    ap.add_argument("address")
    ap.add_argument("--port", type=int, default=22)
    ap.add_argument("--secret-base32", default="")
    ap.add_argument("--static-ports", default="", help="knockd: P,P,...")
    ap.add_argument("--fwknop-args", default="", help="fwknop: its command line")
    ap.add_argument("--spa-key-base64", default="", help="nfknock-spa: KEY_BASE64")
    ap.add_argument("--spa-hmac-key-base64", default="", help="nfknock-spa: HMAC_KEY_BASE64")
    ap.add_argument("--spa-port", type=int, default=62201)
    ap.add_argument("--timeout", type=float, default=3.0)
    ap.add_argument("--pace-ms", type=float, default=0.2, help="nfknock-client's default")
    ap.add_argument("--doors", default="", help="nfknock: the forwarded door range LO-HI")
    ap.add_argument("--isn", action="store_true", help="nfknock: raw knocks with their ISNs")
    ap.add_argument("--length", type=int, default=32, help="nfknock: knocks per sequence")
    args = ap.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    scheme = make_scheme("v1", exclude=frozenset({args.port}), length=args.length)
    assert isinstance(scheme, V1)
    doors = tuple(map(int, args.doors.split("-"))) if args.doors else None
    secret = parse_base32(args.secret_base32) if args.secret_base32 else b""
    spa_keys = ClientKeys(
        base64.b64decode(args.spa_key_base64), base64.b64decode(args.spa_hmac_key_base64)
    )
    counters: dict[int, int] = {}
    for _line in sys.stdin:
        # The door must be closed before the run, or the run proves nothing.
        if connect_until(args.address, args.port, time.perf_counter() + 0.05) == "open":
            print(json.dumps({"ok": False, "ms": 0.0, "result": "already-open"}), flush=True)
            continue
        t0 = time.perf_counter()
        deadline = t0 + args.timeout
        if args.system == "nfknock":
            result = "reset"
            for _ in range(8):  # the client's resync bound
                step = step_for(scheme, time.time())
                counter = counters.get(step, 0)
                ports = scheme.derive(secret, step, counter)
                pace = args.pace_ms / 1000
                if args.isn:
                    values = isns(secret, step, counter, scheme.params)
                    send_raw_knocks(socket.AF_INET, args.address, ports, pace, values)
                else:
                    send_connect_knocks(socket.AF_INET, args.address, ports, pace)
                counters[step] = counter + 1
                port = args.port
                if doors is not None:
                    port = door_port(secret, step, counter, scheme.params, doors[0], doors[1])
                result = connect_until(args.address, port, deadline)
                if result != "reset":
                    break
        elif args.system == "nfknock-spa":
            payload = encode_access(spa_keys, username="bench", timestamp=int(time.time()))
            send_udp(socket.AF_INET, args.address, args.spa_port, payload)
            result = connect_until(args.address, args.port, deadline)
        elif args.system == "knockd":
            subprocess.run(["knock", args.address, *args.static_ports.split(",")], check=True)
            result = connect_until(args.address, args.port, deadline)
        else:
            subprocess.run(args.fwknop_args.split(), check=True, capture_output=True)
            result = connect_until(args.address, args.port, deadline)
        ms = (time.perf_counter() - t0) * 1000
        print(
            json.dumps({"ok": result == "open", "ms": round(ms, 3), "result": result}), flush=True
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
