"""The change feed: strict decoding, and worker processes on one embedded state file
keeping each other's copies current through the local feed (in-process, no kernel)."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from nfknock.config import load_config
from nfknock.core import GrantRecord
from nfknock.events import Verdict
from nfknock.gate import ClaimRequest, CounterClaim, DigestClaim
from nfknock.logs import EventLogger
from nfknock.sequence import step_of
from nfknock.service import Service, WorkerRole, open_state
from nfknock.store.changes import (
    FeedError,
    Granted,
    SeenDigest,
    Spent,
    Used,
    claim_fields,
    decode,
    record_fields,
    used_fields,
)
from nfknock.supervisor import aggregate

from .test_shared_state import SPA_KEYS, SRC2, Clock, knock, spa_packet, syn

KEY = bytes([198, 51, 100, 10, 198, 51, 100, 100])


def request(claim: CounterClaim | DigestClaim) -> ClaimRequest:
    return ClaimRequest(7, claim, KEY, "alice", frozenset({22, 2222}), 1, 1.8e9, "knock", "ab.7")


def test_a_claim_travels_as_the_spent_counter_and_the_grant_it_backs() -> None:
    origin, changes = decode(claim_fields(request(CounterClaim("alice", 5, 3, 2)), "gw1"))
    record = GrantRecord(
        KEY[:4], KEY[4:], "alice", frozenset({22, 2222}), 1, 1.8e9, "knock", "ab.7"
    )
    assert (origin, changes) == ("gw1", [Spent("alice", 5, 3), Granted(record)])
    _, changes = decode(claim_fields(request(DigestClaim(b"\x01" * 32, 1.7e9)), "gw1"))
    assert changes[0] == SeenDigest(b"\x01" * 32, 1.7e9)
    assert decode(used_fields(KEY, "ab.7", "gw2")) == ("gw2", [Used(KEY, "ab.7")])
    assert decode(record_fields(record, "gw3")) == ("gw3", [Granted(record)])


GOOD = claim_fields(request(CounterClaim("alice", 5, 3, 2)), "gw1")


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"t": "bogus"}, "unknown entry type"),
        ({"o": "a b"}, "field 'o'"),
        ({"u": "al ice"}, "field 'u'"),
        ({"s": "1e3"}, "not an integer"),
        ({"c": "10001"}, "not an integer in 0..10000"),
        ({"a": "c63364"}, "4/16 bytes"),
        ({"b": "00" * 16}, "4 bytes"),  # the destination must be of the source's family
        ({"p": "22,0"}, "ports"),
        ({"p": ""}, "ports"),
        ({"p": ",".join(["22"] * 1025)}, "ports"),
        ({"n": "-1"}, "not an integer"),
        ({"e": "nan"}, "out of range"),
        ({"e": "inf"}, "out of range"),
        ({"m": "door"}, "method"),
        ({"r": "x" * 81}, "field 'r'"),
        ({"extra": "1"}, "unexpected fields"),
        ({"u": None}, "missing or not text"),
    ],
)
def test_every_field_of_an_entry_is_checked(change: dict[str, Any], why: str) -> None:
    with pytest.raises(FeedError, match=why):
        decode({**GOOD, **change})
    missing = dict(GOOD)
    del missing["r"]
    with pytest.raises(FeedError, match="missing"):
        decode(missing)


# --- two workers on one embedded state file, through the local feed -------------------


OPEN: list[Service] = []


@pytest.fixture(autouse=True)
def _stop() -> Iterator[None]:
    yield
    while OPEN:
        crash(OPEN.pop())


def crash(svc: Service) -> None:
    if svc.store._thread.is_alive():
        svc.store.call(lambda s: s.close())
        svc.store.close()
    if svc.sharing is not None:
        svc.sharing.close()


def config(tmp: Path) -> Path:
    from nfknock.sequence import format_base32

    from .test_shared_state import SECRET

    (tmp / "users.toml").write_text(
        f'[users.alice]\nsecret = "{format_base32(SECRET)}"\n{SPA_KEYS}'
    )
    (tmp / "users.toml").chmod(0o600)
    path = tmp / "nfknock.toml"
    path.write_text(
        f'[[protect]]\nport = 22\n[users]\nfile = "users.toml"\n[queue]\nworkers = 2\n'
        f'[control]\nsocket = "{tmp}/ctl.sock"\n[state]\npath = "{tmp}/state.db"\n'
        "[door]\nopen_seconds = 300\nmax_connections = 2\n"
    )
    (tmp / "ctl.sock.workers").mkdir(mode=0o700, exist_ok=True)
    return path


def worker(path: Path, index: int, clock: Clock, begin: bool = True) -> Service:
    cfg = load_config(path)
    role = WorkerRole(index, 2, path.parent / "ctl.sock.workers")
    store, sharing, instance = open_state(cfg, role)
    svc = Service(cfg, EventLogger(), clock.wall, clock.mono, store, sharing, instance)
    svc.finish_on_stop = index == 0
    svc.begin_on_restore = False  # the supervisor marks the file in use
    OPEN.append(svc)
    svc.restore()
    if begin:  # (here: as soon as this worker has read it)
        svc.store.call(lambda s: s.begin())
    return svc


def until(svc: Service, done: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 15  # a bound, not a figure: generous on a busy machine
    while not done():
        assert time.monotonic() < deadline, "the local feed did not bring it"
        svc.on_changes()
        time.sleep(0.002)


def test_workers_learn_each_others_counters_grants_and_spent_connections(
    tmp_path: Path,
) -> None:
    clock = Clock()
    path = config(tmp_path)
    w0, w1 = worker(path, 0, clock), worker(path, 1, clock)
    knock(w0, clock)  # completed on worker 0 (its knock queue)
    step = step_of(clock.wall_now)
    until(w1, lambda: w1.core.knocks.counters().get("alice", {}).get(step) == 1)
    knock(w1, clock, src=SRC2)  # the replay, hashed to worker 1
    assert w1.verdict_for(syn(22, SRC2)) is Verdict.REJECT
    # An SPA packet (UDP: hashed to worker 1) opens for the TCP SYN on worker 0.
    data = spa_packet(clock.wall_now, SRC2)
    w1.verdict_for(data)
    until(w0, lambda: _remaining(w0, "198.51.100.11") == 2)
    assert w0.verdict_for(syn(22, SRC2)) is Verdict.ACCEPT
    until(w1, lambda: _remaining(w1, "198.51.100.11") == 1)  # one connection left, for both
    w0.verdict_for(data)  # the same packet replayed, now through worker 0: refused at once
    assert w0.status()["spa"]["results"] == {"spa_replay": 1}
    assert w0.status()["state"]["feed"]["kind"] == "local"


def _remaining(svc: Service, source: str) -> int | None:
    found = [g["remaining"] for g in svc.status()["grants"] if g["source"] == source]
    return found[0] if found else None


def test_a_restarted_worker_asks_its_siblings_for_the_live_grants(tmp_path: Path) -> None:
    clock = Clock()
    path = config(tmp_path)
    w0, w1 = worker(path, 0, clock), worker(path, 1, clock)
    knock(w0, clock)
    OPEN.remove(w1)
    crash(w1)  # kill -9: the state is not clean, so no grant comes back from the file
    again = worker(path, 1, clock)
    until(w0, lambda: w0.status()["state"]["feed"]["received"] >= 1)  # its Hello
    until(again, lambda: _remaining(again, "198.51.100.10") == 2)
    assert again.verdict_for(syn(22)) is Verdict.ACCEPT


def test_worker_0_stops_last_and_records_every_grant_for_a_clean_restart(
    tmp_path: Path,
) -> None:
    clock = Clock()
    path = config(tmp_path)
    w0, w1 = worker(path, 0, clock), worker(path, 1, clock)
    knock(w1, clock, src=SRC2)  # a grant made on worker 1
    until(w0, lambda: _remaining(w0, "198.51.100.11") == 2)
    for svc in (w1, w0):  # the supervisor's order
        OPEN.remove(svc)
        svc.stop()
    restarted = [worker(path, i, clock, begin=False) for i in (0, 1)]
    restarted[0].store.call(lambda s: s.begin())  # the supervisor, once both have read it
    for svc in restarted:  # both restore it, under the same name: one budget
        assert _remaining(svc, "198.51.100.11") == 2
    assert restarted[0].verdict_for(syn(22, SRC2)) is Verdict.ACCEPT
    until(restarted[1], lambda: _remaining(restarted[1], "198.51.100.11") == 1)


def test_datagrams_that_are_not_ours_are_counted_and_ignored(tmp_path: Path) -> None:
    clock = Clock()
    path = config(tmp_path)
    w0 = worker(path, 0, clock)
    target = str(tmp_path / "ctl.sock.workers" / "feed-0.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        for junk in (b"not json", b"[1]", json.dumps({**GOOD, "u": "x y"}).encode(), b"x" * 5000):
            s.sendto(junk, target)
    until(w0, lambda: w0.status()["state"]["feed"]["bad_entries"] == 4)
    assert not w0.status()["grants"]


# --- the supervisor's status --------------------------------------------------------------


def status(accepts: int, grant_left: int, error: str = "") -> dict[str, Any]:
    grant = {
        "source": "198.51.100.10",
        "destination": "198.51.100.1",
        "user": "alice",
        "ports": [22],
        "remaining": grant_left,
        "expires": 1800000000.0,
        "confirmed": True,
        "method": "spa",
    }
    return {
        "step": 60000000,
        "users": {"alice": {"enabled": True, "counter": accepts, "knock": True, "spa": True}},
        "grants": [grant],
        "tracked_sources": 3,
        "verdicts": {"drop": 10, "accept": accepts, "reject": 0, "hold": 0},
        "malformed": 1,
        "internal_errors": 0,
        "held_packets": 0,
        "spa": {"ports": [62201], "users": 1, "results": {"spa_accepted": 1}, "replay_cache": 4},
        "state": {"store": "embedded", "backend": "embedded", "ok": not error, "error": error,
                  "reachable": True, "claims": accepts, "claim_failures": 0},
        "worker": accepts - 1,
    }  # fmt: skip


def test_the_supervisor_answers_for_all_workers_at_once() -> None:
    out = aggregate([status(1, 1), status(2, 2)])
    assert out["verdicts"] == {"drop": 20, "accept": 3, "reject": 0, "hold": 0}
    assert out["users"]["alice"]["counter"] == 2
    assert [g["remaining"] for g in out["grants"]] == [1]  # one shared grant, listed once
    assert out["spa"]["results"] == {"spa_accepted": 2} and out["tracked_sources"] == 6
    assert out["state"]["ok"] is True and out["state"]["claims"] == 3
    assert [w["verdicts"]["accept"] for w in out["workers"]] == [1, 2]
    silent = aggregate([status(1, 1), None])
    assert silent["state"]["ok"] is False and silent["workers"][1] == {
        "index": 1,
        "answered": False,
    }
    failing = aggregate([status(1, 1, "disk full"), status(2, 2)])
    assert failing["state"]["error"] == "worker 0: disk full"


def test_a_worker_not_yet_on_the_new_step_does_not_lend_it_the_old_steps_counter() -> None:
    # Just after a boundary: worker 0 ticked into step N+1 (nothing spent there
    # yet), worker 1 still reports step N, where counter 7 is next.  "Step N+1,
    # counter 7" would send a client beyond the lookahead (floor 0 + 2).
    ahead, behind = status(1, 1), status(2, 2)
    ahead["step"], ahead["users"]["alice"]["counter"] = 60000001, 0
    behind["users"]["alice"]["counter"] = 7
    out = aggregate([behind, ahead])
    assert (out["step"], out["users"]["alice"]["counter"]) == (60000001, 0)
    ahead["users"]["alice"]["counter"] = 1  # spent in N+1 by either worker: known to both
    assert aggregate([ahead, behind])["users"]["alice"]["counter"] == 1
    assert aggregate([behind, None])["users"]["alice"] == {
        "enabled": True,
        "counter": 7,
        "knock": True,
        "spa": True,
    }
