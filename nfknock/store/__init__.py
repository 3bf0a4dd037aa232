"""The state store: everything that must be exactly-once, durable or shared.

One small interface (:class:`StateStore`), used from one thread (the adapter's store
thread, :mod:`nfknock.store.worker`), never from the packet path:

* :meth:`~StateStore.load` -- the validated :class:`Snapshot` (counter windows, the
  replay horizon, SPA digests, and the grants of a clean shutdown).  Anything
  unexpected in the stored data is a :class:`StateError` naming the file and the
  problem: no counter may be lost silently.
* :meth:`~StateStore.begin` -- durably mark the state "in use" before the first
  verdict, so that after a crash the grants (whose spent connections are not
  recorded one by one) are not restored.
* :meth:`~StateStore.claim` -- record one claim atomically under the window rule of
  :mod:`nfknock.counters` (or a digest never seen), together with the grant it backs:
  WON, LOST (already spent: by another process or gateway) or FAILED (could not record:
  nothing opens).
* :meth:`~StateStore.finish` -- an orderly exit: the live grants and "clean".

Backends: :mod:`nfknock.store.embedded` (SQLite in one file, the default: one host,
several processes) and :mod:`nfknock.store.redis` (Redis/Valkey, shared by several
gateways).  What others did reaches this process's in-memory copy through a change
feed (:mod:`nfknock.store.changes`): the Redis stream, or a local feed among worker
processes (:mod:`nfknock.store.localfeed`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from nfknock.core import GrantRecord, WindowList
from nfknock.gate import ClaimOutcome, ClaimRequest


class StateError(Exception):
    """The stored state cannot be used (corrupt, unreadable, in use, wrong format)."""


@dataclass
class Snapshot:
    windows: WindowList = field(default_factory=list)
    high_step: int = -1
    pruned_through: int = -1
    digests: list[tuple[bytes, float]] = field(default_factory=list)
    grants: list[GrantRecord] = field(default_factory=list)
    clean: bool = True  # the previous run ended in an orderly way (or there was none)
    fresh: bool = False  # no state existed
    position: str = ""  # a shared store: where its change feed stood at this snapshot


class StateStore(Protocol):
    description: str

    def load(self, wall: float) -> Snapshot: ...

    def begin(self) -> None: ...

    def claim(self, request: ClaimRequest, wall: float) -> ClaimOutcome: ...

    def save_horizon(self, high_step: int, pruned_through: int) -> None: ...

    def finish(self, grants: list[GrantRecord], high_step: int, pruned_through: int) -> None: ...

    def close(self) -> None: ...
