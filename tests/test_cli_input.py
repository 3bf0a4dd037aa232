"""``nfknock sequence`` refuses what it cannot compute, with exit 2 and a message
(found by the fuzzing tier: NaN and huge times gave tracebacks, a huge counter
computed for ever, non-UTF-8 bytes in argv crashed the encoder)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from nfknock.cli import main
from nfknock.sequence import format_base32

SECRET = format_base32(bytes(range(32)))


@pytest.mark.parametrize(
    ("option", "value", "problem"),
    [
        ("--time", "nan", "not a Unix time"),
        ("--time", "inf", "not a Unix time"),
        ("--time", "1e300", "not a Unix time"),
        ("--time", "-1", "not a Unix time"),
        ("--counter", "-1", "outside 0..1000000"),
        ("--counter", str(10**20), "outside 0..1000000"),
    ],
)
def test_sequence_refuses_values_it_cannot_compute(
    capsys: pytest.CaptureFixture[str], option: str, value: str, problem: str
) -> None:
    assert main(["sequence", "--secret-base32", SECRET, option, value]) == 2
    assert problem in capsys.readouterr().err


def test_sequence_takes_the_realm_as_argv_bytes() -> None:
    argv = [sys.executable.encode(), b"-m", b"nfknock.cli", b"sequence", b"--time", b"0"]
    argv += [b"--secret-base32", SECRET.encode(), b"--realm", b"caf\xe9"]
    proc = subprocess.run(argv, capture_output=True, check=False, timeout=30)
    assert proc.returncode == 0 and len(proc.stdout.split()) == 32, proc.stderr
