"""``nfknock doctor`` without a namespace: the /proc parsers, each check on made-up
machines, the clock on a fake adjtimex result and one real call, the drop record,
and the command line's exits.  The real machines are in tests/kernel/test_doctor_kernel.py."""

from __future__ import annotations

import ipaddress
import json
import socket
import stat
import sys
from pathlib import Path
from typing import Any

import pytest

from nfknock import doctor
from nfknock.cli import main
from nfknock.config import Config, load_config
from nfknock.doctor import STA_UNSYNC, TIME_ERROR, ClockState, Finding, Host
from nfknock.procnet import (
    TCP_ESTABLISHED,
    TCP_LISTEN,
    QueueLine,
    TcpSocket,
    parse_queues,
    parse_tcp,
    read_tcp,
)

from .test_service import write_config

# /proc/net/tcp as a little-endian host prints it: 127.0.0.1:22 and 0.0.0.0:8080
# listening, 198.51.100.1:22 <- 198.51.100.10:40000 established.
TCP4 = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1
   1: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1
   2: 016433C6:0016 0A6433C6:9C40 01 00000000:00000000 00:00000000 00000000     0        0 3 1
"""
# ::1:9090 and ::ffff:127.0.0.1:9091 listening; 2001:db8::1:22 <- 2001:db8::10 established.
TCP6 = """\
  sl  local_address                         remote_address                        st
   0: 00000000000000000000000001000000:2382 00000000000000000000000000000000:0000 0A
   1: 0000000000000000FFFF00000100007F:2383 00000000000000000000000000000000:0000 0A
   2: B80D0120000000000000000001000000:0016 B80D0120000000000000000010000000:A000 01
"""
QUEUES = """\
    0  41234     0 2  4096     0     0       12  1
    1 4294926061     5 2    64   100     7     5000  1
