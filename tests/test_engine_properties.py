"""Hypothesis properties of the verdict engine."""

from __future__ import annotations

import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nfknock.events import EventKind, Verdict

from .helpers import (
    CLIENT,
    CLIENT2,
    SERVER,
    alice,
    bob,
    check_engine,
    kinds,
    knock_all,
    make,
    opened,
    seq,
    syn,
)

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _jitter(ports: tuple[int, ...], rng: random.Random, window: int, dup_rate: float) -> list[int]:
    """Reorder by at most ``window`` positions and duplicate some knocks."""
    keyed = sorted(range(len(ports)), key=lambda i: i + rng.uniform(0, window))
    # sorting i + U(0, w) moves no element more than w positions from home
    out: list[int] = []
    for i in keyed:
        out.append(ports[i])
        while rng.random() < dup_rate:
            out.append(ports[i])
    return out


@FAST
@given(seed=st.integers(0, 2**32), dup_rate=st.floats(0, 0.5), window=st.integers(0, 4))
def test_right_sequence_with_duplicates_and_reordering_always_opens(
    seed: int, dup_rate: float, window: int
) -> None:
    engine, clock = make(reorder_window=4)
    ports = seq(engine, alice(), clock.wall)
    knock_all(engine, clock, _jitter(ports, random.Random(seed), window, dup_rate))
    assert syn(engine, clock) is Verdict.ACCEPT


def _merge(seqs: list[list[int]], rng: random.Random) -> list[int]:
    """A random interleaving that keeps each sequence's own order."""
    owners = [i for i, s in enumerate(seqs) for _ in s]
    rng.shuffle(owners)
    heads = [iter(s) for s in seqs]
    return [next(heads[i]) for i in owners]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    k=st.integers(2, 8),
    seed=st.integers(0, 2**32),
    window=st.integers(0, 4),
    dup_rate=st.floats(0, 0.3),
)
def test_interleaved_sequences_of_up_to_eight_users_from_one_address_all_open(
    k: int, seed: int, window: int, dup_rate: float
) -> None:
    # k users behind one NAT address knock at once: each sequence reordered within the
    # (default) reorder window and duplicated, the k of them randomly interleaved.
    users = [alice(name=f"u{i}", secret=bytes([i + 1]) * 32) for i in range(k)]
    engine, clock = make(users=users)
    rng = random.Random(seed)
    seqs = [_jitter(seq(engine, u, clock.wall), rng, window, dup_rate) for u in users]
    decisions = knock_all(engine, clock, _merge(seqs, rng), gap=0.0002)
    assert opened(decisions) == sorted(u.name for u in users)


@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 2**32))
def test_100k_random_syns_never_open_and_state_stays_bounded(seed: int) -> None:
    engine, clock = make(users=[alice(), bob()], max_sources=1024)
    rng = random.Random(seed)
    for _ in range(100_000):
        src = bytes([198, 51, 100, rng.randrange(256)]) if rng.random() < 0.5 else rng.randbytes(4)
        port = rng.randint(1024, 33791) if rng.random() < 0.98 else 22
        verdict = engine.decide(src, SERVER, port, clock.wall, clock.mono).verdict
        assert verdict is Verdict.DROP
        clock.advance(0.0003)
    assert engine.tracked_sources() <= 1024
    assert engine.grant_list(clock.wall, clock.mono) == []


@settings(max_examples=6, deadline=None)
@given(order=st.sampled_from(["ascending", "descending", "shuffled"]), seed=st.integers(0, 2**32))
def test_full_range_sweep_never_opens(order: str, seed: int) -> None:
    engine, clock = make(users=[alice(), bob()])
    ports = list(range(1024, 33792))
    if order == "descending":
        ports.reverse()
    elif order == "shuffled":
        random.Random(seed).shuffle(ports)
    decisions = knock_all(engine, clock, ports, gap=0.0001)
    assert EventKind.GRANT_OPENED not in kinds(decisions)
    assert syn(engine, clock) is Verdict.DROP


@FAST
@given(seed=st.integers(0, 2**32), delay=st.floats(0, 90))
def test_replay_of_a_completed_sequence_never_opens_again(seed: int, delay: float) -> None:
    engine, clock = make()
    ports = seq(engine, alice(), clock.wall)
    knock_all(engine, clock, ports)
    assert syn(engine, clock) is Verdict.ACCEPT
    clock.advance(delay)
    replay = _jitter(ports, random.Random(seed), 2, 0.1)
    src = CLIENT if seed % 2 else CLIENT2
    knock_all(engine, clock, replay, src=src)
    assert syn(engine, clock, src=src) in (Verdict.DROP, Verdict.REJECT)


_clock_moves = st.lists(
    st.tuples(
        st.sampled_from([-1, 1]),
        st.sampled_from([0.4, 1, 2, 30, 3600, 86400, 3 * 86400]),  # seconds
        st.booleans(),  # tick the daemon's housekeeping for a few seconds after
        st.booleans(),  # replay the spent sequence right there
    ),
    min_size=1,
    max_size=6,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(moves=_clock_moves)
def test_a_spent_sequence_never_opens_again_whatever_the_clock_does(
    moves: list[tuple[int, float, bool, bool]],
) -> None:
    engine, clock = make()
    spent_at = clock.wall
    ports = seq(engine, alice(), spent_at)
    knock_all(engine, clock, ports)
    assert syn(engine, clock) is Verdict.ACCEPT
    replays = 0
    for sign, seconds, tick, replay_here in [*moves, (1, 0.0, False, True)]:
        clock.wall += sign * seconds
        if tick:
            for _ in range(8):
                clock.advance(0.25)
                engine.tick(clock.wall, clock.mono)
        if replay_here:
            for wall in (clock.wall, spent_at):  # here, and with the clock back at T
                clock.wall = wall
                replays += 1
                src = bytes([198, 51, 100, 100 + replays])
                decisions = knock_all(engine, clock, ports, src=src)
                assert EventKind.GRANT_OPENED not in kinds(decisions)
                assert syn(engine, clock, src=src) is not Verdict.ACCEPT


_inputs = st.lists(
    st.tuples(
        st.sampled_from(["knock-right", "knock-random", "syn", "tick", "advance", "users"]),
        st.integers(0, 2**16),
    ),
    max_size=120,
)


@settings(max_examples=150, deadline=None)
@given(script=_inputs)
def test_any_input_sequence_leaves_the_engine_consistent(script: list[tuple[str, int]]) -> None:
    engine, clock = make(users=[alice(), bob()], max_sources=32, max_grants=16)
    right = seq(engine, alice(), clock.wall)
    i = 0
    for action, n in script:
        src = bytes([198, 51, 100, n % 4])
        if action == "knock-right":
            engine.decide(src, SERVER, right[i % len(right)], clock.wall, clock.mono)
            i += 1
        elif action == "knock-random":
            engine.decide(src, SERVER, 1024 + n % 32768, clock.wall, clock.mono)
        elif action == "syn":
            engine.decide(src, SERVER, 22, clock.wall, clock.mono)
        elif action == "tick":
            engine.tick(clock.wall, clock.mono)
        elif action == "advance":
            clock.advance(n % 50)
        else:
            engine.set_users([alice(), bob()][: n % 3], clock.mono)
        # invariants
        assert engine.tracked_sources() <= 32
        check_engine(engine)
        for g in engine.grant_list(clock.wall, clock.mono):
            assert 0 < g["remaining"] <= engine.s.max_connections
            assert g["user"] in engine.users
