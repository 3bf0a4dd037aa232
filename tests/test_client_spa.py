"""``nfknock-client spa`` without a network: profiles and key files, arguments, the
packets it builds (checked by the server's own verifier), the --check/--pipe retry
flow with fake probes, the raw SYN form, exit codes."""

from __future__ import annotations

import base64
import json
import os
import socket
import stat
import struct
from pathlib import Path
from typing import Any

import dpkt
import pytest

from nfknock.cli import main as admin_main
from nfknock.config import SpaConfig, load_config
from nfknock.sequence import format_base32
from nfknock.spa.verify import SpaResult, Verifier
from nfknock_client import cli
from nfknock_client.knock import DoorState, syn_segment
from nfknock_client.spa import load_spa_profile, send_udp

from .spa_support import HMAC_KEY, KEY, SRC, SRC6, spa_user

NOW = 1_800_000_000.7
DST4 = bytes([127, 0, 0, 1])
DST6 = bytes(15) + b"\x01"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture
def xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    (tmp_path / "cfg" / "nfknock").mkdir(parents=True)
    return tmp_path / "cfg" / "nfknock" / "client.toml"


def write_private(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


@pytest.fixture
def keys(tmp_path: Path, xdg: Path) -> tuple[Path, Path]:
    return (
        write_private(tmp_path / "key", b64(KEY) + "\n"),
        write_private(tmp_path / "hmac", b64(HMAC_KEY) + "\n"),
    )


class Wire:
    """Fake edges: a fixed clock, captured packets, scripted probe outcomes."""

    def __init__(self, *doors: DoorState) -> None:
        self.sent: list[tuple[int, str, int, bytes]] = []
        self.doors = list(doors)
        self.probes = 0
        self.relayed = 0

    def send(self, family: int, address: str, port: int, payload: bytes) -> None:
        self.sent.append((family, address, port, payload))

    def probe(
        self, family: int, address: str, port: int, timeout: float
    ) -> tuple[DoorState, socket.socket | None]:
        self.probes += 1
        state = self.doors.pop(0) if self.doors else DoorState.CLOSED
        if state is not DoorState.OPEN:
            return state, None
        a, b = socket.socketpair()
        b.close()
        return state, a

    def relay(self, conn: socket.socket) -> tuple[int, str | None]:
        self.relayed += 1
        conn.close()
        return 0, None

    def io(self) -> cli.SpaIO:
        return cli.SpaIO(clock=lambda: NOW, send=self.send, probe=self.probe, relay=self.relay)


def run(wire: Wire, *args: str) -> int:
    return cli.main(["spa", *args], io=wire.io())


def verify(payload: bytes, src: bytes = SRC, dst: bytes = DST4, **user: Any) -> SpaResult:
    v = Verifier([spa_user(**user)], SpaConfig(), frozenset({22, 2222}))
    return v.verify(src, dst, payload, NOW)


# --- packets built verify with the server's verifier ---------------------------------


def test_a_plain_spa_sends_one_udp_packet_that_opens_the_source(
    keys: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    wire = Wire()
    code = run(wire, "127.0.0.1", "--key-file", str(keys[0]), "--hmac-key-file", str(keys[1]))
    assert code == 0 and wire.probes == 0
    [(family, address, port, payload)] = wire.sent
    assert (family, address, port) == (socket.AF_INET, "127.0.0.1", 62201)
    result = verify(payload)
    assert result.ok, result
    assert result.open_address == SRC and result.ports == {22}
    assert result.message is not None and result.message.allow_ip == "0.0.0.0"
    assert result.timestamp == int(NOW) and result.client_timeout is None
    assert "door not checked" in capsys.readouterr().err


def test_options_shape_the_packet_and_the_server_honours_them(
    keys: tuple[Path, Path], tmp_path: Path
) -> None:
    wire = Wire()
    args = ["127.0.0.1", "--key-file", str(keys[0]), "--hmac-key-file", str(keys[1])]
    args += ["--port", "2222", "--spa-port", "40000", "--allow-ip", "198.51.100.10"]
    args += ["--timeout-open", "1000", "--username", "carol"]
    args += ["--hmac-digest", "sha3_512", "--mode", "ctr"]
    assert run(wire, *args) == 0
    [(_, _, port, payload)] = wire.sent
    assert port == 40000
    assert not verify(payload).ok  # the default user has SHA-256 and CBC
    result = verify(payload, hmac_digest="sha3_512", mode="ctr", username="carol")
    assert result.ok, result
    assert result.ports == {2222} and result.allow_ip == "198.51.100.10"
    assert result.timeout == 300  # asked for 1000 s, capped at max_open_seconds
    assert result.message is not None and result.message.message_type.label == (
        "client_timeout_access"
    )


def test_over_ipv6_the_packet_asks_for_its_own_source(keys: tuple[Path, Path]) -> None:
    wire = Wire()
    assert run(wire, "::1", "--key-file", str(keys[0]), "--hmac-key-file", str(keys[1])) == 0
    [(family, address, _, payload)] = wire.sent
    assert (family, address) == (socket.AF_INET6, "::1")
    result = verify(payload, src=SRC6, dst=DST6)
    assert result.ok and result.open_address == SRC6


def test_each_packet_is_fresh(keys: tuple[Path, Path]) -> None:
    wire = Wire()
    args = ["127.0.0.1", "--key-file", str(keys[0]), "--hmac-key-file", str(keys[1])]
    run(wire, *args)
    run(wire, *args)
    a, b = (s[3] for s in wire.sent)
    assert a != b and verify(a).ok and verify(b).ok


# --- profiles: what `nfknock user add --spa` prints is what the client reads ------------


def _admin_profile(tmp_path: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> str:
    cfg = tmp_path / "etc" / "nfknock.toml"
    init = ["init", "--config", str(cfg), "--state", str(tmp_path / "s.db")]
    assert admin_main([*init, "--socket", str(tmp_path / "c.sock")]) == 0
    capsys.readouterr()
    add = ["user", "add", "dave", "--spa", "--host", "127.0.0.1", "--profile", "lab"]
    assert admin_main([*add, "--config", str(cfg), *extra]) == 0
    out = capsys.readouterr().out
    return out[out.index("# nfknock-client profile") : out.index("# or on the command line")]


def test_the_profile_printed_by_user_add_spa_builds_packets_the_server_accepts(
    xdg: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_private(xdg, _admin_profile(tmp_path, capsys))
    target = load_spa_profile("lab")
    assert (target.host, target.port, target.spa_port) == ("127.0.0.1", 22, 62201)
    wire = Wire()
    assert run(wire, "--profile", "lab") == 0
    server = load_config(tmp_path / "etc" / "nfknock.toml")
    verifier = Verifier(server.spa_users, server.spa, server.protected_ports)
    result = verifier.verify(SRC, DST4, wire.sent[0][3], NOW)
    assert result.ok and result.user == "dave", result


def test_a_profile_with_key_files_and_its_own_digest_and_mode(
    xdg: Path, keys: tuple[Path, Path]
) -> None:
    write_private(
        xdg,
        f'[profiles.srv]\nhost = "127.0.0.1"\nport = 2222\nspa_port = 5000\n'
        f'fwknop_key_file = "{keys[0]}"\nfwknop_hmac_key_file = "{keys[1]}"\n'
        'fwknop_hmac_digest = "md5"\nfwknop_mode = "ofb"\nfwknop_username = "ann"\n',
    )
    wire = Wire()
    assert run(wire, "--profile", "srv") == 0
    [(_, _, port, payload)] = wire.sent
    assert port == 5000
    result = verify(payload, hmac_digest="md5", mode="ofb", username="ann")
    assert result.ok and result.ports == {2222}


def test_a_profile_without_hmac_sends_untagged_packets(xdg: Path) -> None:
    write_private(
        xdg,
        f'[profiles.old]\nhost = "127.0.0.1"\nfwknop_key_base64 = "{b64(KEY)}"\n'
        'fwknop_hmac = false\nfwknop_mode = "legacy"\n',
    )
    wire = Wire()
    assert run(wire, "--profile", "old") == 0
    assert verify(wire.sent[0][3], hmac_key=None, mode="legacy").ok


def test_a_profile_with_both_a_knock_secret_and_spa_keys_serves_both_commands(
    xdg: Path,
) -> None:
    write_private(
        xdg,
        f'[profiles.both]\nhost = "127.0.0.1"\nsecret = "{format_base32(bytes(range(32)))}"\n'
        f'fwknop_key_base64 = "{b64(KEY)}"\nfwknop_hmac_key_base64 = "{b64(HMAC_KEY)}"\n',
    )
    assert cli.load_profile("both").secret == bytes(range(32))
    assert load_spa_profile("both").keys.key == KEY


GOOD_KEYS = f'fwknop_key_base64 = "{b64(KEY)}"\nfwknop_hmac_key_base64 = "{b64(HMAC_KEY)}"\n'


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('fwknop_key_base64 = "!!!"\n', "profiles.srv.fwknop_key_base64: is not base64"),
        (f'fwknop_key_base64 = "{b64(bytes(33))}"\n', "is 33 bytes; fwknop takes at most 32"),
        (f'fwknop_key_base64 = "{b64(KEY)}"\n', "needs fwknop_hmac_key_base64 or"),
        (
            f'fwknop_key_base64 = "{b64(KEY)}"\nfwknop_hmac_key_base64 = "{b64(KEY)}"\n',
            "the HMAC key equals the encryption key",
        ),
        (
            f'fwknop_key_base64 = "{b64(KEY)}"\nfwknop_hmac = false\n'
            f'fwknop_hmac_key_base64 = "{b64(HMAC_KEY)}"\n',
            "fwknop_hmac_key_base64: is set but fwknop_hmac = false",
        ),
        (GOOD_KEYS + 'fwknop_hmac_digest = "sha2"\n', "HMAC digest 'sha2' is not one of"),
        (GOOD_KEYS + 'fwknop_mode = "gcm"\n', "encryption mode 'gcm' is not one of"),
        (GOOD_KEYS + 'fwknop_mode = "legacy"\n', "'legacy' is for old servers without HMAC"),
        (GOOD_KEYS + 'fwknop_username = "a:b"\n', "fwknop_username: 'a:b' is not a username"),
        (GOOD_KEYS + "spa_port = 0\n", "profiles.srv.spa_port: 0 is outside 1-65535"),
        (GOOD_KEYS + 'fwknop_hmac = "no"\n', "fwknop_hmac: expected a boolean, got a string"),
        (GOOD_KEYS + 'fwknop_key_file = "/k"\n', "(exactly one, not fwknop_key_base64 and"),
        (GOOD_KEYS + "fwknop_mode = 1\n", "fwknop_mode: expected a string, got an integer"),
        ('fwknop_key_file = "/nonexistent"\n', "key file /nonexistent not found"),
        (
            f'secret = "{format_base32(bytes(range(32)))}"\n',
            "it has a knock secret: use nfknock-client knock --profile srv",
        ),
    ],
)
def test_bad_spa_profiles_exit_2_naming_the_key(
    xdg: Path, body: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    write_private(xdg, f'[profiles.srv]\nhost = "127.0.0.1"\n{body}')
    wire = Wire()
    assert run(wire, "--profile", "srv") == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and wire.sent == []


def test_an_spa_only_profile_used_to_knock_says_to_use_spa(
    xdg: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_private(xdg, f'[profiles.srv]\nhost = "127.0.0.1"\n{GOOD_KEYS}')
    assert cli.main(["knock", "--profile", "srv"]) == 2
    assert "use nfknock-client spa --profile srv" in capsys.readouterr().err


# --- arguments ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--timeout-open", "0"], "--timeout-open must be between 1 and 65536"),
        (["--timeout-open", "70000"], "--timeout-open must be between 1 and 65536"),
        (["--tries", "0"], "--tries must be between 1 and 10"),
        (["--spa-port", "0"], "--spa-port must be between 1 and 65535"),
        (["--spa-port", "x"], "not an integer"),
        (["--allow-ip", "1.2.3.4", "--source"], "not allowed with argument"),
        (["--pipe", "--json"], "--json cannot be combined with --pipe"),
        (["--mode", "legacy"], "invalid choice"),
        (["--hmac-digest", "sha2"], "invalid choice"),
        (["--timeout", "0"], "--timeout must be between"),
    ],
)
def test_bad_option_values_exit_2_with_usage(
    keys: tuple[Path, Path], args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["spa", "127.0.0.1", "--key-file", str(keys[0]), *args])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["127.0.0.1"], "--key-file and --hmac-key-file are required without --profile"),
        ([], "give HOST, --key-file and --hmac-key-file, or --profile NAME"),
        (["127.0.0.1", "KEYS", "--allow-ip", "::1"], "is not an IPv4 address"),
        (["127.0.0.1", "KEYS", "--allow-ip", "banana"], "is not an IPv4 address"),
        (["::1", "KEYS", "--allow-ip", "198.51.100.10"], "goes over IPv6"),
        (["127.0.0.1", "KEYS", "--username", "a b:c"], "--username 'a b:c'"),
        (["127.0.0.1", "KEYS", "--port", "0"], "outside 1-65535"),
        (["host.invalid", "KEYS"], "cannot resolve"),
        (["127.0.0.1", "KEYS", "--exec", "a\0b"], "NUL byte"),
        (["127.0.0.1", "--key-file", "/", "--hmac-key-file", "HMAC"], "not a regular file"),
        (["127.0.0.1", "--key-file", "HMAC", "--hmac-key-file", "HMAC"], "is 64 bytes"),
    ],
)
def test_bad_values_exit_2_with_a_message_and_nothing_sent(
    keys: tuple[Path, Path], args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    expanded: list[str] = []
    for a in args:
        if a == "KEYS":
            expanded += ["--key-file", str(keys[0]), "--hmac-key-file", str(keys[1])]
        else:
            expanded.append(str(keys[1]) if a == "HMAC" else a)
    wire = Wire()
    assert run(wire, *expanded) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and wire.sent == []


def test_a_key_file_readable_by_others_is_refused(
    keys: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    keys[1].chmod(0o640)
    wire = Wire()
    assert run(wire, "127.0.0.1", "--key-file", str(keys[0]), "--hmac-key-file", str(keys[1])) == 2
    assert "chmod 600" in capsys.readouterr().err and wire.sent == []


def test_pipe_with_stdin_not_a_pipe_exits_2_before_sending(
    keys: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    wire = Wire(DoorState.OPEN)
    null = os.open(os.devnull, os.O_RDONLY)
    saved = os.dup(0)
    os.dup2(null, 0)
    try:
        code = run(wire, *_args(keys, "--pipe"))
    finally:
        os.dup2(saved, 0)
        os.close(saved)
        os.close(null)
    assert code == 2 and wire.sent == []
    assert "nothing was sent" in capsys.readouterr().err


# --- --check / --pipe / --exec: fresh packets until the door answers --------------------


def _args(keys: tuple[Path, Path], *extra: str) -> list[str]:
    return ["127.0.0.1", "--key-file", str(keys[0]), "--hmac-key-file", str(keys[1]), *extra]


def test_check_sends_a_fresh_packet_after_a_timeout_and_stops_when_open(
    keys: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    wire = Wire(DoorState.CLOSED, DoorState.OPEN)
    assert run(wire, *_args(keys, "--check", "--json")) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] and out["packets"] == 2 and wire.probes == 2
    first, second = (s[3] for s in wire.sent)
    assert first != second and verify(first).ok and verify(second).ok
    assert "max_connections" in out["message"] and "nfknock-client spa --pipe" in out["message"]


def test_check_gives_up_after_tries_with_exit_1_naming_the_causes(
    keys: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    wire = Wire()
    assert run(wire, *_args(keys, "--check", "--tries", "4", "--json")) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["packets"] == 4 and len(wire.sent) == 4 and not out["ok"]
    assert "wrong keys" in out["message"] and "max_age" in out["message"]
    assert "nfknock spa inspect" in out["message"]


def test_a_reset_ends_at_once_with_exit_1(
    keys: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    wire = Wire(DoorState.BEHIND)
    assert run(wire, *_args(keys, "--check")) == 1
    assert len(wire.sent) == 1 and "TCP reset" in capsys.readouterr().err


def test_pipe_relays_the_checked_connection(keys: tuple[Path, Path]) -> None:
    wire = Wire(DoorState.OPEN)
    r, w = os.pipe()
    a, b = socket.socketpair()
    saved = os.dup(0), os.dup(1)
    os.dup2(r, 0)
    os.dup2(a.fileno(), 1)
    try:
        code = run(wire, *_args(keys, "--pipe"))
    finally:
        os.dup2(saved[0], 0)
        os.dup2(saved[1], 1)
        for fd in (r, w, *saved):
            os.close(fd)
        a.close()
        b.close()
    assert code == 0 and wire.relayed == 1 and len(wire.sent) == 1


def test_exec_returns_the_commands_status(keys: tuple[Path, Path]) -> None:
    wire = Wire()
    assert run(wire, *_args(keys, "--exec", "exit 7")) == 7
    wire = Wire(DoorState.OPEN)
    assert run(wire, *_args(keys, "--check", "--exec", "exit 5")) == 5


def test_a_failed_send_exits_1(keys: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    def refuse(*_a: object) -> None:
        raise OSError(101, "Network is unreachable")

    io_ = cli.SpaIO(clock=lambda: NOW, send=refuse)
    assert cli.main(["spa", *_args(keys)], io=io_) == 1
    assert "unreachable" in capsys.readouterr().err


def test_save_packet_writes_the_payload_sent_mode_0600(
    keys: tuple[Path, Path], tmp_path: Path
) -> None:
    saved = tmp_path / "last.spa"
    saved.write_text("old")
    saved.chmod(0o644)
    wire = Wire()
    assert run(wire, *_args(keys, "--save-packet", str(saved))) == 0
    assert saved.read_bytes().strip() == wire.sent[0][3]
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600


# --- transports ---------------------------------------------------------------------------


def test_send_udp_delivers_the_payload_as_one_datagram() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server:
        server.bind(("127.0.0.1", 0))
        server.settimeout(5)
        send_udp(socket.AF_INET, "127.0.0.1", server.getsockname()[1], b"x" * 300)
        assert server.recv(2000) == b"x" * 300


@pytest.mark.parametrize("family", [4, 6])
def test_a_raw_syn_carries_the_payload_with_a_valid_checksum(family: int) -> None:
    payload = b"U" * 201  # odd length: the checksum pads
    if family == 4:
        src, dst = bytes([198, 51, 100, 10]), bytes([198, 51, 100, 1])
        pseudo = src + dst + struct.pack("!BBH", 0, 6, 20 + len(payload))
    else:
        src, dst = SRC6, SRC6[:-1] + b"\x01"
        pseudo = src + dst + struct.pack("!I3xB", 20 + len(payload), 6)
    seg = syn_segment(src, dst, 40000, 62201, 9, payload)
    assert dpkt.in_cksum(pseudo + seg) == 0
    tcp = dpkt.tcp.TCP(seg)
    assert (tcp.flags, tcp.dport, bytes(tcp.data)) == (dpkt.tcp.TH_SYN, 62201, payload)
