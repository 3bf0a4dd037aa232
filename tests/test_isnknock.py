"""ISN knocks (nfknock.isnknock): a knock of an ``isn = true`` user counts only with
the ISN its position carries (sequence.py step 8).  Sans-IO, and the service's
reading of the ISN from the SYN."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from nfknock.events import EventKind, Verdict
from nfknock.gate import ClaimOutcome, Outcome
from nfknock.netlab.craft import v4, v6
from nfknock.packet import parse_isn, parse_key
from nfknock.sequence import isns, step_of
from nfknock_client.knock import syn_segment
from tests.helpers import (
    CLIENT,
    CLIENT2,
    SERVER,
    Clock,
    InstantCore,
    alice,
    bob,
    knock_all,
    make,
    seq,
)


def isn_knock(
    core: InstantCore,
    clock: Clock,
    ports: tuple[int, ...],
    isn_values: tuple[int, ...],
    src: bytes = CLIENT,
) -> list[str]:
    """Knock ``ports`` with ``isn_values``; the codes of the events."""
    codes = []
    for port, isn in zip(ports, isn_values, strict=True):
        d = core.decide_isn(src + SERVER, port, isn, clock.wall, clock.mono)
        assert d.verdict is Verdict.DROP
        codes += [e.code for e in d.events]
        clock.advance(0.001)
    return codes


def right(
    core: InstantCore, clock: Clock, counter: int = 0
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    user = core.users["alice"]
    ports = seq(core, user, clock.wall, counter)
    step = step_of(clock.wall, 30)
    return ports, isns(user.secret, step, counter, core.s.params)


def opened(core: InstantCore, clock: Clock, src: bytes = CLIENT) -> bool:
    return core.decide(src, SERVER, 22, clock.wall, clock.mono).verdict is Verdict.ACCEPT


def test_isn_knocks_with_the_right_isns_open() -> None:
    core, clock = make([alice(isn=True)])
    assert core.knocks.isn_mode
    ports, values = right(core, clock)
    codes = isn_knock(core, clock, ports, values)
    assert "sequence_completed" in codes and "granted_knock" in codes
    assert opened(core, clock)


def test_the_right_ports_with_one_wrong_isn_do_not_open_until_that_knock_comes_right() -> None:
    core, clock = make([alice(isn=True)])
    ports, values = right(core, clock)
    wrong = (*values[:5], values[5] ^ 1, *values[6:])
    assert "sequence_completed" not in isn_knock(core, clock, ports, wrong)
    assert not opened(core, clock)
    assert "sequence_completed" in isn_knock(core, clock, ports[5:6], values[5:6])
    assert opened(core, clock)


def test_port_only_knocks_of_an_isn_user_never_open() -> None:
    core, clock = make([alice(isn=True)])
    ports, _ = right(core, clock)
    knock_all(core, clock, ports)  # decided without an ISN: the port-only path
    rng = random.Random(1)
    noise = tuple(rng.getrandbits(32) for _ in ports)
    assert "sequence_completed" not in isn_knock(core, clock, ports, noise)
    assert not opened(core, clock)


def test_wrong_isns_are_strays_that_reset_progress() -> None:
    core, clock = make([alice(isn=True)], stray_budget=3)
    ports, values = right(core, clock)
    isn_knock(core, clock, ports[:10], values[:10])
    codes = isn_knock(core, clock, ports[10:14], tuple(v ^ 0xFFFF for v in values[10:14]))
    assert codes[-1] == "stray_budget_spent"
    clock.advance(11)  # ignored for sequence_timeout, and the progress is gone
    ports, values = right(core, clock)
    assert "sequence_completed" not in isn_knock(core, clock, ports[10:], values[10:])


@settings(max_examples=30, deadline=None)
@given(st.permutations(range(32)))
def test_isn_knocks_complete_in_any_order(order: list[int]) -> None:
    core, clock = make([alice(isn=True)])
    ports, values = right(core, clock)
    codes = isn_knock(core, clock, tuple(ports[i] for i in order), tuple(values[i] for i in order))
    assert codes.count("sequence_completed") == 1


def test_a_replayed_isn_sequence_is_stale_and_a_plain_user_still_knocks_by_port() -> None:
    core, clock = make([alice(isn=True), bob()])
    ports, values = right(core, clock)
    isn_knock(core, clock, ports, values)
    assert "counter_spent" in isn_knock(core, clock, ports, values, src=CLIENT2)
    bob_ports = seq(core, core.users["bob"], clock.wall)
    noise = tuple(random.Random(2).getrandbits(32) for _ in bob_ports)
    codes = isn_knock(core, clock, bob_ports, noise, src=bytes([198, 51, 100, 12]))
    assert "sequence_completed" in codes


def test_without_isn_users_the_engine_is_not_in_isn_mode() -> None:
    core, _ = make([alice(), bob()])
    assert not core.knocks.isn_mode


def test_the_isn_candidates_follow_the_counter_window() -> None:
    core, clock = make([alice(isn=True)], lookahead=1, stale_counters=1)
    ports, values = right(core, clock, counter=2)  # beyond the look-ahead: not yet
    assert "sequence_completed" not in isn_knock(core, clock, ports, values)
    for counter, src in ((0, CLIENT), (1, CLIENT2)):
        ports, values = right(core, clock, counter)
        assert "sequence_completed" in isn_knock(core, clock, ports, values, src=src)
    ports, values = right(core, clock, counter=3)  # the window moved with the claims
    assert "sequence_completed" in isn_knock(core, clock, ports, values, src=SERVER)


def test_the_isn_is_read_from_ipv4_ipv6_and_extension_headers() -> None:
    a4, b4 = bytes([198, 51, 100, 10]), bytes([198, 51, 100, 1])
    a6, b6 = bytes(15) + b"\x10", bytes(15) + b"\x01"
    options = b"\x01" * 4  # IPv4 options: a longer header
    packets = [
        v4(a4, b4, syn_segment(a4, b4, 40000, 2000, 0xDEADBEEF)),
        v4(a4, b4, syn_segment(a4, b4, 40000, 2000, 0xDEADBEEF), options=options),
        v6(a6, b6, [], syn_segment(a6, b6, 40000, 2000, 0xDEADBEEF)),
        v6(a6, b6, [(0, bytes(6)), (60, bytes(14))], syn_segment(a6, b6, 40000, 2000, 0xDEADBEEF)),
    ]
    for packet in packets:
        _key, port = parse_key(packet)
        assert (port, parse_isn(packet)) == (2000, 0xDEADBEEF)


def test_the_service_hands_the_isn_to_the_engine_only_in_isn_mode() -> None:
    core, clock = make([alice(isn=True)])
    ports, values = right(core, clock)
    a, b = CLIENT, SERVER
    for port, isn in zip(ports, values, strict=True):
        packet = v4(a, b, syn_segment(a, b, 40000, port, isn))
        key, dport = parse_key(packet)
        core.knocks.decide_isn(key, dport, parse_isn(packet), clock.wall, clock.mono)
    for request in core.take_claims():
        core.resolve(ClaimOutcome(request.id, Outcome.WON), clock.mono)
    assert opened(core, clock)
    assert EventKind.KNOCK_PROGRESS


def test_isn_knocks_of_the_next_step_open_after_the_step_changes() -> None:
    core, clock = make([alice(isn=True)])
    start = step_of(clock.wall, 30)
    for _ in range(13):  # ticks stage the next step, as the daemon's do
        core.tick(clock.wall, clock.mono)
        clock.advance(2.5)
    assert step_of(clock.wall, 30) == start + 1
    core.tick(clock.wall, clock.mono)
    ports, values = right(core, clock)
    assert "sequence_completed" in isn_knock(core, clock, ports, values)
    assert core.knocks._isn is not None and core.knocks._isn.tracked() == 1
