"""``nfknock-client``: bad input gets exit 2 and a message, never a traceback or a
hang (issue 15 C).  Several of these were found by the fuzzing tier."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from nfknock.sequence import format_base32

SECRET = format_base32(bytes(range(32)))
CLIENT = [sys.executable, "-m", "nfknock_client.cli"]


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "secret"
    path.write_text(SECRET + "\n")
    path.chmod(0o600)
    return path


def client(*argv: bytes | str | Path, timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "XDG_STATE_HOME": "/nonexistent", "XDG_CONFIG_HOME": "/nonexistent"}
    return subprocess.run(
        [*map(os.fsencode, CLIENT), *map(os.fsencode, argv)],
        capture_output=True,
        timeout=timeout,
        env=env,
        check=False,
    )


def profile(tmp_path: Path, line: str) -> Path:
    path = tmp_path / "client.toml"
    path.write_text(f'[profiles.p]\nhost = "198.51.100.7"\nsecret = "{SECRET}"\n{line}\n')
    path.chmod(0o600)
    return path


def assert_usage_error(proc: subprocess.CompletedProcess[bytes]) -> None:
    assert proc.returncode == 2, proc.stderr.decode(errors="replace")
    assert b"Traceback" not in proc.stderr


def test_client_version() -> None:
    proc = client("--version")
    assert proc.returncode == 0 and proc.stdout.startswith(b"nfknock-client ")


@pytest.mark.parametrize("line", ["length = 100000", "step_seconds = 0", "exclude = [[1]]"])
def test_bad_profile_values_are_usage_errors(tmp_path: Path, line: str) -> None:
    assert_usage_error(client("sequence", "--profile", "p", "--config", profile(tmp_path, line)))


@pytest.mark.parametrize("line", ["port = inf", "port = 1e400"])
def test_an_infinite_port_in_a_profile_is_a_usage_error(tmp_path: Path, line: str) -> None:
    assert_usage_error(client("sequence", "--profile", "p", "--config", profile(tmp_path, line)))


def test_deep_nesting_in_a_profile_is_a_usage_error(tmp_path: Path) -> None:
    config = profile(tmp_path, "x = " + "[" * 3000 + "]" * 3000)
    assert_usage_error(client("sequence", "--profile", "p", "--config", config))


def test_a_realm_of_non_utf8_bytes_gives_no_traceback(secret_file: Path) -> None:
    proc = client("sequence", "--secret-file", secret_file, "--realm", b"caf\xe9")
    assert proc.returncode in (0, 2) and b"Traceback" not in proc.stderr


def test_a_closed_stdout_gives_no_traceback(secret_file: Path) -> None:
    r, w = os.pipe()
    os.close(r)
    try:
        proc = subprocess.run(
            [*CLIENT, "sequence", "--secret-file", str(secret_file)],
            stdout=w,
            stderr=subprocess.PIPE,
            timeout=30,
            check=False,
        )
    finally:
        os.close(w)
    assert b"Traceback" not in proc.stderr


def test_a_huge_counter_is_refused_at_once(secret_file: Path) -> None:
    proc = client("sequence", "--secret-file", secret_file, "--counter", str(10**20), timeout=2)
    assert_usage_error(proc)
