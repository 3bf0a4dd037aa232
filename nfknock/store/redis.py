"""The Redis/Valkey state store: exactly-once claims shared by every gateway.

Every claim is one Lua script (:data:`CLAIM`), so Redis runs it atomically: the
counter rule of :mod:`nfknock.counters` (a floor per (user, step); counter ``c``
wins iff ``floor <= c <= min(floor + lookahead, MAX_COUNTER)``, and moves the floor
to ``c + 1``) or "this SPA digest was never seen", the grant it backs (with its
expiry), and the change-feed entry that tells the other gateways -- all or nothing.
``tests/test_counters.py`` runs the same claim sequences against this store, the
embedded one and the rule itself.

Keys (``P`` = ``[state] prefix``; one deployment, one prefix):

    ============  ======  =========================================================
    P:schema      string  "1"; claims refuse a store without it (empty or foreign)
    P:w:<step>    hash    user -> floor; expires (2 x skew + 2) steps + 10 min after
                          its last claim (never for the HOTP "step" -1)
    P:steps       zset    the steps that have a window (for loading)
    P:d           zset    SPA digest (hex) -> the wall time until which it must be
                          remembered (the end of its packet's window); members past
                          it are pruned at every SPA claim; at [spa] replay_cache
                          live members a new claim is refused
    P:g:<ref>     hash    a grant: addresses, user, ports, connections left ("n"),
                          expiry, and the prefix ("l") of a prefix grant; the key
                          expires a minute after the grant
    P:grants      zset    grant ref -> expiry (for loading)
    P:feed        stream  the change feed (capped at about 100,000 entries)
    P:seq         string  the number of the last feed entry (each entry carries its own)
    P:horizon     hash    the highest step seen and the highest pruned (max of all)
    ============  ======  =========================================================

Why a stream for the feed (not pub/sub): the entry is written by the same script
as the claim, so it exists exactly when the claim does; a gateway that lost its
connection for a while reads on from the last entry it saw instead of silently
missing what happened meanwhile; and it is bounded (``MAXLEN ~``), with a reader
that fell behind the trim point noticing it (every entry carries its number) and
reloading everything.

Unreachable: a claim is FAILED (nothing opens that needs one) -- at once while a
back-off runs (0.25 s doubling to 5 s), so a dead server never queues claims behind
timeouts.  Loading at start does not refuse an unreachable server (the daemon
starts with nothing known and catches up when it connects: every opening needs a
claim there anyway) but does refuse damaged or foreign data, like the embedded
store.  Durability is Redis's own: use ``appendonly yes`` (``appendfsync always``
for every claim) or a counter spent just before a crash of Redis may be spent once
more; a Redis that comes back empty is re-seeded by the gateways still running.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import time
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from nfknock.config import USER_NAME, StateConfig
from nfknock.core import GrantRecord, WindowList
from nfknock.counters import MAX_COUNTER, CounterWindow
from nfknock.gate import ClaimOutcome, ClaimRequest, CounterClaim, Outcome
from nfknock.store import Snapshot, StateError
from nfknock.store.changes import FeedError, claim_fields, parse_record, used_fields

T = TypeVar("T")
SCHEMA = b"1"
FEED_MAXLEN = 100_000
MAX_STEP = 1 << 40
MAX_ENTRIES = 1 << 24
BACKOFF_FIRST, BACKOFF_MAX = 0.25, 5.0
HOTP_STEP = -1
# A feed position: the stream id of the last entry read, "/", its sequence number.
POSITION = re.compile(rb"^[0-9]{1,20}-[0-9]{1,20}/[0-9]{1,20}$")
DOWN = (redis.ConnectionError, redis.TimeoutError, OSError)

# KEYS: 1 schema, 2 window hash or digest zset, 3 steps, 4 grant hash, 5 grants, 6 feed,
#       7 feed sequence
# ARGV: 1 kind, 2 schema, 3 now, 4 feed maxlen, 5 grant ttl (0: a record-only claim,
#       no grant), 6.. feed fields (name, value pairs; the grant's come first, in the
#       order HSET stores them), then
#       knock: user, step, counter, lookahead, MAX_COUNTER, window ttl
#       spa:   digest hex, remembered until (wall), key ttl seconds, capacity
CLAIM = """
if redis.call('GET', KEYS[1]) ~= ARGV[2] then
  return redis.error_reply('the shared state has no nfknock schema (empty or foreign)')
