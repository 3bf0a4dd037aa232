"""ISN knocks: each knock carries 32 bits of its sequence's HMAC stream.  Sans-IO.

Seed 002 (SIG^2 KnockD) puts a random value in the initial sequence number of each
knock SYN.  Here the value is derived, like the ports: knock ``i`` of the sequence
of (step, counter) must carry ``ISN_i`` (sequence.py step 8), so a knock is a
*pair* (port, ISN) of 15 + 32 bits and 8 knocks carry 376 bits.  Only raw-socket
clients can choose an ISN (``nfknock-client knock --raw``), so it is a per-user
option (``isn = true``).

Theory of operation
-------------------
The knock engine (:mod:`nfknock.engine`) keeps these users' counters and claims,
but not their candidates: a port-only match would let a knock with the right port
and any ISN advance them.  This tracker holds their candidates instead, indexed by
the exact pair ``port << 32 | isn`` -> (candidate, position), for the live steps and
the one staged next (the engine tells it which counters of which steps, through
:meth:`IsnTracker.sync` / :meth:`IsnTracker.keep_steps`).

Every knock is looked up once (one dictionary probe: the engine only calls it when
some user has ``isn = true``).  A pair matches a position of a candidate, or
nothing:

    ==================================  ==========================================
    the pair matches (live step)        the position is received (a source record
                                        is made on the first match); all L
                                        received within ``sequence_timeout`` of
                                        the first: completed -> the engine claims
                                        the counter and opens, as for any knock
    the position was received already   duplicate (a retransmitted SYN): nothing
    no pair matches, source tracked     a stray: past ``stray_budget`` its
                                        progress is dropped and it is ignored for
                                        ``sequence_timeout``
    no pair matches, source unknown     nothing at all (no state: a flood of
                                        random pairs costs a lookup each)
    ==================================  ==========================================

A knock with the right port and a wrong ISN matches nothing: it is a stray here,
whatever the port.  Positions may arrive in any order: a pair is 47 bits of
evidence for exactly one position of one candidate, so the reorder window that
keeps port-only matching unambiguous is not needed.

Bounds: sources (``max_sources``, least recently knocked evicted), progress per
source (``max_progress_per_source``, least advanced evicted); candidates are the
engine's wanted counters of the ISN users over ``2 x skew + 2`` steps, ``L`` pairs
each -- meant for a handful of users (each costs about ``L x 40`` pairs).
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections import OrderedDict
from dataclasses import dataclass

from nfknock.config import User
from nfknock.events import Event, EventKind
from nfknock.grants import split_key
from nfknock.sequence import SequenceParams, isns_from_block, ports_from_block


@dataclass(frozen=True, slots=True)
class IsnCandidate:
    uidx: int  # the user's index in the engine's list
    step: int
    counter: int
    pairs: tuple[int, ...]  # port << 32 | isn, by position


@dataclass(slots=True)
class _Progress:
    started: float
    mask: int = 0


class _Source:
    __slots__ = ("ignored_until", "last", "progress", "strays")

    def __init__(self, mono: float) -> None:
        self.last = mono
        self.strays = 0
        self.ignored_until = -1.0
        self.progress: dict[int, _Progress] = {}


def blocks(secret: bytes, step: int, counters: range, realm: bytes) -> list[bytes]:
    """H_c for each counter (sequence.py steps 2-3), one HMAC chain for all."""
    message = struct.pack(">Q", step) + (b"\x00" + realm if realm else b"")
    block = hmac.digest(secret, message, hashlib.sha512)
    out = []
    for c in range(counters.stop):
        if c >= counters.start:
            out.append(block)
        block = hmac.digest(secret, block, hashlib.sha512)
    return out


class IsnTracker:
    """See the module docstring.  One caller at a time (the engine)."""

    def __init__(
        self,
        params: SequenceParams,
        *,
        timeout: float,
        stray_budget: int,
        max_sources: int,
        max_progress: int,
    ) -> None:
        self.params = params
        self.timeout = timeout
        self.stray_budget = stray_budget
        self.max_sources = max_sources
        self.max_progress = max_progress
        self.pairs: dict[int, list[tuple[int, int]]] = {}
        self._cands: dict[int, IsnCandidate] = {}
        self._groups: dict[tuple[int, int], dict[int, int]] = {}  # (uidx, step) -> counter -> id
        self._next_id = 0
        self.sources: OrderedDict[bytes, _Source] = OrderedDict()

    # --- candidates (the engine decides which) -----------------------------------

    def sync(self, uidx: int, user: User, step: int, counters: range) -> None:
        """Make (user, step) hold exactly the candidates of ``counters``."""
        group = self._groups.setdefault((uidx, step), {})
        for c in [c for c in group if c not in counters]:
            self._remove(group.pop(c))
        missing = [c for c in counters if c not in group]
        if missing:
            span = range(missing[0], missing[-1] + 1)
            for c, block in zip(
                span, blocks(user.secret, step, span, self.params.realm), strict=True
            ):
                if c in group:
                    continue
                ports = ports_from_block(user.secret, block, self.params)
                isns = isns_from_block(user.secret, block, len(ports))
                pairs = tuple(p << 32 | i for p, i in zip(ports, isns, strict=True))
                group[c] = self._add(IsnCandidate(uidx, step, c, pairs))
        if not group:
            del self._groups[(uidx, step)]

    def keep_steps(self, lo: int, hi: int) -> None:
        """Drop the candidates of every step outside ``lo..hi``."""
        for uidx, step in [k for k in self._groups if not lo <= k[1] <= hi]:
            for cid in self._groups.pop((uidx, step)).values():
                self._remove(cid)

    def _add(self, cand: IsnCandidate) -> int:
        cid = self._next_id
        self._next_id += 1
        self._cands[cid] = cand
        for pos, pair in enumerate(cand.pairs):
            self.pairs.setdefault(pair, []).append((cid, pos))
        return cid

    def _remove(self, cid: int) -> None:
        cand = self._cands.pop(cid)
        for pair in cand.pairs:
            hits = self.pairs.get(pair)
            if hits is not None:
                hits[:] = [h for h in hits if h[0] != cid]
                if not hits:
                    del self.pairs[pair]

    def __len__(self) -> int:
        return len(self._cands)

    # --- the packet path ------------------------------------------------------------

    def knock(
        self, key: bytes, port: int, isn: int, lo: int, hi: int, mono: float
    ) -> tuple[list[IsnCandidate], list[Event]]:
        """One knock: the candidates it completes (for the engine to claim) and the
        events.  Only candidates of the live steps ``lo..hi`` count."""
        hits = self.pairs.get(port << 32 | isn)
        source = self.sources.get(key)
        if source is not None and source.ignored_until > mono:
            return [], []
        matched = (
            [(cid, pos) for cid, pos in hits if lo <= self._cands[cid].step <= hi] if hits else []
        )
        if not matched:
            if source is not None:
                return [], self._stray(key, source, port, mono)
            return [], []
        if source is None:
            source = self._track(key, mono)
        self.sources.move_to_end(key)
        source.last = mono
        done: list[IsnCandidate] = []
        events: list[Event] = []
        for cid, pos in matched:
            cand = self._cands[cid]
            prog = source.progress.get(cid)
            if prog is None or mono - prog.started > self.timeout:
                prog = self._begin(source, cid, mono)
            if (prog.mask >> pos) & 1:
                continue  # a retransmitted SYN
            prog.mask |= 1 << pos
            received = prog.mask.bit_count()
            if received == len(cand.pairs):
                del source.progress[cid]
                source.strays = 0
                done.append(cand)
            else:
                events.append(
                    Event(
                        EventKind.KNOCK_PROGRESS,
                        *split_key(key),
                        None,
                        port,
                        f"{received}/{len(cand.pairs)} (isn)",
                        "knock_progress",
                    )
                )
        return done, events

    def _track(self, key: bytes, mono: float) -> _Source:
        source = self.sources[key] = _Source(mono)
        while len(self.sources) > self.max_sources:
            self.sources.popitem(last=False)
        return source

    def _begin(self, source: _Source, cid: int, mono: float) -> _Progress:
        progress = source.progress
        if cid not in progress and len(progress) >= self.max_progress:
            victim = min(
                progress, key=lambda c: (progress[c].mask.bit_count(), progress[c].started)
            )
            del progress[victim]
        prog = progress[cid] = _Progress(mono)
        return prog

    def _stray(self, key: bytes, source: _Source, port: int, mono: float) -> list[Event]:
        source.strays += 1
        if source.strays <= self.stray_budget:
            return []
        had = bool(source.progress)
        source.progress.clear()
        source.strays = 0
        source.ignored_until = mono + self.timeout
        if not had:
            return []
        return [
            Event(
                EventKind.PROGRESS_RESET,
                *split_key(key),
                None,
                port,
                "stray budget spent (isn)",
                "stray_budget_spent",
            )
        ]

    # --- time ---------------------------------------------------------------------------

    def expire(self, mono: float) -> None:
        """Forget sources idle for longer than the timeout (LRU order)."""
        sources = self.sources
        while sources:
            key = next(iter(sources))
            source = sources[key]
            if mono - source.last <= self.timeout or source.ignored_until > mono:
                break
            del sources[key]

    def tracked(self) -> int:
        return len(self.sources)
