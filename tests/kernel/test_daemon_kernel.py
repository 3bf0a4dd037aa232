"""The daemon in front of real traffic: namespaces, veth, iptables, NFQUEUE."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from nfknock.netlab import (
    BEHIND4,
    CLIENT4,
    PY,
    SERVER4,
    SERVER6,
    Lab,
)
from nfknock.sequence import SequenceParams, format_base32, parse_base32, sequence_at, step_of

from .conftest import OTHER_SECRET, SECRET

pytestmark = pytest.mark.kernel

PARAMS = SequenceParams(exclude=frozenset({22}))


def setup(lab: Lab, users: dict[str, bytes] | None = None, **sections: dict[str, object]) -> Path:
    lab.start_service()
    cfg = lab.write_config(users or {"alice": SECRET}, **sections)
    lab.install_rules(cfg)
    lab.start_daemon(cfg)
    return cfg


def current(
    secret: bytes = SECRET, counter: int = 0, params: SequenceParams = PARAMS, offset: float = 0.0
) -> tuple[int, ...]:
    now = time.time() + offset
    if (now % params.step_seconds) > params.step_seconds - 1.0:
        time.sleep(1.2)  # not at a step boundary: keep knock and check in one step
        now = time.time() + offset
    return sequence_at(secret, now, counter, params)


def queue_waiting(lab: Lab) -> int:
    text = lab.sh(lab.daemon_ns, "cat", "/proc/net/netfilter/nfnetlink_queue").stdout
    return sum(int(line.split()[2]) for line in text.splitlines() if line.strip())


def state_windows(lab: Lab) -> list[tuple[str, int, int]]:
    """(user, step, next counter) rows of the daemon's state database."""
    with sqlite3.connect(lab.workdir / "state.db") as db:
        return db.execute("SELECT user, step, floor FROM windows").fetchall()


def events(lab: Lab, kind: str) -> list[dict[str, object]]:
    return [e for e in lab.log_events() if e.get("event") == kind]


# 1 ----------------------------------------------------------------------------


def test_before_knocking_the_protected_port_times_out_without_reset(lab: Lab) -> None:
    setup(lab)
    assert lab.probe(SERVER4)["result"] == "timeout"
    assert lab.probe(SERVER6)["result"] == "timeout"
    drops = events(lab, "protected_drop")
    assert {d["src"] for d in drops} == {CLIENT4, "2001:db8::10"}
    assert all(d["port"] == 22 for d in drops)


# 2 ----------------------------------------------------------------------------


def test_correct_sequence_opens_once_then_the_budget_is_spent(lab: Lab) -> None:
    setup(lab)
    lab.send_knocks(SERVER4, current())
    assert lab.probe(SERVER4) == {"result": "open", "greeting": "nfknock-ok"}
    assert lab.probe(SERVER4)["result"] == "timeout"


def test_correct_sequence_opens_over_ipv6(lab: Lab) -> None:
    setup(lab)
    lab.send_knocks(SERVER6, current())
    assert lab.probe(SERVER6)["result"] == "open"


def test_window_expires_after_open_seconds(lab: Lab) -> None:
    setup(lab, door={"open_seconds": 1.0})
    lab.send_knocks(SERVER4, current())
    time.sleep(1.5)
    assert lab.probe(SERVER4)["result"] == "timeout"


# 3 ----------------------------------------------------------------------------


def test_established_connection_survives_window_close_and_daemon_restart(lab: Lab) -> None:
    cfg = setup(lab, door={"open_seconds": 1.0})
    lab.send_knocks(SERVER4, current())
    holder = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            lab.client,
            PY,
            "-m",
            "nfknock.netlab.probe",
            SERVER4,
            "22",
            "--hold",
            "4",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    time.sleep(1.5)  # the window has closed
    lab.stop_daemon()
    lab.start_daemon(cfg)
    out, _ = holder.communicate(timeout=30)
    assert json.loads(out) == {"result": "open", "greeting": "nfknock-ok", "echo": "still-here"}