end
local nf = tonumber(ARGV[6])
local fields = {}
for i = 1, 2 * nf do fields[i] = ARGV[6 + i] end
local rest = 7 + 2 * nf
if ARGV[1] == 'knock' then
  local user, step, c = ARGV[rest], ARGV[rest + 1], tonumber(ARGV[rest + 2])
  local lookahead, max = tonumber(ARGV[rest + 3]), tonumber(ARGV[rest + 4])
  local raw = redis.call('HGET', KEYS[2], user)
  local floor = 0
  if raw then
    floor = tonumber(raw)
    if floor == nil or floor < 0 or floor > max + 1 or floor ~= math.floor(floor) then
      return redis.error_reply('damaged floor of ' .. user .. ' in ' .. KEYS[2])
    end
  end
  -- counters.py: claimable iff floor <= c <= min(floor + lookahead, MAX_COUNTER)
  if c < floor or c > math.min(floor + lookahead, max) then return {0, floor} end
  redis.call('HSET', KEYS[2], user, c + 1)
  if tonumber(ARGV[rest + 5]) > 0 then redis.call('EXPIRE', KEYS[2], ARGV[rest + 5]) end
  redis.call('ZADD', KEYS[3], step, step)
else
  local digest, untl = ARGV[rest], ARGV[rest + 1]
  local ttl, capacity = tonumber(ARGV[rest + 2]), tonumber(ARGV[rest + 3])
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[3])
  if redis.call('ZSCORE', KEYS[2], digest) then return {0, 0} end
  if redis.call('ZCARD', KEYS[2]) >= capacity then
    return redis.error_reply('the SPA replay cache is full')
  end
  redis.call('ZADD', KEYS[2], untl, digest)
  if redis.call('TTL', KEYS[2]) < ttl then redis.call('EXPIRE', KEYS[2], ttl) end
