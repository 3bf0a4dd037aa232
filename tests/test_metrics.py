"""Prometheus metrics without a kernel: ``[metrics] listen``, the collector on a made-up
snapshot (checked by Debian's ``promtool``), the snapshot of a real service, and the
HTTP server serving whatever was published last."""

from __future__ import annotations

import os
import platform
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from nfknock import metrics, metrics_http
from nfknock.config import ConfigError, load_config, parse_listen
from nfknock.events import Verdict
from nfknock.store.worker import CLAIM_BUCKETS

from .test_service import knock, service, syn, write_config

SNAPSHOT: dict[str, Any] = {
    "version": "9.9.9",
    "time": 1_700_000_100.5,
    "started": 1_700_000_000.0,
    "verdicts": {"drop": 40, "accept": 3, "reject": 1, "hold": 2},
    "malformed": 5,
    "internal_errors": 0,
    "events": {"sequence_completed": 3, "sequence_stale": 1, "protected_drop": 70},
    "spa_results": {"spa_no_hmac_match": 4, "spa_accepted": 1},
    "grants": 2,
    "tracked_sources": 17,
    "held_packets": 0,
    "users": {"enabled": 3, "disabled": 1},
    "state": {
        "ok": True,
        "claims": 4,
        "claim_failures": 0,
        "pending_claims": 0,
        "claim_buckets": [0, 3, 1] + [0] * (len(CLAIM_BUCKETS) - 2),
        "claim_seconds_sum": 0.004,
    },
    "rules": {"ok": False, "checked": 1_700_000_090.0, "problems": 2},
    "queue": {
        "0": {
            "role": "priority",
            "bound": True,
            "waiting": 0,
            "queue_dropped": 0,
            "user_dropped": 0,
        },
        "1": {"role": "knock", "bound": True, "waiting": 3, "queue_dropped": 50, "user_dropped": 4},
    },
}


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def promtool(text: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("promtool")
    if exe is None:
        if os.environ.get("CI") == "true":
            pytest.fail("promtool (Debian prometheus) is not installed")
        pytest.skip("promtool is not installed")
    return subprocess.run(
        [exe, "check", "metrics"],
        check=False,
        input=text,
        capture_output=True,
        text=True,
        timeout=30,
    )


# --- [metrics] listen ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("127.0.0.1:9610", ("127.0.0.1", 9610)),
        ("[::1]:9610", ("::1", 9610)),
        ("[2001:db8::1]:80", ("2001:db8::1", 80)),
        ("0.0.0.0:9610", ("0.0.0.0", 9610)),
    ],
)
def test_listen_addresses_parse(text: str, parsed: tuple[str, int]) -> None:
    assert parse_listen(text) == parsed


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("localhost:9610", "not an IPv4 or IPv6 address"),
        ("::1:9610", "in brackets"),
        ("[127.0.0.1]:9610", "brackets are for IPv6"),
        ("127.0.0.1:0", "not a port number"),
        ("127.0.0.1:99999", "not a port number"),
        ("127.0.0.1", "not ADDRESS:PORT"),
        (":9610", "not ADDRESS:PORT"),
    ],
)
def test_bad_listen_addresses_name_the_key(tmp_path: Path, text: str, problem: str) -> None:
    path = write_config(tmp_path, f'[metrics]\nlisten = "{text}"\n')
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert exc.value.key == "metrics.listen" and problem in exc.value.problem


def test_metrics_are_off_unless_listen_is_set(tmp_path: Path) -> None:
    assert load_config(write_config(tmp_path)).metrics.listen is None
    cfg = load_config(write_config(tmp_path, '[metrics]\nlisten = "[::1]:9610"\n'))
    assert cfg.metrics.listen == ("::1", 9610) and not cfg.warnings


def test_a_public_listen_address_in_the_knock_range_is_warned_about(tmp_path: Path) -> None:
    cfg = load_config(write_config(tmp_path, '[metrics]\nlisten = "0.0.0.0:9610"\n'))
    assert len(cfg.warnings) == 2
    assert "without authentication" in cfg.warnings[0]
    assert "add 9610 to [knock] exclude" in cfg.warnings[1]
    cfg = load_config(
        write_config(tmp_path, '[knock]\nexclude = [9610]\n[metrics]\nlisten = "0.0.0.0:9610"\n')
    )
    assert len(cfg.warnings) == 1


# --- the collector --------------------------------------------------------------------------


