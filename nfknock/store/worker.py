"""The store thread: claims are recorded off the packet path.

The daemon's loop hands claim requests to :meth:`StoreWorker.submit` (never blocks)
and polls :meth:`StoreWorker.fileno`; when it is readable, :meth:`StoreWorker.drain`
returns the outcomes to feed into ``Core.resolve``.  One thread owns the store
connection; other store calls (load, begin, finish) run on it through
:meth:`StoreWorker.call`, which waits for them (start-up and shut-down only).

If the store hangs, outcomes simply do not come: pending grants stay pending and
nothing opens (fail closed); the daemon reports the age of the oldest pending claim.
"""

from __future__ import annotations

import bisect
import contextlib
import queue
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from nfknock.gate import ClaimOutcome, ClaimRequest, Outcome
from nfknock.store import StateStore

T = TypeVar("T")
_STOP = object()
# Upper bounds (seconds) of the claim-duration histogram (metrics); one more bucket
# counts the rest.
CLAIM_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class StoreWorker:
    def __init__(
        self,
        store: StateStore,
        wall: Callable[[], float] = time.time,
        on_won: Callable[[ClaimRequest], None] | None = None,
    ) -> None:
        self.store = store
        self._wall = wall
        # Told of every won claim, on this thread, before its outcome is handed on
        # (the local feed among workers sends it to the siblings here).
        self._on_won = on_won
        self._requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._outcomes: deque[ClaimOutcome] = deque()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.claims = 0
        self.failures = 0
        self.last_error = ""
        self.last_error_at = 0.0
        self.last_claim_seconds = 0.0
        self.busy_since = 0.0  # monotonic start of the claim being recorded, 0 if idle
        # Claim durations: count per CLAIM_BUCKETS bucket (not cumulative) and sum.
        self.claim_buckets = [0] * (len(CLAIM_BUCKETS) + 1)
        self.claim_seconds_sum = 0.0
        self._thread = threading.Thread(target=self._run, name="nfknock-store", daemon=True)
        self._thread.start()

    def fileno(self) -> int:
        return self._wake_r.fileno()

    def submit(self, requests: list[ClaimRequest]) -> None:
        for request in requests:
            self._requests.put(request)

    def drain(self) -> list[ClaimOutcome]:
        with contextlib.suppress(BlockingIOError):
            while self._wake_r.recv(4096):
                pass
        out = []
        while self._outcomes:
            out.append(self._outcomes.popleft())
        return out

    def call(self, fn: Callable[[StateStore], T], timeout: float = 30.0) -> T:
        """Run ``fn(store)`` on the store thread and wait for it."""
        fut: Future[T] = Future()
        self._requests.put((fn, fut))
        return fut.result(timeout)

    def submit_call(self, fn: Callable[[StateStore], object]) -> None:
        """Run ``fn(store)`` on the store thread without waiting; a failure is kept
        in ``last_error`` (shown by status)."""
        self._requests.put((fn, None))

    def close(self) -> None:
        self._requests.put(_STOP)
        self._thread.join(10)
        self._wake_r.close()
        self._wake_w.close()

    def _run(self) -> None:
        while True:
            item = self._requests.get()
            if item is _STOP:
                return
            if isinstance(item, ClaimRequest):
                self.busy_since = time.monotonic()
                try:
                    outcome = self.store.claim(item, self._wall())
                except Exception as exc:  # a store bug must not lose the outcome
                    outcome = ClaimOutcome(item.id, Outcome.FAILED, f"{type(exc).__name__}: {exc}")
                self.last_claim_seconds = took = time.monotonic() - self.busy_since
                self.claim_buckets[bisect.bisect_left(CLAIM_BUCKETS, took)] += 1
                self.claim_seconds_sum += took
                self.busy_since = 0.0
                self.claims += 1
                if outcome.outcome is Outcome.FAILED:
                    self.failures += 1
                    self.last_error = outcome.detail
                    self.last_error_at = self._wall()
                elif outcome.outcome is Outcome.WON:
                    self.last_error = ""
                    if self._on_won is not None:
                        try:
                            self._on_won(item)
                        except Exception as exc:  # sharing is best effort; the claim stands
                            self.last_error = f"sharing: {type(exc).__name__}: {exc}"
                self._outcomes.append(outcome)
                with contextlib.suppress(BlockingIOError):
                    self._wake_w.send(b"!")
                continue
            fn, fut = item
            try:
                result = fn(self.store)
            except BaseException as exc:
                if fut is None:
                    self.last_error = f"{type(exc).__name__}: {exc}"
                    self.last_error_at = self._wall()
                else:
                    fut.set_exception(exc)
                continue
            if fut is not None:
                fut.set_result(result)
