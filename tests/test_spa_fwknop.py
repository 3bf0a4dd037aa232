"""Conformance with the real Debian ``fwknop`` client (2.6.10) as the reference encoder.

Packets are built with ``--test -B FILE`` (nothing is sent), then verified by our
verifier: accepted with the right fields, or refused with the right reason.  Under
CI=true a missing ``fwknop`` is a failure, not a skip.
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from nfknock.spa import reasons as R
from nfknock.spa.crypto import HMAC_DIGESTS
from nfknock.spa.message import MessageType
from nfknock.spa.replay import ReplayCache
from nfknock.spa.verify import SpaResult

from .spa_support import DST, HMAC_KEY, KEY, OTHER_KEY, SRC, ip, spa_user, verifier

CLIENT_IP = "198.51.100.10"  # SRC
Build = Callable[..., bytes]


@pytest.fixture
def build(tmp_path: Path) -> Build:
    exe = shutil.which("fwknop")
    if exe is None:
        if os.environ.get("CI") == "true":
            pytest.fail("the fwknop client (Debian fwknop-client) is not installed")
        pytest.skip("the fwknop client is not installed")
    rc = tmp_path / "fwknoprc"
    rc.touch(mode=0o600)
    out = tmp_path / "spa.pkt"

    def run(*args: str, key: bytes = KEY, hmac_key: bytes | None = HMAC_KEY) -> bytes:
        out.unlink(missing_ok=True)
        cmd = [exe, "-D", "198.51.100.1", "--test", "-B", str(out), "--no-save-args"]
        cmd += ["--rc-file", str(rc), "--key-base64-rijndael", base64.b64encode(key).decode()]
        if hmac_key is not None:
            cmd += ["--use-hmac", "--key-base64-hmac", base64.b64encode(hmac_key).decode()]
        if "-A" not in args and "--server-cmd" not in args:
            cmd += ["-A", "tcp/22"]
        if "-s" not in args and "-a" not in args:
            cmd += ["-a", CLIENT_IP]
        env = {"HOME": str(tmp_path), "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        done = subprocess.run(
            [*cmd, *args], env=env, capture_output=True, text=True, timeout=20, check=False
        )
        assert done.returncode == 0 and out.exists(), done.stderr
        return out.read_bytes().strip()

    return run


def check(payload: bytes, *users: object, **spa: object) -> SpaResult:
    return verifier(*users, **spa).verify(SRC, DST, payload, time.time())  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", ["cbc", "cfb", "ofb", "ctr", "ecb"])
@pytest.mark.parametrize("hmac_digest", list(HMAC_DIGESTS))
def test_every_hmac_digest_and_mode_of_the_real_client_is_accepted(
    build: Build, hmac_digest: str, mode: str
) -> None:
    payload = build("--hmac-digest-type", hmac_digest, "-M", mode)
    result = check(payload, spa_user(hmac_digest=hmac_digest, mode=mode))
    assert result.ok, result
    assert result.ports == frozenset({22}) and result.open_address == SRC
    assert result.allow_ip == CLIENT_IP and result.message_type == MessageType.ACCESS
    # A user with the other settings refuses it.
    other_mode = "ctr" if mode != "ctr" else "cbc"
    assert not check(payload, spa_user(hmac_digest=hmac_digest, mode=other_mode)).ok


@pytest.mark.parametrize("key_len", [32, 16, 10])
def test_legacy_mode_of_the_real_client_is_accepted_without_hmac(
    build: Build, key_len: int
) -> None:
    key = bytes(range(7, 7 + key_len))
    payload = build("-M", "legacy", key=key, hmac_key=None)
    assert check(payload, spa_user(key=key, hmac_key=None, mode="legacy")).ok
    # legacy is CBC with the key padded or cut to 16 bytes: the same for 16.
    as_cbc = check(payload, spa_user(key=key, hmac_key=None, mode="cbc"))
    assert as_cbc.ok if key_len == 16 else as_cbc.code == R.DECRYPT_FAILED


@pytest.mark.parametrize(
    "digest", ["md5", "sha1", "sha256", "sha384", "sha512", "sha3_256", "sha3_512"]
)
def test_every_inner_digest_of_the_real_client_is_accepted(build: Build, digest: str) -> None:
    result = check(build("-m", digest))
    assert result.ok and result.message is not None
    assert result.message.digest_type == digest


def test_source_ip_flag_opens_the_packet_source(build: Build) -> None:
    result = check(build("-s"))
    assert result.ok and result.allow_ip == "0.0.0.0" and result.open_address == SRC


def test_another_allow_ip_opens_only_for_spa_allow_ip_any(build: Build) -> None:
    payload = build("-a", "203.0.113.9")
    assert check(payload).code == R.ALLOW_IP_REFUSED
    result = check(payload, spa_user(allow_any_ip=True))
    assert result.ok and result.open_address == ip("203.0.113.9")


def test_a_client_timeout_is_served_and_capped(build: Build) -> None:
    result = check(build("-f", "60"))
    assert result.ok and result.message_type == MessageType.CLIENT_TIMEOUT_ACCESS
    assert result.client_timeout == 60 and result.timeout == 60
    assert check(build("-f", "1000")).timeout == 300


def test_several_ports_in_one_request(build: Build) -> None:
    payload = build("-A", "tcp/22,tcp/2222")
    result = check(payload)
    assert result.ok and result.ports == frozenset({22, 2222})
    assert check(payload, replace(spa_user(), ports=frozenset({22}))).code == R.PORT_NOT_ALLOWED


@pytest.mark.parametrize("access", ["tcp/80", "udp/22", "tcp/22,tcp/443"])
def test_a_port_the_user_may_not_open_is_refused(build: Build, access: str) -> None:
    assert check(build("-A", access)).code == R.PORT_NOT_ALLOWED


@pytest.mark.parametrize(
    ("args", "mtype"),
    [
        (("-N", "192.0.2.5:22"), MessageType.NAT_ACCESS),
        (("-N", "192.0.2.5:22", "-f", "30"), MessageType.CLIENT_TIMEOUT_NAT_ACCESS),
        (("--nat-local",), MessageType.LOCAL_NAT_ACCESS),
        (("--nat-local", "-f", "30"), MessageType.CLIENT_TIMEOUT_LOCAL_NAT_ACCESS),
    ],
)
def test_nat_messages_of_the_real_client_are_refused(
    build: Build, args: tuple[str, ...], mtype: MessageType
) -> None:
    result = check(build(*args))
    assert result.code == R.NAT_REFUSED and result.message_type == mtype


def test_a_command_message_of_the_real_client_is_refused(build: Build) -> None:
    result = check(build("--server-cmd", "touch /tmp/nfknock-must-not-exist"))
    assert result.code == R.COMMAND_REFUSED
    assert result.message is not None and result.message.command == (
        "touch /tmp/nfknock-must-not-exist"
    )


def test_wrong_keys_digest_or_mode_are_refused_with_their_reason(build: Build) -> None:
    assert check(build(key=OTHER_KEY)).code == R.DECRYPT_FAILED
    assert check(build(hmac_key=OTHER_KEY)).code == R.NO_HMAC_MATCH
    assert check(build("--hmac-digest-type", "sha512")).code == R.NO_HMAC_MATCH
    assert check(build("-M", "ctr")).code == R.DECRYPT_FAILED


@pytest.mark.parametrize(
    ("flag", "expected"),
    [("--time-offset-minus", R.TOO_OLD), ("--time-offset-plus", R.FROM_FUTURE)],
)
def test_a_packet_200_seconds_off_is_refused(build: Build, flag: str, expected: str) -> None:
    assert check(build(flag, "200")).code == expected


def test_a_required_username_is_checked(build: Build) -> None:
    payload = build("-U", "phone")
    assert check(payload, spa_user(username="phone")).ok
    assert check(payload, spa_user(username="alice")).code == R.USERNAME_MISMATCH


def test_a_saved_packet_replayed_gets_nothing(build: Build) -> None:
    payload, cache = build(), ReplayCache(1024, 241)
    v, now = verifier(), time.time()
    assert v.verify(SRC, DST, payload, now, replay=cache).ok
    assert v.verify(SRC, DST, payload, now + 1, replay=cache).code == R.REPLAY
    assert v.verify(ip("198.51.100.99"), DST, payload, now + 1, replay=cache).code == R.REPLAY
