"""Prefix grants stored and shared: the prefix length travels with the masked address
through the change feed, the embedded file and Redis, and is validated strictly on
the way in (a masked address alone would be ambiguous)."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from nfknock.core import GrantRecord
from nfknock.events import Verdict
from nfknock.gate import ClaimRequest, CounterClaim, Outcome
from nfknock.netlab.redisd import RedisServer
from nfknock.store import StateError
from nfknock.store.changes import FeedError, Granted, claim_fields, decode, record_fields
from nfknock.store.embedded import EmbeddedStore, _validate

from .test_counters import new_store, redis_url, store_kind  # noqa: F401 - fixtures
from .test_shared_state import SRC, SRC2, Clock, knock, pair, syn, until

NET = bytes([198, 51, 100, 0])
DST = bytes([198, 51, 100, 1])
NET6 = bytes.fromhex("20010db8" + "00" * 12)
DST6 = bytes.fromhex("20010db8" + "00" * 11 + "01")


def prefix_request(
    i: int = 1, src: bytes = NET, dst: bytes = DST, prefix: int = 24
) -> ClaimRequest:
    return ClaimRequest(
        i,
        CounterClaim("alice", 100, i - 1, 2),
        src + dst,
        "alice",
        frozenset({22}),
        1,
        1e9 + 60,
        "knock",
        f"gw.{i}",
        prefix,
    )


# --- the feed ---------------------------------------------------------------------------


def test_a_prefix_grant_travels_with_its_length_and_an_exact_one_without() -> None:
    _, changes = decode(claim_fields(prefix_request(src=NET6, dst=DST6, prefix=64), "gw1"))
    [granted] = [c for c in changes if isinstance(c, Granted)]
    assert (granted.record.src, granted.record.prefix) == (NET6, 64)
    exact = GrantRecord(SRC, DST, "alice", frozenset({22}), 1, 1e9, "knock", "gw.2")
    assert "l" not in record_fields(exact, "gw1")
    assert decode(record_fields(exact, "gw1"))[1] == [Granted(exact)]
    wide = GrantRecord(NET, DST, "alice", frozenset({22}), 1, 1e9, "spa", "gw.3", 24)
    assert decode(record_fields(wide, "gw1"))[1] == [Granted(wide)]


GOOD = record_fields(
    GrantRecord(NET, DST, "alice", frozenset({22}), 1, 1e9, "knock", "g.1", 24), "o"
)


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"l": "7"}, "not an integer in 8..31"),
        ({"l": "32"}, "not an integer in 8..31"),  # a whole address is no prefix grant
        ({"l": "x"}, "not an integer"),
        ({"l": "-24"}, "not an integer"),
        ({"a": "c6336401"}, "bits set past the prefix /24"),  # 198.51.100.1/24: not masked
        ({"a": NET6.hex(), "b": DST6.hex(), "l": "15"}, "not an integer in 16..127"),
        ({"a": NET6.hex(), "b": DST6.hex(), "l": "128"}, "not an integer in 16..127"),
    ],
)
def test_a_bad_prefix_in_a_feed_entry_is_refused(change: dict[str, Any], why: str) -> None:
    with pytest.raises(FeedError, match=why):
        decode({**GOOD, **change})


# --- the stores ---------------------------------------------------------------------------


def test_every_store_keeps_a_grants_prefix(
    tmp_path: Path,
    store_kind: str,  # noqa: F811
    redis_url: str,  # noqa: F811
) -> None:
    store = new_store(store_kind, tmp_path, redis_url)
    try:
        assert store.claim(prefix_request(1), 1e9).outcome is Outcome.WON
        assert store.claim(prefix_request(2, NET6, DST6, 64), 1e9).outcome is Outcome.WON
        loaded = {(g.src, g.prefix) for g in store.load(1e9).grants}
        assert loaded == {(NET, 24), (NET6, 64)}
    finally:
        store.close()


def test_the_embedded_store_keeps_prefixes_across_a_clean_exit(tmp_path: Path) -> None:
    store = EmbeddedStore(tmp_path / "state.db")
    records = [
        GrantRecord(NET6, DST6, "alice", frozenset({22}), 2, 1e9 + 60, "spa", prefix=64),
        GrantRecord(SRC, DST, "alice", frozenset({22}), 1, 1e9 + 60),
    ]
    try:
        store.load(1e9)
        store.begin()
        store.finish(records, 5, -1)
    finally:
        store.close()
    again = EmbeddedStore(tmp_path / "state.db")
    try:
        assert sorted(again.load(1e9).grants, key=lambda g: len(g.src)) == records[::-1]
    finally:
        again.close()


OLD_GRANTS = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value);
CREATE TABLE windows (user TEXT NOT NULL, step INTEGER NOT NULL, floor INTEGER NOT NULL,
    PRIMARY KEY (user, step));
CREATE TABLE digests (digest BLOB PRIMARY KEY, until REAL NOT NULL);
CREATE TABLE grants (
    id INTEGER PRIMARY KEY, src BLOB NOT NULL, dst BLOB NOT NULL, user TEXT NOT NULL,
    ports TEXT NOT NULL, remaining INTEGER NOT NULL, expires REAL NOT NULL,
    method TEXT NOT NULL);
INSERT INTO meta VALUES ('schema', 1), ('clean', 1);
INSERT INTO grants (src, dst, user, ports, remaining, expires, method)
    VALUES (x'c633640a', x'c6336401', 'alice', '[22]', 1, 1000000060.0, 'knock');
"""


