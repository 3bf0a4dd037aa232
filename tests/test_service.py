"""The daemon's logic without a kernel: verdicts always given, durable claims, the
state store's guarantees, reload, logs."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from nfknock.config import ConfigError, load_config
from nfknock.daemon import Daemon
from nfknock.events import Verdict
from nfknock.logs import EventLogger
from nfknock.netlab.craft import tcp_syn, v4
from nfknock.sequence import derive, format_base32, step_of
from nfknock.service import Service, queue_stats
from nfknock.store import StateError

SECRET = bytes(range(32))
SRC, DST = bytes([198, 51, 100, 10]), bytes([198, 51, 100, 1])
SRC2 = bytes([198, 51, 100, 11])


def write_config(tmp: Path, extra: str = "", users: dict[str, bytes] | None = None) -> Path:
    users = users if users is not None else {"alice": SECRET}
    text = "".join(f'[users.{n}]\nsecret = "{format_base32(s)}"\n' for n, s in users.items())
    (tmp / "users.toml").write_text(text)
    (tmp / "users.toml").chmod(0o600)
    cfg = tmp / "nfknock.toml"
    cfg.write_text(
        f'[[protect]]\nport = 22\n[state]\npath = "{tmp}/state.db"\n'
        f'[users]\nfile = "users.toml"\n[control]\nsocket = "{tmp}/ctl.sock"\n{extra}'
    )
    return cfg


class FakeClock:
    def __init__(self) -> None:
        self.wall_now = 1_700_000_010.0
        self.mono_now = 500.0

    def wall(self) -> float:
        return self.wall_now

    def mono(self) -> float:
        return self.mono_now


OPEN: list[Service] = []


@pytest.fixture(autouse=True)
def _close_services() -> Iterator[None]:
    yield
    while OPEN:
        crash(OPEN.pop())


def crash(svc: Service) -> None:
    """Stop a service the way kill -9 does: nothing saved, the lock let go."""
    if svc.store._thread.is_alive():
        svc.store.call(lambda s: s.close())
        svc.store.close()


def service(
    tmp: Path, clock: FakeClock | None = None, restore: bool = True, **kw: Any
) -> tuple[Service, FakeClock]:
    clock = clock or FakeClock()
    cfg = (
        load_config(write_config(tmp, **kw)) if not (tmp / "nfknock.toml").exists() or kw else None
    )
    cfg = cfg or load_config(tmp / "nfknock.toml")
    svc = Service(cfg, EventLogger(), clock.wall, clock.mono)
    OPEN.append(svc)
    if restore:
        svc.restore()
    return svc, clock


def restart(svc: Service, clock: FakeClock, clean: bool) -> Service:
    OPEN.remove(svc)
    if clean:
        svc.stop()
    else:
        crash(svc)
    clock.mono_now = 3.0  # a new boot
    again, _ = service(Path(svc.cfg.state_path).parent, clock)
    return again


def syn(port: int, src: bytes = SRC) -> bytes:
    return v4(src, DST, tcp_syn(src, DST, port))


def knock(svc: Service, clock: FakeClock, counter: int = 0, src: bytes = SRC) -> None:
    params = svc.cfg.sequence_params()
    for port in derive(SECRET, step_of(clock.wall_now), counter, params):
        assert svc.verdict_for(syn(port, src)) is Verdict.DROP


def db_rows(tmp: Path, query: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(tmp / "state.db") as db:
        return db.execute(query).fetchall()


def test_garbage_gets_drop_and_a_malformed_event(tmp_path: Path) -> None:
    svc, _ = service(tmp_path)
    with capture_logs() as logs:
        assert svc.verdict_for(b"\x45\x00garbage") is Verdict.DROP
    assert logs[0]["event"] == "malformed_packet" and logs[0]["reason"] == "truncated"
    assert svc.malformed == 1


def test_a_bug_in_the_core_still_gets_drop_and_an_error_event(tmp_path: Path) -> None:
    svc, _ = service(tmp_path)

    def boom(*_: object) -> None:
        raise RuntimeError("bug")

    svc.core.decide_key = boom  # type: ignore[method-assign,assignment]
    with capture_logs() as logs:
        assert svc.verdict_for(syn(22)) is Verdict.DROP
    assert logs[0]["event"] == "internal_error" and "RuntimeError" in logs[0]["reason"]


# --- A.1: a grant is honoured only once its counter is durably recorded ------------


def test_the_counter_and_its_grant_are_on_disk_before_the_grant_opens(tmp_path: Path) -> None:
    svc, clock = service(tmp_path)
    knock(svc, clock)
    assert db_rows(tmp_path, "SELECT user, step, floor FROM windows") == [
        ("alice", step_of(clock.wall_now), 1)
    ]
    assert db_rows(tmp_path, "SELECT user, remaining FROM grants") == [("alice", 1)]
    assert svc.verdict_for(syn(22)) is Verdict.ACCEPT


def test_a_syn_before_the_claim_is_recorded_is_held_not_accepted(tmp_path: Path) -> None:
    svc, clock = service(tmp_path)
    params = svc.cfg.sequence_params()
    for port in derive(SECRET, step_of(clock.wall_now), 0, params):
        svc.decide_packet(syn(port))
    svc.store.call(lambda s: None)  # let nothing be recorded yet: claims wait in the outbox
    assert svc.decide_packet(syn(22)) is Verdict.HOLD
    svc.settle()
    svc.flush_claims()
    assert svc.decide_packet(syn(22)) is Verdict.ACCEPT


@pytest.fixture
def state_fs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs of the test's own for the state directory (root ignores file
    modes: a real read-only or full filesystem is the only honest test)."""
    if os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("needs root to mount a tmpfs")
        pytest.skip("needs root to mount a tmpfs")
    mnt = tmp_path / "statefs"
    mnt.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(mnt)], check=True
    )
    try:
        yield mnt
    finally:
        for _ in range(2):  # the bind on top, if any, then the tmpfs
            subprocess.run(["umount", "-l", str(mnt)], check=False, capture_output=True)


