"""Run inside a namespace: connect once and report open / reset / timeout as JSON.

``--hold S`` keeps an open connection for S seconds, then checks it still echoes.
"""

from __future__ import annotations

import argparse
import json
import socket
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("address")
    ap.add_argument("port", type=int)
    ap.add_argument("--timeout", type=float, default=2.0)
    ap.add_argument("--hold", type=float, default=0.0)
    ap.add_argument("--source", default=None, help="bind to this local address first")
    args = ap.parse_args()
    fam = socket.AF_INET6 if ":" in args.address else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(args.timeout)
    if args.source:
        s.bind((args.source, 0))
    out: dict[str, object] = {}
    try:
        s.connect((args.address, args.port))
        out["result"] = "open"
        out["greeting"] = s.recv(64).decode(errors="replace").strip()
        if args.hold:
            time.sleep(args.hold)
            s.sendall(b"still-here\n")
            out["echo"] = s.recv(64).decode(errors="replace").strip()
    except ConnectionRefusedError:
        out["result"] = "reset"
    except TimeoutError:
        out["result"] = "timeout"
    except OSError as exc:
        out["result"] = f"error: {exc}"
    finally:
        s.close()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
