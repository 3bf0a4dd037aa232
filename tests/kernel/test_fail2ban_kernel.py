"""contrib/fail2ban against log lines a real daemon wrote (JSON and console format),
through Debian's real ``fail2ban-regex``: what it must match, the host it captures,
and what it must leave alone."""

from __future__ import annotations

import re
import time

import pytest

from nfknock.netlab import PY, SERVER4, Lab
from nfknock.sequence import format_base32

from ..test_fail2ban import FILTER, fail2ban_regex
from .conftest import SECRET
from .test_daemon_kernel import current
from .test_spa_kernel import HMAC_KEY, KEY, b64, fwknop

pytestmark = pytest.mark.kernel

OTHER = "198.51.100.11"
STARTED = {"json": re.compile(r'"event": "started"'), "console": re.compile(r"\] started\s")}


def start(lab: Lab, fmt: str) -> None:
    lab.start_service()
    cfg = lab.write_config({"alice": SECRET}, log={"level": "info", "format": fmt})
    (lab.workdir / "users.toml").write_text(
        f'[users.alice]\nsecret = "{format_base32(SECRET)}"\n'
        f'fwknop_key_base64 = "{b64(KEY)}"\nfwknop_hmac_key_base64 = "{b64(HMAC_KEY)}"\n'
    )
    lab.install_rules(cfg)
    argv = [PY, "-m", "nfknock.cli", "run", "--config", str(cfg), "--applied", str(lab.applied)]
    lab.daemon = lab.spawn(lab.daemon_ns, *argv, log=lab.daemon_log)
    marker = STARTED[fmt]
    deadline = time.monotonic() + 15
    while not marker.search(lab.log_text()):
        assert lab.daemon.poll() is None and time.monotonic() < deadline, lab.log_text()
        time.sleep(0.05)


def send_udp(lab: Lab, source: str, payload: str) -> None:
    code = (
        "import socket,sys; s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); "
        f"s.bind(('{source}',0)); s.sendto(sys.argv[1].encode(),('{SERVER4}',62201))"
    )
    lab.sh(lab.client, PY, "-c", code, payload)


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_the_filter_matches_spa_failures_and_replays_from_their_source(lab: Lab, fmt: str) -> None:
    start(lab, fmt)
    lab.add_client_address(f"{OTHER}/24")
    # From 198.51.100.10: a wrong encryption key, a wrong HMAC key, then a good
    # packet (accepted) sent again (a replay) -- three lines to ban on.
    fwknop(lab, key=bytes(32))
    fwknop(lab, hmac_key=bytes(64))
    saved = lab.workdir / "saved.spa"
    fwknop(lab, "-B", str(saved))
    send_udp(lab, "198.51.100.10", saved.read_text().strip())
    # From 198.51.100.11: noise not worth a ban -- a short UDP datagram, a SYN to
    # the protected port, and (only for mode=aggressive) a replayed knock sequence.
    send_udp(lab, OTHER, "x" * 20)
    assert lab.probe(SERVER4, source=OTHER)["result"] == "timeout"
    ports = current()
    lab.send_knocks(SERVER4, ports)
    lab.send_knocks(SERVER4, ports, source=OTHER)
    assert lab.probe(SERVER4, source=OTHER)["result"] == "reset"
    time.sleep(0.3)
    log = lab.daemon_log
    text = log.read_text()
    for seen in ("spa_decrypt_failed", "spa_no_hmac_match", "spa_replay", "spa_accepted"):
        assert seen in text
    for seen in ("spa_too_short", "protected_drop", "sequence_stale", "sequence_completed"):
        assert seen in text  # present, and must not count in normal mode

    assert fail2ban_regex(log, FILTER) == ["198.51.100.10"] * 3
    aggressive = fail2ban_regex(log, f"{FILTER}[mode=aggressive]")
    assert sorted(aggressive) == ["198.51.100.10"] * 3 + [OTHER]
