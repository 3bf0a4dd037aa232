"""The counter rule, and every store held to it: the same claims give the same answers."""

from __future__ import annotations

import secrets
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nfknock.config import StateConfig
from nfknock.counters import MAX_COUNTER, CounterWindow
from nfknock.gate import ClaimRequest, CounterClaim, DigestClaim, Outcome
from nfknock.netlab.redisd import RedisServer
from nfknock.store import StateStore
from nfknock.store.embedded import EmbeddedStore

KEY = bytes([198, 51, 100, 10, 198, 51, 100, 1])


def request(i: int, claim: CounterClaim | DigestClaim) -> ClaimRequest:
    return ClaimRequest(i, claim, KEY, "alice", frozenset({22}), 1, 1e9, "knock")


def test_a_counter_opens_once_and_kills_every_counter_below_it() -> None:
    w = CounterWindow()
    assert w.claim(0, 2) and not w.claim(0, 2)
    assert w.claim(2, 2)  # one lost attempt skipped
    assert not w.claim(1, 2)  # a sniffed, never used sequence dies with it
    assert w.floor == 3


def test_look_ahead_bounds_how_far_a_client_may_skip() -> None:
    w = CounterWindow()
    assert not w.claim(3, 2)
    assert w.claim(2, 2) and w.floor == 3


def test_no_counter_beyond_the_bound_is_ever_claimable() -> None:
    assert not CounterWindow(MAX_COUNTER + 1).claimable(MAX_COUNTER + 1, 5)
    assert CounterWindow(MAX_COUNTER).claim(MAX_COUNTER, 5)


def test_copies_merge_to_what_either_knows_was_spent() -> None:
    a, b = CounterWindow(3), CounterWindow(5)
    a.merge(b)
    assert a.floor == 5
    a.mark_spent(2)
    assert a.floor == 5
    a.mark_spent(7)
    assert a.floor == 8


STEPS = [-1, 100, 101]  # -1: the HOTP "step" of counter-only schemes
# Each step's floor starts at 0 or close to MAX_COUNTER (as if many were spent), so
# the bound is reached; counters near both, look-aheads up to the widest allowed.
starts = st.fixed_dictionaries(
    {s: st.one_of(st.just(0), st.integers(MAX_COUNTER - 70, MAX_COUNTER + 1)) for s in STEPS}
)
# (step, counter relative to the step's starting floor, look-ahead)
claims = st.lists(
    st.tuples(
        st.sampled_from(STEPS),
        st.one_of(st.integers(-3, 12), st.integers(60, 72)),
        st.one_of(st.integers(0, 3), st.just(64)),
    ),
    max_size=40,
)


def seed_floor(store: StateStore, step: int, floor: int) -> None:
    """Start (alice, step) at ``floor``, as if that many counters were spent."""
    if isinstance(store, EmbeddedStore):
        db = store._connect()
        db.execute("INSERT OR REPLACE INTO windows VALUES ('alice', ?, ?)", (step, floor))
    else:
        from nfknock.store.redis import RedisStore

        assert isinstance(store, RedisStore)
        store.client.hset(store.keys.window(step), "alice", floor)
        store.client.zadd(store.keys.steps, {str(step): step})


def new_store(kind: str, tmp: Path, redis_url: str, **kw: float) -> StateStore:
    if kind == "embedded":
        return EmbeddedStore(tmp / "state.db", **kw)  # type: ignore[arg-type]
    from nfknock.store.redis import RedisStore

    state = StateConfig("redis", redis_url, prefix=f"t{secrets.token_hex(6)}", timeout=2.0)
    store = RedisStore(state, origin="conformance", **kw)  # type: ignore[arg-type]
    store.begin()
    return store


@pytest.fixture(params=["embedded", "redis"])
def store_kind(request: pytest.FixtureRequest) -> str:
    kind: str = request.param
    return kind


