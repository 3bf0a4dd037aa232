"""Engine scenarios with a fake clock: exact, one behaviour per test."""

from __future__ import annotations

import random

import pytest

from nfknock.candidates import PrefixDeriver
from nfknock.engine import RETAIN_STEPS
from nfknock.events import EventKind, Verdict
from nfknock.sequence import step_of

from .helpers import (
    CLIENT,
    CLIENT2,
    CLIENT6,
    SERVER,
    SERVER6,
    Clock,
    InstantCore,
    alice,
    bob,
    check_engine,
    ip,
    kinds,
    knock_all,
    make,
    opened,
    seq,
    syn,
)


def test_protected_port_is_dropped_before_knocking() -> None:
    engine, clock = make()
    assert syn(engine, clock) is Verdict.DROP


def test_every_knock_is_dropped_including_the_completing_one() -> None:
    engine, clock = make()
    decisions = knock_all(engine, clock, seq(engine, alice(), clock.wall))
    assert {d.verdict for d in decisions} == {Verdict.DROP}
    assert EventKind.GRANT_OPENED in kinds(decisions)


def test_correct_sequence_opens_the_protected_port() -> None:
    engine, clock = make()
    knock_all(engine, clock, seq(engine, alice(), clock.wall))
    assert syn(engine, clock) is Verdict.ACCEPT


def test_grant_allows_only_max_connections_new_connections() -> None:
    engine, clock = make()
    knock_all(engine, clock, seq(engine, alice(), clock.wall))
    assert syn(engine, clock) is Verdict.ACCEPT
    assert syn(engine, clock) is Verdict.DROP


def test_max_connections_three_allows_three() -> None:
    engine, clock = make(max_connections=3)
    knock_all(engine, clock, seq(engine, alice(), clock.wall))
    assert [syn(engine, clock) for _ in range(4)] == [Verdict.ACCEPT] * 3 + [Verdict.DROP]


def test_grant_expires_after_open_seconds() -> None:
    engine, clock = make(open_seconds=30.0)
    knock_all(engine, clock, seq(engine, alice(), clock.wall))
    clock.advance(30.5)
    assert syn(engine, clock) is Verdict.DROP


def test_expiry_is_reported_by_tick() -> None:
    engine, clock = make(open_seconds=5.0)
    knock_all(engine, clock, seq(engine, alice(), clock.wall))
    clock.advance(6)
    events = engine.tick(clock.wall, clock.mono)
    assert [e.kind for e in events] == [EventKind.GRANT_EXPIRED]
    assert engine.grant_list(clock.wall, clock.mono) == []


def test_grant_is_bound_to_source_and_destination() -> None:
    engine, clock = make()
    knock_all(engine, clock, seq(engine, alice(), clock.wall))
    assert syn(engine, clock, src=CLIENT2) is Verdict.DROP
    assert syn(engine, clock, dst=ip("198.51.100.2")) is Verdict.DROP
    assert syn(engine, clock) is Verdict.ACCEPT


def test_grant_covers_only_the_users_ports() -> None:
    engine, clock = make(
        users=[alice(ports=frozenset({22}))],
        protect={22: None, 2222: None},
    )
    knock_all(engine, clock, seq(engine, alice(), clock.wall))
    assert syn(engine, clock, port=2222) is Verdict.DROP
    assert syn(engine, clock, port=22) is Verdict.ACCEPT


def test_sequence_of_the_previous_step_still_opens_within_skew() -> None:
    engine, clock = make()
    ports = seq(engine, alice(), clock.wall - 30)
    assert knock_all(engine, clock, ports)
    assert syn(engine, clock) is Verdict.ACCEPT


def test_sequence_of_the_next_step_opens_within_skew() -> None:
    engine, clock = make()
    knock_all(engine, clock, seq(engine, alice(), clock.wall + 30))
    assert syn(engine, clock) is Verdict.ACCEPT


def test_sequence_two_steps_old_is_refused_with_skew_one() -> None:
    engine, clock = make()
    knock_all(engine, clock, seq(engine, alice(), clock.wall - 60))
    assert syn(engine, clock) is Verdict.DROP


def test_skew_zero_accepts_only_the_current_step() -> None:
    engine, clock = make(skew_steps=0)
    knock_all(engine, clock, seq(engine, alice(), clock.wall - 30))
    assert syn(engine, clock) is Verdict.DROP


