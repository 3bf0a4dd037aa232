"""The grant table: who may open which protected ports, until when.  Sans-IO.

A *grant* lets one key -- a packed (source, destination) pair -- open the ports of one
user for a number of new connections until a monotonic deadline.  A grant is born
**pending**: it was earned (a knock sequence completed, an SPA packet verified), but
the claim that makes it exactly-once (the counter, the SPA digest) is not yet durably
recorded.  A pending grant never ACCEPTs: a SYN that finds only a pending grant is
HELD by the adapter until the claim resolves (then decided again), or dropped.  The
claim's outcome confirms the grant, or voids it (lost to another process or gateway:
the source is marked behind; the store failed: nothing opens).

*Behind marks* say that a source completed a stale sequence: its next SYNs to a
protected port get a TCP reset (REJECT), so an honest client that is behind resyncs.

*Prefix grants* (:mod:`nfknock.prefixes`): a grant whose ``prefix`` is set is keyed
by its masked source and covers every source of that prefix; a behind mark likewise.
The table keeps, per address size, the prefix lengths in use (a superset, shrunk at
:meth:`GrantTable.expire`); a SYN that finds nothing under its own address looks up
its masked address at each of them, narrowest first.  Without prefix grants the
lookup is the single exact one it always was.

Decisions on a protected port, in order:

    =================================================  =========
    a confirmed, unexpired grant covers the port        ACCEPT (one connection spent)
    a pending grant covers it                           HOLD
    the source is marked behind                         REJECT
    otherwise                                           DROP
    =================================================  =========

Bounds: ``max_grants`` keys (least recently granted evicted first, with an event),
behind marks as many as ``max_behind``.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from nfknock.events import Event, EventKind, Verdict
from nfknock.prefixes import key_mask
from nfknock.prefixes import text as prefix_text

_NEVER = -math.inf  # a behind mark's deadline when there is none

# Grants one key may hold at once (several sessions of one client, several users
# behind one address); the oldest is dropped beyond it.
MAX_GRANTS_PER_KEY = 16


@dataclass(slots=True)
class Grant:
    id: int  # unique; also the id of the claim that backs it
    user: str
    ports: frozenset[int]
    remaining: int
    expires: float  # monotonic
    confirmed: bool = False
    method: str = "knock"
    # The grant's name in shared state (another gateway or worker knows it by it);
    # "" when nothing is shared.
    ref: str = ""
    # None: the exact source address; else the leading bits of it the grant covers
    # (its key's source is masked to them).
    prefix: int | None = None


@dataclass(slots=True)
class GrantTable:
    max_grants: int = 65536
    max_behind: int = 65536
    _grants: OrderedDict[bytes, list[Grant]] = field(default_factory=OrderedDict)
    _behind: OrderedDict[bytes, float] = field(default_factory=OrderedDict)
    # key size (8, 32) -> the prefix lengths of grants and behind marks, longest first,
    # each with its key mask (source bits kept, destination kept) and mark suffix
    _wide: dict[int, tuple[tuple[int, int, bytes], ...]] = field(default_factory=dict)

    # --- the packet path ---------------------------------------------------------

    def decide(self, key: bytes, port: int, mono: float) -> tuple[Verdict, Grant | None]:
        """ACCEPT (and spend a connection), HOLD, REJECT or DROP for a SYN of ``key``
        to the protected ``port``; the grant involved, if any.  The oldest usable
        grant is spent first."""
        grants = self._grants.get(key)
        held: Grant | None = None
        if grants:
            spent, held = self._spend(key, grants, port, mono, None, None)
            if spent is not None:
                return Verdict.ACCEPT, spent
        if self._wide:
            return self._decide_wide(key, port, mono, held)
        if held is not None:
            return Verdict.HOLD, held
        until = self._behind.get(key)
        if until is not None and until > mono:
            return Verdict.REJECT, None
        return Verdict.DROP, None

    def _spend(
        self,
        key: bytes,
        grants: list[Grant],
        port: int,
        mono: float,
        held: Grant | None,
        longest: int | None,
    ) -> tuple[Grant | None, Grant | None]:
        """Spend a connection of the oldest confirmed grant under ``key`` that covers
        ``port`` now (with ``longest``: only prefix grants of at most that length):
        (that grant, or None; the first unconfirmed grant that would do, kept in
        ``held`` -- what the SYN waits for when nothing else opens)."""
        for grant in grants:
            if longest is not None and (grant.prefix is None or grant.prefix > longest):
                continue
            if port not in grant.ports or grant.expires <= mono:
                continue
            if not grant.confirmed:
                held = held or grant
                continue
            grant.remaining -= 1
            if grant.remaining <= 0:
                self._remove(key, grant)
            return grant, held
        return None, held

    def _decide_wide(
        self, key: bytes, port: int, mono: float, held: Grant | None
    ) -> tuple[Verdict, Grant | None]:
        """:meth:`decide` past the exact key: the prefix grants and marks covering it,
        in one pass over the lengths in use.  A grant of prefix p lies under the key
        masked to p; found under the key masked to ``length`` it covers the source
        iff p <= length (an exact grant, or a narrower one, that shares the masked
        key covers other addresses)."""
        n = len(key)
        behind = self._behind
        until = behind.get(key, _NEVER)
        for length, mask, mark in self._wide.get(n, ()):
            wkey = (int.from_bytes(key, "big") & mask).to_bytes(n, "big")
            until = max(until, behind.get(wkey + mark, _NEVER))
            grants = self._grants.get(wkey)
            if not grants:
                continue
            spent, held = self._spend(wkey, grants, port, mono, held, length)
            if spent is not None:
                return Verdict.ACCEPT, spent
        if held is not None:
            return Verdict.HOLD, held
        if until > mono:
            return Verdict.REJECT, None
        return Verdict.DROP, None

    # --- earning, confirming, voiding ------------------------------------------

    def add(self, key: bytes, grant: Grant) -> list[Event]:
        """Add ``grant`` under ``key`` (its source masked to ``grant.prefix``)."""
        if grant.prefix is not None:
            self._use_length(len(key) // 2, grant.prefix)
        grants = self._grants.setdefault(key, [])
        grants.append(grant)
        self._grants.move_to_end(key)
        evicted: list[tuple[bytes, Grant]] = []
        if len(grants) > MAX_GRANTS_PER_KEY:
            evicted.append((key, grants.pop(0)))
        while len(self._grants) > self.max_grants:
            old_key, old = self._grants.popitem(last=False)
            evicted += [(old_key, g) for g in old]
        events = []
        for old_key, old_grant in evicted:
            src, dst = split_key(old_key)
            events.append(
                Event(
                    EventKind.GRANT_REVOKED,
                    src,
                    dst,
                    old_grant.user,
                    None,
                    "grant table full",
                    "grant_table_full",
                )
            )
        return events

    def find(self, key: bytes, grant_id: int) -> Grant | None:
        for grant in self._grants.get(key, ()):
            if grant.id == grant_id:
                return grant
        return None

    def find_ref(self, key: bytes, ref: str) -> Grant | None:
        for grant in self._grants.get(key, ()):
            if grant.ref == ref:
                return grant
        return None

    def spend(self, key: bytes, grant: Grant) -> None:
        """One connection of ``grant`` was used elsewhere (another gateway or worker)."""
        grant.remaining -= 1
        if grant.remaining <= 0:
            self._remove(key, grant)

    def confirm(self, key: bytes, grant_id: int) -> Grant | None:
        grant = self.find(key, grant_id)
        if grant is not None:
            grant.confirmed = True
        return grant

    def void(self, key: bytes, grant_id: int) -> Grant | None:
        grant = self.find(key, grant_id)
        if grant is not None:
            self._remove(key, grant)
        return grant

    def mark_behind(self, key: bytes, until: float, prefix: int | None = None) -> None:
        """Mark ``key`` (its source masked to ``prefix``, if given) behind."""
        if prefix is not None:
            self._use_length(len(key) // 2, prefix)
        key = _mark_key(key, prefix)
        self._behind[key] = until
        self._behind.move_to_end(key)
        while len(self._behind) > self.max_behind:
            self._behind.popitem(last=False)

    def clear_behind(self, key: bytes, prefix: int | None = None) -> None:
        self._behind.pop(_mark_key(key, prefix), None)

    def _use_length(self, size: int, prefix: int) -> None:
        lengths = self.prefix_lengths().get(size, ())
        if prefix not in lengths:
            self._set_lengths(size, {*lengths, prefix})

    def _set_lengths(self, size: int, lengths: set[int]) -> None:
        self._wide[2 * size] = tuple(
            (n, key_mask(size, n), bytes((n,))) for n in sorted(lengths, reverse=True)
        )

    def prefix_lengths(self) -> dict[int, tuple[int, ...]]:
        """Address size (4, 16) -> the prefix lengths looked up, longest first."""
        return {size // 2: tuple(e[0] for e in entries) for size, entries in self._wide.items()}

    def _remove(self, key: bytes, grant: Grant) -> None:
        grants = self._grants.get(key)
        if grants is not None:
            grants.remove(grant)
            if not grants:
                del self._grants[key]

    # --- time, configuration changes -------------------------------------------

    def expire(self, mono: float) -> list[Event]:
        events: list[Event] = []
        for key in list(self._grants):
            for grant in [g for g in self._grants[key] if g.expires <= mono]:
                self._remove(key, grant)
                if grant.confirmed:  # a pending one never opened: nothing closes
                    src, dst = split_key(key)
                    events.append(
                        Event(
                            EventKind.GRANT_EXPIRED,
                            src,
                            dst,
                            grant.user,
                            None,
                            "window closed",
                            "grant_expired",
                        )
                    )
        for key in [k for k, until in self._behind.items() if until <= mono]:
            del self._behind[key]
        self._shrink_lengths()
        return events

    def _shrink_lengths(self) -> None:
        """The prefix lengths in use, exactly (they only grow between calls)."""
        if not self._wide:
            return
        wide: dict[int, set[int]] = {}
        for key, grants in self._grants.items():
            for grant in grants:
                if grant.prefix is not None:
                    wide.setdefault(len(key) // 2, set()).add(grant.prefix)
        for key in self._behind:
            if len(key) % 2:  # a prefix mark: its length is the last byte
                wide.setdefault(len(key) // 2, set()).add(key[-1])
        self._wide = {}
        for size, lengths in wide.items():
            self._set_lengths(size, lengths)

    def retain(
        self, allowed: Callable[[str, bytes], tuple[frozenset[int], int, float]], mono: float
    ) -> list[Event]:
        """Re-check every grant after a configuration change.  ``allowed(user, dst)``
        gives what the new configuration allows that user at that destination: the
        ports, the connection budget and the longest window (seconds); no ports means
        the user may open nothing (gone, disabled, rekeyed).  A grant keeps only what
        is still allowed; one left with nothing is revoked.  Every change is an event."""
        events: list[Event] = []
        for key in list(self._grants):
            src, dst = split_key(key)
            for grant in list(self._grants[key]):
                ports, budget, seconds = allowed(grant.user, dst)
                kept = grant.ports & ports
                if not kept:
                    self._remove(key, grant)
                    events.append(
                        Event(
                            EventKind.GRANT_REVOKED,
                            src,
                            dst,
                            grant.user,
                            None,
                            "user removed, disabled or rekeyed, or its ports are gone",
                            "grant_revoked_by_reload",
                        )
                    )
                    continue
                changes = []
                if kept != grant.ports:
                    changes.append(f"ports {_ports(grant.ports)} -> {_ports(kept)}")
                    grant.ports = kept
                if grant.remaining > budget:
                    changes.append(f"connections {grant.remaining} -> {budget}")
                    grant.remaining = budget
                if grant.expires > mono + seconds:
                    changes.append(f"window cut to {seconds:g}s")
                    grant.expires = mono + seconds
                if changes:
                    events.append(
                        Event(
                            EventKind.GRANT_NARROWED,
                            src,
                            dst,
                            grant.user,
                            None,
                            "; ".join(changes),
                            "grant_narrowed_by_reload",
                        )
                    )
        return events

    # --- introspection ------------------------------------------------------------

    def items(self) -> Iterator[tuple[bytes, Grant]]:
        for key, grants in self._grants.items():
            for grant in grants:
                yield key, grant

    def __len__(self) -> int:
        return sum(len(g) for g in self._grants.values())

    def behind_count(self) -> int:
        return len(self._behind)


def retain_prefixes(table: GrantTable, allowed: Callable[[str, int], int | None]) -> list[Event]:
    """After a configuration change: revoke every grant wider than its user may now
    open (``allowed(user, size)``: the user's prefix for addresses of ``size`` bytes,
    None for the exact address).  A grant cannot be narrowed -- which address inside
    its prefix earned it is not kept -- so it goes, with an event."""
    events: list[Event] = []
    for key, grant in list(table.items()):
        if grant.prefix is None:
            continue
        src, dst = split_key(key)
        now = allowed(grant.user, len(src))
        if now is None or now > grant.prefix:
            table.void(key, grant.id)
            events.append(
                Event(
                    EventKind.GRANT_REVOKED,
                    src,
                    dst,
                    grant.user,
                    None,
                    f"{prefix_text(src, grant.prefix)} is wider than the user's grants "
                    f"open now (/{8 * len(src) if now is None else now})",
                    "grant_prefix_narrowed_by_reload",
                )
            )
    return events


def _mark_key(key: bytes, prefix: int | None) -> bytes:
    """A behind mark's key: a prefix mark carries its length as one more byte (an odd
    length: never an exact key, and never ambiguous with one)."""
    return key if prefix is None else key + bytes((prefix,))


def split_key(key: bytes) -> tuple[bytes, bytes]:
    """A table key (source + destination, packed) back into its two addresses."""
    half = len(key) // 2
    return key[:half], key[half:]


def _ports(ports: frozenset[int]) -> str:
    return ",".join(map(str, sorted(ports)))
