"""The verdict core: knock engine + gate + grant table behind one small interface.
Sans-IO: packets and time in, verdicts, events and claims out.

    knock SYN ---> Engine (engine.py) --completion--> Gate (gate.py) --claim--> outbox
                                                        |                        |
    protected SYN --> port policy --> GrantTable <------+---- resolve(outcome) <-+
                                      (grants.py)

The adapter (service.py) takes the outbox after each batch of verdicts, records the
claims in the state store off the packet path, and feeds the outcomes back with
:meth:`Core.resolve`.  A protected SYN that finds only a pending grant gets
``Verdict.HOLD``: the adapter keeps it until the claim resolves, then asks again.

Reloads: a new knock engine can be built from a snapshot of the counters while the
old one keeps deciding (:meth:`Core.build_engine` is pure and may run in a thread);
:meth:`Core.swap` then merges what was spent meanwhile and re-checks every grant
against the new configuration (``GrantTable.retain``).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from nfknock.config import User
from nfknock.counters import CounterWindow
from nfknock.engine import Engine, EngineSettings
from nfknock.events import Decision, Event, EventKind, Verdict, addr_text
from nfknock.gate import ClaimOutcome, ClaimRequest, Gate, GatePolicy
from nfknock.grants import Grant, GrantTable, split_key

WindowList = list[tuple[str, int, CounterWindow]]


def policy_of(settings: EngineSettings) -> GatePolicy:
    return GatePolicy(
        protect=settings.protect,
        open_seconds=settings.open_seconds,
        max_connections=settings.max_connections,
        max_open_seconds=settings.max_open_seconds,
    )


@dataclass(frozen=True, slots=True)
class GrantRecord:
    """A confirmed grant as plain values (wall-clock expiry), for the state store."""

    src: bytes
    dst: bytes
    user: str
    ports: frozenset[int]
    remaining: int
    expires: float
    method: str = "knock"


class Core:
    def __init__(self, settings: EngineSettings, users: Iterable[User], wall: float) -> None:
        self.s = settings
        self.grants = GrantTable(max_grants=settings.max_grants, max_behind=settings.max_sources)
        self.gate = Gate(self.grants, policy_of(settings), lambda: self.knocks.users)
        self.knocks = Engine(settings, users, wall, self.gate)
        self._protect = settings.protect

    # --- the packet path ------------------------------------------------------------

    def decide_key(self, key: bytes, port: int, wall: float, mono: float) -> Decision:
        """One new TCP SYN (``key`` = packed source + destination) on a queue that
        carries both knocks and protected ports."""
        if port in self._protect:
            return self.decide_protected(key, port, mono)
        return self.knocks.decide_key(key, port, wall, mono)

    def decide(self, src: bytes, dst: bytes, port: int, wall: float, mono: float) -> Decision:
        return self.decide_key(src + dst, port, wall, mono)

    def decide_protected(self, key: bytes, port: int, mono: float) -> Decision:
        dests = self._protect.get(port, frozenset())
        src, dst = split_key(key)
        if dests is not None and dst not in dests:
            return _drop(src, dst, port, "not protected at this destination", "not_protected_here")
        verdict, grant = self.grants.decide(key, port, mono)
        if verdict is Verdict.ACCEPT and grant is not None:
            reason = f"grant used, {grant.remaining} connection(s) left"
            ev = Event(EventKind.PROTECTED_ACCEPT, src, dst, grant.user, port, reason, "granted")
            return Decision(Verdict.ACCEPT, (ev,))
        if verdict is Verdict.HOLD:
            return Decision(Verdict.HOLD)
        if verdict is Verdict.REJECT:
            reason = "stale sequence: client is behind"
            ev = Event(EventKind.PROTECTED_REJECT, src, dst, None, port, reason, "behind")
            return Decision(Verdict.REJECT, (ev,))
        return _drop(src, dst, port, "no grant", "no_grant")

    # --- claims -----------------------------------------------------------------------

    def take_claims(self) -> list[ClaimRequest]:
        return self.gate.take_outbox()

    def resolve(self, outcome: ClaimOutcome, mono: float) -> list[Event]:
        return self.gate.resolve(outcome, mono)

    def note_spent(self, user: str, step: int, counter: int) -> None:
        self.knocks.note_spent(user, step, counter)

    # --- time -----------------------------------------------------------------------

    def tick(self, wall: float, mono: float, budget: int | None = None) -> list[Event]:
        events = self.knocks.tick(wall, mono, budget)
        events += self.grants.expire(mono)
        return events

    @property
    def step(self) -> int:
        return self.knocks.step

    @property
    def users(self) -> Mapping[str, User]:
        return self.knocks.users

    # --- configuration changes ------------------------------------------------------

    def set_users(self, users: Iterable[User], mono: float) -> list[Event]:
        """Same knock parameters, other users: update in place, re-check grants."""
        old = dict(self.knocks.users)
        self.knocks.set_users(users)
        return self.grants.retain(self._allowed(old), mono)

    def snapshot_windows(self) -> WindowList:
        """A copy of the counter windows, for building an engine elsewhere."""
        return [(u, t, copy.deepcopy(w)) for u, t, w in self.knocks.windows()]

    def build_engine(
        self, settings: EngineSettings, users: Iterable[User], wall: float, windows: WindowList
    ) -> Engine:
        """A new knock engine for new settings (pure: may run in another thread; it
        only touches its own objects)."""
        engine = Engine(settings, users, wall, self.gate)
        high, pruned = self.knocks.replay_horizon()
        engine.restore_counters(windows, high, pruned)
        return engine

    def swap(self, engine: Engine, mono: float) -> list[Event]:
        """Make ``engine`` (from :meth:`build_engine`) the live one: counters spent
        since the snapshot are merged, the gate takes the new policy, every grant is
        re-checked.  Knock progress in flight is discarded (clients retry)."""
        old_users = dict(self.knocks.users)
        for user, step, window in self.knocks.windows():
            if user in engine.users:
                engine.merge_window(user, step, window)
        self.s = engine.s
        self._protect = engine.s.protect
        self.gate.policy = policy_of(engine.s)
        self.grants.max_grants = engine.s.max_grants
        self.grants.max_behind = engine.s.max_sources
        self.knocks = engine
        return self.grants.retain(self._allowed(old_users), mono)

    def _allowed(self, old_users: Mapping[str, User]) -> Any:
        policy = self.gate.policy
        users = self.knocks.users

        def allowed(name: str, dst: bytes) -> tuple[frozenset[int], int, float]:
            user = users.get(name)
            before = old_users.get(name)
            rekeyed = before is not None and user is not None and before.secret != user.secret
            if user is None or rekeyed:
                return frozenset(), 0, 0.0
            longest = max(policy.open_seconds, policy.max_open_seconds)
            return policy.ports_for(user, dst), policy.max_connections, longest

        return allowed

    # --- introspection and persistence ----------------------------------------------

    def grant_list(self, wall: float, mono: float) -> list[dict[str, Any]]:
        out = []
        for key, g in self.grants.items():
            if g.expires > mono:
                src, dst = split_key(key)
                out.append(
                    {
                        "source": addr_text(src),
                        "destination": addr_text(dst),
                        "user": g.user,
                        "ports": sorted(g.ports),
                        "remaining": g.remaining,
                        "expires": round(wall + (g.expires - mono), 3),
                        "confirmed": g.confirmed,
                        "method": g.method,
                    }
                )
        return out

    def grant_records(self, wall: float, mono: float) -> list[GrantRecord]:
        """Confirmed live grants, for a clean shutdown."""
        return [
            GrantRecord(
                *split_key(key),
                g.user,
                g.ports,
                g.remaining,
                wall + (g.expires - mono),
                g.method,
            )
            for key, g in self.grants.items()
            if g.confirmed and g.expires > mono and g.remaining > 0
        ]

    def restore_grants(self, records: Iterable[GrantRecord], wall: float, mono: float) -> int:
        """Re-instate stored grants, each cut to what the configuration allows now."""
        restored = 0
        policy = self.gate.policy
        for r in records:
            expires = mono + min(
                r.expires - wall, max(policy.open_seconds, policy.max_open_seconds)
            )
            user = self.knocks.users.get(r.user)
            ports = r.ports & policy.ports_for(user, r.dst)
            remaining = min(r.remaining, policy.max_connections)
            if not ports or remaining <= 0 or expires <= mono:
                continue
            grant = Grant(self.gate.new_id(), r.user, ports, remaining, expires, True, r.method)
            self.grants.add(r.src + r.dst, grant)
            restored += 1
        return restored


def _drop(src: bytes, dst: bytes, port: int, reason: str, code: str) -> Decision:
    ev = Event(EventKind.PROTECTED_DROP, src, dst, None, port, reason, code)
    return Decision(Verdict.DROP, (ev,))