def test_sequence_rolls_over_with_the_clock() -> None:
    engine, clock = make()
    clock.advance(300)
    knock_all(engine, clock, seq(engine, alice(), clock.wall))
    assert syn(engine, clock) is Verdict.ACCEPT


def test_counter_advances_after_a_completed_sequence() -> None:
    engine, clock = make()
    knock_all(engine, clock, seq(engine, alice(), clock.wall, counter=0))
    assert syn(engine, clock) is Verdict.ACCEPT
    knock_all(engine, clock, seq(engine, alice(), clock.wall, counter=1), src=CLIENT2)
    assert syn(engine, clock, src=CLIENT2) is Verdict.ACCEPT
    assert engine.counters()["alice"][engine.step] == 2


def test_replay_of_a_used_sequence_gets_reject_as_behind() -> None:
    engine, clock = make()
    ports = seq(engine, alice(), clock.wall)
    knock_all(engine, clock, ports)
    assert syn(engine, clock) is Verdict.ACCEPT
    decisions = knock_all(engine, clock, ports)
    assert EventKind.SEQUENCE_STALE in kinds(decisions)
    assert syn(engine, clock) is Verdict.REJECT


def test_replay_from_another_source_gets_reject_not_accept() -> None:
    engine, clock = make()
    ports = seq(engine, alice(), clock.wall)
    knock_all(engine, clock, ports)
    knock_all(engine, clock, ports, src=CLIENT2)
    assert syn(engine, clock, src=CLIENT2) is Verdict.REJECT


def test_behind_mark_ends_after_open_seconds() -> None:
    engine, clock = make(open_seconds=10.0)
    ports = seq(engine, alice(), clock.wall)
    knock_all(engine, clock, ports)
    knock_all(engine, clock, ports, src=CLIENT2)
    clock.advance(11)
    assert syn(engine, clock, src=CLIENT2) is Verdict.DROP


def test_behind_client_advancing_its_counter_gets_in() -> None:
    engine, clock = make()
    knock_all(engine, clock, seq(engine, alice(), clock.wall, 0), src=CLIENT2)
    knock_all(engine, clock, seq(engine, alice(), clock.wall, 0))
    assert syn(engine, clock) is Verdict.REJECT
    knock_all(engine, clock, seq(engine, alice(), clock.wall, 1))
    assert syn(engine, clock) is Verdict.ACCEPT


def test_replay_after_the_window_of_steps_is_silently_dropped() -> None:
    engine, clock = make()
    ports = seq(engine, alice(), clock.wall)
    knock_all(engine, clock, ports)
    clock.advance(120)
    decisions = knock_all(engine, clock, ports)
    assert kinds(decisions) == [] or EventKind.GRANT_OPENED not in kinds(decisions)
    assert syn(engine, clock) is Verdict.DROP


def test_wrong_secret_never_opens() -> None:
    engine, clock = make()
    knock_all(engine, clock, seq(engine, bob(), clock.wall))
    assert syn(engine, clock) is Verdict.DROP


def test_revoked_user_loses_grant_and_cannot_knock() -> None:
    engine, clock = make(users=[alice(), bob()])
    knock_all(engine, clock, seq(engine, alice(), clock.wall))
    events = engine.set_users([bob()], clock.mono)
    assert [(e.kind, e.user) for e in events] == [(EventKind.GRANT_REVOKED, "alice")]
    assert syn(engine, clock) is Verdict.DROP
    knock_all(engine, clock, seq(engine, alice(), clock.wall, 1), src=CLIENT2)
    assert syn(engine, clock, src=CLIENT2) is Verdict.DROP


def test_disabled_user_cannot_open_and_reenabled_user_can() -> None:
    engine, clock = make(users=[alice(enabled=False)])
    knock_all(engine, clock, seq(engine, alice(), clock.wall))
    assert syn(engine, clock) is Verdict.DROP
    engine.set_users([alice()], clock.mono)
    knock_all(engine, clock, seq(engine, alice(), clock.wall), src=CLIENT2)
    assert syn(engine, clock, src=CLIENT2) is Verdict.ACCEPT


