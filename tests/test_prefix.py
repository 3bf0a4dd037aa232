"""Grant prefixes (nfknock.prefixes): a grant, a behind mark and knock progress for the
client's network -- a carrier's address pool, an IPv6 /64 of rotating privacy
addresses -- instead of one address.  Sans-IO: the grant table, the gate, the core and
the knock engine with a fake clock."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nfknock.config import SpaConfig
from nfknock.core import GrantRecord
from nfknock.events import EventKind, Verdict
from nfknock.gate import ClaimOutcome, Outcome
from nfknock.grants import Grant, GrantTable
from nfknock.prefixes import is_masked, key_masks, mask_address, mask_key
from nfknock.prefixes import text as prefix_text

from .helpers import (
    CLIENT,
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
    seq,
    syn,
)
from .helpers import settings as engine_settings
from .spa_support import packet, spa_user

V4_NEIGHBOUR = ip("198.51.100.11")  # CLIENT is 198.51.100.10: the same /24
V4_STRANGER = ip("198.51.101.10")
V6_NEIGHBOUR = ip("2001:db8::11")  # CLIENT6 is 2001:db8::10: the same /64
V6_STRANGER = ip("2001:db8:0:1::10")


# --- masking --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("addr", "prefix", "masked"),
    [
        ("198.51.100.10", 24, "198.51.100.0"),
        ("198.51.100.200", 25, "198.51.100.128"),
        ("198.51.100.10", 8, "198.0.0.0"),
        ("2001:db8::10", 64, "2001:db8::"),
        ("2001:db8:0:1ff:8000::1", 57, "2001:db8:0:180::"),
    ],
)
def test_an_address_is_masked_to_its_prefix(addr: str, prefix: int, masked: str) -> None:
    assert mask_address(ip(addr), prefix) == ip(masked)
    assert is_masked(ip(masked), prefix) and not is_masked(ip(addr), prefix)
    assert mask_key(ip(addr) + ip("198.51.100.1" if "." in addr else "2001:db8::1"), prefix)[
        : len(ip(addr))
    ] == ip(masked)


def test_the_engine_masks_each_family_and_never_the_destination() -> None:
    masks = key_masks(24, 64)

    def masked(key: bytes) -> bytes:
        return (int.from_bytes(key, "big") & masks[len(key)]).to_bytes(len(key), "big")

    assert masked(CLIENT + SERVER) == ip("198.51.100.0") + SERVER
    assert masked(CLIENT6 + SERVER6) == ip("2001:db8::") + SERVER6
    assert set(key_masks(32, 64)) == {32}  # IPv4 keys left alone
    assert key_masks(32, 128) == {}  # nothing to mask: the engine keeps its plain path


def test_a_prefix_is_shown_with_its_length_and_an_exact_address_without() -> None:
    assert prefix_text(ip("2001:db8::"), 64) == "2001:db8::/64"
    assert prefix_text(CLIENT, None) == "198.51.100.10"


# --- the grant table --------------------------------------------------------------------


def _grant(gid: int, prefix: int | None, confirmed: bool = True) -> Grant:
    return Grant(gid, "alice", frozenset({22}), 1, 100.0, confirmed, prefix=prefix)


def test_a_prefix_grant_opens_for_every_address_of_its_prefix_and_no_other() -> None:
    table = GrantTable()
    table.add(mask_key(CLIENT + SERVER, 24), _grant(1, 24))
    assert table.decide(V4_STRANGER + SERVER, 22, 0.0)[0] is Verdict.DROP
    verdict, grant = table.decide(V4_NEIGHBOUR + SERVER, 22, 0.0)
    assert verdict is Verdict.ACCEPT and grant is not None and grant.prefix == 24
    assert table.decide(CLIENT + SERVER, 22, 0.0)[0] is Verdict.DROP  # its one connection


def test_an_exact_grant_of_a_network_address_does_not_open_its_neighbours() -> None:
    """198.51.100.0 as a host and 198.51.100.0/24 share a masked key: the length
    tells them apart."""
    table = GrantTable()
    network = ip("198.51.100.0")
    table.add(network + SERVER, _grant(1, None))
    table.add(mask_key(ip("203.0.113.7") + SERVER, 24), _grant(2, 24))  # /24s in use
    assert table.decide(V4_NEIGHBOUR + SERVER, 22, 0.0)[0] is Verdict.DROP
    assert table.decide(network + SERVER, 22, 0.0)[0] is Verdict.ACCEPT


def test_a_pending_prefix_grant_holds_a_neighbours_syn() -> None:
    table = GrantTable()
    table.add(mask_key(CLIENT6 + SERVER6, 64), _grant(1, 64, confirmed=False))
    assert table.decide(V6_NEIGHBOUR + SERVER6, 22, 0.0)[0] is Verdict.HOLD


def test_a_prefix_behind_mark_resets_its_neighbours_and_an_exact_one_only_its_address() -> None:
    table = GrantTable()
    table.mark_behind(mask_key(CLIENT6 + SERVER6, 64), 50.0, 64)
    table.mark_behind(ip("198.51.100.0") + SERVER, 50.0)  # a host that is a network address
    table.mark_behind(mask_key(ip("203.0.113.7") + SERVER, 24), 50.0, 24)
    assert table.decide(V6_NEIGHBOUR + SERVER6, 22, 0.0)[0] is Verdict.REJECT
    assert table.decide(V6_STRANGER + SERVER6, 22, 0.0)[0] is Verdict.DROP
    assert table.decide(V4_NEIGHBOUR + SERVER, 22, 0.0)[0] is Verdict.DROP
    table.clear_behind(mask_key(CLIENT6 + SERVER6, 64), 64)
    assert table.decide(V6_NEIGHBOUR + SERVER6, 22, 0.0)[0] is Verdict.DROP


def test_prefix_lookups_end_when_the_last_prefix_grant_expires() -> None:
    table = GrantTable()
    table.add(mask_key(CLIENT + SERVER, 24), _grant(1, 24))
    table.mark_behind(mask_key(CLIENT6 + SERVER6, 64), 50.0, 64)
    assert table.prefix_lengths() == {4: (24,), 16: (64,)}
    table.expire(60.0)
    assert table.prefix_lengths() == {4: (24,)}
    table.expire(200.0)
    assert table.prefix_lengths() == {}


_last_octet = st.integers(0, 255)


@settings(max_examples=300, deadline=None)
@given(
    grants=st.lists(
        st.tuples(_last_octet, st.sampled_from([None, 24, 25, 28, 30]), st.booleans()),
        max_size=12,
    ),
    marks=st.lists(st.tuples(_last_octet, st.sampled_from([None, 24, 26])), max_size=4),
    queries=st.lists(_last_octet, max_size=20),
)
def test_a_syn_is_decided_by_exactly_the_grants_and_marks_that_cover_its_address(
    grants: list[tuple[int, int | None, bool]],
    marks: list[tuple[int, int | None]],
    queries: list[int],
) -> None:
    """Against a model: a grant (or mark) of prefix p covers the addresses whose first p
    bits are its own; ACCEPT spends a covering confirmed grant, else HOLD for a
    covering pending one, else REJECT for a covering mark, else DROP."""

    def addr(octet: int) -> bytes:
        return bytes([198, 51, 100, octet])

    def covers(net: bytes, prefix: int | None, src: bytes) -> bool:
        return net == (src if prefix is None else mask_address(src, prefix))

    table = GrantTable()
    live: dict[int, tuple[bytes, int | None, bool]] = {}
    for gid, (octet, prefix, confirmed) in enumerate(grants, start=1):
        net = mask_address(addr(octet), prefix)
        table.add(net + SERVER, _grant(gid, prefix, confirmed))
        live[gid] = (net, prefix, confirmed)
    behind = [(mask_address(addr(o), p), p) for o, p in marks]
    for net, prefix in behind:
        table.mark_behind(net + SERVER, 50.0, prefix)
    for octet in queries:
        src = addr(octet)
        verdict, grant = table.decide(src + SERVER, 22, 0.0)
        hits = [(gid, c) for gid, (n, p, c) in live.items() if covers(n, p, src)]
        if any(c for _, c in hits):
            assert verdict is Verdict.ACCEPT and grant is not None
            assert (grant.id, True) in hits
            del live[grant.id]
        elif hits:
            assert verdict is Verdict.HOLD
        elif any(covers(n, p, src) for n, p in behind):
            assert verdict is Verdict.REJECT
        else:
            assert verdict is Verdict.DROP


# --- knocks: grants by the user's prefix ----------------------------------------------------


def test_a_knock_from_one_address_of_a_64_opens_for_another_with_grant_prefix_v6_64() -> None:
    core, clock = make([alice(grant_prefix_v6=64)])
    knock_all(core, clock, seq(core, alice(), clock.wall), src=CLIENT6, dst=SERVER6)
    assert syn(core, clock, src=V6_STRANGER, dst=SERVER6) is Verdict.DROP
    assert syn(core, clock, src=V6_NEIGHBOUR, dst=SERVER6) is Verdict.ACCEPT


def test_with_the_default_prefix_only_the_knocking_address_opens() -> None:
    core, clock = make([alice()])
    knock_all(core, clock, seq(core, alice(), clock.wall), src=CLIENT6, dst=SERVER6)
    assert syn(core, clock, src=V6_NEIGHBOUR, dst=SERVER6) is Verdict.DROP
    assert syn(core, clock, src=CLIENT6, dst=SERVER6) is Verdict.ACCEPT
    knock_all(core, clock, seq(core, alice(), clock.wall, 1), src=CLIENT, dst=SERVER)
    assert syn(core, clock, src=V4_NEIGHBOUR) is Verdict.DROP


def test_a_knock_from_one_address_of_a_24_opens_for_another_with_grant_prefix_v4_24() -> None:
    core, clock = make([alice(grant_prefix_v4=24)])
    decisions = knock_all(core, clock, seq(core, alice(), clock.wall))
    [opened] = [e for d in decisions for e in d.events if e.kind is EventKind.GRANT_OPENED]
    assert opened.src == CLIENT and opened.reason.endswith("for 198.51.100.0/24")
    assert syn(core, clock, src=V4_STRANGER) is Verdict.DROP
    assert syn(core, clock, src=V4_NEIGHBOUR) is Verdict.ACCEPT
    assert core.grant_list(clock.wall, clock.mono) == []  # its one connection is spent


def test_each_user_opens_its_own_prefix() -> None:
    core, clock = make([alice(grant_prefix_v4=24), bob()])
    knock_all(core, clock, seq(core, bob(), clock.wall))
    assert syn(core, clock, src=V4_NEIGHBOUR) is Verdict.DROP  # bob: the address only
    assert syn(core, clock) is Verdict.ACCEPT


def test_a_stale_sequence_marks_the_users_prefix_behind() -> None:
    core, clock = make([alice(grant_prefix_v6=64)])
    ports = seq(core, alice(), clock.wall)
    knock_all(core, clock, ports, src=CLIENT6, dst=SERVER6)
    assert syn(core, clock, src=CLIENT6, dst=SERVER6) is Verdict.ACCEPT
    decisions = knock_all(core, clock, ports, src=CLIENT6, dst=SERVER6)  # a replay
    [stale] = [e for d in decisions for e in d.events if e.kind is EventKind.SEQUENCE_STALE]
    assert stale.src == CLIENT6  # the address itself, for logs and fail2ban
    assert syn(core, clock, src=V6_NEIGHBOUR, dst=SERVER6) is Verdict.REJECT
    assert syn(core, clock, src=V6_STRANGER, dst=SERVER6) is Verdict.DROP


# --- knocks: progress by the widest prefix ---------------------------------------------------


def test_progress_survives_an_address_rotating_mid_sequence_within_the_widest_prefix() -> None:
    core, clock = make([alice(grant_prefix_v6=64)])
    ports = seq(core, alice(), clock.wall)
    knock_all(core, clock, ports[:16], src=CLIENT6, dst=SERVER6)
    decisions = knock_all(core, clock, ports[16:], src=V6_NEIGHBOUR, dst=SERVER6)
    assert EventKind.GRANT_OPENED in kinds(decisions)
    [done] = [e for d in decisions for e in d.events if e.kind is EventKind.SEQUENCE_COMPLETED]
    assert done.src == V6_NEIGHBOUR  # the real source, not the masked key
    assert syn(core, clock, src=ip("2001:db8::99"), dst=SERVER6) is Verdict.ACCEPT
    check_engine(core)


def test_without_a_prefix_a_sequence_split_over_two_addresses_does_not_complete() -> None:
    core, clock = make([alice()])
    ports = seq(core, alice(), clock.wall)
    knock_all(core, clock, ports[:16], src=CLIENT6, dst=SERVER6)
    decisions = knock_all(core, clock, ports[16:], src=V6_NEIGHBOUR, dst=SERVER6)
    assert EventKind.SEQUENCE_COMPLETED not in kinds(decisions)
    assert syn(core, clock, src=V6_NEIGHBOUR, dst=SERVER6) is Verdict.DROP


def test_progress_is_shared_by_the_widest_prefix_but_the_grant_is_the_completers_own() -> None:
    """alice's /64 keys everyone's progress; bob (exact) completes from the address
    of his last knock, and only that address opens."""
    core, clock = make([alice(grant_prefix_v6=64), bob()])
    ports = seq(core, bob(), clock.wall)
    knock_all(core, clock, ports[:16], src=CLIENT6, dst=SERVER6)
    knock_all(core, clock, ports[16:], src=V6_NEIGHBOUR, dst=SERVER6)
    assert syn(core, clock, src=CLIENT6, dst=SERVER6) is Verdict.DROP
    assert syn(core, clock, src=V6_NEIGHBOUR, dst=SERVER6) is Verdict.ACCEPT
    assert core.tracked_sources() == 1  # one progress table for the /64


def test_the_packet_path_is_unmasked_unless_a_prefix_is_configured() -> None:
    plain, _ = make([alice(), bob()])
    assert "decide_key" not in vars(plain.knocks)  # the class's own method: no masking
    wide, _ = make([alice(grant_prefix_v4=24), bob()])
    assert "decide_key" in vars(wide.knocks)
    disabled, _ = make([alice(grant_prefix_v4=24, enabled=False), bob()])
    assert "decide_key" not in vars(disabled.knocks)  # only enabled users count
    wide.set_users([alice(), bob()], 0.0)
    assert "decide_key" not in vars(wide.knocks)


# --- SPA ----------------------------------------------------------------------------------


def spa_core(**prefixes: int) -> tuple[InstantCore, Clock]:
    clock = Clock(1_800_000_000.0)
    user = replace(spa_user(), **prefixes)  # type: ignore[arg-type]
    core = InstantCore(engine_settings(), [], clock.wall, spa_users=[user], spa=SpaConfig())
    return core, clock


def spa_opens(core: InstantCore, clock: Clock, src: bytes, dst: bytes) -> None:
    decision = core.decide_spa(src, dst, packet(), clock.wall, clock.mono)
    assert [e.code for e in decision.events] == ["spa_accepted"]
    for request in core.take_claims():
        core.resolve(ClaimOutcome(request.id, Outcome.WON), clock.mono)


def test_an_spa_opening_covers_the_users_prefix_of_the_allowed_address() -> None:
    core, clock = spa_core(grant_prefix_v4=24)
    spa_opens(core, clock, CLIENT, SERVER)
    assert syn(core, clock, src=V4_STRANGER) is Verdict.DROP
    assert syn(core, clock, src=V4_NEIGHBOUR) is Verdict.ACCEPT


def test_an_spa_opening_with_the_default_prefix_covers_the_address_only() -> None:
    core, clock = spa_core()
    spa_opens(core, clock, CLIENT, SERVER)
    assert syn(core, clock, src=V4_NEIGHBOUR) is Verdict.DROP
    assert syn(core, clock) is Verdict.ACCEPT


# --- status, persistence, sharing, reloads --------------------------------------------------


def test_status_and_records_carry_the_prefix() -> None:
    core, clock = make([alice(grant_prefix_v6=64)], max_connections=2)
    knock_all(core, clock, seq(core, alice(), clock.wall), src=CLIENT6, dst=SERVER6)
    [listed] = core.grant_list(clock.wall, clock.mono)
    assert (listed["source"], listed["prefix"]) == ("2001:db8::/64", 64)
    [record] = core.grant_records(clock.wall, clock.mono)
    assert (record.src, record.prefix) == (ip("2001:db8::"), 64)
    fresh, later = make([alice(grant_prefix_v6=64)], clock=Clock(clock.wall), max_connections=2)
    assert fresh.restore_grants([record], later.wall, later.mono) == 1
    assert syn(fresh, later, src=V6_NEIGHBOUR, dst=SERVER6) is Verdict.ACCEPT


def test_a_stored_grant_wider_than_the_user_may_now_open_is_not_restored() -> None:
    record = GrantRecord(ip("2001:db8::"), SERVER6, "alice", frozenset({22}), 1, 2e9, prefix=64)
    narrower, clock = make([alice(grant_prefix_v6=96)])
    assert narrower.restore_grants([record], clock.wall, clock.mono) == 0
    wider, clock = make([alice(grant_prefix_v6=48)])
    assert wider.restore_grants([record], clock.wall, clock.mono) == 1  # narrower: fine
    assert syn(wider, clock, src=V6_NEIGHBOUR, dst=SERVER6) is Verdict.ACCEPT
    assert syn(wider, clock, src=V6_STRANGER, dst=SERVER6) is Verdict.DROP  # still the /64


def test_a_connection_spent_on_a_shared_prefix_grant_names_the_grants_key() -> None:
    core, clock = make([alice(grant_prefix_v4=24)])
    core.gate.instance = "gw1"
    knock_all(core, clock, seq(core, alice(), clock.wall))
    assert syn(core, clock, src=V4_NEIGHBOUR) is Verdict.ACCEPT
    [(key, ref)] = core.take_used()
    assert key == ip("198.51.100.0") + SERVER and ref.startswith("gw1.")


def test_a_grant_shared_from_elsewhere_opens_its_prefix_here() -> None:
    core, clock = make([alice(grant_prefix_v4=24)])
    record = GrantRecord(
        ip("198.51.100.0"),
        SERVER,
        "alice",
        frozenset({22}),
        1,
        clock.wall + 30,
        ref="gw2.9",
        prefix=24,
    )
    assert [e.code for e in core.add_shared_grant(record, clock.wall, clock.mono)] == [
        "shared_knock"
    ]
    assert syn(core, clock, src=V4_NEIGHBOUR) is Verdict.ACCEPT


def test_a_reload_that_narrows_the_prefix_revokes_wider_grants() -> None:
    core, clock = make([alice(grant_prefix_v6=64)], max_connections=5)
    knock_all(core, clock, seq(core, alice(), clock.wall), src=CLIENT6, dst=SERVER6)
    events = core.set_users([alice(grant_prefix_v6=48)], clock.mono)  # wider: kept
    assert events == [] and syn(core, clock, src=V6_NEIGHBOUR, dst=SERVER6) is Verdict.ACCEPT
    events = core.set_users([alice()], clock.mono)
    assert [(e.kind, e.code) for e in events] == [
        (EventKind.GRANT_REVOKED, "grant_prefix_narrowed_by_reload")
    ]
    assert syn(core, clock, src=CLIENT6, dst=SERVER6) is Verdict.DROP


def test_a_users_full_length_prefix_is_the_exact_address() -> None:
    assert alice(grant_prefix_v4=20).grant_prefix(4) == 20
    assert alice(grant_prefix_v6=64).grant_prefix(16) == 64
    assert alice().grant_prefix(4) is None and alice().grant_prefix(16) is None
