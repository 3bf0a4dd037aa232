"""Run inside a namespace: send the given knock ports, one SYN each."""

from __future__ import annotations

import argparse
import errno
import socket
import time

from nfknock_client.knock import send_connect_knocks, send_raw_knocks


def send_from(source: str, address: str, ports: list[int], pace: float) -> None:
    """Like the client's sender, bound to one local address (another source).
    ``address`` may be several, comma-separated: each knock goes to each in turn
    (two gateways completing the same sequence at the same instant)."""
    addresses = address.split(",")
    fam = socket.AF_INET6 if ":" in address else socket.AF_INET
    for port in ports:
        for one in addresses:
            with socket.socket(fam, socket.SOCK_STREAM) as s:
                s.bind((source, 0))
                s.setblocking(False)
                err = s.connect_ex((one, port))
                if err not in (0, errno.EINPROGRESS):
                    raise OSError(err, "knock failed")
        time.sleep(pace)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("address")
    ap.add_argument("ports", type=int, nargs="+")
    ap.add_argument("--pace-ms", type=float, default=0.5)
    ap.add_argument("--raw", action="store_true")
    ap.add_argument("--source", default=None)
    ap.add_argument("--isns", default=None, help="with --raw: each knock's ISN, comma-separated")
    args = ap.parse_args()
    pace = args.pace_ms / 1000
    if args.source:
        send_from(args.source, args.address, args.ports, pace)
        return
    fam = socket.AF_INET6 if ":" in args.address else socket.AF_INET
    if args.isns:
        isns = [int(x) for x in args.isns.split(",")]
        send_raw_knocks(fam, args.address, args.ports, pace, isns)
        return
    send = send_raw_knocks if args.raw else send_connect_knocks
    send(fam, args.address, args.ports, pace)


if __name__ == "__main__":
    main()
