"""Admin commands: init, user management, printed client profiles."""

from __future__ import annotations

import re
import stat
from pathlib import Path

import pytest

from nfknock.cli import main
from nfknock.config import load_config
from nfknock.engine import EngineSettings
from nfknock.events import Verdict
from nfknock.schemes import step_for
from nfknock_client import cli as client

from .helpers import CLIENT, SERVER, InstantCore


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    path = tmp_path / "etc" / "nfknock.toml"
    assert (
        main(
            [
                "init",
                "--config",
                str(path),
                "--state",
                str(tmp_path / "state.db"),
                "--socket",
                str(tmp_path / "ctl.sock"),
            ]
        )
        == 0
    )
    return path


def test_init_writes_private_valid_files_and_refuses_to_overwrite(
    cfg: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for path in (cfg, cfg.with_name("users.toml")):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert main(["check", "--config", str(cfg)]) == 0
    assert main(["init", "--config", str(cfg)]) == 2
    assert "exists" in capsys.readouterr().err


def _add(cfg: Path, name: str, capsys: pytest.CaptureFixture[str], *extra: str) -> str:
    capsys.readouterr()
    assert (
        main(
            [
                "user",
                "add",
                name,
                "--config",
                str(cfg),
                "--host",
                "198.51.100.1",
                "--profile",
                "p",
                *extra,
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    return out[out.index("[profiles") : out.index("# or on the command line")]


@pytest.mark.parametrize("scheme", ["v1", "totp-knockd-rs", "livingstone", "kommen"])
def test_printed_profile_pasted_into_the_client_opens_the_door(
    cfg: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path, scheme: str
) -> None:
    profile = _add(cfg, "alice", capsys, "--scheme", scheme)
    client_toml = tmp_path / "client.toml"
    client_toml.write_text(profile)
    client_toml.chmod(0o600)
    target = client._target(
        client._parser().parse_args(["sequence", "--profile", "p", "--config", str(client_toml)])
    )
    config = load_config(cfg)
    wall, mono = 1_700_000_010.0, 100.0
    engine = InstantCore(EngineSettings.from_config(config), config.users, wall)
    ports = target.scheme.derive(target.secret, step_for(target.scheme, wall), 0)
    for port in ports:
        engine.decide(CLIENT, SERVER, port, wall, mono)
    assert engine.decide(CLIENT, SERVER, 22, wall, mono).verdict is Verdict.ACCEPT


def test_user_lifecycle(cfg: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _add(cfg, "bob", capsys, "--ports", "22")
    users = cfg.with_name("users.toml")
    first = re.search(r'secret = "(\w+)"', users.read_text())
    assert first is not None
    assert main(["user", "disable", "bob", "--config", str(cfg)]) == 0
    assert not load_config(cfg).users[0].enabled
    assert main(["user", "enable", "bob", "--config", str(cfg)]) == 0
    assert main(["user", "rekey", "bob", "--config", str(cfg), "--host", "198.51.100.1"]) == 0
    assert first.group(1) not in users.read_text()
    capsys.readouterr()
    assert main(["user", "list", "--config", str(cfg)]) == 0
    assert "bob\tenabled\tports=22" in capsys.readouterr().out
    assert main(["user", "revoke", "bob", "--config", str(cfg)]) == 0
    assert load_config(cfg).users == ()
    assert stat.S_IMODE(users.stat().st_mode) == 0o600


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["user", "add", "bob", "--ports", "23"], "not protected"),
        (["user", "add", "bad name"], "user names"),
        (["user", "disable", "nobody"], "no user 'nobody'"),
        (["user", "add"], "needs a NAME"),
    ],
)
def test_bad_user_commands_exit_2_and_change_nothing(
    cfg: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    users = cfg.with_name("users.toml")
    before = users.read_text()
    assert main([*argv, "--config", str(cfg), "--host", "198.51.100.1"]) == 2
    assert message in capsys.readouterr().err
    assert users.read_text() == before


def test_user_add_refuses_an_existing_name(cfg: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _add(cfg, "carol", capsys)
    assert main(["user", "add", "carol", "--config", str(cfg), "--host", "h"]) == 2
    assert "exists" in capsys.readouterr().err
