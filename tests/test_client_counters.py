"""The client's counter algorithm (nfknock_client.counters) with fake probe outcomes and
a fake clock, and the whole ``knock`` command against a model of the server's counter
rule: today's watermark (only the next counter opens) and the window the server is
getting (floor .. floor + lookahead, each once, any order)."""

from __future__ import annotations

import json
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nfknock.schemes import V1, Kommen
from nfknock.sequence import format_base32
from nfknock_client import cli
from nfknock_client.counters import (
    MAX_RESYNC,
    Done,
    Knock,
    Outcome,
    Planner,
    StepRecord,
    Wait,
)
from nfknock_client.knock import DoorState

STEP = 30
T0 = 1_000_000 * STEP + 1.0  # one second into step 1,000,000
S0 = 1_000_000


def drive(planner: Planner, record: StepRecord, outcome: Outcome, wall: float) -> object:
    """Record the last knock's outcome as the client does, then ask the planner."""
    return planner.after(outcome, wall, record)


# --- the planner ------------------------------------------------------------------


def test_a_fresh_knock_takes_the_counter_after_every_one_this_client_recorded() -> None:
    rec = StepRecord(S0, sent=frozenset({0, 3}), used=frozenset({1}))
    assert Planner().start(T0, rec) == Knock(S0, 4, "fresh")
    assert Planner().start(T0, StepRecord(S0 - 1, sent=frozenset({9}))) == Knock(S0, 0, "fresh")


def test_a_timeout_retries_at_once_the_same_counter_then_the_next_then_the_next_step() -> None:
    p = Planner()
    rec = StepRecord(S0)
    k = p.start(T0, rec)
    assert k == Knock(S0, 0, "fresh")
    rec = rec.with_sent(0)
    assert p.after(Outcome.TIMEOUT, T0 + 3, rec) == Knock(S0, 0, "resend")
    assert p.after(Outcome.TIMEOUT, T0 + 6, rec) == Knock(S0, 1, "ahead")
    rec = rec.with_sent(1)
    wait = p.after(Outcome.TIMEOUT, T0 + 9, rec)
    assert wait == Wait((S0 + 1) * STEP + 0.05)
    # The next step: one round of the fresh counter and its resend, then give up.
    k = p.resume((S0 + 1) * STEP + 0.05, StepRecord(S0 + 1))
    assert k == Knock(S0 + 1, 0, "next step")
    rec2 = StepRecord(S0 + 1, sent=frozenset({0}))
    assert p.after(Outcome.TIMEOUT, (S0 + 1) * STEP + 3, rec2) == Knock(S0 + 1, 0, "resend")
    assert p.after(Outcome.TIMEOUT, (S0 + 1) * STEP + 6, rec2) is Done.NO_ANSWER


def test_a_timeout_tries_an_unconfirmed_lower_counter_before_going_ahead() -> None:
    """A plain knock of counter 2 never arrived: a watermark server waits for 2."""
    rec = StepRecord(S0, sent=frozenset({2}), used=frozenset({0, 1}))
    p = Planner()
    assert p.start(T0, rec) == Knock(S0, 3, "fresh")
    rec = rec.with_sent(3)
    assert p.after(Outcome.TIMEOUT, T0 + 3, rec) == Knock(S0, 3, "resend")
    assert p.after(Outcome.TIMEOUT, T0 + 6, rec) == Knock(S0, 2, "unconfirmed")
    assert p.after(Outcome.TIMEOUT, T0 + 9, rec) == Knock(S0, 4, "ahead")


def test_a_reset_marks_the_counter_used_and_knocks_the_next_fresh_one_at_once() -> None:
    p = Planner()
    rec = StepRecord(S0)
    assert p.start(T0, rec).counter == 0
    for n in range(1, MAX_RESYNC):
        rec = rec.with_used(n - 1)
        assert p.after(Outcome.BEHIND, T0, rec) == Knock(S0, n, "resync")
    assert p.after(Outcome.BEHIND, T0, rec.with_used(MAX_RESYNC - 1)) is Done.RESYNC_EXHAUSTED