def test_rekeyed_user_old_sequence_no_longer_opens() -> None:
    engine, clock = make()
    old = seq(engine, alice(), clock.wall)
    engine.set_users([alice(secret=bytes(32))], clock.mono)
    knock_all(engine, clock, old)
    assert syn(engine, clock) is Verdict.DROP


def test_user_added_at_run_time_can_open() -> None:
    engine, clock = make()
    engine.set_users([alice(), bob()], clock.mono)
    knock_all(engine, clock, seq(engine, bob(), clock.wall))
    assert syn(engine, clock) is Verdict.ACCEPT


def test_two_users_interleaved_from_one_address_both_complete() -> None:
    engine, clock = make(users=[alice(), bob()], max_connections=2)
    a, b = seq(engine, alice(), clock.wall), seq(engine, bob(), clock.wall)
    mixed = [p for pair in zip(a, b, strict=True) for p in pair]
    decisions = knock_all(engine, clock, mixed)
    opened = [e.user for d in decisions for e in d.events if e.kind is EventKind.GRANT_OPENED]
    assert sorted(u for u in opened if u) == ["alice", "bob"]


def test_eight_users_behind_one_address_knocking_round_robin_all_open() -> None:
    users = [alice(name=f"u{i}", secret=bytes([i + 1]) * 32) for i in range(8)]
    engine, clock = make(users=users)
    seqs = [seq(engine, u, clock.wall) for u in users]
    mixed = [p for column in zip(*seqs, strict=True) for p in column]
    decisions = knock_all(engine, clock, mixed, gap=0.0002)
    assert opened(decisions) == sorted(u.name for u in users)


def test_a_sequence_starts_however_many_knocks_of_others_lie_between_its_first_two() -> None:
    users = [alice(name=f"u{i}", secret=bytes([i + 1]) * 32) for i in range(8)]
    engine, clock = make(users=users)
    first, *others = [seq(engine, u, clock.wall) for u in users]
    # u0's first knock, then the other seven sequences whole, then the rest of u0's
    mixed = [first[0]] + [p for s in others for p in s] + list(first[1:])
    decisions = knock_all(engine, clock, mixed, gap=0.0002)
    assert opened(decisions) == sorted(u.name for u in users)


def test_ipv6_source_opens_for_ipv6_destination() -> None:
    engine, clock = make()
    knock_all(engine, clock, seq(engine, alice(), clock.wall), src=CLIENT6, dst=SERVER6)
    assert syn(engine, clock, src=CLIENT6, dst=SERVER6) is Verdict.ACCEPT
    assert syn(engine, clock) is Verdict.DROP


def test_duplicated_knocks_are_ignored() -> None:
    engine, clock = make()
    ports = seq(engine, alice(), clock.wall)
    knock_all(engine, clock, [p for p in ports for _ in range(3)])
    assert syn(engine, clock) is Verdict.ACCEPT


def test_reordering_within_the_window_still_completes() -> None:
    engine, clock = make(reorder_window=4)
    ports = list(seq(engine, alice(), clock.wall))
    for i in range(0, len(ports) - 4, 5):
        ports[i], ports[i + 4] = ports[i + 4], ports[i]
    knock_all(engine, clock, ports)
    assert syn(engine, clock) is Verdict.ACCEPT


def test_reordering_beyond_the_window_does_not_complete() -> None:
    engine, clock = make(reorder_window=2)
    ports = list(seq(engine, alice(), clock.wall))
    ports[0], ports[10] = ports[10], ports[0]
    knock_all(engine, clock, ports)
    assert syn(engine, clock) is Verdict.DROP


def test_sequence_slower_than_the_timeout_does_not_complete() -> None:
    engine, clock = make(sequence_timeout=10.0)
    knock_all(engine, clock, seq(engine, alice(), clock.wall), gap=0.5)
    assert syn(engine, clock) is Verdict.DROP


def test_stray_knocks_beyond_the_budget_reset_progress() -> None:
    engine, clock = make(stray_budget=3)
    ports = seq(engine, alice(), clock.wall)
    knock_all(engine, clock, ports[:10])
    used = set(ports)
    strays = [p for p in range(5000, 5100) if p not in used][:4]
    decisions = knock_all(engine, clock, strays)
    assert EventKind.PROGRESS_RESET in kinds(decisions)
    knock_all(engine, clock, ports[10:])
    assert syn(engine, clock) is Verdict.DROP


