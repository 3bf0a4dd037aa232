"""Two gateways' services on one real Redis (no kernel): claims decided once for both,
copies kept current by the stream feed, fail closed while Redis is away, no counter
lost across restarts -- of a gateway, or of Redis itself."""

from __future__ import annotations

import base64
import math
import secrets
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from nfknock.config import load_config
from nfknock.events import Verdict
from nfknock.logs import EventLogger
from nfknock.netlab.craft import tcp_syn, v4
from nfknock.netlab.redisd import RedisServer
from nfknock.sequence import derive, format_base32, step_of
from nfknock.service import Service
from nfknock.spa.encode import encode_access
from nfknock.store import StateError

from .conftest import require_redis
from .spa_support import HMAC_KEY, KEY, client

SECRET = bytes(range(32))
SRC, SRC2 = bytes([198, 51, 100, 10]), bytes([198, 51, 100, 11])
DST = bytes([198, 51, 100, 100])  # the virtual address both gateways serve


class Clock:
    """Near real wall time (Redis prunes by it), still stepped by the test."""

    def __init__(self) -> None:
        self.wall_now = math.floor(time.time() / 30) * 30 + 10.0
        self.mono_now = 1000.0

    def wall(self) -> float:
        return self.wall_now

    def mono(self) -> float:
        return self.mono_now


OPEN: list[Service] = []


@pytest.fixture(autouse=True)
def _stop_services() -> Iterator[None]:
    yield
    while OPEN:
        crash(OPEN.pop())


def crash(svc: Service) -> None:
    """As kill -9 leaves it: nothing finished."""
    if svc.store._thread.is_alive():
        svc.store.call(lambda s: s.close())
        svc.store.close()
    if svc.sharing is not None:
        svc.sharing.close()


SPA_KEYS = (
    f'fwknop_key_base64 = "{base64.b64encode(KEY).decode()}"\n'
    f'fwknop_hmac_key_base64 = "{base64.b64encode(HMAC_KEY).decode()}"\n'
)


def config(
    tmp: Path, url: str, prefix: str, extra: str = "", name: str = "gw", state: str = ""
) -> Path:
    """A gateway's config and users file; ``extra``: lines for [door] and after,
    ``state``: more [state] lines."""
    home = tmp / name
    home.mkdir(exist_ok=True)
    users = f'[users.alice]\nsecret = "{format_base32(SECRET)}"\n{SPA_KEYS}'
    (home / "users.toml").write_text(users)
    (home / "users.toml").chmod(0o600)
    path = home / "nfknock.toml"
    path.write_text(
        f'[[protect]]\nport = 22\n[users]\nfile = "users.toml"\n'
        f'[control]\nsocket = "{home}/ctl.sock"\n'
        f'[state]\nbackend = "redis"\nurl = "{url}"\nprefix = "{prefix}"\ntimeout = 0.5\n'
        f"{state}[door]\nopen_seconds = 300\n{extra}"
    )
    return path


def gateway(path: Path, clock: Clock) -> Service:
    svc = Service(load_config(path), EventLogger(), clock.wall, clock.mono)
    OPEN.append(svc)
    svc.restore()
    return svc


def pair(tmp: Path, url: str, extra: str = "") -> tuple[Service, Service, Clock]:
    prefix = f"t{secrets.token_hex(5)}"
    clock = Clock()
    a = gateway(config(tmp, url, prefix, extra, "a"), clock)
    b = gateway(config(tmp, url, prefix, extra, "b"), clock)
    return a, b, clock


def syn(port: int, src: bytes = SRC) -> bytes:
    return v4(src, DST, tcp_syn(src, DST, port))


def spa_packet(wall: float, src: bytes = SRC) -> bytes:
    """A UDP datagram to the SPA port holding a valid fwknop ACCESS request."""
    payload = encode_access(client(), username="alice", timestamp=int(wall))
    udp = struct.pack("!HHHH", 40000, 62201, 8 + len(payload), 0) + payload
    return v4(src, DST, udp, proto=17)


def knock(svc: Service, clock: Clock, counter: int = 0, src: bytes = SRC) -> None:
    for port in derive(SECRET, step_of(clock.wall_now), counter, svc.cfg.sequence_params()):
        assert svc.verdict_for(syn(port, src)) is Verdict.DROP