def _on(fs: Path, tmp: Path) -> None:
    cfg = tmp / "nfknock.toml"
    write_config(tmp)
    cfg.write_text(cfg.read_text().replace(f"{tmp}/state.db", f"{fs}/state.db"))


def _bind_ro(fs: Path, ro: bool) -> None:
    if ro:
        subprocess.run(["mount", "--bind", str(fs), str(fs)], check=True)
        subprocess.run(["mount", "-o", "remount,bind,ro", str(fs)], check=True)
    else:
        subprocess.run(["umount", "-l", str(fs)], check=True)  # the read-only bind on top


def _fill(fs: Path) -> None:
    with (fs / "ballast").open("wb") as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 65536)
            f.flush()


@pytest.mark.parametrize("fault", ["read-only", "full"])
def test_a_state_that_cannot_be_written_opens_nothing_and_says_why(
    tmp_path: Path, state_fs: Path, fault: str
) -> None:
    _on(state_fs, tmp_path)
    svc, clock = service(tmp_path)
    if fault == "read-only":
        # What a filesystem forced read-only looks like: open files no longer write.
        svc.store.call(lambda s: s.disconnect())  # type: ignore[attr-defined]
        _bind_ro(state_fs, True)
    else:
        _fill(state_fs)
    with capture_logs() as logs:
        knock(svc, clock)
        assert svc.verdict_for(syn(22)) is Verdict.DROP
    assert "claim_failed" in {e["event"] for e in logs}
    state = svc.status()["state"]
    assert state["ok"] is False and state["claim_failures"] == 1 and state["error"]
    assert svc.verdict_for(b"junk") is Verdict.DROP  # still giving verdicts
    knock(svc, clock)  # the same sequence again: spent here all the same
    assert svc.verdict_for(syn(22)) is Verdict.REJECT
    # the disk recovers: the next sequence opens, and status says all is well
    if fault == "read-only":
        _bind_ro(state_fs, False)
    else:
        (state_fs / "ballast").unlink()
    knock(svc, clock, counter=1)
    assert svc.verdict_for(syn(22)) is Verdict.ACCEPT
    assert svc.status()["state"]["ok"] is True


