"""Knock-sequence scheme v1: conformance vectors, RFC 6238, secrets, the CLI contract."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nfknock.cli import main
from nfknock.sequence import (
    SchemeError,
    SecretError,
    SequenceParams,
    derive,
    first_block,
    format_base32,
    generate_secret,
    parse_base32,
    step_of,
    totp,
)
from tests.helpers import vector_params

VECTORS = json.loads((Path(__file__).parent / "vectors" / "sequence-v1.json").read_text())
CASES = VECTORS["cases"]


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_vector_block_matches(case: dict[str, Any]) -> None:
    secret = parse_base32(case["secret_base32"])
    step = step_of(case["unix_time"], case["step_seconds"])
    assert (
        first_block(secret, step, case["counter"], case["realm"].encode()).hex()
        == case["block_hex"]
    )


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_vector_ports_match(case: dict[str, Any]) -> None:
    secret = parse_base32(case["secret_base32"])
    step = step_of(case["unix_time"], case["step_seconds"])
    assert list(derive(secret, step, case["counter"], vector_params(case))) == case["ports"]


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_cli_sequence_json_matches_vector(
    case: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "sequence",
        "--secret-base32",
        case["secret_base32"],
        "--time",
        str(case["unix_time"]),
        "--counter",
        str(case["counter"]),
        "--length",
        str(case["length"]),
        "--range",
        f"{case['port_min']}-{case['port_max']}",
        "--step",
        str(case["step_seconds"]),
        "--json",
    ]
    if case["realm"]:
        argv += ["--realm", case["realm"]]
    if case["exclude"]:
        argv += ["--exclude", ",".join(map(str, case["exclude"]))]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ports"] == case["ports"]
    assert out["counter"] == case["counter"]
    assert out["step"] == step_of(case["unix_time"], case["step_seconds"])


def test_cli_sequence_as_a_subprocess_prints_one_json_object() -> None:
    case = CASES[0]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "nfknock.cli",
            "sequence",
            "--secret-base32",
            case["secret_base32"],
            "--time",
            "59",
            "--json",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(proc.stdout)["ports"] == case["ports"]


RFC6238_SHA512 = [  # RFC 6238 Appendix B, SHA-512 column
    (59, "90693936"),
    (1111111109, "25091201"),
    (1111111111, "99943326"),
    (1234567890, "93441116"),
    (2000000000, "38618901"),
    (20000000000, "47863826"),
]


@pytest.mark.parametrize(("t", "code"), RFC6238_SHA512)
def test_counter_zero_block_reproduces_rfc6238_sha512(t: int, code: str) -> None:
    seed = b"1234567890" * 6 + b"1234"
    assert totp(first_block(seed, step_of(t), 0), 8) == code


def test_vector_file_rfc6238_check() -> None:
    check = VECTORS["rfc6238_sha512_check"]
    block = first_block(check["secret_ascii"].encode(), step_of(check["unix_time"]), 0)
    assert totp(block) == check["totp8"]


def test_base32_is_case_insensitive_and_ignores_spaces_and_padding() -> None:
    secret = generate_secret()
    text = format_base32(secret)
    spaced = " ".join(text[i : i + 4] for i in range(0, len(text), 4)).lower() + "===="
    assert parse_base32(spaced) == secret


def test_short_secret_is_refused_with_a_clear_error() -> None:
    with pytest.raises(SecretError, match="at least 16 bytes"):
        parse_base32(format_base32(b"x" * 15))


def test_invalid_base32_is_refused() -> None:
    with pytest.raises(SecretError, match="not valid base32"):
        parse_base32("not-base32-at-all!!")


def test_generated_secrets_are_32_random_bytes() -> None:
    a, b = generate_secret(), generate_secret()
    assert len(a) == 32 and a != b


def test_range_too_small_for_the_length_is_refused() -> None:
    with pytest.raises(SchemeError, match="fewer than the length"):
        SequenceParams(port_min=1000, port_max=1009, length=11)


def test_cli_rejects_a_short_secret_with_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sequence", "--secret-base32", "AAAA", "--time", "1"]) == 2
    assert "at least 16 bytes" in capsys.readouterr().err


def test_cli_rejects_a_bad_range_with_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sequence", "--secret-base32", CASES[0]["secret_base32"], "--range", "5-2"]) == 2
    assert "port range" in capsys.readouterr().err


@given(
    secret=st.binary(min_size=16, max_size=64),
    step=st.integers(0, 2**40),
    counter=st.integers(0, 3),
    lo=st.integers(1, 60000),
    span=st.integers(40, 5000),
    length=st.integers(1, 40),
)
def test_sequences_are_distinct_in_range_and_never_excluded(
    secret: bytes, step: int, counter: int, lo: int, span: int, length: int
) -> None:
    hi = min(lo + span - 1, 65535)
    exclude = frozenset({lo, hi})
    params = SequenceParams(
        port_min=lo, port_max=hi, length=min(length, hi - lo - 1), exclude=exclude
    )
    ports = derive(secret, step, counter, params)
    assert len(ports) == len(set(ports)) == params.length
    assert all(lo <= p <= hi and p not in exclude for p in ports)
