"""Careless-admin steps (issue 15 C): init --force keeps the users, user add's
stdout is exactly the profile, --host is required, a closed stdout or a missing
capability gets a message instead of a traceback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from nfknock.cli import main
from nfknock.config import load_config

HOST = "198.51.100.1"


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    path = tmp_path / "etc" / "nfknock.toml"
    argv = ["init", "--config", str(path), "--state", str(tmp_path / "state.json")]
    assert main([*argv, "--socket", str(tmp_path / "ctl.sock")]) == 0
    return path


def add(cfg: Path, name: str, *extra: str) -> int:
    return main(["user", "add", name, "--config", str(cfg), "--host", HOST, *extra])


def test_init_force_keeps_the_existing_users(cfg: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert add(cfg, "alice") == 0
    before = cfg.with_name("users.toml").read_text()
    capsys.readouterr()
    assert main(["init", "--config", str(cfg), "--force"]) == 0
    assert cfg.with_name("users.toml").read_text() == before
    assert "kept" in capsys.readouterr().err
    assert [u.name for u in load_config(cfg).users] == ["alice"]


def test_init_force_users_replaces_the_users_file_and_says_so(
    cfg: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert add(cfg, "alice") == 0
    capsys.readouterr()
    assert main(["init", "--config", str(cfg), "--force", "--force-users"]) == 0
    assert "1 user(s) erased" in capsys.readouterr().err
    assert load_config(cfg).users == ()


def test_user_add_stdout_is_exactly_a_client_profile(
    cfg: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    assert add(cfg, "alice", "--profile", "srv") == 0
    out, err = capsys.readouterr()
    profile = tomllib.loads(out)  # the whole of stdout parses as client.toml
    assert set(profile) == {"profiles"} and profile["profiles"]["srv"]["host"] == HOST
    assert "user alice: add done" in err and "daemon" in err


def test_user_rekey_stdout_is_exactly_a_client_profile(
    cfg: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert add(cfg, "alice") == 0
    capsys.readouterr()
    assert main(["user", "rekey", "alice", "--config", str(cfg), "--host", HOST]) == 0
    out, err = capsys.readouterr()
    assert tomllib.loads(out)["profiles"][HOST]["host"] == HOST
    assert "rekey done" in err


@pytest.mark.parametrize("action", ["add", "rekey"])
def test_user_add_and_rekey_require_host(
    cfg: Path, capsys: pytest.CaptureFixture[str], action: str
) -> None:
    assert add(cfg, "alice") == 0
    users = cfg.with_name("users.toml")
    before = users.read_text()
    capsys.readouterr()
    name = "bob" if action == "add" else "alice"
    assert main(["user", action, name, "--config", str(cfg)]) == 2
    out, err = capsys.readouterr()
    assert "--host" in err and out == ""
    assert users.read_text() == before


def test_status_lines_of_other_user_actions_go_to_stderr(
    cfg: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert add(cfg, "alice") == 0
    capsys.readouterr()
    assert main(["user", "disable", "alice", "--config", str(cfg)]) == 0
    out, err = capsys.readouterr()
    assert out == "" and "disable done" in err


REKEY = [sys.executable, "-m", "nfknock.cli", "user", "rekey", "alice", "--config"]


def test_a_closed_stdout_ends_quietly_with_exit_1(cfg: Path) -> None:
    """``nfknock user rekey ... | head -5``: the reader goes away mid-profile."""
    assert add(cfg, "alice") == 0
    for _ in range(3):  # a pipe whose reader is gone before the first write
        r, w = os.pipe()
        os.close(r)
        proc = subprocess.run(
            [*REKEY, str(cfg), "--host", HOST],
            stdout=w,
            stderr=subprocess.PIPE,
            text=True,
            check=False,
        )
        os.close(w)
        assert proc.returncode == 1
        assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr
        assert "rekey done" in proc.stderr  # the change itself happened and was said


def test_head_on_user_rekey_gives_no_traceback(cfg: Path) -> None:
    assert add(cfg, "alice") == 0
    argv = f"{sys.executable} -m nfknock.cli user rekey alice --config {cfg} --host {HOST}"
    proc = subprocess.run(
        ["bash", "-c", f"set -o pipefail; {argv} | head -1"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stdout.startswith("#")


def test_run_without_cap_net_admin_says_so_and_exits_1(cfg: Path) -> None:
    # A queue number no one uses: should the drop fail, the daemon must not steal
    # a real queue for long (timeout below).
    cfg.write_text(cfg.read_text().replace("number = 0 ", "number = 4711 ", 1))
    argv = [sys.executable, "-m", "nfknock.cli", "run", "--config", str(cfg)]
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        assert setpriv is not None, "setpriv (util-linux) is needed to drop the capability"
        argv = [setpriv, "--inh-caps=-all", "--bounding-set=-net_admin", "--", *argv]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert "CAP_NET_ADMIN" in proc.stderr


@pytest.mark.parametrize(
    "state", ['/var/lib/a"b\\c', "/var/lib/\x7f/\x01/state.json", "/tmp/\u00e9"]
)
def test_init_writes_any_path_as_a_valid_toml_string(tmp_path: Path, state: str) -> None:
    config = tmp_path / "nfknock.toml"
    argv = ["init", "--config", str(config), "--state", state]
    assert main([*argv, "--socket", str(tmp_path / "c.sock")]) == 0
    assert load_config(config).state_path == Path(state)


def test_init_refuses_a_path_check_would_refuse(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "nfknock.toml"
    assert main(["init", "--config", str(config), "--socket", "/dev/null"]) == 2
    assert "control.socket" in capsys.readouterr().err
    assert not config.exists()
