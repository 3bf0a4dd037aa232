"""The local change feed among the worker processes of one host.

Workers on the embedded store claim in the same SQLite file (so a claim is decided
once, for all of them); this feed keeps each worker's in-memory copy current:
every won claim (the spent counter or SPA digest, and the grant it backs) and every
connection spent on a grant is sent at once, as one datagram, to every sibling.

Why Unix datagram sockets: one ``sendto`` per sibling and change, no connection to
keep, no server, message boundaries for free, and the socket itself is the wake-up
fd the daemon's loop polls (reading it is a local, non-blocking ``recv``: nothing
here waits for a network).  The sockets live in a directory only root can enter
(``[control] socket`` + ``.workers``, mode 0700), because a ``Granted`` message can
open a door: nothing outside that directory can send one, and every message is
still decoded strictly.

A worker that (re)starts says ``Hello``; each sibling answers with the live grants
it knows, so a restarted worker honours an SPA grant made on another one.  Lost
messages (a full socket buffer, a sibling being restarted) cost little: a claim is
still decided by the store (a counter spent elsewhere is LOST there), a grant not
heard of is not honoured on that worker (fail closed), and a connection not heard
of may be spent once more there -- counted in ``status``.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from pathlib import Path

from nfknock.core import GrantRecord
from nfknock.gate import ClaimRequest
from nfknock.store.changes import (
    Change,
    FeedError,
    claim_fields,
    decode,
    hello_fields,
    record_fields,
    used_fields,
)

MAX_DATAGRAM = 4096
DRAIN_MAX = 4096  # datagrams read per call (the loop comes back for the rest)


def feed_path(directory: Path, worker: int) -> Path:
    return directory / f"feed-{worker}.sock"


class LocalFeed:
    kind = "local"

    def __init__(self, directory: Path, worker: int, workers: int, origin: str) -> None:
        self.worker = worker
        self.origin = origin
        self.path = feed_path(directory, worker)
        self.peers = {j: feed_path(directory, j) for j in range(workers) if j != worker}
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # a stale socket of this worker's previous life
        self._sock = socket.socket(
            socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
        )
        old = os.umask(0o177)
        try:
            self._sock.bind(str(self.path))
        finally:
            os.umask(old)
        self._out = socket.socket(
            socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
        )
        self.sent = 0
        self.send_failures = 0
        self.received = 0
        self.bad = 0
        self.last_bad = ""

    def fileno(self) -> int:
        return self._sock.fileno()

    def drain(self) -> list[Change]:
        out: list[Change] = []
        for _ in range(DRAIN_MAX):
            try:
                data = self._sock.recv(MAX_DATAGRAM + 1)
            except (BlockingIOError, InterruptedError):
                break
            try:
                if len(data) > MAX_DATAGRAM:
                    raise FeedError(f"datagram of {len(data)} bytes")
                fields = json.loads(data)
                if not isinstance(fields, dict):
                    raise FeedError("not a JSON object")
                origin, changes = decode(fields)
            except (FeedError, ValueError) as exc:
                self.bad += 1
                self.last_bad = str(exc)
                continue
            if origin != self.origin:
                self.received += 1
                out += changes
        return out

    def _send(self, fields: dict[str, str], to: list[int] | None = None) -> None:
        data = json.dumps(fields, separators=(",", ":")).encode()
        for j in self.peers if to is None else to:
            try:
                self._out.sendto(data, str(self.peers[j]))
                self.sent += 1
            except OSError:  # not running (yet), or its buffer is full
                self.send_failures += 1

    def start(self, position: str) -> None:
        self._send(hello_fields(self.worker, self.origin))

    def claimed(self, request: ClaimRequest) -> None:
        self._send(claim_fields(request, self.origin))

    def used(self, key: bytes, ref: str) -> None:
        self._send(used_fields(key, ref, self.origin))

    def welcome(self, worker: int, records: list[GrantRecord]) -> None:
        if worker in self.peers:
            for record in records:
                self._send(record_fields(record, self.origin), [worker])

    def resume(self) -> None:
        """Nothing waits: a datagram that could not be sent is gone."""

    def status(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "connected": True,
            "sent": self.sent,
            "send_failures": self.send_failures,
            "received": self.received,
            "bad_entries": self.bad,
            "last_bad": self.last_bad,
        }

    def close(self) -> None:
        self._sock.close()
        self._out.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