def test_stray_knocks_within_the_budget_are_tolerated() -> None:
    engine, clock = make(stray_budget=3)
    ports = seq(engine, alice(), clock.wall)
    used = set(ports)
    strays = [p for p in range(5000, 5100) if p not in used][:3]
    knock_all(engine, clock, list(ports[:10]) + strays + list(ports[10:]))
    assert syn(engine, clock) is Verdict.ACCEPT


def test_port_outside_range_and_not_protected_is_dropped_without_state() -> None:
    engine, clock = make()
    assert syn(engine, clock, port=80) is Verdict.DROP
    assert syn(engine, clock, port=65000) is Verdict.DROP
    assert engine.tracked_sources() == 0


def test_protected_port_at_a_destination_only_opens_there() -> None:
    gw_host = ip("198.51.100.20")
    engine, clock = make(protect={22: frozenset({gw_host})})
    knock_all(engine, clock, seq(engine, alice(), clock.wall), dst=gw_host)
    assert syn(engine, clock, dst=SERVER) is Verdict.DROP
    assert syn(engine, clock, dst=gw_host) is Verdict.ACCEPT


def test_source_table_is_bounded_by_lru_eviction() -> None:
    engine, clock = make(max_sources=16)
    starters = list(seq(engine, alice(), clock.wall)[:2])
    evicted = []
    for i in range(100):
        decisions = knock_all(engine, clock, starters, src=ip(f"198.51.100.{i + 2}"))
        evicted += [e for e in kinds(decisions) if e is EventKind.SOURCE_EVICTED]
    assert engine.tracked_sources() == 16
    assert len(evicted) == 100 - 16


def test_a_single_knock_never_creates_per_source_state() -> None:
    engine, clock = make()
    first = seq(engine, alice(), clock.wall)[0]
    for i in range(200):
        knock_all(engine, clock, [first], src=ip(f"198.51.100.{i % 250}"))
    assert engine.tracked_sources() == 0


def test_starting_needs_two_knocks_of_one_candidate_from_one_source() -> None:
    engine, clock = make()
    a, b = seq(engine, alice(), clock.wall)[:2]
    knock_all(engine, clock, [a], src=CLIENT)
    knock_all(engine, clock, [b], src=CLIENT2)
    assert engine.tracked_sources() == 0
    knock_all(engine, clock, [b], src=CLIENT)
    assert engine.tracked_sources() == 1


def test_progress_per_source_is_bounded() -> None:
    users = [alice(name=f"u{i}", secret=bytes([i]) * 32) for i in range(40)]
    engine, clock = make(users=users, max_progress_per_source=4, stray_budget=1000)
    for u in users:
        knock_all(engine, clock, seq(engine, u, clock.wall)[:2])
    source = engine.knocks._sources[CLIENT + SERVER]
    assert len(source.progress) <= 4


def test_restored_counter_windows_make_a_replay_stale() -> None:
    engine, clock = make()
    ports = seq(engine, alice(), clock.wall)
    knock_all(engine, clock, ports)
    high, pruned = engine.knocks.replay_horizon()
    fresh, later = make(clock=Clock(clock.wall))
    later.mono = 50.0  # a new boot: the monotonic clock restarted
    fresh.knocks.restore_counters(engine.snapshot_windows(), high, pruned)
    knock_all(fresh, later, ports, src=CLIENT2)
    assert syn(fresh, later, src=CLIENT2) is Verdict.REJECT
    assert fresh.counters() == {"alice": {engine.step: 1}}


def test_restored_grants_open_until_they_expire_and_skip_unknown_users() -> None:
    engine, clock = make()
    knock_all(engine, clock, seq(engine, alice(), clock.wall))
    records = engine.grant_records(clock.wall, clock.mono)
    fresh, later = make(clock=Clock(clock.wall))
    later.mono = 50.0
    assert fresh.restore_grants(records, later.wall, later.mono) == 1
    assert syn(fresh, later) is Verdict.ACCEPT
    stranger, _ = make(users=[bob()], clock=Clock(clock.wall))
    assert stranger.restore_grants(records, clock.wall, clock.mono) == 0
    stranger.knocks.restore_counters(engine.snapshot_windows(), -1, -1)
    assert stranger.counters() == {}