def until(svc: Service, done: Callable[[], bool], seconds: float = 5.0) -> None:
    """Apply feed changes (as the daemon's loop does) until ``done()``."""
    deadline = time.monotonic() + seconds
    while not done():
        assert time.monotonic() < deadline, "the feed did not bring it in time"
        svc.on_changes()
        time.sleep(0.005)


def reconnected(svc: Service) -> bool:
    """The feed lost Redis and found it again, and the service heard of both."""
    assert svc.sharing is not None
    return bool(svc.sharing.status()["reconnects"]) and not svc.on_changes()


def counter(svc: Service, clock: Clock) -> int:
    return svc.core.knocks.counters().get("alice", {}).get(step_of(clock.wall_now), 0)


def test_a_sequence_used_on_one_gateway_is_stale_on_the_other(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    a, b, clock = pair(tmp_path, redis_server.url)
    knock(a, clock)
    assert a.verdict_for(syn(22)) is Verdict.ACCEPT
    # The feed moved B's copy: the counter, A's grant and the connection A spent.
    until(b, lambda: counter(b, clock) == 1 and not b.status()["grants"])
    for src in (SRC2, SRC):  # the replay through B, from another address and the same
        knock(b, clock, src=src)
        assert b.verdict_for(syn(22, src)) is Verdict.REJECT  # "behind"


def test_a_replay_that_outruns_the_feed_loses_its_claim_in_redis(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    a, b, clock = pair(tmp_path, redis_server.url)
    knock(a, clock)
    with capture_logs() as logs:
        knock(b, clock)  # B has not read the feed: only Redis can refuse it
    assert b.verdict_for(syn(22)) is Verdict.REJECT
    stale = [e for e in logs if e["event"] == "sequence_stale"]
    assert [e["code"] for e in stale] == ["claimed_elsewhere"]


def test_a_grant_made_on_one_gateway_is_honoured_on_the_other_and_shares_its_budget(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    a, b, clock = pair(tmp_path, redis_server.url, "max_connections = 2\n")
    knock(a, clock)
    with capture_logs() as logs:
        until(b, lambda: any(g["user"] == "alice" for g in b.status()["grants"]))
    assert [e["code"] for e in logs if e["event"] == "grant_shared"] == ["shared_knock"]
    assert b.verdict_for(syn(22)) is Verdict.ACCEPT  # the address moved to B
    until(a, lambda: a.status()["grants"][0]["remaining"] == 1)  # B told A
    assert a.verdict_for(syn(22)) is Verdict.ACCEPT
    until(b, lambda: not b.status()["grants"])  # and A told B: the budget is spent
    assert b.verdict_for(syn(22)) is Verdict.DROP
    assert a.status()["state"]["feed"]["entries"] >= 1


def test_the_same_counter_completed_on_both_at_once_opens_exactly_once(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    a, b, clock = pair(tmp_path, redis_server.url)
    for c in range(3):
        ports = derive(SECRET, step_of(clock.wall_now), c, a.cfg.sequence_params())
        for port in ports:  # both complete before either hears from the other
            a.decide_packet(syn(port))
            b.decide_packet(syn(port))
        a.settle()
        b.settle()
        a.flush_claims()
        b.flush_claims()
        verdicts = {a.verdict_for(syn(22)), b.verdict_for(syn(22))}
        assert verdicts == {Verdict.ACCEPT, Verdict.REJECT}, c
        until(a, lambda c=c: counter(a, clock) == c + 1)  # type: ignore[misc]
        until(b, lambda c=c: counter(b, clock) == c + 1)  # type: ignore[misc]


def test_an_spa_packet_used_on_one_gateway_opens_nothing_on_the_other(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    a, b, clock = pair(tmp_path, redis_server.url)
    data = spa_packet(clock.wall_now)
    assert a.verdict_for(data) is Verdict.DROP  # SPA packets are always dropped
    assert a.verdict_for(syn(22)) is Verdict.ACCEPT
    with capture_logs() as logs:
        b.verdict_for(data)  # the replay through B, before B read the feed
        until(b, lambda: b.status()["spa"]["replay_cache"] == 1)
        b.verdict_for(data)  # and after
    assert b.verdict_for(syn(22)) is not Verdict.ACCEPT
    codes = [e.get("code") for e in logs if e["event"] in ("sequence_stale", "spa_refused")]
    assert codes == ["claimed_elsewhere", "spa_replay"]


def test_a_restarted_gateway_loses_no_counter_and_restores_the_shared_grants(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    a, b, clock = pair(tmp_path, redis_server.url)
    knock(a, clock)
    OPEN.remove(a)
    crash(a)  # kill -9 right after its claim
    again = gateway(Path(a.cfg.path), clock)
    assert counter(again, clock) == 1
    assert again.verdict_for(syn(22)) is Verdict.ACCEPT  # the grant lives in Redis
    knock(again, clock)
    assert again.verdict_for(syn(22)) is Verdict.REJECT
    OPEN.remove(b)
    b.stop()  # an orderly stop too
    b2 = gateway(Path(b.cfg.path), clock)
    knock(b2, clock)
    assert b2.verdict_for(syn(22)) is Verdict.REJECT


def test_damaged_or_foreign_shared_state_refuses_to_start_naming_the_key(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    import redis

    a, _, clock = pair(tmp_path, redis_server.url)
    knock(a, clock)
    client = redis.Redis.from_url(redis_server.url)
    prefix = a.cfg.state.prefix
    client.hset(f"{prefix}:w:{step_of(clock.wall_now)}", "alice", "lots")
    with pytest.raises(StateError, match=rf"{prefix}:w:\d+: floor of alice must be an integer"):
        gateway(Path(a.cfg.path), clock)
    client.set(f"{prefix}:schema", "9")
    with pytest.raises(StateError, match="another program or version"):
        gateway(Path(a.cfg.path), clock)


def test_bad_feed_entries_are_skipped_and_counted(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    import redis

    a, b, clock = pair(tmp_path, redis_server.url)
    client = redis.Redis.from_url(redis_server.url)
    feed = f"{a.cfg.state.prefix}:feed"
    client.xadd(feed, {"t": "grant", "o": "evil", "u": "alice", "p": "22"})  # no address
    client.xadd(feed, {"t": "spent", "o": "x"})
    knock(a, clock)
    until(b, lambda: counter(b, clock) == 1)
    status = b.status()["state"]["feed"]
    assert status["bad_entries"] == 2 and status["entries"] == 1
    assert not [g for g in b.status()["grants"] if g["source"] != "198.51.100.10"]


# --- Redis away ------------------------------------------------------------------------


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A server of this test's own, persistent (AOF, fsync always), to stop and start."""
    require_redis()
    server = RedisServer(tmp_path / "redis", persistent=True)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_while_redis_is_away_nothing_new_opens_known_grants_work_and_it_recovers(
    tmp_path: Path, own_redis: RedisServer
) -> None:
    a, b, clock = pair(tmp_path, own_redis.url, "max_connections = 2\n")
    knock(a, clock)  # a grant with two connections, known to both
    until(b, lambda: bool(b.status()["grants"]))
    own_redis.stop()
    until(a, lambda: not a.status()["state"]["reachable"])
    with capture_logs() as logs:
        knock(a, clock, counter=1, src=SRC2)
        assert a.verdict_for(syn(22, SRC2)) is Verdict.DROP  # its claim FAILED
    assert "claim_failed" in {e["event"] for e in logs}
    assert a.verdict_for(syn(22)) is Verdict.ACCEPT  # known locally: still honoured
    state = a.status()["state"]
    assert state["ok"] is False and state["reachable"] is False and "unreachable" in state["error"]
    started = time.monotonic()
    assert a.verdict_for(syn(23)) is Verdict.DROP  # verdicts go on, without waiting
    assert time.monotonic() - started < 0.5
    own_redis.start()
    until(a, lambda: a.status()["state"]["reachable"], seconds=15)
    until(b, lambda: b.status()["state"]["reachable"], seconds=15)
    # The connection spent while Redis was away reaches B once it is back.
    until(b, lambda: [g["remaining"] for g in b.status()["grants"]] == [1])
    knock(a, clock, counter=2, src=SRC2)
    assert a.verdict_for(syn(22, SRC2)) is Verdict.ACCEPT
    assert a.status()["state"]["ok"] is True


def test_a_gateway_started_while_redis_is_down_fails_closed_then_catches_up(
    tmp_path: Path,
) -> None:
    require_redis()
    server = RedisServer(tmp_path / "redis", persistent=True)
    server.start()
    clock = Clock()
    a = gateway(config(tmp_path, server.url, "late", name="a"), clock)
    knock(a, clock)  # counter 0 spent while the other gateway is away
    server.stop()
    late = gateway(config(tmp_path, server.url, "late", name="b"), clock)  # starts anyway
    try:
        until(late, lambda: late.status()["state"]["reachable"] is False)
        assert late.status()["state"]["ok"] is False
        knock(late, clock)  # it does not know counter 0 is spent: only Redis could say
        assert late.verdict_for(syn(22)) is Verdict.DROP  # ... and it is away: nothing opens
        server.start()
        until(late, lambda: late.status()["state"]["reachable"], seconds=15)
        until(late, lambda: counter(late, clock) >= 1)  # caught up: the replay is stale
        knock(late, clock, src=SRC2)
        assert late.verdict_for(syn(22, SRC2)) is Verdict.REJECT
        knock(late, clock, counter=1, src=SRC2)  # and a fresh counter opens
        assert late.verdict_for(syn(22, SRC2)) is Verdict.ACCEPT
    finally:
        for svc in list(OPEN):
            OPEN.remove(svc)
            crash(svc)
        server.stop()


def test_a_gateway_that_missed_trimmed_entries_reloads_everything(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    import redis

    from nfknock.store.changes import Resync
    from nfknock.store.redis import RedisStore
    from nfknock.store.redisfeed import RedisFeed

    a, _, clock = pair(tmp_path, redis_server.url)
    knock(a, clock)
    client = redis.Redis.from_url(redis_server.url)
    client.xtrim(f"{a.cfg.state.prefix}:feed", maxlen=0)  # as MAXLEN does to a slow reader
    assert isinstance(a.store.store, RedisStore)
    feed = RedisFeed(a.store.store)
    feed.start("1-0")  # where a reader that slept through it all stood
    try:
        deadline = time.monotonic() + 5
        got: list[object] = []
        while not any(isinstance(c, Resync) for c in got):
            assert time.monotonic() < deadline
            got += feed.drain()
            time.sleep(0.01)
        resync = next(c for c in got if isinstance(c, Resync))
        assert [(u, w.floor) for u, _, w in resync.snapshot.windows] == [("alice", 1)]
        assert feed.status()["resyncs"] == 1
    finally:
        feed.close()


def test_a_redis_that_comes_back_empty_is_reseeded_with_the_spent_counters(
    tmp_path: Path,
) -> None:
    require_redis()
    server = RedisServer(tmp_path / "redis")  # no persistence: a restart forgets all
    server.start()
    try:
        a, b, clock = pair(tmp_path, server.url)
        knock(a, clock)
        server.stop()
        server.start()
        with capture_logs() as logs:
            for svc in (a, b):
                until(svc, lambda s=svc: reconnected(s), seconds=15)  # type: ignore[misc]
            time.sleep(0.3)  # the re-seeding call runs on the store thread
        assert "state_reseeded" in {e["event"] for e in logs}
        fresh = gateway(config(tmp_path, server.url, a.cfg.state.prefix, name="c"), clock)
        assert counter(fresh, clock) == 1  # the new gateway learned it from Redis
        knock(fresh, clock)
        assert fresh.verdict_for(syn(22)) is Verdict.REJECT
    finally:
        for svc in list(OPEN):
            OPEN.remove(svc)
            crash(svc)
        server.stop()


def test_the_password_comes_from_a_private_file_and_a_wrong_one_fails_closed(
    tmp_path: Path,
) -> None:
    require_redis()
    server = RedisServer(tmp_path / "redis", password="s3cret-pw")  # noqa: S106
    server.start()
    try:
        secret = tmp_path / "redis.pw"
        secret.write_text("s3cret-pw\n")
        secret.chmod(0o600)
        clock = Clock()
        a = gateway(
            config(tmp_path, server.url, "pw", name="a", state=f'password_file = "{secret}"\n'),
            clock,
        )
        knock(a, clock)
        assert a.verdict_for(syn(22)) is Verdict.ACCEPT
        b = gateway(config(tmp_path, server.url, "pw", name="b"), clock)  # no password
        with capture_logs() as logs:
            knock(b, clock, counter=1)
            assert b.verdict_for(syn(22, SRC2)) is Verdict.DROP
        failed = [e for e in logs if e["event"] == "claim_failed"]
        assert failed and "s3cret" not in str(logs)
    finally:
        for svc in list(OPEN):
            OPEN.remove(svc)
            crash(svc)
        server.stop()