@pytest.fixture
def redis_url(store_kind: str, request: pytest.FixtureRequest) -> str:
    if store_kind != "redis":
        return ""
    server: RedisServer = request.getfixturevalue("redis_server")
    return server.url


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(start=starts, sequence=claims)
def test_every_store_claims_exactly_as_the_rule(
    tmp_path_factory: pytest.TempPathFactory,
    store_kind: str,
    redis_url: str,
    start: dict[int, int],
    sequence: list[tuple[int, int, int]],
) -> None:
    """The same claim sequences, against the rule (counters.py) and a real store:
    the embedded SQLite file, and Redis through its Lua claim script."""
    store = new_store(store_kind, tmp_path_factory.mktemp("store"), redis_url)
    model = {step: CounterWindow(floor) for step, floor in start.items()}
    try:
        for step, floor in start.items():
            if floor:
                seed_floor(store, step, floor)
        for i, (step, delta, lookahead) in enumerate(sequence, start=1):
            counter = max(0, start[step] + delta)
            expected = model[step].claim(counter, lookahead)
            out = store.claim(request(i, CounterClaim("alice", step, counter, lookahead)), 1e9)
            assert out.outcome is (Outcome.WON if expected else Outcome.LOST), (step, counter)
        loaded = {step: w.floor for _, step, w in store.load(1e9).windows}
        assert loaded == {s: w.floor for s, w in model.items() if w.floor}
    finally:
        store.close()


def test_a_digest_is_claimed_once_until_its_window_ends_and_the_store_refuses_when_full(
    tmp_path: Path, store_kind: str, redis_url: str
) -> None:
    store = new_store(store_kind, tmp_path, redis_url, replay_cache=1024, max_age=120)
    try:
        d = bytes(32)
        assert store.claim(request(1, DigestClaim(d, 5240.0)), 4990.0).outcome is Outcome.WON
        assert store.claim(request(2, DigestClaim(d, 5240.0)), 5000.0).outcome is Outcome.LOST
        for i in range(1, 1024):
            digest = i.to_bytes(32, "big")
            assert store.claim(request(10 + i, DigestClaim(digest, 5240.0)), 5000.0).outcome is (
                Outcome.WON
            )
        # Full of digests still needed (their windows not over): refuse, fail closed.
        full = store.claim(request(9999, DigestClaim(b"\xff" * 32, 5250.0)), 5000.0)
        assert full.outcome is Outcome.FAILED and "replay cache is full" in full.detail
        # Once their windows are over they may go: room again, and d is claimable anew.
        later = store.claim(request(10000, DigestClaim(b"\xfe" * 32, 5550.0)), 5300.0)
        assert later.outcome is Outcome.WON
        assert store.claim(request(10001, DigestClaim(d, 5550.0)), 5300.0).outcome is Outcome.WON
    finally:
        store.close()


def test_a_record_only_claim_stores_the_digest_and_no_grant(
    tmp_path: Path, store_kind: str, redis_url: str
) -> None:
    store = new_store(store_kind, tmp_path, redis_url)
    try:
        record = ClaimRequest(
            1, DigestClaim(bytes(32), 1e9 + 240), b"", "alice", frozenset(), 0, 0, "spa"
        )
        assert store.claim(record, 1e9).outcome is Outcome.WON
        snap = store.load(1e9)
        assert snap.digests == [(bytes(32), 1e9 + 240)] and snap.grants == []
    finally:
        store.close()


def test_each_grant_is_recorded_with_its_claim_and_only_with_a_won_one(
    tmp_path: Path, store_kind: str, redis_url: str
) -> None:
    store = new_store(store_kind, tmp_path, redis_url)
    try:
        won = replace(request(1, CounterClaim("alice", 100, 0, 2)), expires=1e9 + 60)
        lost = replace(request(2, CounterClaim("alice", 100, 0, 2)), expires=1e9 + 60, remaining=7)
        assert store.claim(won, 1e9).outcome is Outcome.WON
        assert store.claim(lost, 1e9).outcome is Outcome.LOST
        if isinstance(store, EmbeddedStore):  # its grants are loaded after a clean exit only
            rows = store._connect().execute("SELECT user, remaining FROM grants").fetchall()
            assert rows == [("alice", 1)]
        else:
            grants = store.load(1e9).grants
            assert [(g.user, g.remaining, g.ports) for g in grants] == [
                ("alice", 1, frozenset({22}))
            ]
    finally:
        store.close()