def test_tick_stages_the_next_step_so_the_step_change_derives_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = Clock(wall=1_700_000_035.0)  # 5 s before a step boundary
    engine, _ = make(users=[alice(), bob()], clock=clock)
    engine.tick(clock.wall, clock.mono)  # stages step T+2 for both users
    derived: list[int] = []
    real = PrefixDeriver.prefixes

    def counting(
        self: PrefixDeriver, secret: bytes, step: int, counters: range, mac: object = None
    ) -> list[tuple[int, ...]]:
        derived.append(step)
        return real(self, secret, step, counters)

    monkeypatch.setattr(PrefixDeriver, "prefixes", counting)
    clock.advance(10)  # into the next step
    knock_all(engine, clock, [5000], src=CLIENT2)  # the step change, on the packet path
    assert derived == []
    engine.tick(clock.wall, clock.mono)
    assert set(derived) == {engine.step + 2}  # ticks stage the step after
    knock_all(engine, clock, seq(engine, alice(), clock.wall + 30))
    assert syn(engine, clock) is Verdict.ACCEPT


def test_a_staged_sequence_does_not_open_before_its_step_enters_the_window() -> None:
    clock = Clock(wall=1_700_000_035.0)
    engine, _ = make(clock=clock)
    engine.tick(clock.wall, clock.mono)  # T+2 is indexed now, but beyond the skew
    knock_all(engine, clock, seq(engine, alice(), clock.wall + 60))
    assert syn(engine, clock) is Verdict.DROP


def test_the_step_that_left_the_window_never_opens() -> None:
    clock = Clock(wall=1_700_000_035.0)
    engine, _ = make(clock=clock)
    old = seq(engine, alice(), clock.wall - 30)  # T-1: fine now, gone after the change
    clock.advance(10)
    engine.tick(clock.wall, clock.mono, budget=0)
    assert engine.step - 2 not in engine.knocks._table.steps
    knock_all(engine, clock, old)
    assert syn(engine, clock) is Verdict.DROP


def test_progress_on_a_step_that_leaves_the_window_is_discarded() -> None:
    clock = Clock(wall=1_700_000_039.0)  # 1 s before a step boundary
    engine, _ = make(clock=clock)
    old = seq(engine, alice(), clock.wall - 30)
    knock_all(engine, clock, old[:16])
    clock.advance(2)  # T-1 leaves the window halfway through the sequence
    engine.tick(clock.wall, clock.mono, budget=0)
    knock_all(engine, clock, old[16:])
    assert syn(engine, clock) is Verdict.DROP


def test_the_step_that_leaves_the_window_leaves_the_start_index_at_once() -> None:
    clock = Clock(wall=1_700_000_035.0)
    engine, _ = make(users=[alice(), bob()], clock=clock)
    engine.tick(clock.wall, clock.mono)
    table = engine.knocks._table
    t = engine.step
    assert set(table.steps) == {t - 1, t, t + 1, t + 2}
    per_step = 2 * (1 + engine.s.lookahead)  # two users: the floor and its look-ahead
    assert table.slots_in_use() == 4 * per_step
    clock.advance(10)
    knock_all(engine, clock, [5000])  # the step change, on the packet path
    assert set(table.steps) == {t, t + 1, t + 2}
    check_engine(engine)
    engine.tick(clock.wall, clock.mono, budget=0)  # empties it for reuse
    assert not table._graveyard and table._spare
    for _ in range(4):
        clock.advance(0.25)
        engine.tick(clock.wall, clock.mono)
    assert set(table.steps) == {t, t + 1, t + 2, t + 3}
    assert table.slots_in_use() == 4 * per_step  # T+3 took the slots T-1 left
    check_engine(engine)


def test_a_clock_jump_rebuilds_the_window() -> None:
    engine, clock = make()
    clock.advance(3600)
    engine.tick(clock.wall, clock.mono)
    assert set(engine.knocks._table.steps) == set(range(engine.step - 1, engine.step + 3))
    check_engine(engine)
    clock.advance(-7200)
    knock_all(engine, clock, seq(engine, alice(), clock.wall))
    assert syn(engine, clock) is Verdict.ACCEPT


