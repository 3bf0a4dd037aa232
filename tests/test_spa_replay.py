"""The replay cache: bounded, time-keyed, fail-closed, exportable."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nfknock.spa.replay import Claim, ReplayCache, ReplayStateError

D1, D2, D3 = (bytes([i]) * 32 for i in (1, 2, 3))
T = 1_800_000_000.0


def test_a_digest_is_fresh_once_then_a_replay_until_it_expires() -> None:
    cache = ReplayCache(16, 241)
    assert cache.claim(D1, T) is Claim.FRESH
    assert cache.claim(D1, T + 240.9) is Claim.REPLAY
    assert cache.seen(D1, T + 240.9) and not cache.seen(D1, T + 241)
    assert cache.claim(D1, T + 241) is Claim.FRESH


def test_entries_are_kept_at_least_twice_max_age() -> None:
    cache = ReplayCache.for_max_age(16, 120)
    assert cache.keep >= 240
    cache.claim(D1, T)
    assert cache.claim(D1, T + 240) is Claim.REPLAY


def test_seen_records_nothing() -> None:
    cache = ReplayCache(16, 10)
    assert not cache.seen(D1, T)
    assert len(cache) == 0


def test_a_cache_full_of_live_entries_refuses_instead_of_forgetting() -> None:
    cache = ReplayCache(2, 100)
    assert cache.claim(D1, T) is Claim.FRESH
    assert cache.claim(D2, T + 1) is Claim.FRESH
    assert cache.claim(D3, T + 2) is Claim.FULL
    assert cache.claim(D1, T + 2) is Claim.REPLAY  # still remembered
    assert cache.claim(D3, T + 100) is Claim.FRESH  # D1 expired: room again
    assert D1 not in cache and D2 in cache


def test_a_packet_from_the_future_is_kept_until_its_own_window_closes() -> None:
    cache = ReplayCache(2, 10)
    assert cache.claim(D1, T, good_until=T + 1000) is Claim.FRESH
    assert cache.claim(D2, T) is Claim.FRESH
    assert cache.claim(D3, T + 10) is Claim.FRESH  # D2 expired: it did not wait for D1
    assert cache.claim(D1, T + 999) is Claim.REPLAY
    assert not cache.seen(D1, T + 1000) and cache.expire(T + 1000) == 2


def test_expire_forgets_only_what_has_expired() -> None:
    cache = ReplayCache(16, 10)
    cache.claim(D1, T)
    cache.claim(D2, T + 5)
    assert cache.expire(T + 10) == 1
    assert D2 in cache and D1 not in cache


def test_export_and_restore_round_trip_through_json() -> None:
    cache = ReplayCache(16, 100)
    cache.claim(D1, T)
    cache.claim(D2, T + 50)
    data = json.loads(json.dumps(cache.export()))
    restored = ReplayCache(16, 100)
    assert restored.restore(data, T + 60) == 0
    assert restored.claim(D1, T + 60) is Claim.REPLAY
    assert restored.claim(D2, T + 60) is Claim.REPLAY
    assert restored.claim(D3, T + 60) is Claim.FRESH


def test_restore_drops_expired_entries_and_keeps_the_latest_over_capacity() -> None:
    data = [[D1.hex(), T + 10], [D2.hex(), T + 30], [D3.hex(), T + 20], [bytes(32).hex(), T - 1]]
    cache = ReplayCache(2, 100)
    assert cache.restore(data, T) == 1
    assert D2 in cache and D3 in cache and D1 not in cache and bytes(32) not in cache


@pytest.mark.parametrize(
    "data",
    [
        "not a list",
        {"a": 1},
        [["00"]],
        [[D1.hex(), "later"]],
        [[D1.hex(), True]],
        [[D1.hex(), float("nan")]],
        [["zz" * 32, T]],
        [["00" * 31, T]],
        [[1, T]],
        42,
    ],
)
def test_restore_refuses_malformed_data_and_changes_nothing(data: object) -> None:
    cache = ReplayCache(16, 100)
    cache.claim(D1, T)
    with pytest.raises(ReplayStateError):
        cache.restore(data, T)  # type: ignore[arg-type]
    assert len(cache) == 1


def test_bad_bounds_are_refused() -> None:
    with pytest.raises(ValueError):
        ReplayCache(0, 10)
    with pytest.raises(ValueError):
        ReplayCache(10, 0)


@settings(max_examples=200)
@given(
    st.lists(
        st.tuples(st.integers(0, 5), st.floats(0, 50, allow_nan=False)), min_size=1, max_size=60
    )
)
def test_claims_match_a_simple_model(steps: list[tuple[int, float]]) -> None:
    """With room to spare, a claim is a replay iff the same digest was claimed
    fresh less than ``keep`` seconds before (time only moves forward)."""
    keep = 60.0
    cache = ReplayCache(1024, keep)
    fresh_at: dict[int, float] = {}
    now = T
    for digest, dt in steps:
        now += dt
        expected = (
            Claim.REPLAY if digest in fresh_at and now < fresh_at[digest] + keep else Claim.FRESH
        )
        assert cache.claim(bytes([digest]) * 32, now) is expected
        if expected is Claim.FRESH:
            fresh_at[digest] = now