# 4 ----------------------------------------------------------------------------


def test_replay_gets_a_reset_and_no_grant_from_the_same_source_or_another(lab: Lab) -> None:
    setup(lab)
    lab.add_client_address("198.51.100.11/24")
    ports = current()
    lab.send_knocks(SERVER4, ports)
    assert lab.probe(SERVER4)["result"] == "open"
    lab.send_knocks(SERVER4, ports)  # replay, same source
    assert lab.probe(SERVER4)["result"] == "reset"
    # Replayed from another source: no grant either -- only the "behind" reset that a
    # completed stale sequence earns any source (an honest second client resyncs on it).
    lab.send_knocks(SERVER4, ports, source="198.51.100.11")
    assert lab.probe(SERVER4, source="198.51.100.11")["result"] == "reset"
    assert [e["src"] for e in events(lab, "sequence_stale")] == ["198.51.100.10", "198.51.100.11"]
    assert [e["src"] for e in events(lab, "protected_accept")] == ["198.51.100.10"]
    assert len(events(lab, "grant_opened")) == 1


# 5 ----------------------------------------------------------------------------


def test_replay_after_kill_9_and_restart_still_fails(lab: Lab) -> None:
    cfg = setup(lab)
    ports = current()
    lab.send_knocks(SERVER4, ports)
    assert lab.probe(SERVER4)["result"] == "open"
    lab.stop_daemon(signal.SIGKILL)
    lab.start_daemon(cfg)
    lab.send_knocks(SERVER4, ports)
    assert lab.probe(SERVER4)["result"] != "open"
    assert ("alice", 1) in [(u, f) for u, _, f in state_windows(lab)]


# 6 ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ports",
    [
        pytest.param(lambda: current(OTHER_SECRET), id="wrong-secret"),
        pytest.param(
            lambda: current(params=SequenceParams(exclude=frozenset({22}), realm=b"other")),
            id="wrong-realm",
        ),
        pytest.param(lambda: current(offset=-95), id="clock-3-steps-behind"),
        pytest.param(lambda: current(offset=+95), id="clock-3-steps-ahead"),
    ],
)
def test_wrong_parameters_get_silent_drop(lab: Lab, ports: object) -> None:
    setup(lab)
    assert callable(ports)
    lab.send_knocks(SERVER4, ports())
    assert lab.probe(SERVER4)["result"] == "timeout"
    assert not events(lab, "grant_opened")


# 7 ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "scan",
    [
        ["-sS", "-p-", "--min-rate", "20000"],
        ["-sT", "-p", "1-4000,22,33791-33800", "--min-rate", "5000"],
        ["-sA", "-p", "1-2000"],
        ["-sF", "-p", "1-2000"],
        ["-sX", "-p", "1-2000"],
        ["-sN", "-p", "1-2000"],
    ],
    ids=["syn-all-ports", "connect", "ack", "fin", "xmas", "null"],
)
def test_nmap_finds_no_open_port_and_never_opens_the_door(lab: Lab, scan: list[str]) -> None:
    setup(lab)
    out = lab.sh(
        lab.client, "nmap", "-n", "-Pn", "-T5", "--max-retries", "0", *scan, SERVER4, timeout=300
    ).stdout
    assert "Nmap done" in out
    assert not re.search(r"^\d+/tcp\s+open\s", out, re.M), out
    assert lab.probe(SERVER4)["result"] == "timeout"
    assert not events(lab, "grant_opened")


# 8 ----------------------------------------------------------------------------


def test_without_the_daemon_the_protected_port_stays_closed(lab: Lab) -> None:
    setup(lab)
    lab.stop_daemon()
    lab.send_knocks(SERVER4, current())
    assert lab.probe(SERVER4)["result"] == "timeout"
    assert lab.probe(SERVER6)["result"] == "timeout"