def test_a_reset_after_the_unconfirmed_retry_goes_on_above_everything_known() -> None:
    rec = StepRecord(S0, sent=frozenset({2}))
    p = Planner()
    p.start(T0, rec)
    rec = rec.with_sent(3)
    p.after(Outcome.TIMEOUT, T0 + 3, rec)  # resend 3
    assert p.after(Outcome.TIMEOUT, T0 + 6, rec) == Knock(S0, 2, "unconfirmed")
    assert p.after(Outcome.BEHIND, T0 + 6, rec.with_used(2)) == Knock(S0, 4, "resync")


def test_crossing_into_the_next_step_while_retrying_starts_there_at_once() -> None:
    p = Planner()
    k = p.start((S0 + 1) * STEP - 2, StepRecord(S0))
    assert k.step == S0
    nxt = p.after(Outcome.TIMEOUT, (S0 + 1) * STEP + 1, StepRecord(S0 + 1))
    assert nxt == Knock(S0 + 1, 0, "next step")


def test_a_given_counter_is_used_for_the_first_knock_only() -> None:
    p = Planner(given=5)
    assert p.start(T0, StepRecord(S0)) == Knock(S0, 5, "given")
    rec = StepRecord(S0, used=frozenset({5}))
    assert p.after(Outcome.BEHIND, T0, rec) == Knock(S0, 6, "resync")


def test_a_scheme_without_counters_waits_for_the_next_step_after_a_reset() -> None:
    p = Planner(has_counter=False)
    assert p.start(T0, StepRecord(S0)) == Knock(S0, 0, "fresh")
    assert p.after(Outcome.BEHIND, T0, StepRecord(S0)) == Wait((S0 + 1) * STEP + 0.05)
    assert p.resume((S0 + 1) * STEP + 0.05, StepRecord(S0 + 1)).step == S0 + 1
    assert p.after(Outcome.BEHIND, (S0 + 1) * STEP + 1, StepRecord(S0 + 1)) is Done.STEP_USED


def test_a_hotp_scheme_starts_at_the_profile_counter_and_never_waits_for_a_step() -> None:
    p = Planner(time_based=False, floor=7)
    assert p.start(T0, StepRecord(-1)) == Knock(-1, 7, "fresh")
    rec = StepRecord(-1, sent=frozenset({7}))
    assert p.after(Outcome.TIMEOUT, T0 + 3, rec) == Knock(-1, 7, "resend")
    assert p.after(Outcome.TIMEOUT, T0 + 6, rec) == Knock(-1, 8, "ahead")
    assert p.after(Outcome.TIMEOUT, T0 + 9, rec.with_sent(8)) is Done.NO_ANSWER


@settings(max_examples=300, deadline=None)
@given(
    outcomes=st.lists(st.sampled_from(list(Outcome)), min_size=1, max_size=60),
    sent=st.frozensets(st.integers(0, 12), max_size=6),
    used=st.frozensets(st.integers(0, 12), max_size=6),
    has_counter=st.booleans(),
    time_based=st.booleans(),
    offset=st.floats(0, STEP - 0.01),
)
def test_any_outcome_sequence_ends_soon_and_never_knocks_a_used_counter_again(
    outcomes: list[Outcome],
    sent: frozenset[int],
    used: frozenset[int],
    has_counter: bool,
    time_based: bool,
    offset: float,
) -> None:
    """h2-style: drive every outcome order; the planner stays in its invariants."""
    p = Planner(has_counter=has_counter, time_based=time_based)
    wall = S0 * STEP + offset
    step = p.step_of(wall)
    records = {step: StepRecord(step, sent - used, used)}
    action: object = p.start(wall, records[step])
    knocks: dict[tuple[int, int], int] = {}
    for n, outcome in enumerate(outcomes):
        assert n < 40, "the planner did not end"
        if isinstance(action, Wait):
            assert action.until > wall
            wall = action.until
            step = p.step_of(wall)
            action = p.resume(wall, records.setdefault(step, StepRecord(step)))
        if not isinstance(action, Knock):
            assert isinstance(action, Done)
            break
        rec = records.setdefault(action.step, StepRecord(action.step))
        if has_counter:
            assert action.counter not in rec.used, "knocked a counter known to be used"
        key = (action.step, action.counter)
        knocks[key] = knocks.get(key, 0) + 1
        assert knocks[key] <= 2 or not has_counter
        rec = rec.with_sent(action.counter)
        if outcome is not Outcome.TIMEOUT:
            rec = rec.with_used(action.counter)
        records[action.step] = rec
        if outcome is Outcome.OPEN:
            assert p.after(outcome, wall, rec) is Done.OPENED
            return
        wall += 3.0 if outcome is Outcome.TIMEOUT else 0.01
        step = p.step_of(wall)
        action = p.after(outcome, wall, records.setdefault(step, StepRecord(step)))
    assert p.rounds <= 2 and p.resyncs <= MAX_RESYNC