def _tick_for(engine: InstantCore, clock: Clock, seconds: float) -> list[EventKind]:
    """The daemon's housekeeping: a tick every 0.25 s (monotonic time)."""
    events: list[EventKind] = []
    for _ in range(int(seconds * 4)):
        clock.mono += 0.25
        clock.wall += 0.25
        events += [e.kind for e in engine.tick(clock.wall, clock.mono)]
    return events


def test_a_clock_stepped_forward_an_hour_and_back_still_knows_the_spent_counter() -> None:
    engine, clock = make()
    ports = seq(engine, alice(), clock.wall)
    knock_all(engine, clock, ports)
    assert syn(engine, clock) is Verdict.ACCEPT
    back = clock.wall
    clock.wall += 3600  # the clock steps forward an hour ...
    _tick_for(engine, clock, 5)
    clock.wall = back  # ... and back to step T
    _tick_for(engine, clock, 1)
    decisions = knock_all(engine, clock, ports, src=CLIENT2)
    assert EventKind.SEQUENCE_STALE in kinds(decisions)
    assert EventKind.GRANT_OPENED not in kinds(decisions)
    assert syn(engine, clock, src=CLIENT2) is Verdict.REJECT  # stale, not a grant
    knock_all(engine, clock, seq(engine, alice(), clock.wall, counter=1), src=CLIENT2)
    assert syn(engine, clock, src=CLIENT2) is Verdict.ACCEPT  # the next counter still opens


def test_a_clock_stepped_forward_without_ticks_and_back_still_knows_the_spent_counter() -> None:
    engine, clock = make()
    ports = seq(engine, alice(), clock.wall)
    knock_all(engine, clock, ports)
    back = clock.wall
    clock.wall += 3600
    knock_all(engine, clock, [5000], src=CLIENT2)  # the packet path sees the jump
    clock.wall = back
    knock_all(engine, clock, ports, src=CLIENT2)
    assert syn(engine, clock, src=CLIENT2) is Verdict.REJECT


def test_a_step_whose_counters_were_pruned_never_goes_live_again() -> None:
    engine, clock = make()
    ports = seq(engine, alice(), clock.wall)
    knock_all(engine, clock, ports)
    back = clock.wall
    clock.wall += (RETAIN_STEPS + 10) * engine.s.params.step_seconds
    assert EventKind.REPLAY_STATE_GAP not in _tick_for(engine, clock, 1)  # prunes step T
    clock.wall = back
    events = _tick_for(engine, clock, 2)
    assert events.count(EventKind.REPLAY_STATE_GAP) == 1  # said once
    assert engine.knocks.replay_horizon()[1] >= step_of(back, engine.s.params.step_seconds)
    decisions = knock_all(engine, clock, ports, src=CLIENT2)  # the replay ...
    fresh = knock_all(engine, clock, seq(engine, alice(), back, counter=1), src=CLIENT2)
    assert EventKind.GRANT_OPENED not in kinds(decisions + fresh)  # ... and a new counter
    assert syn(engine, clock, src=CLIENT2) is Verdict.DROP
    clock.wall = back + 30  # the next step was never pruned: it opens
    knock_all(engine, clock, seq(engine, alice(), clock.wall))
    assert syn(engine, clock) is Verdict.ACCEPT


def test_a_first_knock_survives_one_turn_of_tier_zero() -> None:
    engine, clock = make()
    engine.knocks._seen_limit = engine.knocks._seen_cap = 8  # turn after eight new sources
    ports = seq(engine, alice(), clock.wall)
    knock_all(engine, clock, ports[:1])
    near = [p for p in range(1024, 33792) if engine.knocks._table.near[p] and p not in ports]
    for i in range(9):  # nine other sources: tier 0 turns between our first two knocks
        knock_all(engine, clock, [near[i]], src=ip(f"198.51.100.{100 + i}"))
    assert (CLIENT + SERVER) in engine.knocks._prev_seen
    knock_all(engine, clock, ports[1:])
    assert syn(engine, clock) is Verdict.ACCEPT