def test_a_state_unwritable_at_start_runs_but_restores_no_grant(
    tmp_path: Path, state_fs: Path
) -> None:
    _on(state_fs, tmp_path)
    svc, clock = service(tmp_path)
    knock(svc, clock)
    OPEN.remove(svc)
    svc.stop()
    _bind_ro(state_fs, True)
    again, _ = service(tmp_path, clock, restore=False)
    restored = again.restore()
    assert restored.writable is False and restored.grants == 0
    assert again.verdict_for(syn(22)) is Verdict.DROP
    knock(again, clock)  # counters came back: the replay is stale
    assert again.verdict_for(syn(22)) is Verdict.REJECT


# --- A.2, A.3, A.4, A.6: the state store ----------------------------------------------


def test_restart_restores_counters_so_a_replay_is_stale(tmp_path: Path) -> None:
    svc, clock = service(tmp_path)
    knock(svc, clock)
    assert svc.verdict_for(syn(22)) is Verdict.ACCEPT
    for clean in (False, True):
        svc = restart(svc, clock, clean=clean)
        knock(svc, clock)
        assert svc.verdict_for(syn(22)) is Verdict.REJECT


def test_grants_survive_a_clean_exit_but_not_a_crash(tmp_path: Path) -> None:
    svc, clock = service(tmp_path, extra="[door]\nmax_connections = 3\n")
    knock(svc, clock)
    assert svc.verdict_for(syn(22)) is Verdict.ACCEPT  # two connections left
    crashed = restart(svc, clock, clean=False)
    assert crashed.verdict_for(syn(22)) is Verdict.DROP  # the grant was not restored


def test_a_spent_connection_never_comes_back_after_a_crash_following_a_clean_restart(
    tmp_path: Path,
) -> None:
    svc, clock = service(tmp_path, extra="[door]\nmax_connections = 3\n")
    knock(svc, clock)
    assert svc.verdict_for(syn(22)) is Verdict.ACCEPT
    svc = restart(svc, clock, clean=True)  # two connections left, saved cleanly
    assert svc.verdict_for(syn(22)) is Verdict.ACCEPT  # one left
    svc = restart(svc, clock, clean=False)  # kill -9 right after the accept
    assert svc.verdict_for(syn(22)) is Verdict.DROP  # never the spent one back


def test_clean_restart_restores_the_remaining_connections_exactly(tmp_path: Path) -> None:
    svc, clock = service(tmp_path, extra="[door]\nmax_connections = 3\n")
    knock(svc, clock)
    assert svc.verdict_for(syn(22)) is Verdict.ACCEPT
    svc = restart(svc, clock, clean=True)
    assert [svc.verdict_for(syn(22)) for _ in range(3)] == [
        Verdict.ACCEPT,
        Verdict.ACCEPT,
        Verdict.DROP,
    ]


def test_a_second_instance_on_the_same_state_is_refused_and_told_who_holds_it(
    tmp_path: Path,
) -> None:
    service(tmp_path)
    with pytest.raises(StateError, match=rf"in use by another nfknock \(pid {os.getpid()}\)"):
        Service(load_config(tmp_path / "nfknock.toml"), EventLogger())


