"""Prometheus metrics of a real daemon: scraped over HTTP inside the namespace while a
real knock and a real (refused) SPA packet go through, validated by ``promtool``, and
the same metrics printed by ``nfknock status --format prometheus``."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from nfknock.netlab import PY, SERVER4, Lab
from nfknock.sequence import format_base32

from ..test_metrics import promtool, samples
from .conftest import SECRET
from .test_daemon_kernel import current
from .test_spa_kernel import HMAC_KEY, KEY, b64, fwknop

pytestmark = pytest.mark.kernel

SCRAPE = "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode(), end='')"  # noqa: E501


def scrape(lab: Lab, url: str) -> str:
    return lab.sh(lab.server, PY, "-c", SCRAPE, url).stdout


def value(text: str, name: str, **labels: str) -> float:
    return samples(text).get((name, tuple(sorted(labels.items()))), -1.0)


def spa_setup(lab: Lab, **sections: dict[str, object]) -> Path:
    """alice with a knock secret and fwknop keys; service, rules and daemon up."""
    lab.start_service()
    cfg = lab.write_config({"alice": SECRET}, **sections)
    (lab.workdir / "users.toml").write_text(
        f'[users.alice]\nsecret = "{format_base32(SECRET)}"\n'
        f'fwknop_key_base64 = "{b64(KEY)}"\nfwknop_hmac_key_base64 = "{b64(HMAC_KEY)}"\n'
    )
    lab.install_rules(cfg)
    lab.start_daemon(cfg)
    return cfg


@pytest.mark.parametrize(
    ("listen", "url"),
    [
        ("127.0.0.1:9610", "http://127.0.0.1:9610/metrics"),
        ("[::1]:9610", "http://[::1]:9610/metrics"),
    ],
    ids=["ipv4", "ipv6"],
)
def test_metrics_move_with_a_real_knock_and_spa_packet(lab: Lab, listen: str, url: str) -> None:
    cfg = spa_setup(lab, metrics={"listen": listen})
    before = scrape(lab, url)
    assert value(before, "nfknock_sequences_completed_total") == 0
    assert value(before, "nfknock_queue_bound", queue="1", role="knock") == 1
    lab.send_knocks(SERVER4, current())
    assert lab.probe(SERVER4)["result"] == "open"
    fwknop(lab, hmac_key=bytes(64))  # refused: no user's HMAC key matches
    deadline = time.monotonic() + 5  # the loop publishes once a second
    while True:
        text = scrape(lab, url)
        done = value(text, "nfknock_spa_results_total", code="spa_no_hmac_match") == 1
        if done or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert value(text, "nfknock_sequences_completed_total") == 1
    assert value(text, "nfknock_verdicts_total", verdict="accept") == 1
    assert value(text, "nfknock_verdicts_total", verdict="drop") >= 33  # 32 knocks + SPA
    assert value(text, "nfknock_spa_results_total", code="spa_no_hmac_match") == 1
    assert value(text, "nfknock_events_total", event="grant_opened") == 1
    assert value(text, "nfknock_state_claims_total") == 1
    assert value(text, "nfknock_state_claim_duration_seconds_count") == 1
    assert value(text, "nfknock_rules_ok") == 1
    assert value(text, "nfknock_users", state="enabled") == 1
    assert value(text, "process_resident_memory_bytes") > 0
    checked = promtool(text)
    assert checked.returncode == 0, checked.stdout + checked.stderr

    # The same metrics from the control socket (node_exporter's textfile collector).
    printed = lab.nfknock("status", "--format", "prometheus", "--config", str(cfg)).stdout
    checked = promtool(printed)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    ours = {k: v for k, v in samples(text).items() if k[0].startswith("nfknock_")}
    again = samples(printed)
    assert set(again) == set(ours)
    moving = ("nfknock_snapshot_timestamp_seconds", "nfknock_rules_checked_timestamp_seconds")
    for key, v in ours.items():
        if key[0] not in moving:
            assert again[key] == v, key
