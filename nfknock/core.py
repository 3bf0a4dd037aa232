"""The verdict core: knock engine, SPA verifier, gate and grant table behind one small
interface.  Sans-IO: packets and time in, verdicts, events and claims out.

    knock SYN ---> Engine (engine.py) ----completion--> Gate (gate.py) --claim--> outbox
    SPA packet --> Verifier (spa/verify.py) --success--^   |                        |
                   + local ReplayCache                      |                        |
    protected SYN --> port policy --> GrantTable <---------+--- resolve(outcome) <--+
                                      (grants.py)

A knock completion and an SPA success end the same way: an ``Access`` whose claim (the
counter, or the payload digest) must be won in the state store before its grant
opens.  Both paths also spend locally at once (the counter window, the replay
cache), so a replay right behind the original is refused here without waiting.

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
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from nfknock.config import SpaConfig, User
from nfknock.counters import CounterWindow
from nfknock.door import DoorMap
from nfknock.engine import Engine, EngineSettings
from nfknock.events import DROP_SILENT, Decision, Event, EventKind, Verdict, addr_text
from nfknock.gate import Access, ClaimOutcome, ClaimRequest, DigestClaim, Gate, GatePolicy
from nfknock.grants import Grant, GrantTable, retain_prefixes, split_key
from nfknock.prefixes import mask_key
from nfknock.prefixes import text as prefix_text
from nfknock.spa import reasons as R
from nfknock.spa.replay import ReplayCache
from nfknock.spa.verify import Verifier

WindowList = list[tuple[str, int, CounterWindow]]
# An SPA digest is remembered at most this long (a client whose clock is more than
# a year fast would see its packets replayable when the server's clock gets there).
MAX_DIGEST_SECONDS = 366 * 86400


def policy_of(settings: EngineSettings) -> GatePolicy:
    return GatePolicy(
        protect=settings.protect,
        open_seconds=settings.open_seconds,
        max_connections=settings.max_connections,
        max_open_seconds=settings.max_open_seconds,
        doors=DoorMap(settings.forwards),
    )


@dataclass
class Tables:
    """Everything a configuration determines: rebuilt as a whole at a reload (off the
    packet path) and swapped in at once."""

    settings: EngineSettings
    engine: Engine
    verifier: Verifier | None  # None: no SPA ports, or no user with fwknop keys
    users: dict[str, User]  # every user, knock and SPA
    spa: SpaConfig


@dataclass(frozen=True, slots=True)
class GrantRecord:
    """A confirmed grant as plain values (wall-clock expiry), for the state store.
    ``prefix``: None for the exact address ``src``; else ``src`` is masked to it
    (nfknock.prefixes)."""

    src: bytes
    dst: bytes
    user: str
    ports: frozenset[int]
    remaining: int
    expires: float
    method: str = "knock"
    ref: str = ""  # its name in shared state, if shared
    prefix: int | None = None


class Core:
    def __init__(
        self,
        settings: EngineSettings,
        users: Iterable[User],
        wall: float,
        *,
        spa_users: Iterable[User] = (),
        spa: SpaConfig | None = None,
        instance: str = "",
    ) -> None:
        spa = spa or SpaConfig(ports=frozenset())
        self.s = settings
        self.grants = GrantTable(max_grants=settings.max_grants, max_behind=settings.max_sources)
        self._users: dict[str, User] = {}
        self.gate = Gate(self.grants, policy_of(settings), lambda: self._users)
        # ``instance``: grants are shared with other gateways or workers under names
        # "instance.id"; connections spent on them wait in ``used`` for the adapter.
        self.gate.instance = instance
        self.used: list[tuple[bytes, str]] = []
        self.replay = ReplayCache.for_max_age(spa.replay_cache, spa.max_age)
        tables = self.build(settings, users, spa_users, spa, wall, [])
        self._install(tables)

    def _install(self, t: Tables) -> None:
        self.s = t.settings
        self.knocks = t.engine
        self.verifier = t.verifier
        self._users = t.users
        self.spa = t.spa
        self.spa_ports = frozenset(t.spa.ports)
        keep = 2 * t.spa.max_age + 1
        if (self.replay.capacity, self.replay.keep) != (t.spa.replay_cache, keep):
            wider = ReplayCache(t.spa.replay_cache, keep)
            wider.restore(self.replay.export(), 0.0)
            self.replay = wider
        self._protect = t.settings.protect
        self.gate.policy = policy_of(t.settings)
        self.doors = self.gate.policy.doors
        # Ports that are not knocks: protected ports and forwarded doors -- the
        # protected ports' own table when there are no doors, so that a knock costs
        # decide_key exactly one lookup either way.
        self._guarded: Mapping[int, object] | frozenset[int] = self._protect
        if self.doors:
            doors = {p for f in self.doors.forwards for p in f.doors}
            self._guarded = frozenset(self._protect) | doors
        self.grants.max_grants = t.settings.max_grants
        self.grants.max_behind = t.settings.max_sources

    # --- the packet path ------------------------------------------------------------

    def decide_key(
        self, key: bytes, port: int, wall: float, mono: float, defer: bool = False
    ) -> Decision:
        """One new TCP SYN (``key`` = packed source + destination) on a queue that
        carries protected ports and forwarded doors (and knocks, with a single
        queue).  ``defer``: see :meth:`decide_protected`."""
        if port in self._guarded:
            if port in self._protect:
                return self.decide_protected(key, port, mono, defer)
            return self.decide_door(key, port, mono, defer)
        return self.knocks.decide_key(key, port, wall, mono)

    def decide_isn(
        self, key: bytes, port: int, isn: int, wall: float, mono: float, defer: bool = False
    ) -> Decision:
        """:meth:`decide_key` for a SYN whose sequence number was read: while some
        user knocks with ISNs (``Engine.isn_mode``), a knock is decided with it."""
        if port in self._guarded:
            return self.decide_key(key, port, wall, mono, defer)
        return self.knocks.decide_isn(key, port, isn, wall, mono)

    def decide(self, src: bytes, dst: bytes, port: int, wall: float, mono: float) -> Decision:
        return self.decide_key(src + dst, port, wall, mono)

    def decide_spa(
        self, src: bytes, dst: bytes, payload: bytes, wall: float, mono: float
    ) -> Decision:
        """One SPA payload (UDP, or a TCP SYN's data): always DROP -- no reply, no
        ICMP -- with an event carrying the verifier's reason code; a success earns an
        Access whose digest claim the store must win before the grant opens."""
        if self.verifier is None:
            return DROP_SILENT
        result = self.verifier.verify(src, dst, payload, wall, replay=self.replay)
        if result.ok and len(result.open_address) != len(dst):
            kind, reason, code = (
                EventKind.SPA_REFUSED,
                "the allow-IP is of another address family than the destination",
                "spa_allow_ip_refused",
            )
        elif result.ok:
            kind, reason, code = EventKind.SPA_ACCEPTED, result.reason, result.code
        else:
            kind, reason, code = EventKind.SPA_REFUSED, result.reason, result.code
        events = [Event(kind, src, dst, result.user, None, reason, code)]
        claim = None
        if result.authenticated and result.replay_digest and result.user is not None:
            ts = result.timestamp if result.timestamp is not None else wall
            max_age = self.spa.max_age
            until = max(wall + 2 * max_age + 1, ts + max_age + 1)
            claim = DigestClaim(result.replay_digest, min(until, wall + MAX_DIGEST_SECONDS))
        if claim is not None and kind is EventKind.SPA_REFUSED and result.code != R.REPLAY:
            # Refused, but authentic: remember it durably all the same (a packet
            # stamped in the future becomes valid later; a restart must not forget).
            self.gate.record(claim, result.user or "")
        if kind is EventKind.SPA_ACCEPTED and result.user is not None and claim is not None:
            access = Access(
                result.user,
                result.open_address,
                dst,
                claim,
                "spa",
                ports=result.ports,
                seconds=float(result.timeout) if result.timeout is not None else None,
                origin=src,
                door=bool(result.forward),
            )
            events += self.gate.earn(access, wall, mono)
        return Decision(Verdict.DROP, tuple(events))

    def decide_protected(self, key: bytes, port: int, mono: float, defer: bool = False) -> Decision:
        """ACCEPT / HOLD / REJECT / DROP (grants.py).  ``defer``: a SYN that finds
        no grant is HELD instead of dropped or reset (no event) -- the knocks that
        earn its grant (or the stale completion that marks it behind, or the fresh
        one that clears that mark) may still wait in the knock queue, which the
        priority queue overtakes; the adapter decides it again, without ``defer``,
        once it has read them."""
        dests = self._protect.get(port, frozenset())
        src, dst = split_key(key)
        if dests is not None and dst not in dests:
            return _drop(src, dst, port, "not protected at this destination", "not_protected_here")
        verdict, grant = self.grants.decide(key, port, mono)
        if defer and (verdict is Verdict.DROP or verdict is Verdict.REJECT):
            return Decision(Verdict.HOLD)
        if verdict is Verdict.ACCEPT and grant is not None:
            if grant.ref:
                self.used.append((mask_key(key, grant.prefix), grant.ref))
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

    def decide_door(self, key: bytes, port: int, mono: float, defer: bool = False) -> Decision:
        """A new SYN to a forwarded door (nfknock.door): ACCEPT with the entry's mark
        when a confirmed grant of this source covers the door; HOLD / REJECT as for
        a protected port; otherwise DROP, silently -- door ranges are scanned like
        the knock range, and a door says nothing to whoever has no grant."""
        entry = self.doors.entry(port)
        if entry is None or not self.doors.serves(entry, key[len(key) // 2 :]):
            return DROP_SILENT
        verdict, grant = self.grants.decide(key, port, mono)
        if defer and (verdict is Verdict.DROP or verdict is Verdict.REJECT):
            return Decision(Verdict.HOLD)
        if verdict is Verdict.ACCEPT and grant is not None:
            if grant.ref:
                self.used.append((key, grant.ref))
            src, dst = split_key(key)
            reason = f"door to {entry.target_text()}, {grant.remaining} connection(s) left"
            ev = Event(EventKind.PROTECTED_ACCEPT, src, dst, grant.user, port, reason, "door")
            return Decision(Verdict.ACCEPT, (ev,), entry.mark)
        if verdict is Verdict.HOLD:
            return Decision(Verdict.HOLD)
        if verdict is Verdict.REJECT:
            src, dst = split_key(key)
            reason = "stale sequence: client is behind"
            ev = Event(EventKind.PROTECTED_REJECT, src, dst, None, port, reason, "behind")
            return Decision(Verdict.REJECT, (ev,))
        return DROP_SILENT

    # --- claims -----------------------------------------------------------------------

    def take_claims(self) -> list[ClaimRequest]:
        return self.gate.take_outbox()

    def resolve(self, outcome: ClaimOutcome, mono: float) -> list[Event]:
        return self.gate.resolve(outcome, mono)

    def note_spent(self, user: str, step: int, counter: int) -> None:
        self.knocks.note_spent(user, step, counter)

    # --- shared state: what other gateways or workers did ------------------------------

    def take_used(self) -> list[tuple[bytes, str]]:
        """Connections spent here on shared grants: (key, ref), for the others."""
        out, self.used = self.used, []
        return out

    def note_digest(self, digest: bytes, until: float, wall: float) -> None:
        """An SPA payload claimed elsewhere, to be remembered until ``until``: refused
        here at once from now on (a full local cache leaves it to the store, which
        refuses it too)."""
        self.replay.claim(digest, wall, good_until=until)

    def add_shared_grant(self, record: GrantRecord, wall: float, mono: float) -> list[Event]:
        """A grant confirmed elsewhere (its claim won in the shared store): honoured
        here too, cut to what this configuration allows.  A ref known here already
        (our own grant, or one delivered twice) changes nothing."""
        key = record.src + record.dst
        if not record.ref or self.grants.find_ref(key, record.ref) is not None:
            return []
        grant = self._admit(record, wall, mono)
        if grant is None:
            return []
        events = self.grants.add(key, grant)
        reason = (
            f"granted elsewhere: ports {','.join(map(str, sorted(grant.ports)))} until "
            f"{record.expires:.0f}, {grant.remaining} connection(s)"
        )
        code = f"shared_{grant.method}"
        ev = Event(EventKind.GRANT_SHARED, record.src, record.dst, grant.user, None, reason, code)
        return [*events, ev]

    def resync_grants(
        self, records: Iterable[GrantRecord], wall: float, mono: float, wiped: bool = False
    ) -> list[Event]:
        """Bring the shared grants in line with a full snapshot of the store: new
        ones added, connections spent elsewhere meanwhile taken off, shared grants
        the store no longer holds (spent or expired there) dropped -- unless the
        store came back ``wiped``, when it knows nothing and ours stay."""
        events: list[Event] = []
        seen = set()
        for record in records:
            key = record.src + record.dst
            seen.add((key, record.ref))
            grant = self.grants.find_ref(key, record.ref)
            if grant is None:
                events += self.add_shared_grant(record, wall, mono)
            elif grant.confirmed and record.remaining < grant.remaining:
                grant.remaining = record.remaining
        if not wiped:
            for key, grant in list(self.grants.items()):
                if grant.ref and grant.confirmed and (key, grant.ref) not in seen:
                    self.grants.void(key, grant.id)
        return events

    def spend_shared(self, key: bytes, ref: str) -> None:
        """A connection of the shared grant ``ref`` was spent elsewhere."""
        grant = self.grants.find_ref(key, ref)
        if grant is not None:
            self.grants.spend(key, grant)

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
        """Every user: knock and SPA."""
        return self._users

    # --- configuration changes ------------------------------------------------------

    def set_users(
        self, users: Iterable[User], mono: float, spa_users: Iterable[User] = ()
    ) -> list[Event]:
        """Same settings, other users (tests and small changes): rebuilt in place."""
        tables = self.build(self.s, users, spa_users, self.spa, 0.0, self.snapshot_windows())
        return self.swap(tables, mono)

    def snapshot_windows(self) -> WindowList:
        """A copy of the counter windows, for building an engine elsewhere."""
        return [(u, t, copy.deepcopy(w)) for u, t, w in self.knocks.windows()]

    def build(
        self,
        settings: EngineSettings,
        users: Iterable[User],
        spa_users: Iterable[User],
        spa: SpaConfig,
        wall: float,
        windows: WindowList,
    ) -> Tables:
        """New tables for a configuration.  Pure (may run in another thread: it reads
        only its arguments and two integers of the live engine)."""
        users = list(users)
        spa_users = list(spa_users)
        engine = Engine(settings, users, wall or self._wall_hint(), self.gate)
        if hasattr(self, "knocks"):
            high, pruned = self.knocks.replay_horizon()
            engine.restore_counters(windows, high, pruned)
        protected = frozenset(settings.protect)
        doors = DoorMap(settings.forwards)
        verifier = Verifier(spa_users, spa, protected, doors) if spa.ports and spa_users else None
        everyone = {u.name: u for u in (*spa_users, *users)}
        return Tables(settings, engine, verifier, everyone, spa)

    def _wall_hint(self) -> float:
        return self.knocks.step * self.s.params.step_seconds if hasattr(self, "knocks") else 0.0

    def swap(self, tables: Tables, mono: float) -> list[Event]:
        """Make ``tables`` (from :meth:`build`) the live ones: counters spent since the
        snapshot are merged, every grant re-checked against the new configuration.
        Knock progress in flight is discarded (clients retry)."""
        old_users = dict(self._users)
        old_doors = self.doors
        for user, step, window in self.knocks.windows():
            if user in tables.engine.users:
                tables.engine.merge_window(user, step, window)
        self._install(tables)
        events = self.grants.retain(self._allowed(old_users, old_doors), mono)
        return events + retain_prefixes(self.grants, self._prefix_of)

    def _prefix_of(self, name: str, size: int) -> int | None:
        """The grant prefix the configuration gives ``name`` for addresses of ``size``
        bytes (None: the exact address; also for a user unknown here)."""
        user = self._users.get(name)
        return user.grant_prefix(size) if user is not None else None

    def _allowed(self, old_users: Mapping[str, User], old_doors: DoorMap) -> Any:
        policy = self.gate.policy
        users = self._users
        # The doors grants hold now, less those that lead elsewhere after the change.
        held = {p for _, g in self.grants.items() for p in g.ports if old_doors.entry(p)}
        held -= policy.doors.moved(old_doors)

        def allowed(name: str, dst: bytes) -> tuple[frozenset[int], int, float]:
            user = users.get(name)
            before = old_users.get(name)
            rekeyed = (
                before is not None
                and user is not None
                and (before.secret != user.secret or before.spa != user.spa)
            )
            if user is None or rekeyed:
                return frozenset(), 0, 0.0
            longest = max(policy.open_seconds, policy.max_open_seconds)
            ports = policy.ports_for(user, dst) | policy.doors.doors_for(user, dst, held)
            return ports, policy.max_connections, longest

        return allowed

    # --- introspection and persistence ----------------------------------------------

    def grant_list(self, wall: float, mono: float) -> list[dict[str, Any]]:
        out = []
        for key, g in self.grants.items():
            if g.expires > mono:
                src, dst = split_key(key)
                out.append(
                    {
                        "source": prefix_text(src, g.prefix),
                        "prefix": 8 * len(src) if g.prefix is None else g.prefix,
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
                g.ref,
                g.prefix,
            )
            for key, g in self.grants.items()
            if g.confirmed and g.expires > mono and g.remaining > 0
        ]

    def restore_digests(self, digests: Iterable[tuple[bytes, float]], wall: float) -> int:
        """Remember stored SPA digests (each until its wall time) for the replay cache."""
        self.replay.restore([[d.hex(), until] for d, until in digests], wall)
        return len(self.replay)

    def restore_grants(self, records: Iterable[GrantRecord], wall: float, mono: float) -> int:
        """Re-instate stored grants, each cut to what the configuration allows now."""
        restored = 0
        for r in records:
            grant = self._admit(r, wall, mono)
            if grant is not None:
                self.grants.add(r.src + r.dst, grant)
                restored += 1
        return restored

    def _admit(self, r: GrantRecord, wall: float, mono: float) -> Grant | None:
        """A stored or shared grant as a live one, cut to what the configuration
        allows now; None if nothing is left."""
        policy = self.gate.policy
        expires = mono + min(r.expires - wall, max(policy.open_seconds, policy.max_open_seconds))
        user = self._users.get(r.user)
        ports = r.ports & (
            policy.ports_for(user, r.dst) | policy.doors.doors_for(user, r.dst, r.ports)
        )
        remaining = min(r.remaining, policy.max_connections)
        if not ports or remaining <= 0 or expires <= mono:
            return None
        allowed = self._prefix_of(r.user, len(r.src))
        if r.prefix is not None and (allowed is None or r.prefix < allowed):
            return None  # wider than this configuration lets the user open
        ref = r.ref
        if not ref and self.gate.instance:
            # Restored from a store that keeps no names (the embedded file, shared by
            # worker processes): every worker derives the same one, so a connection
            # spent on one of them is spent on all.
            ref = "r." + hashlib.sha256(repr(r).encode()).hexdigest()[:20]
        return Grant(
            self.gate.new_id(), r.user, ports, remaining, expires, True, r.method, ref, r.prefix
        )


def _drop(src: bytes, dst: bytes, port: int, reason: str, code: str) -> Decision:
    ev = Event(EventKind.PROTECTED_DROP, src, dst, None, port, reason, code)
    return Decision(Verdict.DROP, (ev,))
