"""The change feed: what another gateway or worker did, as small validated values.

Every process that shares state (gateways on one Redis, worker processes on one
host) keeps an in-memory copy -- counter windows, the SPA replay cache, grants -- so
that the packet path never waits for the network.  The claim itself is always
decided by the store (atomically, for everyone); the feed only brings the copies up
to date, promptly, so that a replay on another gateway is refused locally at once
and a grant made elsewhere is honoured here:

    ==========  ==========================================  ========================
    change      made when                                   applied here with
    ==========  ==========================================  ========================
    Spent       a knock counter claim is won                ``Core.note_spent``
    SeenDigest  an SPA digest claim is won                  ``Core.note_digest``
    Granted     (with either) the grant it backs            ``Core.add_shared_grant``
    Used        a connection was spent on a shared grant    ``Core.spend_shared``
    Resync      a full snapshot (after a reconnect or gap)  ``Core.resync_grants`` ...
    Link        the store became reachable or unreachable   status, logs
    Hello       a worker (re)started and asks for grants    answered with Granted
    ==========  ==========================================  ========================

Wire form: a flat map of short ASCII fields (a Redis stream entry, or a JSON object
in a Unix datagram between workers).  A grant is ``r a b u p n e m``, and ``l`` -- its
prefix length, the source ``a`` masked to it -- only for a prefix grant
(:mod:`nfknock.prefixes`): an nfknock that predates prefixes refuses such an entry
rather than take it for a grant of one address.  :func:`decode` is strict -- every field's type,
range and size -- because a ``Granted`` change opens a door: anything unexpected is
a :class:`FeedError` and the entry is skipped (fail closed).  Sans-IO.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from nfknock.config import USER_NAME
from nfknock.core import GrantRecord
from nfknock.counters import MAX_COUNTER
from nfknock.gate import ClaimRequest, CounterClaim
from nfknock.prefixes import BOUNDS, is_masked
from nfknock.store import Snapshot

MAX_STEP = 1 << 40
MAX_WALL = 1e11  # the year 5138: beyond it a time is not ours
MAX_PORTS = 1024
REF = re.compile(r"^[A-Za-z0-9_.:-]{1,80}$")
ORIGIN = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
HEX = re.compile(r"^[0-9a-f]*$")


class FeedError(ValueError):
    """A feed entry that is not ours or is damaged: skipped."""


@dataclass(frozen=True, slots=True)
class Spent:
    user: str
    step: int
    counter: int


@dataclass(frozen=True, slots=True)
class SeenDigest:
    digest: bytes
    until: float  # remembered until this wall time (the end of its packet's window)


@dataclass(frozen=True, slots=True)
class Granted:
    record: GrantRecord


@dataclass(frozen=True, slots=True)
class Used:
    key: bytes
    ref: str


@dataclass(frozen=True, slots=True)
class Hello:
    worker: int


@dataclass(frozen=True, slots=True)
class Resync:
    """Everything the store holds now; ``wiped``: it held nothing of ours (e.g. a
    Redis restarted without persistence) -- grants known here are kept then."""

    snapshot: Snapshot
    wiped: bool = False


@dataclass(frozen=True, slots=True)
class Link:
    up: bool
    detail: str = ""
    wiped: bool = False  # up again, but empty: the adapter writes back what it knows


Change = Spent | SeenDigest | Granted | Used | Hello | Resync | Link


class Sharing(Protocol):
    """How one process shares state with the others (Redis stream, local feed).
    ``fileno``/``drain`` on the packet loop's thread; ``claimed``/``used``/``resume``
    on the store thread (after a claim was won; after a connection was spent; after
    the store became reachable again: send what waited)."""

    kind: str

    def fileno(self) -> int: ...

    def drain(self) -> list[Change]: ...

    def start(self, position: str) -> None: ...

    def claimed(self, request: ClaimRequest) -> None: ...

    def used(self, key: bytes, ref: str) -> None: ...

    def welcome(self, worker: int, records: list[GrantRecord]) -> None: ...

    def resume(self) -> None: ...

    def status(self) -> dict[str, object]: ...

    def close(self) -> None: ...


# --- encoding ------------------------------------------------------------------------


def grant_fields(request: ClaimRequest) -> dict[str, str]:
    """The grant a claim backs, as feed fields (the Redis claim script writes the
    same names)."""
    half = len(request.key) // 2
    fields = {
        "r": request.ref,
        "a": request.key[:half].hex(),
        "b": request.key[half:].hex(),
        "u": request.user,
        "p": ",".join(map(str, sorted(request.ports))),
        "n": str(request.remaining),
        "e": repr(float(request.expires)),
        "m": request.method,
    }
    return _with_prefix(fields, request.prefix)


def _with_prefix(fields: dict[str, str], prefix: int | None) -> dict[str, str]:
    return fields if prefix is None else {**fields, "l": str(prefix)}


def claim_fields(request: ClaimRequest, origin: str) -> dict[str, str]:
    claim = request.claim
    if isinstance(claim, CounterClaim):
        head = {"t": "knock", "s": str(claim.step), "c": str(claim.counter)}
    else:
        head = {"t": "spa", "d": claim.digest.hex(), "w": repr(float(claim.until))}
    if not request.ports:  # a record-only claim: the digest, no grant
        return {**head, "o": origin}
    return {**head, "o": origin, **grant_fields(request)}


def record_fields(record: GrantRecord, origin: str) -> dict[str, str]:
    fields = {
        "t": "grant",
        "o": origin,
        "r": record.ref,
        "a": record.src.hex(),
        "b": record.dst.hex(),
        "u": record.user,
        "p": ",".join(map(str, sorted(record.ports))),
        "n": str(record.remaining),
        "e": repr(float(record.expires)),
        "m": record.method,
    }
    return _with_prefix(fields, record.prefix)


def used_fields(key: bytes, ref: str, origin: str) -> dict[str, str]:
    return {"t": "used", "o": origin, "r": ref, "k": key.hex()}


def hello_fields(worker: int, origin: str) -> dict[str, str]:
    return {"t": "hello", "o": origin, "i": str(worker)}


# --- strict decoding -------------------------------------------------------------------


def decode(fields: Mapping[str, str]) -> tuple[str, list[Change]]:
    """(origin, changes) of one entry; FeedError for anything that is not exactly
    one of ours."""
    f = _Fields(fields)
    kind = f.take("t")
    origin = f.match("o", ORIGIN)
    changes: list[Change]
    if kind == "knock":
        user = f.user("u")
        step = f.integer("s", -1, MAX_STEP)
        counter = f.integer("c", 0, MAX_COUNTER)
        changes = [Spent(user, step, counter), Granted(_record(f, user))]
    elif kind == "spa":
        digest = f.hexbytes("d", (32,))
        until = f.real("w")
        changes = [SeenDigest(digest, until)]
        if "r" in f.data:  # else a record-only claim (an authentic packet refused)
            changes.append(Granted(_record(f, f.user("u"))))
    elif kind == "grant":
        changes = [Granted(_record(f, f.user("u")))]
    elif kind == "used":
        ref = f.match("r", REF)
        changes = [Used(f.hexbytes("k", (8, 32)), ref)]
    elif kind == "hello":
        changes = [Hello(f.integer("i", 0, 63))]
    else:
        raise FeedError(f"unknown entry type {kind!r}")
    f.finish()
    return origin, changes


def parse_record(fields: Mapping[str, str]) -> GrantRecord:
    """A stored grant (the fields of ``grant_fields``, with ``r``); FeedError if bad."""
    f = _Fields(fields)
    record = _record(f, f.user("u"))
    f.finish()
    return record


def _record(f: _Fields, user: str) -> GrantRecord:
    ref = f.match("r", REF)
    src = f.hexbytes("a", (4, 16))
    dst = f.hexbytes("b", (len(src),))
    text = f.take("p")
    try:
        ports = [int(p) for p in text.split(",")]
    except ValueError:
        raise FeedError(f"ports {text[:40]!r}") from None
    if not 0 < len(ports) <= MAX_PORTS or not all(1 <= p <= 65535 for p in ports):
        raise FeedError(f"ports {text[:40]!r}")
    remaining = f.integer("n", 0, 1 << 20)
    expires = f.real("e")
    method = f.take("m")
    if method not in ("knock", "spa"):
        raise FeedError(f"method {method[:20]!r}")
    prefix = None
    if "l" in f.data:  # a prefix grant: strictly shorter than the address, and masked
        lo, hi = BOUNDS[len(src)]
        prefix = f.integer("l", lo, hi - 1)
        if not is_masked(src, prefix):
            raise FeedError(f"field 'a': bits set past the prefix /{prefix}")
    return GrantRecord(src, dst, user, frozenset(ports), remaining, expires, method, ref, prefix)


class _Fields:
    def __init__(self, fields: Mapping[str, str]) -> None:
        if len(fields) > 16:
            raise FeedError(f"{len(fields)} fields")
        self.data = dict(fields)

    def take(self, name: str) -> str:
        value = self.data.pop(name, None)
        if not isinstance(value, str) or len(value) > 8192:
            raise FeedError(f"field {name!r} missing or not text")
        return value

    def match(self, name: str, pattern: re.Pattern[str]) -> str:
        value = self.take(name)
        if not pattern.fullmatch(value):
            raise FeedError(f"field {name!r}: {value[:40]!r}")
        return value

    def user(self, name: str) -> str:
        return self.match(name, USER_NAME)

    def integer(self, name: str, lo: int, hi: int) -> int:
        text = self.take(name)
        if not re.fullmatch(r"-?[0-9]{1,15}", text) or not lo <= int(text) <= hi:
            raise FeedError(f"field {name!r}: {text[:20]!r} is not an integer in {lo}..{hi}")
        return int(text)

    def real(self, name: str) -> float:
        text = self.take(name)
        try:
            value = float(text)
        except ValueError:
            raise FeedError(f"field {name!r}: {text[:20]!r} is not a number") from None
        if not math.isfinite(value) or not 0 <= value <= MAX_WALL:
            raise FeedError(f"field {name!r}: {text[:20]!r} is out of range")
        return value

    def hexbytes(self, name: str, sizes: tuple[int, ...]) -> bytes:
        text = self.take(name)
        if not HEX.match(text) or len(text) // 2 not in sizes or len(text) % 2:
            raise FeedError(f"field {name!r}: not {'/'.join(map(str, sizes))} bytes of hex")
        return bytes.fromhex(text)

    def finish(self) -> None:
        if self.data:
            raise FeedError(f"unexpected fields {sorted(self.data)[:4]}")
