"""Shared helpers for the unit tests: a fake clock and ready-made engines."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from nfknock.config import User
from nfknock.core import Core
from nfknock.engine import EngineSettings
from nfknock.events import Decision, EventKind, Verdict
from nfknock.gate import ClaimOutcome, Outcome
from nfknock.sequence import SequenceParams, derive, step_of

SECRET_A = bytes(range(32))
SECRET_B = bytes(range(100, 132))
T0 = 1_700_000_010.0  # 10 s into a 30 s step


def ip(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


CLIENT = ip("198.51.100.10")
CLIENT2 = ip("198.51.100.11")
SERVER = ip("198.51.100.1")
CLIENT6 = ip("2001:db8::10")
SERVER6 = ip("2001:db8::1")


def settings(**overrides: object) -> EngineSettings:
    base = EngineSettings(
        params=SequenceParams(exclude=frozenset({22})),
        protect={22: None},
    )
    return replace(base, **overrides)  # type: ignore[arg-type]


def alice(**kw: object) -> User:
    return replace(User("alice", SECRET_A), **kw)  # type: ignore[arg-type]


def bob(**kw: object) -> User:
    return replace(User("bob", SECRET_B), **kw)  # type: ignore[arg-type]


class Clock:
    """Wall and monotonic time moving together, stepped by the test."""

    def __init__(self, wall: float = T0) -> None:
        self.wall = wall
        self.mono = 1000.0

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds


class InstantCore(Core):
    """A core whose claims are won at once, as if an in-memory store always agreed
    (``auto_resolve = False`` leaves them in the outbox for the test to answer)."""

    auto_resolve = True

    def decide_key(
        self, key: bytes, port: int, wall: float, mono: float, defer: bool = False
    ) -> Decision:
        return self._resolved(super().decide_key(key, port, wall, mono, defer), mono)

    def decide_isn(
        self, key: bytes, port: int, isn: int, wall: float, mono: float, defer: bool = False
    ) -> Decision:
        return self._resolved(super().decide_isn(key, port, isn, wall, mono, defer), mono)

    def _resolved(self, decision: Decision, mono: float) -> Decision:
        if self.auto_resolve and self.gate.outbox:
            events = list(decision.events)
            for request in self.take_claims():
                events += self.resolve(ClaimOutcome(request.id, Outcome.WON), mono)
            decision = Decision(decision.verdict, tuple(events), decision.mark)
        return decision

    def counters(self) -> dict[str, dict[int, int]]:
        return self.knocks.counters()

    def tracked_sources(self) -> int:
        return self.knocks.tracked_sources()


def make(
    users: Iterable[User] = (), clock: Clock | None = None, **kw: object
) -> tuple[InstantCore, Clock]:
    clock = clock or Clock()
    users = list(users) or [alice()]
    return InstantCore(settings(**kw), users, clock.wall), clock


def seq(engine: Core, user: User, wall: float, counter: int = 0) -> tuple[int, ...]:
    return derive(
        user.secret, step_of(wall, engine.s.params.step_seconds), counter, engine.s.params
    )


def knock_all(
    engine: Core,
    clock: Clock,
    ports: Iterable[int],
    src: bytes = CLIENT,
    dst: bytes = SERVER,
    gap: float = 0.001,
) -> list[Decision]:
    out = []
    for port in ports:
        out.append(engine.decide(src, dst, port, clock.wall, clock.mono))
        clock.advance(gap)
    return out


def syn(
    engine: Core, clock: Clock, port: int = 22, src: bytes = CLIENT, dst: bytes = SERVER
) -> Verdict:
    return engine.decide(src, dst, port, clock.wall, clock.mono).verdict


def kinds(decisions: Iterable[Decision]) -> list[EventKind]:
    return [e.kind for d in decisions for e in d.events]


def opened(decisions: Iterable[Decision]) -> list[str]:
    """The users whose grants the decisions opened, sorted."""
    return sorted(
        e.user for d in decisions for e in d.events if e.kind is EventKind.GRANT_OPENED and e.user
    )


def check_engine(core: Core) -> None:
    """The knock engine's tables agree with each other (white-box invariants):

    * every anchor entry of a step's start index names a slot that holds a candidate
      of that step with that first port, and every such slot is indexed once;
    * each step's partner lists are exactly those its candidates imply;
    * ``near`` counts the partner entries at each port;
    * every user's wanted candidates exist in every fully built step;
    * every tracked source is found by its key in tier 0.
    """
    engine = core.knocks
    table = engine._table
    k = table.k
    near = [0] * 65536
    for step, idx in table.steps.items():
        held: set[int] = set()
        for g in range(len(table.gstep)):
            if table.gstep[g] == step and table.ggen[g] == idx.gen:
                held.update(table.held(g).values())
        partners: dict[int, list[int]] = {}
        anchored: list[int] = []
        for s in held:
            ports = [p for p in table.prefix[s * k : s * k + k] if p]
            if len(ports) < 2:
                continue
            anchored.append(s)
            partners.setdefault(ports[0], []).extend(ports[1:])
            for f in ports[1:]:
                partners.setdefault(f, []).append(ports[0])
        indexed = idx.anchors()
        assert sorted(s for _, s in indexed) == sorted(anchored), f"step {step}: anchors"
        for port, s in indexed:
            assert table.prefix[s * k] == port
            assert s in idx.anchored(port)
        assert {p: sorted(v) for p, v in idx.partners.items() if v} == {
            p: sorted(v) for p, v in partners.items()
        }, f"step {step}: partners"
        for port, arr in idx.partners.items():
            near[port] += len(arr)
    assert near == table.near or not table.track_near
    for step in engine._built:
        for uidx, user in enumerate(engine._ulist):
            if not user.enabled or engine._scheme(user).time_based != (step != -1):
                continue
            for counter in engine._wanted_counters(user, step):
                assert table.slot_of(uidx, step, counter) >= 0, (user.name, step, counter)
    for key, source in engine._sources.items():
        assert engine._seen[key] is source


def vector_params(case: dict[str, Any]) -> SequenceParams:
    """The SequenceParams of a case of tests/vectors/sequence-v1*.json."""
    return SequenceParams(
        port_min=case["port_min"],
        port_max=case["port_max"],
        length=case["length"],
        step_seconds=case["step_seconds"],
        realm=case["realm"].encode(),
        exclude=frozenset(case["exclude"]),
    )
