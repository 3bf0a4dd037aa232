"""``nfknock doctor`` on real machines: each misconfiguration built for real in a
namespace (listeners, rules, daemon, traffic), checked by its stable code and the exit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from nfknock.netlab import CLIENT4, PY, SERVER4, Lab, run

from .conftest import SECRET, start_flood
from .test_daemon_kernel import current

pytestmark = pytest.mark.kernel


def doctor(lab: Lab, cfg: Path, env: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    argv = ["ip", "netns", "exec", lab.server, PY, "-m", "nfknock.cli", "doctor"]
    argv += ["--config", str(cfg), "--applied", str(lab.applied), "--json"]
    base = {k: v for k, v in os.environ.items() if k != "SSH_CONNECTION"}
    done = run(argv, check=False, env={**base, **(env or {})})
    assert done.returncode in (0, 1), done.stderr
    return done.returncode, json.loads(done.stdout)


def found(report: dict[str, Any], level: str | None = None) -> dict[str, list[str]]:
    """code -> details of the findings (of one level, if given)."""
    out: dict[str, list[str]] = {}
    for f in report["findings"]:
        if level is None or f["level"] == level:
            out.setdefault(f["code"], []).append(f["detail"])
    return out


def listen_loopback(lab: Lab, port: int) -> None:
    code = (
        "import socket,time; s=socket.socket(); "
        f"s.bind(('127.0.0.1',{port})); s.listen(); print('up',flush=True); time.sleep(300)"
    )
    lab.spawn(lab.server, PY, "-c", code)
    deadline = time.monotonic() + 10
    while not lab.sh(lab.server, "ss", "-Htln", f"sport = :{port}").stdout.strip():
        assert time.monotonic() < deadline, "the loopback listener did not start"
        time.sleep(0.05)


def test_a_working_install_has_no_error(lab: Lab) -> None:
    lab.start_service()
    cfg = lab.write_config({"alice": SECRET})
    lab.install_rules(cfg)
    lab.start_daemon(cfg)
    code, report = doctor(lab, cfg)
    assert code == 0 and report["errors"] == 0, found(report, "error")
    ok = found(report, "ok")
    for expected in (
        "config_valid",
        "file_modes_ok",
        "rules_ok",
        "queues_bound",
        "daemon_answers",
        "queue_no_drops",
        "knock_range_clear",
        "protected_listening",
        "no_remote_session",
    ):
        assert expected in ok, expected


def test_a_service_in_the_knock_range_is_an_error_until_it_is_excluded(lab: Lab) -> None:
    lab.start_service()
    lab.start_service(port=8080)  # dual-stack, inside 1024-33791
    listen_loopback(lab, 9090)  # loopback only: never queued, harmless
    cfg = lab.write_config({"alice": SECRET})
    lab.install_rules(cfg)
    lab.start_daemon(cfg)
    # Why it is an error: the service's clients are dropped as knocks.
    assert lab.probe(SERVER4, port=8080)["result"] == "timeout"
    code, report = doctor(lab, cfg)
    errors = found(report, "error")
    assert code == 1 and list(errors) == ["listener_in_knock_range"]
    assert len(errors["listener_in_knock_range"]) == 1
    assert "TCP port 8080" in errors["listener_in_knock_range"][0]
    cfg = lab.write_config({"alice": SECRET}, knock={"exclude": [8080]})
    lab.nfknock("reload", "--config", str(cfg), "--applied", str(lab.applied))
    assert lab.probe(SERVER4, port=8080)["result"] == "open"
    code, report = doctor(lab, cfg)
    assert code == 0 and "knock_range_clear" in found(report, "ok")


def test_nothing_listening_on_the_protected_port_is_a_warning(lab: Lab) -> None:
    cfg = lab.write_config({"alice": SECRET})
    lab.install_rules(cfg)
    lab.start_daemon(cfg)
    code, report = doctor(lab, cfg)
    assert code == 0
    assert "protected_not_listening" in found(report, "warning")
    listen_loopback(lab, 22)
    code, report = doctor(lab, cfg)
    assert "only on 127.0.0.1" in found(report, "warning")["protected_not_listening"][0]


def test_removed_rules_and_a_bypass_rule_above_the_jump_are_errors(lab: Lab) -> None:
    lab.start_service()
    cfg = lab.write_config({"alice": SECRET})
    lab.install_rules(cfg)
    lab.start_daemon(cfg)
    lab.nfknock("rules", "--remove")
    code, report = doctor(lab, cfg)
    errors = found(report, "error")
    assert code == 1 and {"jump_missing", "chain_missing"} <= set(errors)
    lab.install_rules(cfg)
    lab.sh(
        lab.server,
        "iptables",
        "-w",
        "-I",
        "INPUT",
        "1",
        "-p",
        "tcp",
        "--dport",
        "22",
        "-j",
        "ACCEPT",
    )
    assert lab.probe(SERVER4)["result"] == "open"  # the bypass is real
    code, report = doctor(lab, cfg)
    errors = found(report, "error")
    assert code == 1 and list(errors) == ["jump_not_first"]
    assert "--dport 22 -j ACCEPT" in errors["jump_not_first"][0]


def test_without_a_daemon_the_queues_are_unbound_and_nothing_answers(lab: Lab) -> None:
    lab.start_service()
    cfg = lab.write_config({"alice": SECRET})
    lab.install_rules(cfg)
    code, report = doctor(lab, cfg)
    errors = found(report, "error")
    assert code == 1 and set(errors) == {"queue_unbound", "daemon_not_answering"}
    assert "0 (priority), 1 (knock)" in errors["queue_unbound"][0]
    lab.start_daemon(cfg)
    code, report = doctor(lab, cfg)
    assert code == 0 and {"queues_bound", "daemon_answers"} <= set(found(report, "ok"))
    assert lab.daemon is not None
    os.kill(lab.daemon.pid, signal.SIGSTOP)  # bound, but not answering
    try:
        code, report = doctor(lab, cfg)
    finally:
        os.kill(lab.daemon.pid, signal.SIGCONT)
    assert code == 1 and list(found(report, "error")) == ["daemon_not_answering"]


def test_queue_drops_are_reported_once_since_the_last_check(lab: Lab, synflood: Path) -> None:
    lab.start_service()
    cfg = lab.write_config({"alice": SECRET}, queue={"max_len": 4})
    lab.install_rules(cfg)
    lab.start_daemon(cfg)
    doctor(lab, cfg)  # the first check records the counters
    flood = start_flood(lab, synflood, rate=200_000, seconds=2, count=50_000)
    flood.communicate(timeout=60)
    code, report = doctor(lab, cfg)
    warnings = found(report, "warning")
    assert code == 0 and "queue 1 (knock)" in warnings["queue_drops"][0]
    assert "since the last check" in warnings["queue_drops"][0]
    code, report = doctor(lab, cfg)  # nothing new since
    assert "queue_drops" not in found(report) and "queue_no_drops" in found(report, "ok")
    record = lab.applied.with_name("doctor-queues.json")
    assert record.stat().st_mode & 0o777 == 0o600


def test_a_remote_session_without_break_glass_is_a_warning(lab: Lab) -> None:
    lab.start_service()
    cfg = lab.write_config({"alice": SECRET})
    lab.install_rules(cfg)
    lab.start_daemon(cfg)
    ssh = {"SSH_CONNECTION": f"{CLIENT4} 50000 {SERVER4} 22"}
    code, report = doctor(lab, cfg, env=ssh)
    assert code == 0 and f"{CLIENT4} (SSH_CONNECTION)" in found(report)["no_break_glass"][0]
    # An established connection to the protected port says the same without the variable.
    lab.send_knocks(SERVER4, current())
    probe = [PY, "-m", "nfknock.netlab.probe", SERVER4, "22", "--hold", "3"]
    holder = subprocess.Popen(
        ["ip", "netns", "exec", lab.client, *probe],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(0.5)
        code, report = doctor(lab, cfg)
    finally:
        holder.communicate(timeout=30)
    assert f"{CLIENT4} to port 22" in found(report, "warning")["no_break_glass"][0]
    cfg = lab.write_config({"alice": SECRET}, allow=[{"network": "198.51.100.0/24"}])
    code, report = doctor(lab, cfg, env=ssh)
    assert "break_glass_present" in found(report, "ok")
