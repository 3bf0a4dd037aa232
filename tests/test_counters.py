"""The counter rule, and every store held to it: the same claims give the same answers."""

from __future__ import annotations

from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nfknock.counters import MAX_COUNTER, CounterWindow
from nfknock.gate import ClaimRequest, CounterClaim, DigestClaim, Outcome
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


claims = st.lists(
    st.tuples(st.sampled_from([-1, 100, 101]), st.integers(0, 12), st.integers(0, 3)),
    max_size=40,
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(sequence=claims)
def test_the_embedded_store_claims_exactly_as_the_rule(
    tmp_path_factory: object, sequence: list[tuple[int, int, int]]
) -> None:
    path = tmp_path_factory.mktemp("store") / "state.db"  # type: ignore[attr-defined]
    store = EmbeddedStore(Path(path))
    model: dict[int, CounterWindow] = {}
    try:
        for i, (step, counter, lookahead) in enumerate(sequence, start=1):
            expected = model.setdefault(step, CounterWindow()).claim(counter, lookahead)
            out = store.claim(request(i, CounterClaim("alice", step, counter, lookahead)), 1e9)
            assert out.outcome is (Outcome.WON if expected else Outcome.LOST), (step, counter)
        loaded = {step: w.floor for _, step, w in store.load(1e9).windows}
        assert loaded == {s: w.floor for s, w in model.items() if w.floor}
    finally:
        store.close()


def test_a_digest_is_claimed_once_until_its_window_ends_and_the_store_refuses_when_full(
    tmp_path: Path,
) -> None:
    store = EmbeddedStore(tmp_path / "state.db", replay_cache=1024, max_age=120)
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


def test_a_record_only_claim_stores_the_digest_and_no_grant(tmp_path: Path) -> None:
    store = EmbeddedStore(tmp_path / "state.db")
    try:
        record = ClaimRequest(
            1, DigestClaim(bytes(32), 1e9 + 240), b"", "alice", frozenset(), 0, 0, "spa"
        )
        assert store.claim(record, 1e9).outcome is Outcome.WON
        snap = store.load(1e9)
        assert snap.digests == [(bytes(32), 1e9 + 240)] and snap.grants == []
    finally:
        store.close()