# 9 ----------------------------------------------------------------------------


def test_malformed_packets_leave_the_daemon_alive_and_the_queue_empty(lab: Lab) -> None:
    setup(lab)
    sent = lab.sh(
        lab.client, PY, "-m", "nfknock.netlab.craft", CLIENT4, SERVER4, "2001:db8::10", SERVER6
    ).stdout.split("\n")
    assert "ipv6-nine-dstopts" in sent
    time.sleep(0.5)
    assert lab.daemon is not None and lab.daemon.poll() is None
    assert queue_waiting(lab) == 0
    # The long IPv6 chain reaches the queue (ip6tables -p tcp skips extension
    # headers) and the parser refuses it.
    assert any(e.get("reason") == "extension-chain" for e in events(lab, "malformed_packet"))
    assert not events(lab, "internal_error")
    lab.send_knocks(SERVER4, current())
    assert lab.probe(SERVER4)["result"] == "open"


# 10 ---------------------------------------------------------------------------


def test_forward_mode_gateway_protects_a_host_behind_it(gateway_lab: Lab) -> None:
    lab = gateway_lab
    lab.start_service(ns=lab.server)
    cfg = lab.write_config({"alice": SECRET}, protect=[{"port": 22, "address": BEHIND4}])
    lab.install_rules(cfg)
    lab.start_daemon(cfg)
    assert lab.probe(BEHIND4)["result"] == "timeout"
    lab.send_knocks(BEHIND4, current())
    assert lab.probe(BEHIND4, hold=0.5) == {
        "result": "open",
        "greeting": "nfknock-ok",
        "echo": "still-here",
    }
    assert lab.probe(BEHIND4)["result"] == "timeout"


# 11 ---------------------------------------------------------------------------

FOREIGN_V4 = """*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:ADMIN-CHAIN - [0:0]
-A INPUT -p tcp -m tcp --dport 80 -j ACCEPT
-A INPUT -s 203.0.113.0/24 -j ADMIN-CHAIN
-A ADMIN-CHAIN -j LOG --log-prefix "admin: "
-A FORWARD -i c0 -j ACCEPT
COMMIT
"""
FOREIGN_V6 = """*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -p tcp -m tcp --dport 443 -j ACCEPT
COMMIT
"""


def _saved(lab: Lab, tool: str) -> str:
    text = lab.sh(lab.server, tool).stdout
    # Drop the timestamp comments and the packet counters; keep every rule.
    lines = [ln for ln in text.splitlines() if not ln.startswith("#")]
    return "\n".join(re.sub(r"\[\d+:\d+\]", "[0:0]", ln) for ln in lines)


def test_rules_install_and_remove_leave_foreign_rules_identical(lab: Lab) -> None:
    for tool, foreign in (("iptables-restore", FOREIGN_V4), ("ip6tables-restore", FOREIGN_V6)):
        subprocess.run(
            ["ip", "netns", "exec", lab.server, tool],
            input=foreign,
            text=True,
            check=True,
            timeout=30,
        )
    before4, before6 = _saved(lab, "iptables-save"), _saved(lab, "ip6tables-save")
    cfg = lab.write_config(
        {"alice": SECRET},
        protect=[{"port": 22}, {"port": 2222, "address": "2001:db8::99"}],
        allow=[{"network": "203.0.113.0/24"}, {"network": "2001:db8:1::/48", "ports": [22]}],
    )
    lab.install_rules(cfg)
    lab.install_rules(cfg)  # idempotent: still one jump
    during = _saved(lab, "iptables-save")
    assert during.count("-A INPUT -j NFKNOCK-INPUT") == 1
    assert "-A INPUT -p tcp -m tcp --dport 80 -j ACCEPT" in during
    assert ":FORWARD DROP" in during
    record = ("--applied", str(lab.applied))
    assert lab.nfknock("rules", "--verify", "--config", str(cfg), *record).returncode == 0
    lab.nfknock("rules", "--remove", "--config", str(cfg))
    gone = lab.nfknock("rules", "--verify", "--config", str(cfg), *record, check=False)
    assert gone.returncode == 1 and "chain NFKNOCK-INPUT is missing" in gone.stderr
    assert _saved(lab, "iptables-save") == before4
    assert _saved(lab, "ip6tables-save") == before6


