"""Forwarded doors (nfknock.door): configuration, the door a knock earns, the verdict
with its mark, SPA NAT messages, reloads and restored grants.  Sans-IO."""

from __future__ import annotations

import ipaddress
from dataclasses import replace
from pathlib import Path

import pytest

from nfknock.config import DEFAULT_DOOR_MARK, ConfigError, Forward, SpaConfig, User, load_config
from nfknock.core import GrantRecord
from nfknock.door import DoorMap
from nfknock.events import EventKind, Verdict
from nfknock.gate import ClaimOutcome, Outcome
from nfknock.sequence import door_port, format_base32, step_of
from nfknock.spa import reasons as R
from nfknock.spa.message import MessageType
from tests.helpers import (
    CLIENT,
    CLIENT2,
    CLIENT6,
    SERVER,
    SERVER6,
    Clock,
    InstantCore,
    alice,
    bob,
    knock_all,
    make,
    seq,
    settings,
)
from tests.spa_support import NOW, message, sealed, spa_user

BEHIND = ipaddress.ip_address("198.51.100.130")
GW = Forward("gw", 40000, 40999, 22, BEHIND, DEFAULT_DOOR_MARK + 1)
LOCAL = Forward("local", 41000, 41999, 22, None, DEFAULT_DOOR_MARK + 2)


FORWARD_BOTH = (GW, LOCAL)


# --- configuration -------------------------------------------------------------------

SECRET = format_base32(bytes(range(32)))
FORWARDS = """
[[protect]]
port = 22
[[door.forward]]
name = "gw"
doors = "40000-40999"
address = "198.51.100.130"
port = 22
[[door.forward]]
name = "local"
doors = "41000-41999"
port = 22
"""


def write(tmp: Path, config: str, users: str) -> Path:
    (tmp / "users.toml").write_text(users)
    (tmp / "users.toml").chmod(0o600)
    path = tmp / "nfknock.toml"
    path.write_text(config + '\n[users]\nfile = "users.toml"\n')
    return path


def test_forward_entries_get_their_marks_and_users_their_doors(tmp_path: Path) -> None:
    users = (
        f'[users.alice]\nsecret = "{SECRET}"\ndoor = "random"\nforward = ["gw"]\n'
        f'[users.bob]\nsecret = "{SECRET}"\nisn = true\n'
    )
    cfg = load_config(write(tmp_path, FORWARDS, users))
    gw, local = cfg.door.forward
    assert (gw.name, gw.door_min, gw.door_max, gw.port, str(gw.address)) == (
        "gw",
        40000,
        40999,
        22,
        "198.51.100.130",
    )
    assert (local.address, gw.mark, local.mark) == (None, 0x4E4B0101, 0x4E4B0102)
    a, b = cfg.users
    assert (a.door, a.forward, a.isn) == (True, frozenset({"gw"}), False)
    assert (b.door, b.forward, b.isn) == (False, None, True)


@pytest.mark.parametrize(
    ("config", "users", "key"),
    [
        (FORWARDS.replace('doors = "40000-40999"', 'doors = "1500-1600"'), "", "doors"),
        (FORWARDS.replace('doors = "40000-40999"', 'doors = "41500-41600"'), "", "doors"),
        (FORWARDS.replace('doors = "40000-40999"', 'doors = "40000-9"'), "", "doors"),
        (FORWARDS.replace('doors = "40000-40999"', 'doors = "62000-62300"'), "", "doors"),
        (FORWARDS.replace('name = "local"', 'name = "gw"'), "", "name"),
        (FORWARDS.replace('address = "198.51.100.130"', 'address = "0.0.0.0"'), "", "address"),
        (FORWARDS + "[door]\nmark = 0x4e4b0000\n", "", "door.mark"),
        (FORWARDS, 'door = "random"\n', "door"),  # two entries: which one?
        (FORWARDS, 'door = "fixed"\nforward = ["gw"]\n', "door"),
        (FORWARDS, 'forward = ["nope"]\n', "forward"),
        (FORWARDS, 'isn = "yes"\n', "isn"),
    ],
)
def test_a_bad_forward_entry_or_door_key_names_its_key(
    tmp_path: Path, config: str, users: str, key: str
) -> None:
    text = f'[users.alice]\nsecret = "{SECRET}"\n{users}'
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, config, text))
    assert key in err.value.key


def test_door_and_isn_need_a_v1_knock_user(tmp_path: Path) -> None:
    for extra in ('door = "random"\nforward = ["gw"]\n', "isn = true\n"):
        users = f'[users.alice]\nsecret = "{SECRET}"\nscheme = "kommen"\n{extra}'
        with pytest.raises(ConfigError, match="v1"):
            load_config(write(tmp_path, FORWARDS, users))


# --- a knock opens the door ----------------------------------------------------------


def door_user(**kw: object) -> User:
    return alice(door=True, forward=frozenset({"gw"}), **kw)


