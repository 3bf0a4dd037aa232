"""``nfknock status``: readable lines for people, the daemon's JSON unchanged for
programs (issue 15 D)."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nfknock.cli import main
from nfknock.status_text import format_duration, format_status

NOW = 1_700_000_000.0
STATUS: dict[str, Any] = {
    "pid": 4242,
    "uptime": 3723.4,
    "step": 56666666,
    "users": {
        "alice": {"enabled": True, "counter": 2},
        "bob": {"enabled": False, "counter": 0},
    },
    "grants": [
        {
            "source": "198.51.100.10",
            "destination": "198.51.100.1",
            "user": "alice",
            "ports": [22],
            "remaining": 1,
            "expires": NOW + 23.2,
        }
    ],
    "tracked_sources": 3,
    "verdicts": {"accept": 5, "drop": 1200, "reject": 1},
    "malformed": 0,
    "internal_errors": 0,
    "queue": {"queue": 0, "waiting": 0, "queue_dropped": 7, "user_dropped": 0},
}


def test_verdicts_are_counted_by_name() -> None:
    lines = format_status(STATUS, NOW)
    assert any("drop 1200 accept 5 reject 1" in line for line in lines)
    assert not any("{" in line for line in lines)  # no Python dict anywhere


def test_grant_expiry_is_local_time_and_relative() -> None:
    (grant,) = [line for line in format_status(STATUS, NOW) if line.startswith("grant")]
    local = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(NOW + 23.2))
    assert f"expires {local} (in 23 s)" in grant
    assert "alice 198.51.100.10 -> 198.51.100.1 port 22" in grant
    assert "1 connection left" in grant


def test_uptime_is_a_duration_and_users_are_listed() -> None:
    text = "\n".join(format_status(STATUS, NOW))
    assert "up 1 h 2 min" in text
    assert "user alice: enabled, counter 2 this step" in text and "user bob: disabled" in text


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.2, "0 s"), (23.7, "23 s"), (59, "59 s"), (61, "1 min 1 s"), (7260, "2 h 1 min")],
)
def test_durations_read_like_a_person_would_say_them(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_a_partial_or_odd_status_still_prints() -> None:
    assert format_status({}, NOW)
    assert format_status({"grants": [{"expires": "soon"}], "verdicts": None}, NOW)


@pytest.fixture
def live_status() -> dict[str, Any]:
    grant = {**STATUS["grants"][0], "expires": time.time() + 25.95}
    return {**STATUS, "grants": [grant]}


@pytest.fixture
def fake_daemon(tmp_path: Path, live_status: dict[str, Any]) -> Iterator[Path]:
    """A control socket answering one status request with ``live_status``."""
    path = tmp_path / "ctl.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(4096)
            conn.sendall((json.dumps({"ok": True, "status": live_status}) + "\n").encode())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield path
    server.close()
    thread.join(timeout=5)


def config_for(tmp_path: Path, sock: Path) -> Path:
    path = tmp_path / "nfknock.toml"
    argv = ["init", "--config", str(path), "--state", str(tmp_path / "state.json")]
    assert main([*argv, "--socket", str(sock)]) == 0
    return path


def test_status_text_from_a_daemon(
    tmp_path: Path, fake_daemon: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = config_for(tmp_path, fake_daemon)
    capsys.readouterr()
    assert main(["status", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "drop 1200 accept 5 reject 1" in out and "(in 25 s)" in out
    assert "{" not in out


def test_status_json_is_the_daemons_status_unchanged(
    tmp_path: Path,
    fake_daemon: Path,
    live_status: dict[str, Any],
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = config_for(tmp_path, fake_daemon)
    capsys.readouterr()
    assert main(["status", "--config", str(config), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == live_status


def test_status_without_a_daemon_exits_1_with_a_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = config_for(tmp_path, tmp_path / "absent.sock")
    capsys.readouterr()
    assert main(["status", "--config", str(config)]) == 1
    assert "no daemon" in capsys.readouterr().err


def test_every_queue_the_daemon_serves_gets_its_own_line_and_an_unbound_one_says_so() -> None:
    status = dict(STATUS)
    status["queue"] = {
        "0": {"queue": 0, "waiting": 3, "queue_dropped": 7, "user_dropped": 1},
        "1": {"queue": 1, "waiting": 0, "queue_dropped": 0, "user_dropped": 0},
        "2": {},
    }
    lines = [line for line in format_status(status, NOW) if line.startswith("queue")]
    assert lines == [
        "queue 0: 3 waiting; lost 7 (queue full) and 1 (socket full)",
        "queue 1: 0 waiting; lost 0 (queue full) and 0 (socket full)",
        "queue 2: not bound (no line in /proc/net/netfilter/nfnetlink_queue: "
        "the kernel drops its packets)",
    ]


def test_the_single_queue_form_of_an_older_daemon_still_reads() -> None:
    lines = [line for line in format_status(STATUS, NOW) if line.startswith("queue")]
    assert lines == ["queue 0: 0 waiting; lost 7 (queue full) and 0 (socket full)"]
