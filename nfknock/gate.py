"""Admission: an earned access becomes a grant once its claim is won.  Sans-IO.

Knock sequences and SPA packets both end in an :class:`Access` -- who earned what,
for which address, backed by which :data:`Claim`.  The gate checks it against the
configuration (user enabled, the ports the user may open at that destination),
records a *pending* grant and puts a :class:`ClaimRequest` in its outbox.  The
adapter submits the outbox to the state store off the packet path and feeds each
:class:`ClaimOutcome` back into :meth:`Gate.resolve`:

    ==========  ===============================================================
    WON         the grant is confirmed: ACCEPTs from now on (``grant_opened``)
    LOST        someone else (a worker, the other gateway) spent it first: void
                the grant, mark the source behind (``sequence_stale``)
    FAILED      the store could not record it (disk full, read-only, Redis down):
                void the grant, nothing opens (``claim_failed``) -- fail closed
    ==========  ===============================================================

So a grant is honoured only after the counter (or digest) that earned it is durably
recorded: durability is data (the grant's ``claim_id``), not call order.

The grant is for the user's prefix of the address to open (``grant_prefix_v4`` /
``grant_prefix_v6``, :mod:`nfknock.prefixes`): keyed by that address masked to it,
and so is a behind mark; events name the address itself.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from nfknock.config import User
from nfknock.door import DoorMap
from nfknock.events import Event, EventKind
from nfknock.grants import Grant, GrantTable, split_key
from nfknock.prefixes import mask_address, mask_key
from nfknock.prefixes import text as prefix_text


@dataclass(frozen=True, slots=True)
class CounterClaim:
    """Spend ``counter`` of (``user``, ``step``) under the window rule (counters.py)."""

    user: str
    step: int
    counter: int
    lookahead: int


@dataclass(frozen=True, slots=True)
class DigestClaim:
    """Spend an SPA payload digest (SHA-256), remembered until the wall time
    ``until`` -- the end of the packet's validity (its timestamp + max_age, and at
    least 2 x max_age after it arrived): a copy resent before then is a replay."""

    digest: bytes
    until: float


Claim = CounterClaim | DigestClaim


@dataclass(frozen=True, slots=True)
class Access:
    """What a knock sequence or an SPA packet earned.  ``src`` is the address to open
    (an SPA allow-IP may differ from the packet's source ``origin``), ``dst`` the
    destination it is for; ``ports`` None asks for every port the user may open
    there; ``seconds`` None takes ``[door] open_seconds``.  ``door``: ``ports`` are
    forwarded doors (nfknock.door), not protected ports."""

    user: str
    src: bytes
    dst: bytes
    claim: Claim
    method: str = "knock"
    ports: frozenset[int] | None = None
    seconds: float | None = None
    origin: bytes = b""
    door: bool = False


class Outcome(enum.Enum):
    WON = "won"
    LOST = "lost"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class ClaimRequest:
    """A claim to record, with the grant it backs (stored in the same transaction,
    so a grant is never persisted without its claim).  ``expires`` is wall time."""

    id: int
    claim: Claim
    key: bytes
    user: str
    ports: frozenset[int]
    remaining: int
    expires: float
    method: str
    ref: str = ""  # the grant's name in shared state ("" when nothing is shared)
    prefix: int | None = None  # the grant's prefix (its key's source is masked to it)


@dataclass(frozen=True, slots=True)
class ClaimOutcome:
    id: int
    outcome: Outcome
    detail: str = ""


@dataclass(frozen=True)
class GatePolicy:
    """What the configuration allows: protected port -> destinations (None: any)."""

    protect: Mapping[int, frozenset[bytes] | None]
    open_seconds: float
    max_connections: int
    max_open_seconds: float  # an SPA client's timeout is honoured up to this
    doors: DoorMap = field(default_factory=DoorMap)  # [[door.forward]]

    def ports_for(self, user: User | None, dst: bytes) -> frozenset[int]:
        if user is None or not user.enabled:
            return frozenset()
        ports = {p for p, dests in self.protect.items() if dests is None or dst in dests}
        if user.ports is not None:
            ports &= user.ports
        return frozenset(ports)


class Gate:
    def __init__(
        self, grants: GrantTable, policy: GatePolicy, users: Callable[[], Mapping[str, User]]
    ) -> None:
        self.grants = grants
        self.policy = policy
        self._users = users
        self.outbox: list[ClaimRequest] = []
        # claim id (= grant id) -> (key, user, seconds, address) of the grant waiting
        # for it; the address is the one that earned it (the key's may be masked)
        self._pending: dict[int, tuple[bytes, str, float, bytes]] = {}
        self._next_id = 1
        # Set when grants are shared (Redis, worker processes): every grant gets a
        # name unique to this process, ``instance.id``, that the others know it by.
        self.instance = ""

    def earn(self, access: Access, wall: float, mono: float) -> list[Event]:
        src, dst = access.src, access.dst
        user = self._users().get(access.user)
        if access.door:
            ports = self.policy.doors.doors_for(user, dst, access.ports or ())
        else:
            allowed = self.policy.ports_for(user, dst)
            ports = allowed if access.ports is None else allowed & access.ports
        if not ports:
            what = "door" if access.door else "protected port"
            return [
                Event(
                    EventKind.GRANT_OPENED,
                    src,
                    dst,
                    access.user,
                    None,
                    f"no {what} here for this user",
                    "no_door_here" if access.door else "no_port_here",
                )
            ]
        seconds = self.policy.open_seconds
        if access.seconds is not None:
            seconds = min(access.seconds, self.policy.max_open_seconds)
        claim_id = self.new_id()
        prefix = user.grant_prefix(len(src)) if user is not None else None
        key = mask_address(src, prefix) + dst
        grant = Grant(
            claim_id,
            access.user,
            ports,
            self.policy.max_connections,
            mono + seconds,
            confirmed=False,
            method=access.method,
            ref=f"{self.instance}.{claim_id}" if self.instance else "",
            prefix=prefix,
        )
        events = self.grants.add(key, grant)
        self._pending[claim_id] = (key, access.user, seconds, src)
        self.outbox.append(
            ClaimRequest(
                claim_id,
                access.claim,
                key,
                access.user,
                ports,
                grant.remaining,
                wall + seconds,
                access.method,
                grant.ref,
                prefix,
            )
        )
        return events

    def stale(self, key: bytes, user: str, mono: float, reason: str, code: str) -> list[Event]:
        """A completed sequence whose counter is spent: mark the source behind (the
        user's prefix of it)."""
        src, dst = split_key(key)
        user_cfg = self._users().get(user)
        prefix = user_cfg.grant_prefix(len(src)) if user_cfg is not None else None
        self.grants.mark_behind(mask_key(key, prefix), mono + self.policy.open_seconds, prefix)
        return [Event(EventKind.SEQUENCE_STALE, src, dst, user, None, reason, code)]

    def resolve(self, result: ClaimOutcome, mono: float) -> list[Event]:
        pending = self._pending.pop(result.id, None)
        if pending is None:
            return []
        key, user, seconds, src = pending
        dst = split_key(key)[1]
        if result.outcome is Outcome.WON:
            grant = self.grants.confirm(key, result.id)
            if grant is None:
                return []  # revoked or expired meanwhile
            self.grants.clear_behind(key, grant.prefix)
            net = key[: len(src)]
            wide = "" if grant.prefix is None else f", for {prefix_text(net, grant.prefix)}"
            return [
                Event(
                    EventKind.GRANT_OPENED,
                    src,
                    dst,
                    user,
                    None,
                    f"ports {','.join(map(str, sorted(grant.ports)))} for {seconds:g}s, "
                    f"{grant.remaining} connection(s){wide}",
                    f"granted_{grant.method}",
                )
            ]
        self.grants.void(key, result.id)
        if result.outcome is Outcome.LOST:
            return self.stale(
                src + dst,
                user,
                mono,
                f"spent elsewhere first ({result.detail})",
                "claimed_elsewhere",
            )
        return [
            Event(
                EventKind.CLAIM_FAILED,
                src,
                dst,
                user,
                None,
                f"not recorded, nothing opens: {result.detail}",
                "state_write_failed",
            )
        ]

    def record(self, claim: Claim, user: str) -> None:
        """Record a claim that earns nothing (an authenticated SPA packet refused for
        its age, ports or type): its digest must outlive a restart all the same."""
        self.outbox.append(
            ClaimRequest(self.new_id(), claim, b"", user, frozenset(), 0, 0.0, "spa")
        )

    def new_id(self) -> int:
        """A fresh grant (and claim) id."""
        self._next_id += 1
        return self._next_id - 1

    def take_outbox(self) -> list[ClaimRequest]:
        out, self.outbox = self.outbox, []
        return out

    def pending_count(self) -> int:
        return len(self._pending)
