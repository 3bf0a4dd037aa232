"""Compatibility schemes: the seed systems' vectors, the CLI contract, the engine."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nfknock.cli import main
from nfknock.config import User
from nfknock.engine import HOTP_STEP
from nfknock.events import EventKind, Verdict
from nfknock.schemes import (
    Kommen,
    Livingstone,
    TotpKnockdRs,
    kommen_ports,
    livingstone_ports,
    make_scheme,
    step_for,
)
from nfknock.sequence import format_base32, parse_base32
from nfknock_client import cli as client

from .helpers import CLIENT, CLIENT2, Clock, InstantCore, kinds, knock_all, syn
from .helpers import settings as engine_settings

VECTORS = json.loads((Path(__file__).parent / "vectors" / "seed-schemes.json").read_text())


@pytest.mark.parametrize("case", VECTORS["totp-knockd-rs"])
def test_totp_knockd_rs_vectors(case: dict[str, Any]) -> None:
    scheme = TotpKnockdRs(case["port_min"], case["port_max"], case["length"], case["interval"])
    step = case["unix_time"] // case["interval"]
    assert list(scheme.derive(case["secret_utf8"].encode(), step, case["counter"])) == case["ports"]


@pytest.mark.parametrize("case", VECTORS["livingstone"])
def test_livingstone_vectors(case: dict[str, Any]) -> None:
    secret = parse_base32(case["secret_base32"], min_bytes=1)
    scheme = Livingstone()
    step = case["unix_time"] // 30
    assert scheme.code(secret, step) == case["code"]
    assert list(scheme.derive(secret, step, 0)) == case["ports"]


@pytest.mark.parametrize("case", VECTORS["kommen"])
def test_kommen_vectors(case: dict[str, Any]) -> None:
    secret = parse_base32(case["secret_base32"], min_bytes=1)
    assert Kommen().code(secret, case["counter"]) == case["code"]
    assert list(Kommen().derive(secret, HOTP_STEP, case["counter"])) == case["ports"]


@pytest.mark.parametrize("case", VECTORS["livingstone_digit_mapping"])
def test_livingstone_digit_mapping(case: dict[str, Any]) -> None:
    assert list(livingstone_ports(case["code"])) == case["ports"]


def test_livingstone_zero_group_becomes_1000() -> None:
    # Their code loops for ever on a zero group; nfknock defines it as 1000.
    assert livingstone_ports("000012") == (1000, 1200)
    assert livingstone_ports("120000") == (1200, 1000)


def test_kommen_special_values() -> None:
    assert kommen_ports("000000008005002") == (1, 161, 10005)
    assert kommen_ports("999990000065536") == (34464, 1, 1)


def _cli_json(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    assert main(argv) == 0
    out: dict[str, Any] = json.loads(capsys.readouterr().out)
    return out


@pytest.mark.parametrize("case", VECTORS["totp-knockd-rs"])
def test_cli_sequence_totp_knockd_rs(
    case: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    secret = format_base32(case["secret_utf8"].encode())  # the base32 of the exact key bytes
    out = _cli_json(
        [
            "sequence",
            "--scheme",
            "totp-knockd-rs",
            "--secret-base32",
            secret,
            "--time",
            str(case["unix_time"]),
            "--counter",
            str(case["counter"]),
            "--range",
            f"{case['port_min']}-{case['port_max']}",
            "--length",
            str(case["length"]),
            "--step",
            str(case["interval"]),
            "--json",
        ],
        capsys,
    )
    assert out["ports"] == case["ports"]


def test_cli_sequence_totp_knockd_rs_with_its_own_defaults(
    capsys: pytest.CaptureFixture[str],
) -> None:
    case = VECTORS["totp-knockd-rs"][0]  # 1024-32768, 32 ports, 30 s
    out = _cli_json(
        [
            "sequence",
            "--scheme",
            "totp-knockd-rs",
            "--secret-utf8",
            case["secret_utf8"],
            "--time",
            str(case["unix_time"]),
            "--json",
        ],
        capsys,
    )
    assert out["ports"] == case["ports"]


@pytest.mark.parametrize("case", VECTORS["livingstone"])
def test_cli_sequence_livingstone(case: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    out = _cli_json(
        [
            "sequence",
            "--scheme",
            "livingstone",
            "--secret-base32",
            case["secret_base32"],
            "--time",
            str(case["unix_time"]),
            "--json",
        ],
        capsys,
    )
    assert (out["ports"], out["code"]) == (case["ports"], case["code"])


@pytest.mark.parametrize("case", VECTORS["kommen"])
def test_cli_sequence_kommen(case: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    out = _cli_json(
        [
            "sequence",
            "--scheme",
            "kommen",
            "--secret-base32",
            case["secret_base32"],
            "--counter",
            str(case["counter"]),
            "--json",
        ],
        capsys,
    )
    assert (out["ports"], out["code"], out["counter"]) == (
        case["ports"],
        case["code"],
        case["counter"],
    )


def test_strength_bits_are_documented_figures() -> None:
    assert round(Livingstone().strength_bits()) == 20
    assert Kommen().strength_bits() == 31
    assert round(TotpKnockdRs().strength_bits()) == 479  # 32 x log2(31745)
    assert make_scheme("v1").strength_bits() > 470


# --- the engine serves every scheme ------------------------------------------------

SECRETS = {
    "v1": bytes(range(32)),
    "totp-knockd-rs": b"correct horse battery staple",
    "livingstone": b"1234567890",
    "kommen": b"0123456789",
}


def _engine(scheme_name: str, clock: Clock, **kw: Any) -> tuple[InstantCore, User]:
    scheme = None if scheme_name == "v1" else make_scheme(scheme_name)
    user = User("u", SECRETS[scheme_name], scheme=scheme, initial_counter=kw.pop("initial", 0))
    return InstantCore(engine_settings(**kw), [user], clock.wall), user


def _client_ports(
    scheme_name: str,
    wall: float,
    tmp: Path,
    monkeypatch: pytest.MonkeyPatch,
    counter: int | None = None,
) -> list[int]:
    """What nfknock-client sends for this scheme at ``wall``."""
    cfg = tmp / "client.toml"
    secret = SECRETS[scheme_name]
    body = f'[profiles.p]\nhost = "h"\nscheme = "{scheme_name}"\n'
    body += (
        f'secret_utf8 = "{secret.decode()}"\n'
        if scheme_name == "totp-knockd-rs"
        else f'secret = "{format_base32(secret)}"\n'
    )
    if scheme_name == "v1":
        body += "exclude = [22]\n"
    cfg.write_text(body)
    cfg.chmod(0o600)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp / "state"))
    monkeypatch.setattr("time.time", lambda: wall)
    args = ["sequence", "--profile", "p", "--config", str(cfg), "--json"]
    if counter is not None:
        args += ["--counter", str(counter)]
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert client.main(args) == 0
    ports: list[int] = json.loads(buf.getvalue())["ports"]
    return ports


@settings(max_examples=25, deadline=None)
@given(
    scheme_name=st.sampled_from(sorted(SECRETS)), wall=st.floats(1e9, 4e9), gap=st.floats(0, 0.2)
)
def test_client_output_opens_the_door_for_every_scheme(
    scheme_name: str, wall: float, gap: float, tmp_path_factory: pytest.TempPathFactory
) -> None:
    tmp = tmp_path_factory.mktemp("c")
    with pytest.MonkeyPatch.context() as mp:
        ports = _client_ports(scheme_name, wall, tmp, mp)
    clock = Clock(wall)
    engine, _ = _engine(scheme_name, clock)
    knock_all(engine, clock, ports, gap=gap / max(len(ports), 1))
    assert syn(engine, clock) is Verdict.ACCEPT


def test_livingstone_repeated_port_sequence_opens() -> None:
    # At step 56689649 this secret's code is "010000" -> (1000, 1000): the same port
    # twice is the whole sequence.
    clock = Clock(56689649 * 30 + 10.0)
    engine, user = _engine("livingstone", clock)
    assert Livingstone().derive(user.secret, 56689649, 0) == (1000, 1000)
    knock_all(engine, clock, [1000])
    assert syn(engine, clock) is Verdict.DROP
    knock_all(engine, clock, [1000])
    assert syn(engine, clock) is Verdict.ACCEPT


def test_counterless_scheme_replay_gets_reject_and_opens_nothing() -> None:
    clock = Clock(1_700_000_010.0)
    engine, user = _engine("livingstone", clock)
    scheme = Livingstone()
    ports = scheme.derive(user.secret, step_for(scheme, clock.wall), 0)
    knock_all(engine, clock, ports)
    assert syn(engine, clock) is Verdict.ACCEPT
    decisions = knock_all(engine, clock, ports, src=CLIENT2)
    assert EventKind.SEQUENCE_STALE in kinds(decisions)
    assert syn(engine, clock, src=CLIENT2) is Verdict.REJECT


def test_kommen_counter_is_the_hotp_counter_with_lookahead() -> None:
    clock = Clock(1_700_000_010.0)
    engine, user = _engine("kommen", clock, initial=5)
    scheme = Kommen()
    knock_all(engine, clock, scheme.derive(user.secret, HOTP_STEP, 7))  # two ahead
    assert syn(engine, clock) is Verdict.ACCEPT
    assert engine.counters()["u"][HOTP_STEP] == 8  # the floor moved past the skipped ones
    knock_all(engine, clock, scheme.derive(user.secret, HOTP_STEP, 5), src=CLIENT2)  # skipped
    assert syn(engine, clock, src=CLIENT2) is Verdict.REJECT


def test_kommen_counter_does_not_depend_on_time() -> None:
    clock = Clock(1_700_000_010.0)
    engine, user = _engine("kommen", clock)
    clock.advance(3600)
    knock_all(engine, clock, Kommen().derive(user.secret, HOTP_STEP, 0))
    assert syn(engine, clock) is Verdict.ACCEPT


def test_kommen_knocks_outside_the_v1_range_reach_the_engine() -> None:
    clock = Clock(1_700_000_010.0)
    engine, user = _engine("kommen", clock)
    ports = Kommen().derive(user.secret, HOTP_STEP, 0)
    assert ports[0] == 1  # always: the HOTP code has at most 10 digits
    knock_all(engine, clock, ports, src=CLIENT)
    assert syn(engine, clock, src=CLIENT) is Verdict.ACCEPT