def knock_door(core: InstantCore, clock: Clock, counter: int = 0) -> int:
    user = core.users["alice"]
    step = step_of(clock.wall, 30)
    ports = seq(core, user, clock.wall, counter)
    knock_all(core, clock, ports)
    return door_port(user.secret, step, counter, core.s.params, GW.door_min, GW.door_max)


def test_a_door_users_knock_opens_its_door_once_with_the_targets_mark() -> None:
    core, clock = make([door_user()], forwards=FORWARD_BOTH)
    door = knock_door(core, clock)
    assert [p for _, g in core.grants.items() for p in g.ports] == [door]
    assert core.decide(CLIENT, SERVER, 22, clock.wall, clock.mono).verdict is Verdict.DROP
    d = core.decide(CLIENT, SERVER, door, clock.wall, clock.mono)
    assert (d.verdict, d.mark) == (Verdict.ACCEPT, GW.mark)
    assert d.events[0].code == "door"
    again = core.decide(CLIENT, SERVER, door, clock.wall, clock.mono)
    assert (again.verdict, again.mark, again.events) == (Verdict.DROP, 0, ())


def test_another_source_or_another_door_gets_nothing() -> None:
    core, clock = make([door_user()], forwards=FORWARD_BOTH)
    door = knock_door(core, clock)
    other = 40000 + (door - 40000 + 1) % 1000
    for src, port in ((CLIENT2, door), (CLIENT, other), (CLIENT, 41000 + door % 1000)):
        d = core.decide(src, SERVER, port, clock.wall, clock.mono)
        assert (d.verdict, d.mark, d.events) == (Verdict.DROP, 0, ())


def test_a_plain_users_knock_opens_no_door_and_a_door_user_no_protected_port() -> None:
    core, clock = make([door_user(), bob()], forwards=FORWARD_BOTH)
    ports = seq(core, core.users["bob"], clock.wall)
    knock_all(core, clock, ports, src=CLIENT2)
    assert [sorted(g.ports) for _, g in core.grants.items()] == [[22]]
    knock_door(core, clock)
    assert core.decide(CLIENT, SERVER, 22, clock.wall, clock.mono).verdict is Verdict.DROP


def test_a_door_grant_is_held_until_its_claim_is_won_and_stale_knocks_get_a_reset() -> None:
    core, clock = make([door_user()], forwards=FORWARD_BOTH)
    core.auto_resolve = False
    door = knock_door(core, clock)
    assert core.decide(CLIENT, SERVER, door, clock.wall, clock.mono).verdict is Verdict.HOLD
    assert core.decide_door(CLIENT + SERVER, door, clock.mono, defer=True).verdict is Verdict.HOLD
    core.auto_resolve = True
    core.take_claims()
    core2, clock2 = make([door_user()], forwards=FORWARD_BOTH)
    knock_door(core2, clock2)
    knock_door(core2, clock2)  # the same counter again: stale, the source is behind
    d = core2.decide(CLIENT, SERVER, 40000, clock2.wall, clock2.mono)
    assert d.verdict is Verdict.REJECT


def test_a_door_of_an_ipv4_target_is_not_opened_over_ipv6() -> None:
    core, clock = make([door_user()], forwards=FORWARD_BOTH)
    user = core.users["alice"]
    done = knock_all(core, clock, seq(core, user, clock.wall), src=CLIENT6, dst=SERVER6)
    assert [e.code for d in done for e in d.events if e.kind is EventKind.GRANT_OPENED] == [
        "no_door_here"
    ]
    assert list(core.grants.items()) == []


def test_a_reload_that_moves_the_target_revokes_the_door_and_one_that_keeps_it_does_not() -> None:
    core, clock = make([door_user()], forwards=FORWARD_BOTH)
    door = knock_door(core, clock)
    same = core.build(core.s, [door_user()], [], core.spa, clock.wall, core.snapshot_windows())
    assert core.swap(same, clock.mono) == []
    moved = replace(GW, address=ipaddress.ip_address("198.51.100.131"))
    tables = core.build(
        replace(core.s, forwards=(moved, LOCAL)),
        [door_user()],
        [],
        core.spa,
        clock.wall,
        core.snapshot_windows(),
    )
    events = core.swap(tables, clock.mono)
    assert [e.code for e in events] == ["grant_revoked_by_reload"]
    assert core.decide(CLIENT, SERVER, door, clock.wall, clock.mono).verdict is Verdict.DROP


def test_a_restored_door_grant_survives_only_while_the_user_may_use_the_door() -> None:
    core, clock = make([door_user()], forwards=FORWARD_BOTH)
    record = GrantRecord(CLIENT, SERVER, "alice", frozenset({40007}), 1, clock.wall + 20)
    assert core.restore_grants([record], clock.wall, clock.mono) == 1
    d = core.decide(CLIENT, SERVER, 40007, clock.wall, clock.mono)
    assert (d.verdict, d.mark) == (Verdict.ACCEPT, GW.mark)
    core2, clock2 = make([alice(forward=frozenset({"local"}))], forwards=FORWARD_BOTH)
    assert core2.restore_grants([record], clock2.wall, clock2.mono) == 0


# --- SPA NAT messages ---------------------------------------------------------------------