def test_tier_zero_is_bounded_by_a_flood_of_new_sources() -> None:
    users = [alice(name=f"u{i}", secret=i.to_bytes(2, "big") * 16) for i in range(2000)]
    engine, clock = make(users=users)  # enough users that every knock port is near
    engine.knocks._seen_limit = engine.knocks._seen_cap = 1000
    rng = random.Random(3)
    for _ in range(5000):
        engine.decide(rng.randbytes(4), SERVER, rng.randint(1024, 33791), clock.wall, clock.mono)
    assert len(engine.knocks._seen) <= 1001
    assert len(engine.knocks._prev_seen) == 1001  # a full generation was turned over


def test_after_a_clock_step_the_packet_path_builds_a_bounded_share_and_ticks_the_rest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import nfknock.engine

    monkeypatch.setattr(nfknock.engine, "SYNC_BUILD", 3)
    users = [alice(name=f"u{i}", secret=bytes([i + 1]) * 32) for i in range(10)]
    engine, clock = make(users=users)
    clock.advance(3600)  # a clock step: nothing of the new window is built
    knock_all(engine, clock, [5000], src=CLIENT2)
    assert engine.knocks._cursor  # the packet path built three users of it, no more
    last = users[-1]
    knock_all(engine, clock, seq(engine, last, clock.wall))
    assert syn(engine, clock) is Verdict.DROP  # not built yet: fails closed
    engine.tick(clock.wall, clock.mono)  # the current step first, then the others
    # the client tries again (with its next counter, as nfknock-client does)
    knock_all(engine, clock, seq(engine, last, clock.wall, counter=1))
    assert syn(engine, clock) is Verdict.ACCEPT
    check_engine(engine)


def test_tier_zero_turns_by_new_sources_however_many_sources_are_tracked() -> None:
    engine, clock = make(max_sources=64)
    knocks = engine.knocks
    rng = random.Random(4)
    ports = [p for p in range(1024, 33792) if knocks._table.near[p]]
    for _ in range(40):  # 40 tracked sources ...
        src = rng.randbytes(4)
        for port in rng.sample(ports, 5):
            engine.decide(src, SERVER, port, clock.wall, clock.mono)
    assert engine.tracked_sources() == 40
    knocks._seen_limit = 16  # ... more than a generation of new ones
    knocks._turn(clock.mono)
    turned = knocks._prev_seen
    for _ in range(16):  # sixteen new sources fit in this generation
        engine.decide(rng.randbytes(4), SERVER, ports[0], clock.wall, clock.mono)
    assert knocks._prev_seen is turned
    engine.decide(rng.randbytes(4), SERVER, ports[0], clock.wall, clock.mono)
    assert knocks._prev_seen is not turned  # the seventeenth turns it over
    assert engine.tracked_sources() == 40


def test_random_knocks_from_many_sources_create_little_state() -> None:
    engine, clock = make()
    rng = random.Random(7)
    for _ in range(20_000):
        src = rng.getrandbits(32).to_bytes(4, "big")
        engine.decide(src, SERVER, rng.randint(1024, 33791), clock.wall, clock.mono)
    # One user, 3 steps, 5 start positions: about 15/32768 of random knocks start.
    assert engine.tracked_sources() < 100


def test_changing_a_users_scheme_voids_the_old_sequences() -> None:
    from nfknock.schemes import make_scheme

    engine, clock = make()
    old = seq(engine, alice(), clock.wall)
    events = engine.set_users([alice(scheme=make_scheme("totp-knockd-rs"))], clock.mono)
    assert events == []  # no grant to revoke
    knock_all(engine, clock, old)
    assert syn(engine, clock) is Verdict.DROP


def test_an_untracked_source_past_its_stray_budget_is_ignored_until_its_slot_expires() -> None:
    users = [alice(name=f"u{i}", secret=(i + 1).to_bytes(2, "big") * 16) for i in range(300)]
    engine, clock = make(users=users, stray_budget=3)
    mine = set(seq(engine, users[0], clock.wall))
    near = [p for p in range(1024, 33792) if engine.knocks._table.near[p] and p not in mine]
    knock_all(engine, clock, near[:200], gap=0.0001)  # a sweep of near ports, one source
    knock_all(engine, clock, seq(engine, users[0], clock.wall), gap=0.0001)
    assert syn(engine, clock) is Verdict.DROP  # ignored while the budget is spent
    clock.advance(engine.s.sequence_timeout + 0.1)
    knock_all(engine, clock, seq(engine, users[0], clock.wall))
    assert syn(engine, clock) is Verdict.ACCEPT
