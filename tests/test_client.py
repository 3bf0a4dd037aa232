"""nfknock-client without a network: profiles, secrets, counters, SYN crafting."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import dpkt
import pytest

from nfknock.sequence import format_base32
from nfknock_client import cli
from nfknock_client.knock import syn_segment

SECRET = bytes(range(32))


@pytest.fixture
def xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    (tmp_path / "cfg" / "nfknock").mkdir(parents=True)
    return tmp_path / "cfg" / "nfknock" / "client.toml"


def write_profile(path: Path, body: str, mode: int = 0o600) -> None:
    path.write_text(body)
    path.chmod(mode)


def test_profile_with_inline_secret_loads(xdg: Path) -> None:
    write_profile(
        xdg,
        f'[profiles.srv]\nhost = "h"\nport = 2222\nsecret = "{format_base32(SECRET)}"\n'
        'realm = "r"\nexclude = [22, 2222]\n',
    )
    t = cli.load_profile("srv")
    assert (t.host, t.port, t.secret, t.options["realm"]) == ("h", 2222, SECRET, b"r")
    assert t.options["exclude"] == {22, 2222}


@pytest.mark.parametrize(
    ("body", "mode", "message"),
    [
        ('[profiles.srv]\nhost = "h"\nsecret = "AAAA"\n', 0o600, "at least 16 bytes"),
        ('[profiles.srv]\nsecret = "x"\n', 0o600, "profiles.srv.host: is required"),
        ('[profiles.srv]\nhost = "h"\n', 0o600, "needs secret, secret_utf8 or secret_file"),
        ('[profiles.srv]\nhost = "h"\nsecret_file = "/nope"\n', 0o600, "not found"),
        ('[profiles.srv]\nhost = "h"\nsekret = "x"\n', 0o600, "sekret: unknown key"),
        ('[profiles.srv]\nhost = "h"\n', 0o644, "chmod 600"),
        ("[profiles.srv\n", 0o600, "client config"),
        ('[profiles.other]\nhost = "h"\n', 0o600, "no profile 'srv' (profiles: other)"),
        (
            f'[profiles.srv]\nhost = "h"\nport = 0\nsecret = "{format_base32(SECRET)}"\n',
            0o600,
            "outside 1-65535",
        ),
    ],
)
def test_bad_profiles_are_refused_with_a_precise_message(
    xdg: Path, body: str, mode: int, message: str
) -> None:
    write_profile(xdg, body, mode)
    with pytest.raises(cli.ClientError, match=message.replace("(", r"\(").replace(")", r"\)")):
        cli.load_profile("srv")


def test_bad_profile_exits_2_with_json_when_asked(
    xdg: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_profile(xdg, '[profiles.srv]\nhost = "h"\n')
    assert cli.main(["knock", "--profile", "srv", "--json"]) == 2
    assert json.loads(capsys.readouterr().out)["exit"] == 2


def test_counter_state_advances_within_a_step_and_resets_on_the_next(xdg: Path) -> None:
    assert cli.load_counter("srv", 100) == 0
    cli.save_counter("srv", 100, 0)
    assert cli.load_counter("srv", 100) == 1
    cli.save_counter("srv", 100, 1)
    assert cli.load_counter("srv", 100) == 2
    assert cli.load_counter("srv", 101) == 0
    assert cli.load_counter("other", 100) == 0


def test_corrupt_counter_state_starts_at_zero(xdg: Path) -> None:
    cli.state_path().parent.mkdir(parents=True)
    cli.state_path().write_text("garbage")
    assert cli.load_counter("srv", 1) == 0
    cli.save_counter("srv", 1, 0)
    assert cli.load_counter("srv", 1) == 1


def test_sequence_command_excludes_the_protected_port(
    xdg: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = tmp_path / "s"
    secret.write_text(format_base32(SECRET))
    secret.chmod(0o600)
    assert (
        cli.main(
            [
                "sequence",
                "--secret-file",
                str(secret),
                "--port",
                "2222",
                "--json",
                "--range",
                "2000-2300",
                "--length",
                "200",
            ]
        )
        == 0
    )
    ports = json.loads(capsys.readouterr().out)["ports"]
    assert 2222 not in ports and len(ports) == 200


@pytest.mark.parametrize("family", [4, 6])
def test_raw_syn_segment_has_a_valid_checksum(family: int) -> None:
    if family == 4:
        src, dst = bytes([198, 51, 100, 10]), bytes([198, 51, 100, 1])
        pseudo = src + dst + struct.pack("!BBH", 0, 6, 20)
    else:
        src = b"\x20\x01\x0d\xb8" + bytes(11) + b"\x10"
        dst = b"\x20\x01\x0d\xb8" + bytes(11) + b"\x01"
        pseudo = src + dst + struct.pack("!I3xB", 20, 6)
    seg = syn_segment(src, dst, 40000, 5000, 7)
    # RFC 1071: the one's-complement sum over pseudo-header and segment, checksum
    # included, is all ones -- dpkt's independent implementation must return 0.
    assert dpkt.in_cksum(pseudo + seg) == 0
    tcp = dpkt.tcp.TCP(seg)
    assert (tcp.flags, tcp.sport, tcp.dport, tcp.seq) == (dpkt.tcp.TH_SYN, 40000, 5000, 7)