def test_a_state_file_from_before_prefixes_reads_as_exact_grants_and_gains_the_column(
    tmp_path: Path,
) -> None:
    path = tmp_path / "state.db"
    with closing(sqlite3.connect(path)) as db:
        db.executescript(OLD_GRANTS)
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as ro:  # read-only
        [grant] = _validate(ro, path, 1e9, False).grants
    assert (grant.src, grant.prefix) == (SRC, None)
    store = EmbeddedStore(path)
    try:
        [grant] = store.load(1e9).grants
        assert (grant.src, grant.prefix) == (SRC, None)
        assert store.claim(prefix_request(), 1e9).outcome is Outcome.WON
        assert {g.prefix for g in store.load(1e9).grants} == {None, 24}
    finally:
        store.close()


@pytest.mark.parametrize(
    ("prefix", "src", "problem"),
    [
        (32, NET, "prefix must be an integer in 8..31"),
        (7, NET, "prefix must be an integer in 8..31"),
        ("x24", NET, "prefix must be an integer"),
        (24.5, NET, "prefix must be an integer"),
        (24, SRC, "source c633640a has bits set past its prefix /24"),
        (128, NET6, "prefix must be an integer in 16..127"),
    ],
)
def test_a_damaged_prefix_in_the_state_file_refuses_to_start(
    tmp_path: Path, prefix: object, src: bytes, problem: str
) -> None:
    path = tmp_path / "state.db"
    store = EmbeddedStore(path)
    store.load(1e9)
    dst = DST6 if len(src) == 16 else DST
    with closing(sqlite3.connect(path)) as db, db:
        db.execute(
            "INSERT INTO grants (src, dst, user, ports, remaining, expires, method, prefix) "
            "VALUES (?, ?, 'alice', '[22]', 1, 1000000060.0, 'knock', ?)",
            (src, dst, prefix),
        )
    try:
        with pytest.raises(StateError, match=f"grants: {problem}"):
            store.load(1e9)
    finally:
        store.close()


# --- two gateways on one Redis -------------------------------------------------------------


def test_a_prefix_grant_made_on_one_gateway_opens_its_prefix_on_the_other(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    a, b, clock = pair(tmp_path, redis_server.url, "max_connections = 2\ngrant_prefix_v4 = 24\n")
    knock(a, clock)  # from 198.51.100.10
    until(b, lambda: any(g["source"] == "198.51.100.0/24" for g in b.status()["grants"]))
    assert b.verdict_for(syn(22, SRC2)) is Verdict.ACCEPT  # 198.51.100.11, through B
    until(a, lambda: a.status()["grants"][0]["remaining"] == 1)  # B told A: the grant's key
    assert a.verdict_for(syn(22, bytes([198, 51, 100, 77]))) is Verdict.ACCEPT
    assert a.verdict_for(syn(22, SRC)) is Verdict.DROP  # the budget is spent


# --- two worker processes on one embedded file, through the local feed ------------------


def test_workers_share_a_prefix_grant_and_restore_it_after_a_clean_stop(tmp_path: Path) -> None:
    from . import test_feed as feed

    clock = Clock()
    path = feed.config(tmp_path)
    path.write_text(path.read_text() + "grant_prefix_v4 = 24\n")  # under [door]
    w0, w1 = feed.worker(path, 0, clock), feed.worker(path, 1, clock)
    try:
        knock(w0, clock)  # from 198.51.100.10, completed on worker 0
        feed.until(w1, lambda: feed._remaining(w1, "198.51.100.0/24") == 2)
        assert w1.verdict_for(syn(22, bytes([198, 51, 100, 77]))) is Verdict.ACCEPT
        feed.until(w0, lambda: feed._remaining(w0, "198.51.100.0/24") == 1)  # the grant's key
        for svc in (w1, w0):  # the supervisor's order: worker 0 records every grant
            feed.OPEN.remove(svc)
            svc.stop()
        again = [feed.worker(path, i, clock, begin=False) for i in (0, 1)]
        again[0].store.call(lambda s: s.begin())
        assert [feed._remaining(svc, "198.51.100.0/24") for svc in again] == [1, 1]
        assert again[1].verdict_for(syn(22, bytes([198, 51, 100, 88]))) is Verdict.ACCEPT
    finally:
        while feed.OPEN:
            feed.crash(feed.OPEN.pop())