# 12 ---------------------------------------------------------------------------


def test_sighup_reload_ends_a_revoked_users_grant(lab: Lab) -> None:
    setup(lab, users={"alice": SECRET, "bob": OTHER_SECRET}, door={"max_connections": 2})
    lab.send_knocks(SERVER4, current(OTHER_SECRET))
    assert lab.probe(SERVER4)["result"] == "open"  # bob has one connection left
    users = lab.workdir / "users.toml"
    users.write_text(f'[users.alice]\nsecret = "{format_base32(SECRET)}"\n')
    assert lab.daemon is not None
    os.kill(lab.daemon.pid, signal.SIGHUP)
    deadline = time.monotonic() + 5
    while not events(lab, "reloaded") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [e["user"] for e in events(lab, "grant_revoked")] == ["bob"]
    assert lab.probe(SERVER4)["result"] == "timeout"
    lab.send_knocks(SERVER4, current(OTHER_SECRET, counter=1))
    assert lab.probe(SERVER4)["result"] == "timeout"
    lab.send_knocks(SERVER4, current(SECRET))
    assert lab.probe(SERVER4)["result"] == "open"


def test_bad_config_at_reload_keeps_the_old_one_running(lab: Lab) -> None:
    cfg = setup(lab)
    cfg.write_text(cfg.read_text() + "\n[knock]\nlength = -1\n")
    assert lab.daemon is not None
    os.kill(lab.daemon.pid, signal.SIGHUP)
    deadline = time.monotonic() + 5
    while not events(lab, "reload_failed") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert events(lab, "reload_failed")
    lab.send_knocks(SERVER4, current())
    assert lab.probe(SERVER4)["result"] == "open"


def test_user_add_reloads_the_running_daemon_and_status_shows_it(lab: Lab) -> None:
    cfg = setup(lab)
    added = lab.nfknock("user", "add", "carol", "--config", str(cfg), "--host", SERVER4)
    assert "the running daemon reloaded" in added.stderr  # stdout is the profile alone
    out = added.stdout
    secret = re.search(r'secret = "([A-Z2-7]+)"', out)
    assert secret is not None
    lab.send_knocks(SERVER4, current(parse_base32(secret.group(1))))
    assert lab.probe(SERVER4)["result"] == "open"
    status = json.loads(lab.nfknock("status", "--config", str(cfg), "--json").stdout)
    assert status["users"]["carol"]["counter"] == 1
    assert all(q["queue_dropped"] == 0 for q in status["queue"].values())
    assert status["verdicts"]["accept"] == 1


def test_sigterm_exits_cleanly_and_saves_state(lab: Lab) -> None:
    setup(lab)
    lab.send_knocks(SERVER4, current())
    assert lab.stop_daemon(signal.SIGTERM) == 0
    assert events(lab, "stopped")
    step = step_of(time.time(), 30)
    assert any(f == 1 and abs(t - step) <= 1 for _, t, f in state_windows(lab))
    with sqlite3.connect(lab.workdir / "state.db") as db:
        assert db.execute("SELECT value FROM meta WHERE key = 'clean'").fetchone() == (1,)


def test_daemon_tells_systemd_it_is_ready_and_alive(
    lab: Lab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket

    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as srv:
        srv.bind(str(path))
        srv.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        monkeypatch.setenv("WATCHDOG_USEC", "400000")  # ping every 0.2 s
        setup(lab)
        messages = {srv.recv(256).decode() for _ in range(3)}
    assert any(m.startswith("READY=1") for m in messages)
    assert "WATCHDOG=1" in messages
