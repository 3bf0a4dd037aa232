"""nfknock-client and forwarded doors / ISN knocks, without a network: the door the
client computes is the server's, probes and --exec go to it, ``sequence`` prints
it, ISN knocks carry the server's ISNs; ``nfknock user add --door --isn`` prints
a profile the client reads."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest

from nfknock.cli import main as nfknock_main
from nfknock.config import DEFAULT_DOOR_MARK, Forward
from nfknock.sequence import SequenceParams, door_port, format_base32, isns, step_of
from nfknock_client import cli
from nfknock_client.knock import DoorState
from tests.helpers import CLIENT, SERVER, alice, make, seq

SECRET = bytes(range(32))
NOW = 1_700_000_010.0


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    path = tmp_path / "secret"
    path.write_text(format_base32(SECRET))
    path.chmod(0o600)
    return path


class Io:
    def __init__(self, state: DoorState = DoorState.CLOSED) -> None:
        self.sent: list[tuple[int, ...]] = []
        self.probed: list[int] = []
        self.state = state

    def send(self, family: int, address: str, ports: Sequence[int], pace: float) -> None:
        self.sent.append(tuple(ports))

    def probe(self, family: int, address: str, port: int, timeout: float) -> tuple[DoorState, None]:
        self.probed.append(port)
        return self.state, None

    def io(self) -> cli.KnockIO:
        return cli.KnockIO(
            clock=lambda: NOW, sleep=lambda s: None, send=self.send, probe=self.probe
        )


def test_the_client_door_is_the_one_the_server_opens(env: Path) -> None:
    forward = Forward("gw", 40000, 40999, 22, None, DEFAULT_DOOR_MARK + 1)
    core, clock = make([alice(door=True, forward=frozenset({"gw"}))], forwards=(forward,))
    clock.wall = NOW
    knock_all_ports = seq(core, core.users["alice"], NOW)
    for port in knock_all_ports:
        core.decide(CLIENT, SERVER, port, clock.wall, clock.mono)
    (granted,) = [p for _, g in core.grants.items() for p in g.ports]
    io = Io()
    argv = ["knock", "127.0.0.1", "--secret-file", str(env), "--doors", "40000-40999"]
    assert cli.cmd_knock(cli._parser().parse_args([*argv, "--check"]), io.io()) == 1
    assert io.probed[0] == granted
    assert io.sent[0] == knock_all_ports


def test_without_doors_the_probe_goes_to_the_protected_port(env: Path) -> None:
    io = Io()
    args = cli._parser().parse_args(["knock", "127.0.0.1", "--secret-file", str(env), "--check"])
    cli.cmd_knock(args, io.io())
    assert set(io.probed) == {22}


def test_sequence_prints_the_door_and_the_isns(
    env: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("nfknock_client.cli.time.time", lambda: NOW)
    argv = ["sequence", "--secret-file", str(env), "--doors", "40000-40999", "--isn"]
    assert cli.main([*argv, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    params = SequenceParams(exclude=frozenset({22}))
    step = step_of(NOW, 30)
    assert out["door"] == door_port(SECRET, step, out["counter"], params, 40000, 40999)
    assert out["isns"] == list(isns(SECRET, step, out["counter"], params))
    assert cli.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == f"door {out['door']}" and lines[2].startswith("isns ")
    assert cli.main(["sequence", "--secret-file", str(env)]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1  # unchanged without them


def test_exec_gets_the_door_in_its_environment(
    env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "env"
    io = Io()
    cmd = f"echo $NFKNOCK_HOST $NFKNOCK_PORT > {out}"
    argv = ["knock", "127.0.0.1", "--secret-file", str(env), "--doors", "41000-41000"]
    assert cli.cmd_knock(cli._parser().parse_args([*argv, "--exec", cmd]), io.io()) == 0
    assert out.read_text().split() == ["127.0.0.1", "41000"]


def test_isn_and_doors_need_scheme_v1(env: Path) -> None:
    for extra in (["--isn"], ["--doors", "40000-40010"]):
        argv = ["knock", "h", "--secret-file", str(env), "--scheme", "kommen", *extra]
        with pytest.raises(cli.ClientError, match="v1"):
            cli._target(cli._parser().parse_args(argv))
    with pytest.raises(cli.ClientError, match="LO-HI"):
        cli._target(
            cli._parser().parse_args(["knock", "h", "--secret-file", str(env), "--doors", "x"])
        )


def test_isn_knocks_go_raw_with_the_servers_isns(
    env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent: list[tuple[tuple[int, ...], tuple[int, ...] | None]] = []

    def raw(
        family: int,
        address: str,
        ports: Sequence[int],
        pace: float,
        isn_values: Sequence[int] | None = None,
    ) -> None:
        sent.append((tuple(ports), tuple(isn_values) if isn_values is not None else None))

    monkeypatch.setattr(cli, "send_raw_knocks", raw)
    io = cli.KnockIO(clock=lambda: NOW)
    assert cli.main(["knock", "127.0.0.1", "--secret-file", str(env), "--isn"], io) == 0
    ((ports, isn_values),) = sent
    params = SequenceParams(exclude=frozenset({22}))
    assert isn_values == isns(SECRET, step_of(NOW, 30), 0, params)
    assert len(ports) == len(isn_values)


def test_user_add_with_door_and_isn_prints_a_profile_the_client_reads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    users = tmp_path / "users.toml"
    users.write_text("")
    users.chmod(0o600)
    config = tmp_path / "nfknock.toml"
    config.write_text(
        f'[[protect]]\nport = 22\n[users]\nfile = "{users}"\n[state]\npath = "{tmp_path}/s.db"\n'
        f'[control]\nsocket = "{tmp_path}/c.sock"\n'
        '[[door.forward]]\nname = "gw"\ndoors = "40000-40999"\naddress = "198.51.100.130"\n'
        "port = 22\n"
    )
    config.chmod(0o600)
    argv = ["user", "add", "alice", "--config", str(config), "--host", "gw.example"]
    assert nfknock_main([*argv, "--door", "gw", "--isn"]) == 0
    profile = capsys.readouterr().out
    assert 'doors = "40000-40999"' in profile and "isn = true" in profile
    assert "--doors 40000-40999 --isn" in profile
    client = tmp_path / "cfg" / "nfknock" / "client.toml"
    client.parent.mkdir(parents=True)
    client.write_text(profile)
    client.chmod(0o600)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    t = cli.load_profile("gw.example")
    assert (t.doors, t.isn) == ((40000, 40999), True)
    assert nfknock_main([*argv[:2], "bob", *argv[3:], "--door", "nope"]) == 2
