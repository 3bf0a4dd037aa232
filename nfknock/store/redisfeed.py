"""The Redis change feed, read in a thread: what other gateways did, handed to the loop.

One thread, one connection of its own, blocked in ``XREAD`` on the deployment's
stream (``P:feed``; why a stream: :mod:`nfknock.store.redis`).  Every entry another
gateway wrote is decoded strictly (:func:`nfknock.store.changes.decode`; a bad one
is skipped and counted) and queued; a byte on a socket pair wakes the daemon's
poll loop, which applies the changes between packets -- so the packet path never
waits for the network, exactly like claim outcomes (:mod:`nfknock.store.worker`).

Connection lost: a ``Link(up=False)`` change (status, log), then reconnect attempts
with back-off (0.25 s doubling to 5 s).  Reconnected: ``Link(up=True)``, the claim
path is told to try at once, and reading goes on from the last entry seen -- the
stream kept what happened meanwhile.  Every entry carries its number (``q``, one
``INCR`` in the script that writes it): if the next entry read is not the next
number, entries were trimmed before this gateway read them (or Redis lost them),
and everything is reloaded (``Resync``), as when the queue towards the loop
overflows.  A store that came back without our schema (a Redis restarted without
persistence) is reported ``wiped``: the daemon writes back what it knows.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections import deque
from typing import Any

import redis

from nfknock.core import GrantRecord
from nfknock.gate import ClaimRequest
from nfknock.store import StateError
from nfknock.store.changes import Change, FeedError, Link, Resync, decode
from nfknock.store.redis import (
    BACKOFF_FIRST,
    BACKOFF_MAX,
    DOWN,
    SCHEMA,
    RedisStore,
    load_snapshot,
    make_client,
)

BLOCK_MS = 1000
BATCH = 512
MAX_QUEUED = 100_000  # changes waiting for the loop; beyond it: drop them and reload


class RedisFeed:
    kind = "redis"

    def __init__(self, store: RedisStore) -> None:
        self.store = store
        self.origin = store.origin
        self.keys = store.keys
        self._client = make_client(store.state, read_timeout=store.state.timeout + 2.0)
        self._changes: deque[Change] = deque()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._position: str | None = None  # the last entry's id; None: reload everything
        self._seq = 0  # the last entry's number
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="nfknock-feed", daemon=True)
        self.connected = False
        self.since = time.time()
        self.error = ""
        self.entries = 0  # entries of other gateways applied
        self.bad_entries = 0
        self.last_bad = ""
        self.resyncs = 0
        self.reconnects = 0
        self._ever_connected = False
        self._said_down = False

    # --- the loop's side -------------------------------------------------------------

    def fileno(self) -> int:
        return self._wake_r.fileno()

    def drain(self) -> list[Change]:
        with contextlib.suppress(BlockingIOError):
            while self._wake_r.recv(4096):
                pass
        out = []
        while self._changes:
            out.append(self._changes.popleft())
        return out

    def start(self, position: str) -> None:
        """Read on from ``position`` (where the snapshot the daemon restored from
        stood); "" when that load failed: reload everything at the first connect."""
        self._position, self._seq = _split(position)
        self._thread.start()

    def status(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "connected": self.connected,
            "since": round(self.since, 3),
            "error": self.error,
            "position": f"{self._position}/{self._seq}" if self._position else "",
            "entries": self.entries,
            "bad_entries": self.bad_entries,
            "last_bad": self.last_bad,
            "resyncs": self.resyncs,
            "reconnects": self.reconnects,
        }

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(Exception):  # wakes a blocked XREAD (shutdown of its socket)
            self._client.connection_pool.disconnect()
        if self._thread.is_alive():
            self._thread.join(BLOCK_MS / 1000 + 3)
        with contextlib.suppress(Exception):
            self._client.close()
        self._wake_r.close()
        self._wake_w.close()

    # --- the store thread's side (Sharing) ------------------------------------------------

    def claimed(self, request: ClaimRequest) -> None:
        """Nothing to do: the claim script wrote the feed entry with the claim."""

    def used(self, key: bytes, ref: str) -> None:
        self.store.used(key, ref)

    def welcome(self, worker: int, records: list[GrantRecord]) -> None:
        """Workers on Redis all read the stream: nobody asks."""

    def resume(self) -> None:
        self.store.flush()

    # --- the feed thread ----------------------------------------------------------------

    def _push(self, *changes: Change) -> None:
        self._changes.extend(changes)
        if len(self._changes) > MAX_QUEUED:
            self._changes.clear()
            self._position = None  # reload everything: nothing is lost, only late
        with contextlib.suppress(BlockingIOError, OSError):
            self._wake_w.send(b"!")

    def _run(self) -> None:
        backoff = 0.0
        while not self._stop.is_set():
            try:
                if not self.connected:
                    self._connect()
                    backoff = 0.0
                elif self._position is None:
                    self._reload()
                self._read()
            except Exception as exc:  # the thread never dies: anything is "down"
                if self._stop.is_set():
                    return  # close() cut the connection under XREAD
                if isinstance(exc, DOWN):
                    backoff = min(max(BACKOFF_FIRST, backoff * 2), BACKOFF_MAX)
                    self._lost(f"{type(exc).__name__}: {exc}")
                else:  # refused, damaged, foreign (StateError), or a client bug
                    backoff = BACKOFF_MAX
                    known = isinstance(exc, redis.RedisError | StateError)
                    self._lost(str(exc) if known else f"{type(exc).__name__}: {exc}")
                self._stop.wait(backoff)

    def _lost(self, why: str) -> None:
        self.error = f"{self.store.description} unreachable: {why}"
        if self.connected or not self._said_down:  # (also when it never connected)
            self.connected = False
            self._said_down = True
            self.since = time.time()
            self._push(Link(False, self.error))
        with contextlib.suppress(Exception):
            self._client.connection_pool.disconnect()

    def _connect(self) -> None:
        self._client.ping()
        wiped = self._client.get(self.keys.schema) != SCHEMA
        if self._position is None:
            self._reload()
        if self._ever_connected:
            self.reconnects += 1
        self._ever_connected = True
        self._said_down = False
        self.connected = True
        self.since = time.time()
        self.error = ""
        self.store.note_reachable()
        self._push(Link(True, "", wiped))

    def _reload(self) -> None:
        snap, present = load_snapshot(self._client, self.keys, time.time(), self.store.description)
        self._position, self._seq = _split(snap.position)
        self.resyncs += 1
        self._push(Resync(snap, wiped=not present))

    def _read(self) -> None:
        if self._position is None:
            return
        reply: Any = self._client.xread(
            {self.keys.feed: self._position}, count=BATCH, block=BLOCK_MS
        )
        for _stream, entries in reply or []:
            for entry_id, fields in entries:
                number = fields.pop(b"q", b"")
                if not number.isdigit() or len(number) > 18:  # not written by nfknock
                    self._position = entry_id.decode()
                    self._bad("no entry number")
                    continue
                if int(number) != self._seq + 1:
                    # Not the next entry: some were trimmed (or lost) unread.
                    self._position = None
                    return
                self._position, self._seq = entry_id.decode(), int(number)
                self._entry(fields)

    def _entry(self, raw: dict[bytes, bytes]) -> None:
        try:
            fields = {k.decode("ascii"): v.decode("ascii") for k, v in raw.items()}
            origin, changes = decode(fields)
        except (FeedError, UnicodeDecodeError) as exc:
            self._bad(str(exc))
            return
        if origin == self.origin:
            return  # ours: applied when the claim was won
        self.entries += 1
        self._push(*changes)

    def _bad(self, why: str) -> None:
        self.bad_entries += 1
        self.last_bad = f"entry {self._position}: {why}"


def _split(position: str) -> tuple[str | None, int]:
    """A feed position "stream-id/number" ("" or damaged: none, reload first)."""
    entry, _, number = position.partition("/")
    if not entry or not number.isdigit():
        return None, 0
    return entry, int(number)
