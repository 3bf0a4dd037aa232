"""contrib/fail2ban checked by Debian's real fail2ban: the filter on hand-made lines
(journal prefix, IPv6, a value that tries to forge a field) and the example jail
parsed by ``fail2ban-client --test``.  Lines from a real daemon:
tests/kernel/test_fail2ban_kernel.py."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

CONTRIB = Path(__file__).parents[1] / "contrib" / "fail2ban"
FILTER = str(CONTRIB / "filter.d" / "nfknock.conf")
JAIL = CONTRIB / "jail.d" / "nfknock.local"
TS = '"timestamp": "2026-01-02T03:04:05.123456Z"'


def tool(name: str) -> str:
    exe = shutil.which(name)
    if exe is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name} (Debian fail2ban) is not installed")
        pytest.skip(f"{name} is not installed")
    return exe


def fail2ban_regex(log: Path | str, filter_spec: str) -> list[str]:
    """The host captured from each matching line (fail2ban-regex -o ip)."""
    done = subprocess.run(
        [tool("fail2ban-regex"), "-o", "ip", str(log), filter_spec],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout.split()


@pytest.mark.parametrize(
    ("line", "host"),
    [
        (
            '{"src": "2001:db8::10", "dst": "2001:db8::1", "reason": "r", '
            f'"code": "spa_no_hmac_match", "event": "spa_refused", "level": "warning", {TS}}}',
            "2001:db8::10",
        ),
        (  # from the journal: "HOST IDENT[PID]: MESSAGE"
            'gw nfknock[812]: {"src": "203.0.113.9", "code": "spa_replay", '
            f'"event": "spa_refused", {TS}}}',
            "203.0.113.9",
        ),
        (
            "2026-01-02T03:04:05.123456Z [warning  ] spa_refused    code=spa_bad_digest "
            "dst=198.51.100.1 reason='the digest inside the packet is missing or wrong' "
            "src=192.0.2.44 user=alice",
            "192.0.2.44",
        ),
        (  # a console value that imitates the end of a line: the real src is taken
            "2026-01-02T03:04:05.123456Z [warning  ] spa_refused    code=spa_replay "
            "reason='x src=192.0.2.1 user=a' src=198.51.100.7 user=alice",
            "198.51.100.7",
        ),
    ],
)
def test_the_filter_captures_the_source_of_hand_made_lines(
    tmp_path: Path, line: str, host: str
) -> None:
    log = tmp_path / "one.log"
    log.write_text(line + "\n")
    assert fail2ban_regex(log, FILTER) == [host]


@pytest.mark.parametrize(
    "line",
    [
        # a banned code and another source hidden in a JSON-escaped value
        '{"src": "198.51.100.7", "reason": "x\\", \\"code\\": \\"spa_replay", '
        f'"code": "spa_too_short", "event": "spa_refused", {TS}}}',
        # an honest client's clock, not an attack
        f'{{"src": "198.51.100.7", "code": "spa_too_old", "event": "spa_refused", {TS}}}',
        # every scanner's SYN to the protected port
        f'{{"src": "198.51.100.7", "port": 22, "event": "protected_drop", {TS}}}',
        # a short datagram: any scanner's noise
        "2026-01-02T03:04:05.123456Z [warning  ] spa_refused    code=spa_too_short "
        "dst=198.51.100.1 reason='payload shorter than 140 bytes' src=198.51.100.7",
    ],
)
def test_the_filter_leaves_noise_and_forged_fields_alone(tmp_path: Path, line: str) -> None:
    log = tmp_path / "one.log"
    log.write_text(line + "\n")
    assert fail2ban_regex(log, FILTER) == []


def test_the_example_jail_passes_fail2ban_client_test(tmp_path: Path) -> None:
    conf = tmp_path / "fail2ban"
    shutil.copytree("/etc/fail2ban", conf)
    for old in (conf / "jail.d").iterdir():
        old.unlink()  # only our jail
    shutil.copy(FILTER, conf / "filter.d" / "nfknock.conf")
    shutil.copy(JAIL, conf / "jail.d" / "nfknock.local")
    client = tool("fail2ban-client")
    done = subprocess.run(
        [client, "-c", str(conf), "--test"], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    dump = subprocess.run(
        [client, "-c", str(conf), "-d"], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert "['add', 'nfknock', 'systemd']" in dump
    assert "_SYSTEMD_UNIT=nfknock.service" in dump
    assert "meta l4proto \\\\{ tcp, udp \\\\}" in dump and "saddr @<addr_set> drop" in dump