def test_the_collector_turns_a_snapshot_into_prometheus_metrics() -> None:
    got = samples(metrics.render(SNAPSHOT))
    assert got[("nfknock_verdicts_total", (("verdict", "accept"),))] == 3
    assert got[("nfknock_verdicts_total", (("verdict", "hold"),))] == 2
    assert got[("nfknock_malformed_packets_total", ())] == 5
    assert got[("nfknock_sequences_completed_total", ())] == 3
    assert got[("nfknock_sequences_stale_total", ())] == 1
    assert got[("nfknock_events_total", (("event", "protected_drop"),))] == 70
    assert got[("nfknock_events_total", (("event", "grant_opened"),))] == 0  # every kind
    assert got[("nfknock_spa_results_total", (("code", "spa_no_hmac_match"),))] == 4
    assert got[("nfknock_spa_results_total", (("code", "spa_replay"),))] == 0  # every code
    assert got[("nfknock_grants_open", ())] == 2
    assert got[("nfknock_sources_tracked", ())] == 17
    assert got[("nfknock_users", (("state", "disabled"),))] == 1
    knock = (("queue", "1"), ("role", "knock"))
    assert got[("nfknock_queue_waiting", knock)] == 3
    assert (
        got[("nfknock_queue_dropped_total", (*knock[:1], ("reason", "queue_full"), knock[1]))] == 50
    )
    assert (
        got[("nfknock_queue_dropped_total", (*knock[:1], ("reason", "socket_full"), knock[1]))] == 4
    )
    assert got[("nfknock_state_claim_duration_seconds_bucket", (("le", "0.001"),))] == 3
    assert got[("nfknock_state_claim_duration_seconds_bucket", (("le", "+Inf"),))] == 4
    assert got[("nfknock_state_claim_duration_seconds_count", ())] == 4
    assert got[("nfknock_rules_ok", ())] == 0 and got[("nfknock_rules_problems", ())] == 2
    assert (
        got[("nfknock_build_info", (("python", platform.python_version()), ("version", "9.9.9")))]
        == 1
    )


def test_the_text_passes_promtool_check_metrics() -> None:
    done = promtool(metrics.render(SNAPSHOT))
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_partial_snapshot_still_renders_and_rules_wait_for_their_first_check() -> None:
    got = samples(metrics.render({"verdicts": {"drop": 1}}))
    assert got[("nfknock_verdicts_total", (("verdict", "drop"),))] == 1
    assert not any(name.startswith("nfknock_rules") for name, _ in got)
    assert promtool(metrics.render({})).returncode == 0


# --- the snapshot of a real service ------------------------------------------------------------


def test_the_snapshot_of_a_service_counts_a_knock_and_its_claim(tmp_path: Path) -> None:
    svc, clock = service(tmp_path)
    knock(svc, clock)
    assert svc.verdict_for(syn(22)) is Verdict.ACCEPT
    snap = metrics.snapshot(svc, {"ok": True, "checked": 1.0, "problems": []}, held=0)
    assert snap["verdicts"]["accept"] == 1 and snap["verdicts"]["drop"] == 32
    assert snap["events"]["sequence_completed"] == 1
    assert snap["state"]["claims"] == 1 and sum(snap["state"]["claim_buckets"]) == 1
    assert snap["users"] == {"enabled": 1, "disabled": 0}
    assert snap["queue"]["1"]["role"] == "knock"
    got = samples(metrics.render(snap))
    assert got[("nfknock_sequences_completed_total", ())] == 1
    assert got[("nfknock_state_claim_duration_seconds_count", ())] == 1


# --- the HTTP server -----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fetch(port: int, host: str = "127.0.0.1", method: str = "GET") -> tuple[int, str]:
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/metrics"
    req = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as reply:  # noqa: S310 - http only
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, ""


def test_the_server_serves_the_last_published_snapshot_and_process_metrics() -> None:
    port = free_port()
    server = metrics_http.MetricsServer(("127.0.0.1", port), {"verdicts": {"drop": 1}})
    try:
        _, first = fetch(port)
        server.publish({"verdicts": {"drop": 7}})
        status, second = fetch(port)
        assert fetch(port, method="HEAD") == (200, "")
        assert fetch(port, method="POST")[0] == 405
    finally:
        server.close()
    assert status == 200
    assert samples(first)[("nfknock_verdicts_total", (("verdict", "drop"),))] == 1
    assert samples(second)[("nfknock_verdicts_total", (("verdict", "drop"),))] == 7
    assert "process_resident_memory_bytes" in second
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_the_text_is_rendered_once_per_snapshot() -> None:
    server = metrics_http.MetricsServer(("::1", free_port6()), {"verdicts": {"drop": 1}})
    try:
        once = server.body()
        assert server.body() is once  # the same bytes until the next snapshot
        server.publish({"verdicts": {"drop": 2}})
        assert server.body() is not once
        assert fetch(server.listen[1], host="::1")[0] == 200
    finally:
        server.close()


def test_scrapes_are_served_one_at_a_time_at_a_bounded_rate() -> None:
    """Whatever the clients do, the server answers at most 1/REQUEST_GAP requests a
    second, and a client that sends nothing is cut off after REQUEST_TIMEOUT."""
    port = free_port()
    server = metrics_http.MetricsServer(("127.0.0.1", port), {})
    try:
        silent = socket.create_connection(("127.0.0.1", port))
        t0 = time.monotonic()
        assert fetch(port)[0] == 200  # waits for the silent client's timeout
        assert time.monotonic() - t0 >= metrics_http.REQUEST_TIMEOUT - 0.1
        silent.close()
        t0 = time.monotonic()
        for _ in range(10):
            assert fetch(port)[0] == 200
        assert time.monotonic() - t0 >= 9 * metrics_http.REQUEST_GAP
    finally:
        server.close()


def free_port6() -> int:
    with socket.socket(socket.AF_INET6) as s:
        s.bind(("::1", 0))
        return int(s.getsockname()[1])