# --- the knock command against a model of the server ----------------------------------


SECRET = bytes(range(32))


@dataclass
class FakeServer:
    """The server's counter rule for one user and one source, and a fake clock.

    ``window=False`` is today's rule: counter c opens iff c == next (next = 1 + the
    highest used).  ``window=True`` is the window: floor <= c <= floor + lookahead and c
    unused (floor = the lowest unused).  A completed stale sequence marks the source
    behind: the next probe is reset, until a grant."""

    window: bool = False
    lookahead: int = 2
    now: float = T0
    lose: list[bool] = field(default_factory=list)  # per send: True = a knock lost
    used: dict[int, set[int]] = field(default_factory=dict)
    grant: int = 0
    behind: bool = False
    sent: list[tuple[int, int]] = field(default_factory=list)
    opened: list[tuple[int, int]] = field(default_factory=list)
    _index: dict[tuple[int, ...], tuple[int, int]] = field(default_factory=dict)

    def _lookup(self, ports: Sequence[int]) -> tuple[int, int]:
        step = int(self.now // STEP)
        scheme = V1()
        for s in (step - 1, step, step + 1):
            for c in range(40):
                key = scheme.derive(SECRET, s, c)
                self._index.setdefault(tuple(key), (s, c))
        return self._index[tuple(ports)]

    def claimable(self, step: int, c: int) -> bool:
        used = self.used.setdefault(step, set())
        if not self.window:
            return c == (max(used) + 1 if used else 0)
        floor = 0
        while floor in used:
            floor += 1
        return floor <= c <= floor + self.lookahead and c not in used

    def send(self, family: int, address: str, ports: Sequence[int], pace: float) -> None:
        step, c = self._lookup(ports)
        self.sent.append((step, c))
        self.now += 0.01
        if self.lose and self.lose.pop(0):
            return
        if self.claimable(step, c):
            used = self.used[step]
            if not self.window:  # the watermark kills every lower counter
                used.update(range(c))
            used.add(c)
            self.opened.append((step, c))
            self.grant, self.behind = 1, False
        elif c in self.used[step] or (not self.window and c < max(self.used[step], default=-1)):
            self.behind = True
        # else: beyond the window, not a candidate: nothing happens

    def probe(
        self, family: int, address: str, port: int, timeout: float
    ) -> tuple[DoorState, socket.socket | None]:
        self.now += 0.002
        if self.grant:
            self.grant -= 1
            a, b = socket.socketpair()
            b.close()
            return DoorState.OPEN, a
        if self.behind:
            return DoorState.BEHIND, None
        self.now += timeout
        return DoorState.CLOSED, None

    def sleep(self, seconds: float) -> None:
        self.now += seconds

    def io(self) -> cli.KnockIO:
        return cli.KnockIO(
            clock=lambda: self.now, sleep=self.sleep, send=self.send, probe=self.probe
        )


@pytest.fixture
def secret_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    path = tmp_path / "secret"
    path.write_text(format_base32(SECRET))
    path.chmod(0o600)
    return path


def run(server: FakeServer, secret_file: Path, *args: str) -> tuple[int, dict[str, Any]]:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(
            ["knock", "127.0.0.1", "--secret-file", str(secret_file), "--json", *args],
            io=server.io(),
        )
    return code, json.loads(out.getvalue())


@pytest.mark.parametrize("window", [False, True], ids=["today", "window"])
def test_a_check_whose_knock_was_lost_opens_at_once_by_resending(
    secret_file: Path, window: bool
) -> None:
    server = FakeServer(window=window, lose=[True])
    code, out = run(server, secret_file, "--check")
    assert code == 0, out
    assert server.sent == [(S0, 0), (S0, 0)] and server.opened == [(S0, 0)]
    assert server.now - T0 < 4  # one probe timeout, not the rest of the step


@pytest.mark.parametrize("window", [False, True], ids=["today", "window"])
def test_a_check_after_a_lost_plain_knock_opens_within_the_step(
    secret_file: Path, window: bool
) -> None:
    server = FakeServer(window=window, lose=[True])
    code, out = run(server, secret_file)
    assert (code, out["counter"]) == (0, 0)
    assert "next knock uses 1" in str(out["message"])
    code, out = run(server, secret_file, "--check")
    assert code == 0, out
    if window:  # counter 1 is within the window above the floor 0: no wait at all
        assert server.opened == [(S0, 1)] and server.now - T0 < 0.5
    else:  # 1 times out twice, then the unconfirmed 0 opens
        assert server.opened == [(S0, 0)] and server.now - T0 < 7
        assert [t["counter"] for t in out["tries"]] == [1, 1, 0]


def test_a_plain_knock_after_a_lost_one_opens_only_with_the_window(secret_file: Path) -> None:
    """Nothing confirms a plain knock: the next one takes the next counter, which
    only a server with the window accepts (today's waits for the lost one)."""
    for window in (False, True):
        server = FakeServer(window=window, lose=[True])
        run(server, secret_file, "--counter", "0")
        run(server, secret_file, "--counter", "1")
        assert server.opened == ([(S0, 1)] if window else [])


def test_a_second_client_that_is_behind_resyncs_by_resets(secret_file: Path) -> None:
    server = FakeServer(used={S0: {0, 1, 2}})
    code, out = run(server, secret_file, "--check")
    assert (code, out["counter"]) == (0, 3)
    assert [t["result"] for t in out["tries"]] == ["behind"] * 3 + ["open"]


def test_a_wrong_secret_gives_up_after_the_next_step_with_exit_1(secret_file: Path) -> None:
    server = FakeServer(lose=[True] * 20)
    code, out = run(server, secret_file, "--check")
    assert code == 1 and "wrong secret" in str(out["message"])
    assert [c for _, c in server.sent] == [0, 0, 1, 0, 0]
    assert int(server.now // STEP) == S0 + 1  # waited for exactly one step


def test_check_reports_the_spent_connection_and_what_to_do(secret_file: Path) -> None:
    code, out = run(FakeServer(), secret_file, "--check")
    assert code == 0
    assert "max_connections = 1" in str(out["message"]) and "--pipe" in str(out["message"])


def test_the_counter_state_remembers_sent_and_confirmed_counters(secret_file: Path) -> None:
    server = FakeServer(lose=[True, False, False])
    run(server, secret_file)  # 0: sent, lost
    run(server, secret_file, "--check")  # 1 (x2, timeouts), 0 opens
    data = json.loads(cli.state_path().read_text())
    assert data == {"version": 2, "profiles": {"127.0.0.1": {"step": S0, "sent": [1], "used": [0]}}}


def test_kommen_planner_matches_the_scheme_properties() -> None:
    p = cli._planner(cli.Target("k", "h", 22, b"x", "kommen", {}, 9, Kommen()), None)
    assert (p.time_based, p.floor) == (False, 9)