"""


def ip(text: str) -> Any:
    return ipaddress.ip_address(text)


def listener(address: str, port: int) -> TcpSocket:
    return TcpSocket(TCP_LISTEN, ip(address), port, ip("0.0.0.0"), 0)


def cfg_with(tmp_path: Path, extra: str = "") -> Config:
    return load_config(write_config(tmp_path, extra))


def codes(findings: list[Finding]) -> dict[str, str]:
    return {f.code: f.level for f in findings}


# --- /proc parsers ------------------------------------------------------------------------


@pytest.mark.skipif(sys.byteorder != "little", reason="the sample was printed little-endian")
def test_proc_tcp_lines_become_addresses_ports_and_states() -> None:
    socks = parse_tcp(TCP4) + parse_tcp(TCP6)
    got = [(s.state, str(s.local), s.local_port, str(s.remote), s.remote_port) for s in socks]
    assert got == [
        (TCP_LISTEN, "127.0.0.1", 22, "0.0.0.0", 0),
        (TCP_LISTEN, "0.0.0.0", 8080, "0.0.0.0", 0),
        (TCP_ESTABLISHED, "198.51.100.1", 22, "198.51.100.10", 40000),
        (TCP_LISTEN, "::1", 9090, "::", 0),
        (TCP_LISTEN, str(ip("::ffff:127.0.0.1")), 9091, "::", 0),
        (TCP_ESTABLISHED, "2001:db8::1", 22, "2001:db8::10", 40960),
    ]
    assert [s.loopback_only for s in socks] == [True, False, False, True, True, False]


def test_a_real_listening_socket_is_found_in_proc() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        found = [x for x in read_tcp() if x.local_port == port and x.state == TCP_LISTEN]
    assert [str(x.local) for x in found] == ["127.0.0.1"]
    assert found[0].loopback_only


def test_nfnetlink_queue_lines_are_parsed_and_junk_skipped() -> None:
    queues = parse_queues(QUEUES + "garbage line\n")
    assert set(queues) == {0, 1}
    assert queues[0] == QueueLine(0, 41234, 0, 0, 0, 12)
    assert queues[1].waiting == 5 and queues[1].queue_dropped == 100
    assert queues[1].user_dropped == 7


# --- files --------------------------------------------------------------------------------


def test_a_valid_config_with_private_files_is_ok(tmp_path: Path) -> None:
    cfg, findings = doctor.check_config(write_config(tmp_path))
    assert cfg is not None and len(cfg.users) == 1
    assert codes(findings) == {"config_valid": "ok", "file_modes_ok": "ok"}


def test_a_users_file_readable_by_others_is_an_error_with_the_fix(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    (tmp_path / "users.toml").chmod(0o644)
    cfg, findings = doctor.check_config(path)
    assert cfg is not None  # the rest of doctor still runs, without users
    assert codes(findings) == {"file_unsafe": "error"}
    assert "0644" in findings[0].detail and "chmod 600" in findings[0].fix


def test_a_config_others_can_change_and_an_open_directory_are_errors(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    path.chmod(0o666)
    _, findings = doctor.check_config(path)
    assert [f.code for f in findings if f.level == "error"] == ["file_unsafe"]
    tmp_path.chmod(0o777)
    try:
        _, findings = doctor.check_config(path)
    finally:
        tmp_path.chmod(0o700)
    details = [f.detail for f in findings if f.code == "file_unsafe"]
    assert any("others can replace" in d or "writable by" in d for d in details), details
    tmp_path.chmod(0o1777)  # sticky: others cannot replace what they do not own
    try:
        _, findings = doctor.check_config(path)
    finally:
        tmp_path.chmod(0o700)
    assert not any("replace" in f.detail for f in findings)


def test_an_invalid_config_or_users_file_is_named(tmp_path: Path) -> None:
    path = write_config(tmp_path, "[knock]\nlength = -1\n")
    cfg, findings = doctor.check_config(path)
    assert cfg is None and codes(findings) == {"config_invalid": "error"}
    assert "knock.length" in findings[0].detail
    path = write_config(tmp_path)
    (tmp_path / "users.toml").write_text('[users.alice]\nsecret = "nope"\n')
    cfg, findings = doctor.check_config(path)
    assert cfg is not None and codes(findings)["users_file_invalid"] == "error"


# --- listeners ----------------------------------------------------------------------------


def test_a_service_in_the_knock_range_is_an_error_unless_loopback_or_excluded(
    tmp_path: Path,
) -> None:
    cfg = cfg_with(tmp_path)
    socks = [listener("0.0.0.0", 8080), listener("127.0.0.1", 9090), listener("::", 22)]
    findings = doctor.check_knock_range(cfg, socks)
    assert [(f.code, f.level) for f in findings] == [("listener_in_knock_range", "error")]
    assert "8080" in findings[0].detail and "exclude" in findings[0].fix
    cfg = cfg_with(tmp_path, "[knock]\nexclude = [8080]\n")
    assert codes(doctor.check_knock_range(cfg, socks)) == {"knock_range_clear": "ok"}


def test_a_gateway_has_no_local_knock_range(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    path.write_text(path.read_text().replace("port = 22\n", 'port = 22\naddress = "192.0.2.9"\n'))
    cfg = load_config(path)
    found = doctor.check_knock_range(cfg, [listener("0.0.0.0", 8080)])
    assert codes(found) == {"knock_range_not_local": "ok"}


def test_a_protected_port_without_a_reachable_listener_is_a_warning(tmp_path: Path) -> None:
    cfg = cfg_with(tmp_path)
    assert codes(doctor.check_protected_listeners(cfg, [])) == {
        "protected_not_listening": "warning"
    }
    only_lo = doctor.check_protected_listeners(cfg, [listener("127.0.0.1", 22)])
    assert codes(only_lo) == {"protected_not_listening": "warning"}
    assert "only on 127.0.0.1" in only_lo[0].detail
    ok = doctor.check_protected_listeners(cfg, [listener("::", 22)])
    assert codes(ok) == {"protected_listening": "ok"}


# --- clock --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("clock", "code"),
    [
        (ClockState(0, 0, 2000), "clock_synchronised"),
        (ClockState(TIME_ERROR, 0, 16_000_000), "clock_unsynchronised"),
        (ClockState(0, STA_UNSYNC, 16_000_000), "clock_unsynchronised"),
        (None, "clock_unknown"),
    ],
)
def test_the_clock_check_reads_adjtimex_state_and_status(
    tmp_path: Path, clock: ClockState | None, code: str
) -> None:
    (finding,) = doctor.check_clock(cfg_with(tmp_path), clock)
    assert finding.code == code
    assert finding.level == ("ok" if code == "clock_synchronised" else "warning")


def test_adjtimex_reads_the_real_kernel_clock_state() -> None:
    clock = doctor.adjtimex()
    assert clock is not None
    assert 0 <= clock.state <= TIME_ERROR
    assert clock.maxerror_us >= 0
    # the kernel sets STA_UNSYNC whenever it reports TIME_ERROR (kernel/time/ntp.c)
    assert (clock.state == TIME_ERROR) <= bool(clock.status & STA_UNSYNC)


# --- break-glass --------------------------------------------------------------------------


def test_no_allow_entry_while_reached_over_ssh_is_a_warning(tmp_path: Path) -> None:
    cfg = cfg_with(tmp_path)
    env = {"SSH_CONNECTION": "203.0.113.5 50000 198.51.100.1 22"}
    (finding,) = doctor.check_break_glass(cfg, [], env)
    assert (finding.code, finding.level) == ("no_break_glass", "warning")
    assert "203.0.113.5" in finding.detail and "[[allow]]" in finding.fix
    session = TcpSocket(TCP_ESTABLISHED, ip("::ffff:198.51.100.1"), 22, ip("::ffff:192.0.2.7"), 1)
    (finding,) = doctor.check_break_glass(cfg, [session], {})
    assert finding.code == "no_break_glass" and "192.0.2.7 to port 22" in finding.detail
    assert doctor.check_break_glass(cfg, [], {})[0].code == "no_remote_session"
    cfg = cfg_with(tmp_path, '[[allow]]\nnetwork = "203.0.113.0/24"\n')
    assert doctor.check_break_glass(cfg, [session], env)[0].code == "break_glass_present"


# --- queue drops --------------------------------------------------------------------------


def test_queue_drops_are_counted_since_the_last_check_in_a_private_record(tmp_path: Path) -> None:
    cfg = cfg_with(tmp_path)
    record = tmp_path / "doctor-queues.json"
    bound = {0: QueueLine(0, 7, 0, 0, 0, 1), 1: QueueLine(1, 8, 0, 100, 20, 900)}
    (first,) = doctor.check_queue_drops(cfg, record, bound, 1000.0)
    assert first.code == "queue_drops" and "120 packet(s) since the queue was bound" in first.detail
    assert stat.S_IMODE(record.stat().st_mode) == 0o600
    (same,) = doctor.check_queue_drops(cfg, record, bound, 1060.0)
    assert same.code == "queue_no_drops" and "since the last check" in same.detail
    bound[1] = QueueLine(1, 8, 0, 130, 25, 2000)
    (more,) = doctor.check_queue_drops(cfg, record, bound, 1120.0)
    assert "35 packet(s) since the last check" in more.detail
    assert "30 queue full, 5 socket" in more.detail
    bound[1] = QueueLine(1, 9, 0, 3, 0, 10)  # the daemon restarted: a new binding
    (rebound,) = doctor.check_queue_drops(cfg, record, bound, 1180.0)
    assert "3 packet(s) since the queue was bound (rebound" in rebound.detail


def test_queue_drops_without_a_record_directory_report_totals(tmp_path: Path) -> None:
    cfg = cfg_with(tmp_path)
    record = tmp_path / "missing" / "doctor-queues.json"
    (f,) = doctor.check_queue_drops(cfg, record, {0: QueueLine(0, 7, 0, 0, 0, 1)}, 1.0)
    assert f.code == "queue_no_drops" and "not recorded" in f.detail
    assert not record.parent.exists()


# --- all of it ----------------------------------------------------------------------------


def fake_host(**kw: Any) -> Host:
    status = {"pid": 1, "uptime": 1, "users": {"alice": {}}, "state": {"ok": True}}
    base: dict[str, Any] = {
        "queues": lambda: {0: QueueLine(0, 1, 0, 0, 0, 0), 1: QueueLine(1, 2, 0, 0, 0, 0)},
        "sockets": lambda: [listener("::", 22)],
        "clock": lambda: ClockState(0, 0, 1000),
        "status": lambda path: status,
        "environ": {},
        "now": lambda: 1.0,
    }
    base.update(kw)
    return Host(**base)


def test_a_check_that_breaks_is_a_finding_not_a_traceback(tmp_path: Path) -> None:
    def broken() -> list[TcpSocket]:
        raise RuntimeError("boom")

    findings = doctor.run(
        write_config(tmp_path), tmp_path / "rules.applied", fake_host(sockets=broken)
    )
    failed = [f for f in findings if f.code == "check_failed"]
    assert failed and "RuntimeError: boom" in failed[0].detail


def test_a_daemon_with_other_users_and_a_broken_store_is_reported(tmp_path: Path) -> None:
    status = {
        "pid": 1,
        "users": {"bob": {}},
        "state": {"ok": False, "store": "embedded", "error": "read-only file system"},
        "internal_errors": 2,
    }
    found = doctor.check_daemon(cfg_with(tmp_path), fake_host(status=lambda p: status), {})
    assert codes(found) == {
        "queue_unbound": "error",
        "daemon_answers": "ok",
        "state_not_writable": "error",
        "internal_errors": "warning",
        "daemon_config_stale": "warning",
    }


def test_doctor_json_lists_findings_and_exits_1_on_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path, "[knock]\nlength = -1\n")
    assert main(["doctor", "--config", str(path), "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["errors"] == 1 and out["findings"][0]["code"] == "config_invalid"


def test_doctor_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["doctor", "--no-such-option"])
    assert exc.value.code == 2


def test_finding_lines_carry_the_fix_except_when_ok() -> None:
    assert Finding("ok", "x", "fine", "unused").line() == "ok      x: fine"
    assert Finding("error", "y", "bad", "do z").line() == "error   y: bad -- fix: do z"
