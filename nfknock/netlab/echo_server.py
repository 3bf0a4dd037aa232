"""A tiny TCP service for the kernel tests: greets, then echoes lines until closed.

Runs inside the server namespace; dual-stack; bounded: exits after ``--lifetime``.
"""

from __future__ import annotations

import argparse
import socket
import threading
import time


def serve(conn: socket.socket) -> None:
    with conn:
        conn.sendall(b"nfknock-ok\n")
        conn.settimeout(120)
        try:
            while data := conn.recv(4096):
                conn.sendall(data)
        except OSError:
            pass


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=22)
    ap.add_argument("--lifetime", type=float, default=1800)
    args = ap.parse_args()
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", args.port))
    s.listen(1024)
    s.settimeout(1.0)
    deadline = time.monotonic() + args.lifetime
    print("listening", flush=True)
    while time.monotonic() < deadline:
        try:
            conn, _ = s.accept()
        except TimeoutError:
            continue
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    main()