def test_a_symlinked_state_path_writes_through_to_its_target(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    write_config(tmp_path)
    (tmp_path / "state.db").symlink_to(real / "state.db")
    (real / "state.db").touch()
    svc, clock = service(tmp_path)
    knock(svc, clock)
    assert (tmp_path / "state.db").is_symlink()
    with sqlite3.connect(real / "state.db") as db:
        assert db.execute("SELECT floor FROM windows").fetchall() == [(1,)]


def test_a_dangling_state_symlink_refuses_to_start(tmp_path: Path) -> None:
    write_config(tmp_path)
    (tmp_path / "state.db").symlink_to(tmp_path / "gone" / "state.db")
    with pytest.raises(StateError, match="does not exist"):
        Service(load_config(tmp_path / "nfknock.toml"), EventLogger())


def test_the_state_file_and_directory_are_private_whatever_the_umask(tmp_path: Path) -> None:
    write_config(tmp_path)
    cfg = tmp_path / "nfknock.toml"
    cfg.write_text(cfg.read_text().replace(f"{tmp_path}/state.db", f"{tmp_path}/new/state.db"))
    old = os.umask(0)
    try:
        svc, clock = service(tmp_path)
        knock(svc, clock)
    finally:
        os.umask(old)
    assert (tmp_path / "new").stat().st_mode & 0o777 == 0o700
    for name in ("state.db", "state.db.lock"):
        assert (tmp_path / "new" / name).stat().st_mode & 0o777 == 0o600


def _tamper(tmp: Path, *sql: str) -> None:
    with sqlite3.connect(tmp / "state.db") as db:
        for statement in sql:
            db.execute(statement)


@pytest.mark.parametrize(
    ("sql", "problem"),
    [
        ("UPDATE windows SET floor = 'x'", "floor"),
        ("UPDATE meta SET value = NULL WHERE key = 'clean'", "clean"),
        ("UPDATE windows SET floor = 1000000", "floor"),
        ("UPDATE windows SET floor = 1e400", "floor"),
        ("UPDATE windows SET user = 'alice\n'", "user"),
        ("UPDATE windows SET step = -5", "step"),
        ("UPDATE grants SET expires = 1e400", "expires"),
        ("UPDATE grants SET expires = 9e15", "expires"),
        ("UPDATE grants SET ports = '[0]'", "ports"),
        ("UPDATE grants SET ports = 'null'", "ports"),
        ("UPDATE grants SET src = x'0102'", "addresses"),
        ("UPDATE grants SET remaining = 2.5", "remaining"),
        ("UPDATE meta SET value = 7 WHERE key = 'schema'", "schema"),
        ("UPDATE meta SET value = 'yes' WHERE key = 'clean'", "clean"),
        ("INSERT INTO digests VALUES (x'00', 1.0)", "digest"),
    ],
)
def test_a_damaged_state_refuses_to_start_naming_the_file_and_problem(
    tmp_path: Path, sql: str, problem: str
) -> None:
    svc, clock = service(tmp_path)
    knock(svc, clock)
    OPEN.remove(svc)
    svc.stop()
    _tamper(tmp_path, sql)
    with pytest.raises(StateError, match=problem) as err:
        service(tmp_path, clock)
    assert str(tmp_path / "state.db") in str(err.value)


@pytest.mark.parametrize("content", [b"{}", b"null", b"\x00" * 64, b"SQLite format 3\x00junk"])
def test_a_state_file_that_is_not_a_database_refuses_to_start(
    tmp_path: Path, content: bytes
) -> None:
    write_config(tmp_path)
    (tmp_path / "state.db").write_bytes(content)
    with pytest.raises(StateError, match=str(tmp_path / "state.db")):
        service(tmp_path)


# --- reload -------------------------------------------------------------------------


def test_reload_keeps_grants_and_counters(tmp_path: Path) -> None:
    svc, clock = service(tmp_path, extra="[door]\nmax_connections = 2\n")
    knock(svc, clock)
    write_config(tmp_path, "[door]\nmax_connections = 2\n", {"alice": SECRET, "bob": bytes(32)})
    assert svc.reload() == "configuration reloaded"
    assert svc.verdict_for(syn(22)) is Verdict.ACCEPT  # grant kept
    knock(svc, clock)  # the spent counter is still spent
    assert svc.verdict_for(syn(22, SRC)) is Verdict.ACCEPT  # the grant's second connection
    knock(svc, clock, src=SRC2)
    assert svc.verdict_for(syn(22, SRC2)) is Verdict.REJECT


def test_reload_rechecks_every_grant_against_the_new_configuration(tmp_path: Path) -> None:
    svc, clock = service(tmp_path, extra="[door]\nmax_connections = 5\n[[protect]]\nport = 443\n")
    knock(svc, clock)
    # alice may now open only 443, with two connections
    (tmp_path / "users.toml").write_text(
        f'[users.alice]\nsecret = "{format_base32(SECRET)}"\nports = [443]\n'
    )
    cfg = tmp_path / "nfknock.toml"
    cfg.write_text(cfg.read_text().replace("max_connections = 5", "max_connections = 2"))
    with capture_logs() as logs:
        svc.reload()
    narrowed = [e for e in logs if e["event"] == "grant_narrowed"]
    assert narrowed and "ports 22,443 -> 443" in narrowed[0]["reason"]
    assert "connections 5 -> 2" in narrowed[0]["reason"]
    assert svc.verdict_for(syn(22)) is Verdict.DROP
    assert svc.verdict_for(syn(443)) is Verdict.ACCEPT


@pytest.mark.parametrize("change", ["remove", "disable", "rekey"])
def test_reload_revokes_the_grants_of_removed_disabled_or_rekeyed_users(
    tmp_path: Path, change: str
) -> None:
    svc, clock = service(tmp_path)
    knock(svc, clock)
    users = tmp_path / "users.toml"
    if change == "remove":
        users.write_text("")
    elif change == "disable":
        users.write_text(users.read_text() + "enabled = false\n")
    else:
        users.write_text(f'[users.alice]\nsecret = "{format_base32(bytes(32))}"\n')
    with capture_logs() as logs:
        svc.reload()
    assert [e["event"] for e in logs if e["event"].startswith("grant_")] == ["grant_revoked"]
    assert svc.verdict_for(syn(22)) is Verdict.DROP


def test_reload_with_changed_knock_parameters_keeps_spent_counters(tmp_path: Path) -> None:
    svc, clock = service(tmp_path)
    knock(svc, clock)
    cfg = tmp_path / "nfknock.toml"
    cfg.write_text(cfg.read_text() + "[knock]\nreorder_window = 6\n")
    assert "knock parameters changed" in svc.reload()
    knock(svc, clock, src=SRC2)
    assert svc.verdict_for(syn(22, SRC2)) is Verdict.REJECT


def test_a_reload_is_built_in_a_thread_while_packets_are_decided(tmp_path: Path) -> None:
    svc, clock = service(tmp_path)
    snapshot = svc.reload_snapshot()
    result: list[Any] = []
    worker = threading.Thread(target=lambda: result.append(svc.prepare_reload(snapshot)))
    worker.start()
    knock(svc, clock)  # meanwhile a counter is spent on the live engine
    worker.join()
    svc.finish_reload(result[0])
    knock(svc, clock, src=SRC2)
    assert svc.verdict_for(syn(22, SRC2)) is Verdict.REJECT  # the spend was merged


def test_reload_with_bad_config_keeps_the_old_one(tmp_path: Path) -> None:
    svc, clock = service(tmp_path)
    (tmp_path / "nfknock.toml").write_text("[knock]\nlength = 'x'\n")
    with pytest.raises(ConfigError):
        svc.reload()
    knock(svc, clock)
    assert svc.verdict_for(syn(22)) is Verdict.ACCEPT


def test_logs_never_contain_a_secret(tmp_path: Path) -> None:
    svc, clock = service(tmp_path)
    with capture_logs() as logs:
        knock(svc, clock)
        svc.verdict_for(syn(22))
        knock(svc, clock)  # replay
        svc.verdict_for(syn(22))
        svc.reload()
        svc.verdict_for(b"junk")
    text = json.dumps(logs)
    assert format_base32(SECRET) not in text and SECRET.hex() not in text
    assert {"sequence_completed", "protected_accept", "sequence_stale", "protected_reject"} <= {
        e["event"] for e in logs
    }


def test_protected_port_events_carry_source_user_and_port(tmp_path: Path) -> None:
    svc, clock = service(tmp_path)
    knock(svc, clock)
    with capture_logs() as logs:
        svc.verdict_for(syn(22))
    assert logs[0] == {
        "event": "protected_accept",
        "src": "198.51.100.10",
        "dst": "198.51.100.1",
        "user": "alice",
        "port": 22,
        "reason": "grant used, 0 connection(s) left",
        "code": "granted",
        "log_level": "info",
    }


def test_noisy_events_are_rate_limited(tmp_path: Path) -> None:
    svc, _ = service(tmp_path)
    svc.events.burst = 5
    with capture_logs() as logs:
        for _ in range(50):
            svc.verdict_for(syn(22))
        svc.events.flush_suppressed()
    drops = [e for e in logs if e["event"] == "protected_drop"]
    assert len(drops) == 5
    assert logs[-1]["event"] == "events_suppressed" and logs[-1]["count"] == 45


class FakePacket:
    def __init__(self, payload: bytes | Exception, fail_verdict: bool = False) -> None:
        self.payload = payload
        self.fail_verdict = fail_verdict
        self.verdicts: list[str] = []
        self.mark = 0

    def get_payload(self) -> bytes:
        if isinstance(self.payload, Exception):
            raise self.payload
        return self.payload

    def accept(self) -> None:
        if self.fail_verdict:
            raise OSError("verdict failed")
        self.verdicts.append("accept")

    def drop(self) -> None:
        self.verdicts.append("drop")

    def set_mark(self, mark: int) -> None:
        self.mark = mark

    def repeat(self) -> None:
        self.verdicts.append("repeat")

    def retain(self) -> None:
        self.verdicts.append("retained")


def _daemon(tmp_path: Path) -> Daemon:
    structlog.reset_defaults()
    d = Daemon(load_config(write_config(tmp_path)))
    OPEN.append(d.service)
    return d


def test_callback_gives_drop_when_reading_the_payload_fails(tmp_path: Path) -> None:
    d = _daemon(tmp_path)
    pkt = FakePacket(RuntimeError("no payload"))
    d.handle(pkt)
    assert pkt.verdicts == ["drop"]
    assert d.service.errors == 1


def test_callback_falls_back_to_drop_when_the_verdict_call_fails(tmp_path: Path) -> None:
    d = _daemon(tmp_path)
    d.service.decide_marked = lambda _p, defer=False: (Verdict.ACCEPT, 0)  # type: ignore[method-assign,assignment]
    pkt = FakePacket(syn(22), fail_verdict=True)
    d.handle(pkt)
    assert pkt.verdicts == ["drop"]


def test_reject_is_the_mark_plus_repeat(tmp_path: Path) -> None:
    d = _daemon(tmp_path)
    d.service.decide_marked = lambda _p, defer=False: (Verdict.REJECT, 0)  # type: ignore[method-assign,assignment]
    pkt = FakePacket(syn(22))
    d.handle(pkt)
    assert pkt.verdicts == ["repeat"] and pkt.mark == 0x4E4B0001


def test_queue_stats_reads_the_proc_line(tmp_path: Path) -> None:
    proc = tmp_path / "q"
    proc.write_text(
        "    0  12345     3 2   512     7     1       99  1\n    1  1 0 2 512 0 0 0 1\n"
    )
    assert queue_stats(0, proc) == {
        "queue": 0,
        "portid": 12345,
        "waiting": 3,
        "copy_mode": 2,
        "copy_range": 512,
        "queue_dropped": 7,
        "user_dropped": 1,
        "last_id": 99,
    }
    assert queue_stats(5, proc) == {}


def test_a_syn_waiting_for_its_claim_is_held_then_accepted_once_recorded(
    tmp_path: Path,
) -> None:
    d = _daemon(tmp_path)
    d.service.restore()
    wall = d.service.wall()
    params = d.service.cfg.sequence_params()
    for port in derive(SECRET, step_of(wall), 0, params):
        d.service.decide_packet(syn(port))  # no settle: the claim is not submitted yet
    pkt = FakePacket(syn(22))
    d.handle(pkt)  # handle() settles: the claim goes to the store thread now
    assert pkt.verdicts == ["retained"] and len(d._held) == 1
    d.service.flush_claims()
    d._redecide_held()
    assert pkt.verdicts == ["retained", "accept"] and not d._held


def test_held_syns_are_dropped_after_the_hold_deadline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = _daemon(tmp_path)
    d.service.decide_marked = lambda _p, defer=False: (Verdict.HOLD, 0)  # type: ignore[method-assign,assignment]
    pkt = FakePacket(syn(22))
    d.handle(pkt)
    assert pkt.verdicts == ["retained"]
    now = time.monotonic()
    monkeypatch.setattr(time, "monotonic", lambda: now + 10)
    d._redecide_held(expire_only=True)
    assert pkt.verdicts == ["retained", "drop"] and not d._held


def test_held_syns_beyond_the_table_bound_are_dropped_at_once(tmp_path: Path) -> None:
    from nfknock import daemon

    d = _daemon(tmp_path)
    d.service.decide_marked = lambda _p, defer=False: (Verdict.HOLD, 0)  # type: ignore[method-assign,assignment]
    pkts = [FakePacket(syn(22)) for _ in range(daemon.MAX_HELD + 1)]
    for pkt in pkts:
        d.handle(pkt)
    assert pkts[-1].verdicts == ["drop"] and len(d._held) == daemon.MAX_HELD
