"""The daemon's logic without a kernel: verdicts always given, state, reload, logs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from nfknock.config import load_config
from nfknock.daemon import Daemon
from nfknock.events import Verdict
from nfknock.fileio import StateError
from nfknock.logs import EventLogger
from nfknock.netlab.craft import tcp_syn, v4
from nfknock.sequence import derive, format_base32, step_of
from nfknock.service import Service, queue_stats

SECRET = bytes(range(32))
SRC, DST = bytes([198, 51, 100, 10]), bytes([198, 51, 100, 1])


def write_config(tmp: Path, extra: str = "", users: dict[str, bytes] | None = None) -> Path:
    users = users if users is not None else {"alice": SECRET}
    text = "".join(f'[users.{n}]\nsecret = "{format_base32(s)}"\n' for n, s in users.items())
    (tmp / "users.toml").write_text(text)
    (tmp / "users.toml").chmod(0o600)
    cfg = tmp / "nfknock.toml"
    cfg.write_text(
        f'[[protect]]\nport = 22\n[state]\npath = "{tmp}/state.json"\n'
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


def service(tmp: Path, **kw: Any) -> tuple[Service, FakeClock]:
    clock = FakeClock()
    return Service(
        load_config(write_config(tmp, **kw)), EventLogger(), clock.wall, clock.mono
    ), clock


def syn(port: int, src: bytes = SRC) -> bytes:
    return v4(src, DST, tcp_syn(src, DST, port))


def knock(svc: Service, clock: FakeClock, counter: int = 0, secret: bytes = SECRET) -> None:
    params = svc.cfg.sequence_params()
    for port in derive(secret, step_of(clock.wall_now), counter, params):
        assert svc.verdict_for(syn(port)) is Verdict.DROP


def test_garbage_gets_drop_and_a_malformed_event(tmp_path: Path) -> None:
    svc, _ = service(tmp_path)
    with capture_logs() as logs:
        assert svc.verdict_for(b"\x45\x00garbage") is Verdict.DROP
    assert logs[0]["event"] == "malformed_packet" and logs[0]["reason"] == "truncated"
    assert svc.malformed == 1


def test_a_bug_in_the_engine_still_gets_drop_and_an_error_event(tmp_path: Path) -> None:
    svc, _ = service(tmp_path)

    def boom(*_: object) -> None:
        raise RuntimeError("bug")

    svc.engine.decide_key = boom  # type: ignore[method-assign,assignment]
    with capture_logs() as logs:
        assert svc.verdict_for(syn(22)) is Verdict.DROP
    assert logs[0]["event"] == "internal_error" and "RuntimeError" in logs[0]["reason"]


def test_counter_is_on_disk_before_the_next_packet_is_decided(tmp_path: Path) -> None:
    svc, clock = service(tmp_path)
    knock(svc, clock)
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["counters"] == [{"user": "alice", "step": step_of(clock.wall_now), "next": 1}]
    assert state["grants"][0]["source"] == "198.51.100.10"


def test_restart_restores_counters_so_a_replay_is_stale(tmp_path: Path) -> None:
    svc, clock = service(tmp_path)
    knock(svc, clock)
    assert svc.verdict_for(syn(22)) is Verdict.ACCEPT
    again = Service(svc.cfg, EventLogger(), clock.wall, lambda: 3.0)
    again.restore()
    knock(again, clock)
    assert again.verdict_for(syn(22)) is Verdict.REJECT


def test_corrupt_state_file_refuses_to_start(tmp_path: Path) -> None:
    svc, _ = service(tmp_path)
    (tmp_path / "state.json").write_text("{not json")
    with pytest.raises(StateError, match="not valid JSON"):
        svc.restore()
    (tmp_path / "state.json").write_text('{"version": 1, "counters": [{"user": 1}]}')
    with pytest.raises(StateError, match="unusable"):
        svc.restore()


def test_reload_keeps_grants_progress_and_counters(tmp_path: Path) -> None:
    svc, clock = service(tmp_path, extra="[door]\nmax_connections = 2\n")
    knock(svc, clock)
    params = svc.cfg.sequence_params()
    half = derive(SECRET, step_of(clock.wall_now), 1, params)[:16]
    for port in half:
        svc.verdict_for(syn(port, src=bytes([198, 51, 100, 11])))
    write_config(tmp_path, "[door]\nmax_connections = 2\n", {"alice": SECRET, "bob": bytes(32)})
    assert svc.reload() == "users reloaded"
    assert svc.verdict_for(syn(22)) is Verdict.ACCEPT  # grant kept
    for port in derive(SECRET, step_of(clock.wall_now), 1, params)[16:]:
        svc.verdict_for(syn(port, src=bytes([198, 51, 100, 11])))
    assert (
        svc.verdict_for(syn(22, src=bytes([198, 51, 100, 11]))) is Verdict.ACCEPT
    )  # progress kept


def test_reload_with_bad_config_keeps_the_old_one(tmp_path: Path) -> None:
    svc, clock = service(tmp_path)
    (tmp_path / "nfknock.toml").write_text("[knock]\nlength = 'x'\n")
    from nfknock.config import ConfigError

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


def _daemon(tmp_path: Path) -> Daemon:
    structlog.reset_defaults()
    return Daemon(load_config(write_config(tmp_path)))


def test_callback_gives_drop_when_reading_the_payload_fails(tmp_path: Path) -> None:
    d = _daemon(tmp_path)
    pkt = FakePacket(RuntimeError("no payload"))
    d.handle(pkt)
    assert pkt.verdicts == ["drop"]
    assert d.service.errors == 1


def test_callback_falls_back_to_drop_when_the_verdict_call_fails(tmp_path: Path) -> None:
    d = _daemon(tmp_path)
    d.service.decide_packet = lambda _p: Verdict.ACCEPT  # type: ignore[method-assign,assignment]
    pkt = FakePacket(syn(22), fail_verdict=True)
    d.handle(pkt)
    assert pkt.verdicts == ["drop"]


def test_reject_is_the_mark_plus_repeat(tmp_path: Path) -> None:
    d = _daemon(tmp_path)
    d.service.decide_packet = lambda _p: Verdict.REJECT  # type: ignore[method-assign,assignment]
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


def test_grants_survive_a_clean_exit_but_not_a_crash(tmp_path: Path) -> None:
    svc, clock = service(tmp_path, extra="[door]\nmax_connections = 3\n")
    knock(svc, clock)
    assert svc.verdict_for(syn(22)) is Verdict.ACCEPT  # two connections left
    crashed = Service(svc.cfg, EventLogger(), clock.wall, lambda: 9.0)
    assert crashed.restore()[1] is False
    assert crashed.verdict_for(syn(22)) is Verdict.DROP  # the grant was not restored
    svc.save(clean=True)
    restarted = Service(svc.cfg, EventLogger(), clock.wall, lambda: 9.0)
    assert restarted.restore()[1] is True
    assert [restarted.verdict_for(syn(22)) for _ in range(3)] == [
        Verdict.ACCEPT,
        Verdict.ACCEPT,
        Verdict.DROP,
    ]