end
if tonumber(ARGV[5]) > 0 then
  -- the grant: pairs 3..10 of the feed entry (items 5..20) are r a b u p n e m,
  -- and pair 11 (items 21, 22) is l for a prefix grant (nfknock.prefixes)
  local last = 20
  if fields[21] == 'l' then last = 22 end
  redis.call('HSET', KEYS[4], unpack(fields, 5, last))
  redis.call('EXPIRE', KEYS[4], ARGV[5])
  redis.call('ZADD', KEYS[5], fields[18], fields[6])
  redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', '(' .. ARGV[3])
end
fields[#fields + 1] = 'q'
fields[#fields + 1] = redis.call('INCR', KEYS[7])
redis.call('XADD', KEYS[6], 'MAXLEN', '~', ARGV[4], '*', unpack(fields))
return {1, 0}
"""

# KEYS: 1 grant hash, 2 feed, 3 feed sequence.  ARGV: 1 feed maxlen, 2.. feed fields.
USED = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  if redis.call('HINCRBY', KEYS[1], 'n', -1) <= 0 then redis.call('DEL', KEYS[1]) end
end
local fields = {}
for i = 2, #ARGV do fields[i - 1] = ARGV[i] end
fields[#fields + 1] = 'q'
fields[#fields + 1] = redis.call('INCR', KEYS[3])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[1], '*', unpack(fields))
return 1
"""

# KEYS: 1 schema, 2 steps, 3 grants, 4 digests, 5 feed, 6 horizon, 7 feed sequence.
# ARGV: 1 prefix, 2 now.  One script, so the snapshot and the feed position it
# corresponds to (the last entry, and its number) are one instant.
LOAD = """
local windows, grants = {}, {}
for _, step in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  local h = redis.call('HGETALL', ARGV[1] .. ':w:' .. step)
  if #h == 0 then redis.call('ZREM', KEYS[2], step) else
    windows[#windows + 1] = step; windows[#windows + 1] = h end
end
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', '(' .. ARGV[2])
for _, ref in ipairs(redis.call('ZRANGE', KEYS[3], 0, -1)) do
  local h = redis.call('HGETALL', ARGV[1] .. ':g:' .. ref)
  if #h == 0 then redis.call('ZREM', KEYS[3], ref) else
    grants[#grants + 1] = ref; grants[#grants + 1] = h end
end
local last = redis.call('XREVRANGE', KEYS[5], '+', '-', 'COUNT', 1)
local position = '0-0'
if #last > 0 then position = last[1][1] end
position = position .. '/' .. (redis.call('GET', KEYS[7]) or '0')
return {redis.call('GET', KEYS[1]) or '', windows, grants,
        redis.call('ZRANGE', KEYS[4], 0, -1, 'WITHSCORES'), position,
        redis.call('HGETALL', KEYS[6])}
"""

# KEYS: 1 horizon.  ARGV: high_step, pruned_through.  Each field keeps the maximum.
HORIZON = """
local names = {'high_step', 'pruned_through'}
for i = 1, 2 do
  local have = tonumber(redis.call('HGET', KEYS[1], names[i]) or '-1') or -1
  if tonumber(ARGV[i]) > have then redis.call('HSET', KEYS[1], names[i], ARGV[i]) end
end
return 1
"""

# KEYS: 1 schema, 2 steps, 3 digests.  ARGV: 1 prefix, 2 schema, 3 window ttl,
# 4 number of windows, then (user, step, floor) triples, then (digest, until) pairs.
# After the store came back empty: what this gateway knows goes back (floors only
# ever rise), and only then the schema, so claims resume.
RESEED = """
local n, i = tonumber(ARGV[4]), 5
for _ = 1, n do
  local user, step, floor = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  local key = ARGV[1] .. ':w:' .. step
  if floor > (tonumber(redis.call('HGET', key, user) or '0') or 0) then
    redis.call('HSET', key, user, floor)
  end
  if step ~= '-1' then redis.call('EXPIRE', key, ARGV[3]) end
  redis.call('ZADD', KEYS[2], step, step)
  i = i + 3
end
while i < #ARGV do
  redis.call('ZADD', KEYS[3], 'NX', ARGV[i + 1], ARGV[i])
  i = i + 2
end
redis.call('SET', KEYS[1], ARGV[2])
return 1
"""


def make_client(state: StateConfig, read_timeout: float | None = None) -> redis.Redis:
    """A client for ``state`` that never retries on its own (the store decides what
    a failure means) and verifies a TLS server's certificate and name."""
    kwargs: dict[str, Any] = {
        "socket_timeout": read_timeout or state.timeout,
        "socket_connect_timeout": state.timeout,
        "retry": Retry(NoBackoff(), 0),
        "health_check_interval": 0,
        "client_name": "nfknock",
    }
    if state.password:
        kwargs["password"] = state.password
    if state.url.startswith("rediss://"):
        kwargs["ssl_cert_reqs"] = "required"
        kwargs["ssl_check_hostname"] = True
        if state.ca_file is not None:
            kwargs["ssl_ca_certs"] = str(state.ca_file)
    client: redis.Redis = redis.Redis.from_url(state.url, **kwargs)
    return client


class Keys:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.schema = f"{prefix}:schema"
        self.steps = f"{prefix}:steps"
        self.digests = f"{prefix}:d"
        self.grants = f"{prefix}:grants"
        self.feed = f"{prefix}:feed"
        self.seq = f"{prefix}:seq"
        self.horizon = f"{prefix}:horizon"

    def window(self, step: int) -> str:
        return f"{self.prefix}:w:{step}"

    def grant(self, ref: str) -> str:
        return f"{self.prefix}:g:{ref}"


class RedisStore:
    def __init__(
        self,
        state: StateConfig,
        *,
        origin: str,
        replay_cache: int = 65536,
        max_age: float = 120.0,
        step_seconds: int = 30,
        skew_steps: int = 1,
    ) -> None:
        self.state = state
        self.description = state.describe()
        self.origin = origin
        self.keys = Keys(state.prefix)
        self.replay_cache = replay_cache
        self.keep = 2 * max_age + 1  # as the replay cache: nfknock.spa.replay
        # A step is claimable for at most (2 x skew + 1) steps after its first claim;
        # ten more minutes cover gateways whose clocks disagree a little.
        self.window_ttl = (2 * skew_steps + 2) * step_seconds + 600
        self.client = make_client(state)
        self._claim = self.client.register_script(CLAIM)
        self._used = self.client.register_script(USED)
        self._load = self.client.register_script(LOAD)
        self._horizon = self.client.register_script(HORIZON)
        self._reseed = self.client.register_script(RESEED)
        self.reachable = True
        self.last_error = ""
        self._retry_at = 0.0
        self._backoff = 0.0
        # Connections spent while Redis was unreachable: sent when it is back.
        self._unsent: deque[tuple[bytes, str]] = deque(maxlen=4096)

    # --- reachability --------------------------------------------------------------

    def _may_try(self) -> bool:
        return time.monotonic() >= self._retry_at

    def _down(self, exc: BaseException) -> str:
        self.reachable = False
        self._backoff = min(max(BACKOFF_FIRST, self._backoff * 2), BACKOFF_MAX)
        self._retry_at = time.monotonic() + self._backoff
        self.last_error = f"{self.description} unreachable: {type(exc).__name__}: {exc}"
        with contextlib.suppress(Exception):
            self.client.connection_pool.disconnect()  # no dead connection is reused later
        return self.last_error

    def _up(self) -> None:
        self.reachable = True
        self._backoff = 0.0
        self._retry_at = 0.0
        self.last_error = ""

    def _again(self, call: Callable[[], T]) -> T:
        """``call()``, once more if the connection it used turned out to be dead
        (Redis restarted since): the command was never sent, so it is safe to send
        again.  A timeout is not retried (the script may have run)."""
        try:
            return call()
        except redis.ConnectionError:
            if not self.reachable:
                raise
            return call()

    def note_reachable(self) -> None:
        """The feed reconnected: try at once instead of waiting out the back-off."""
        self._retry_at = 0.0

    # --- the interface --------------------------------------------------------------

    def load(self, wall: float) -> Snapshot:
        try:
            snap, present = load_snapshot(self.client, self.keys, wall, self.description)
        except DOWN as exc:
            self._down(exc)
            return Snapshot()  # caught up with when the feed connects
        self._up()
        if not present:
            snap.fresh = True
        return snap

    def begin(self) -> None:
        """Mark the store as nfknock's (a fresh deployment); refuse a foreign one."""
        try:
            self.client.set(self.keys.schema, SCHEMA, nx=True)
            schema = self.client.get(self.keys.schema)
        except DOWN as exc:
            self._down(exc)
            return
        if schema != SCHEMA:
            raise StateError(
                f"{self.description}: {self.keys.schema} is {schema!r}, not {SCHEMA!r} "
                "(another program's data, or another nfknock version: use another prefix)"
            )

    def claim(self, request: ClaimRequest, wall: float) -> ClaimOutcome:
        if not self._may_try():
            detail = self.last_error or f"{self.description} unreachable"
            return ClaimOutcome(request.id, Outcome.FAILED, f"{detail} (retrying)")
        self._flush_unsent()
        if not request.ref:  # a caller that shares nothing (tests): name it anyway
            request = dataclasses.replace(request, ref=f"{self.origin}.{request.id}")
        fields = claim_fields(request, self.origin)
        claim = request.claim
        names = ["t", fields["t"], "o", self.origin]
        grant = ["r", "a", "b", "u", "p", "n", "e", "m"] if request.ports else []
        if grant and "l" in fields:  # a prefix grant (the script looks for it here)
            grant.append("l")
        pairs = names + [x for k in grant for x in (k, fields[k])]
        if isinstance(claim, CounterClaim):
            pairs += ["s", fields["s"], "c", fields["c"]]
            keys = [self.keys.schema, self.keys.window(claim.step), self.keys.steps]
            ttl = 0 if claim.step == HOTP_STEP else self.window_ttl
            extra: list[Any] = [claim.user, claim.step, claim.counter, claim.lookahead]
            extra += [MAX_COUNTER, ttl]
        else:
            pairs += ["d", fields["d"], "w", fields["w"]]
            keys = [self.keys.schema, self.keys.digests, self.keys.steps]
            ttl = max(1, math.ceil(claim.until - wall) + 60)
            extra = [fields["d"], fields["w"], ttl, self.replay_cache]
        keys += [self.keys.grant(request.ref)]
        keys += [self.keys.grants, self.keys.feed, self.keys.seq]
        grant_ttl = max(1, math.ceil(request.expires - wall) + 60) if request.ports else 0
        args: list[Any] = ["knock" if isinstance(claim, CounterClaim) else "spa", SCHEMA]
        args += [repr(wall)]
        args += [FEED_MAXLEN, grant_ttl, len(pairs) // 2, *pairs, *extra]
        try:
            reply = self._again(lambda: self._claim(keys=keys, args=args))
        except DOWN as exc:
            return ClaimOutcome(request.id, Outcome.FAILED, self._down(exc))
        except redis.RedisError as exc:  # the script refused: damaged data, full, no schema
            self._up()
            return ClaimOutcome(request.id, Outcome.FAILED, f"{self.description}: {exc}")
        self._up()
        if reply == [1, 0]:
            return ClaimOutcome(request.id, Outcome.WON)
        if not (isinstance(reply, list) and len(reply) == 2 and reply[0] == 0):
            return ClaimOutcome(
                request.id, Outcome.FAILED, f"{self.description}: unexpected reply {reply!r}"
            )
        if isinstance(claim, CounterClaim):
            detail = f"counter {claim.counter} of step {claim.step} already spent (next {reply[1]})"
        else:
            detail = "SPA payload seen before (replay)"
        return ClaimOutcome(request.id, Outcome.LOST, detail)

    def used(self, key: bytes, ref: str) -> None:
        """A connection of the shared grant ``ref`` was spent here: one fewer for
        everyone.  Unreachable: kept (bounded) and sent when Redis is back."""
        self._unsent.append((key, ref))
        if self._may_try():
            self._flush_unsent()

    def flush(self) -> None:
        """Reachable again: send the connections spent meanwhile."""
        self._retry_at = 0.0
        self._flush_unsent()

    def _flush_unsent(self) -> None:
        while self._unsent:
            key, ref = self._unsent[0]
            fields = used_fields(key, ref, self.origin)
            args: list[Any] = [FEED_MAXLEN, *[x for kv in fields.items() for x in kv]]
            try:
                self._again(
                    partial(
                        self._used,
                        keys=[self.keys.grant(ref), self.keys.feed, self.keys.seq],
                        args=args,
                    )
                )
            except DOWN as exc:
                self._down(exc)
                return
            except redis.RedisError as exc:
                self.last_error = f"{self.description}: {exc}"
            self._unsent.popleft()

    def save_horizon(self, high_step: int, pruned_through: int) -> None:
        # Windows are not deleted here: another gateway whose clock lags may still
        # accept those steps; they expire by themselves (window_ttl).
        try:
            self._again(
                lambda: self._horizon(keys=[self.keys.horizon], args=[high_step, pruned_through])
            )
        except DOWN as exc:
            self._down(exc)

    def finish(self, grants: list[GrantRecord], high_step: int, pruned_through: int) -> None:
        """Grants live in Redis with their expiry already; what is left to do is to
        send the connections spent here that Redis has not heard of."""
        if self._may_try():
            self._flush_unsent()
        self.save_horizon(high_step, pruned_through)

    def reseed(self, windows: WindowList, digests: list[tuple[bytes, float]]) -> None:
        """Write back what this gateway knows into a store that came back empty."""
        args: list[Any] = [self.keys.prefix, SCHEMA, self.window_ttl, len(windows)]
        for user, step, window in windows:
            args += [user, step, window.floor]
        for digest, until in digests:
            args += [digest.hex(), repr(until)]
        try:
            keys = [self.keys.schema, self.keys.steps, self.keys.digests]
            self._again(lambda: self._reseed(keys=keys, args=args))
        except DOWN as exc:
            self._down(exc)

    def close(self) -> None:
        self.client.close()


# --- strict loading ------------------------------------------------------------------------


def load_snapshot(
    client: redis.Redis, keys: Keys, wall: float, description: str
) -> tuple[Snapshot, bool]:
    """Everything the store holds, validated, and the feed position it corresponds
    to; whether the store carries our schema.  StateError for damaged or foreign
    data (a connection problem raises the client's error)."""
    try:
        reply = client.register_script(LOAD)(
            keys=[
                keys.schema,
                keys.steps,
                keys.grants,
                keys.digests,
                keys.feed,
                keys.horizon,
                keys.seq,
            ],
            args=[keys.prefix, repr(wall)],
        )
    except DOWN:
        raise
    except redis.RedisError as exc:
        raise StateError(f"{description}: cannot load the shared state: {exc}") from None
    where = "reply"
    try:
        if not isinstance(reply, list) or len(reply) != 6:
            raise _Bad("not the six parts of a snapshot")
        schema, windows_raw, grants_raw, digests_raw, position, horizon_raw = reply
        present = schema == SCHEMA
        if schema not in (b"", SCHEMA):
            raise _Bad(f"schema {schema!r}, not {SCHEMA!r} (another program or version)")
        where = keys.horizon
        horizon = _pairs(horizon_raw, 2)
        high = _int(horizon.get(b"high_step", b"-1"), -1, MAX_STEP, "high_step")
        pruned = _int(horizon.get(b"pruned_through", b"-1"), -1, MAX_STEP, "pruned_through")
        where = keys.steps
        windows: WindowList = []
        for step_raw, fields in _pairs(windows_raw, MAX_ENTRIES).items():
            step = _int(step_raw, -1, MAX_STEP, "step")
            where = keys.window(step)
            for user_raw, floor_raw in _pairs(fields, MAX_ENTRIES).items():
                user = _text(user_raw, "user")
                if not USER_NAME.fullmatch(user):
                    raise _Bad(f"{user!r} is not a user name")
                floor = _int(floor_raw, 0, MAX_COUNTER + 1, f"floor of {user}")
                windows.append((user, step, CounterWindow(floor)))
        where = keys.grants
        grants = []
        for ref_raw, fields in _pairs(grants_raw, MAX_ENTRIES).items():
            ref = _text(ref_raw, "ref")
            where = keys.grant(ref)
            record = {_text(k, "field"): _text(v, "value") for k, v in _pairs(fields, 16).items()}
            try:
                grants.append(parse_record({**record, "r": ref}))
            except FeedError as exc:
                raise _Bad(str(exc)) from None
        where = keys.digests
        digests = []
        for member, score in _pairs(digests_raw, MAX_ENTRIES).items():
            text = _text(member, "digest")
            if not re.fullmatch(r"[0-9a-f]{64}", text):
                raise _Bad(f"{text[:70]!r} is not a digest")
            digests.append((bytes.fromhex(text), _real(score, "digest time")))
        where = keys.feed
        if not isinstance(position, bytes) or not POSITION.match(position):
            raise _Bad(f"position {position!r}")
    except _Bad as exc:
        raise StateError(
            f"{description}: {where}: {exc} (the shared state is damaged or not nfknock's)"
        ) from None
    snap = Snapshot(
        windows=windows,
        high_step=high,
        pruned_through=pruned,
        digests=digests,
        grants=[g for g in grants if g.expires > wall and g.remaining > 0],
        clean=True,  # grants live in Redis whatever happened to any one gateway
        position=position.decode(),
    )
    return snap, present


class _Bad(Exception):
    pass


def _pairs(raw: Any, limit: int) -> dict[Any, Any]:
    if not isinstance(raw, list) or len(raw) % 2 or len(raw) > 2 * limit:
        raise _Bad(f"not a list of pairs: {str(raw)[:60]}")
    return dict(zip(raw[::2], raw[1::2], strict=True))


def _text(raw: Any, what: str) -> str:
    if not isinstance(raw, bytes) or len(raw) > 256:
        raise _Bad(f"{what} {str(raw)[:60]}")
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        raise _Bad(f"{what} {raw[:60]!r} is not ASCII") from None


def _int(raw: Any, lo: int, hi: int, what: str) -> int:
    text = _text(raw, what)
    if not re.fullmatch(r"-?[0-9]{1,15}", text) or not lo <= int(text) <= hi:
        raise _Bad(f"{what} must be an integer in {lo}..{hi}, not {text[:30]!r}")
    return int(text)


def _real(raw: Any, what: str) -> float:
    text = _text(raw, what)
    try:
        value = float(text)
    except ValueError:
        raise _Bad(f"{what} {text[:30]!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise _Bad(f"{what} {text[:30]!r} is out of range")
    return value