def spa_core(**user: object) -> tuple[InstantCore, object]:
    u = spa_user(**user.pop("keys", {}))  # type: ignore[arg-type]
    u = replace(u, **user)  # type: ignore[arg-type]
    core = InstantCore(settings(forwards=(GW, LOCAL)), [], NOW, spa_users=[u], spa=SpaConfig())
    return core, u


def spa(core: InstantCore, src: bytes, payload: bytes, mono: float = 100.0) -> list[str]:
    """An SPA packet decided, its claims won at once: the SPA result codes."""
    d = core.decide_spa(src, SERVER, payload, NOW, mono)
    for request in core.take_claims():
        core.resolve(ClaimOutcome(request.id, Outcome.WON), mono)
    return [e.code for e in d.events if e.kind.value.startswith("spa")]


def nat(kind: MessageType, door: int, host: str, port: int = 22, **kw: object) -> bytes:
    return sealed(
        message(message_type=kind, access=(("tcp", door),), nat_access=(host, port), **kw)
    )


@pytest.mark.parametrize(
    ("kind", "door", "host", "port", "code", "mark"),
    [
        (MessageType.NAT_ACCESS, 40123, "198.51.100.130", 22, R.ACCEPTED, GW.mark),
        (MessageType.LOCAL_NAT_ACCESS, 41555, "gw.example.net", 22, R.ACCEPTED, LOCAL.mark),
        (MessageType.NAT_ACCESS, 41555, "198.51.100.130", 22, R.NAT_DOOR_REFUSED, 0),
        (MessageType.NAT_ACCESS, 40123, "198.51.100.131", 22, R.NAT_TARGET_REFUSED, 0),
        (MessageType.NAT_ACCESS, 40123, "198.51.100.130", 2222, R.NAT_TARGET_REFUSED, 0),
        (MessageType.NAT_ACCESS, 40123, "gw.example.net", 22, R.NAT_REFUSED, 0),
        (MessageType.LOCAL_NAT_ACCESS, 40123, "x", 22, R.NAT_DOOR_REFUSED, 0),
    ],
)
def test_spa_nat_messages_are_served_as_doors_or_refused_with_a_code(
    kind: MessageType, door: int, host: str, port: int, code: str, mark: int
) -> None:
    core, _ = spa_core()
    assert spa(core, CLIENT, nat(kind, door, host, port)) == [code]
    syn = core.decide(CLIENT, SERVER, door, NOW, 100.0)
    assert (syn.verdict is Verdict.ACCEPT, syn.mark) == (bool(mark), mark)


def test_spa_nat_with_a_client_timeout_opens_the_door_that_long() -> None:
    core, _ = spa_core()
    kind = MessageType.CLIENT_TIMEOUT_NAT_ACCESS
    spa(core, CLIENT, nat(kind, 40500, "198.51.100.130", client_timeout=60))
    (grant,) = [g for _, g in core.grants.items()]
    assert (grant.ports, grant.expires) == (frozenset({40500}), 160.0)
    kind = MessageType.CLIENT_TIMEOUT_LOCAL_NAT_ACCESS
    spa(core, CLIENT2, nat(kind, 41001, "h", client_timeout=45))
    assert core.decide(CLIENT2, SERVER, 41001, NOW, 144.0).mark == LOCAL.mark


def test_spa_nat_is_refused_for_an_entry_the_user_may_not_use_and_without_entries() -> None:
    core, _ = spa_core(forward=frozenset({"local"}))
    d = core.decide_spa(CLIENT, SERVER, nat(MessageType.NAT_ACCESS, 40123, str(BEHIND)), NOW, 1)
    assert [e.code for e in d.events] == [R.NAT_TARGET_REFUSED]
    plain = InstantCore(settings(), [], NOW, spa_users=[spa_user()], spa=SpaConfig())
    d = plain.decide_spa(CLIENT, SERVER, nat(MessageType.NAT_ACCESS, 40123, str(BEHIND)), NOW, 1)
    assert [e.code for e in d.events] == [R.NAT_REFUSED]


def test_spa_nat_asking_for_two_ports_is_refused() -> None:
    core, _ = spa_core()
    msg = message(
        message_type=MessageType.NAT_ACCESS,
        access=(("tcp", 40001), ("tcp", 40002)),
        nat_access=(str(BEHIND), 22),
    )
    d = core.decide_spa(CLIENT, SERVER, sealed(msg), NOW, 1)
    assert [e.code for e in d.events] == [R.NAT_DOOR_REFUSED]


def test_door_map_names_moved_doors() -> None:
    old = DoorMap((GW, LOCAL))
    assert DoorMap((GW, LOCAL)).moved(old) == frozenset()
    moved = DoorMap((replace(GW, port=2222), LOCAL)).moved(old)
    assert moved == frozenset(range(40000, 41000))
    shrunk = DoorMap((replace(GW, door_max=40499), LOCAL)).moved(old)
    assert shrunk == frozenset(range(40500, 41000))
    assert EventKind.PROTECTED_ACCEPT  # the door's events are the protected ports' kinds
