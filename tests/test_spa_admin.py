"""``nfknock spa inspect`` and ``nfknock user add --spa`` (issue 10 items 5 and 7)."""

from __future__ import annotations

import base64
import json
import os
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from nfknock.cli import main
from nfknock.config import load_config
from nfknock.spa.admin import qr_text

from .spa_support import NOW, client, packet


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    path = tmp_path / "etc" / "nfknock.toml"
    args = ["init", "--config", str(path), "--state", str(tmp_path / "state.json")]
    assert main([*args, "--socket", str(tmp_path / "ctl.sock")]) == 0
    return path


def add_spa(cfg: Path, capsys: pytest.CaptureFixture[str], name: str = "alice") -> str:
    """What ``user add --spa`` shows: stdout is the client profile alone (valid TOML,
    so ``> alice.toml`` works); the fwknop set-ups and the QR go to the terminal."""
    capsys.readouterr()
    argv = ["user", "add", name, "--spa", "--host", "198.51.100.1", "--config", str(cfg)]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    tomllib.loads(out)  # the profile alone: parses as TOML
    return out + err


def users(cfg: Path) -> dict[str, dict[str, object]]:
    data = tomllib.loads(cfg.with_name("users.toml").read_text())
    return data["users"]  # type: ignore[no-any-return]


def inspect(
    cfg: Path, capsys: pytest.CaptureFixture[str], *args: str
) -> tuple[int, dict[str, object]]:
    capsys.readouterr()
    rc = main(["spa", "inspect", "--config", str(cfg), *args])
    out = capsys.readouterr().out
    return rc, json.loads(out) if out else {}


def test_user_add_spa_makes_fwknop_key_gen_keys(
    cfg: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    add_spa(cfg, capsys)
    entry = users(cfg)["alice"]
    assert len(base64.b64decode(str(entry["fwknop_key_base64"]))) == 32
    assert len(base64.b64decode(str(entry["fwknop_hmac_key_base64"]))) == 64
    assert "secret" not in entry
    loaded = load_config(cfg)
    assert [u.name for u in loaded.spa_users] == ["alice"] and loaded.users == ()


def test_user_add_spa_prints_every_client_set_up_and_a_qr_code(
    cfg: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = add_spa(cfg, capsys)
    entry = users(cfg)["alice"]
    key, hkey = entry["fwknop_key_base64"], entry["fwknop_hmac_key_base64"]
    assert f"KEY_BASE64          {key}" in out and f"HMAC_KEY_BASE64     {hkey}" in out
    assert "USE_HMAC            Y" in out and "SPA_SERVER_PORT     62201" in out
    assert f"--key-base64-rijndael {key}" in out and f"--key-base64-hmac {hkey}" in out
    assert "spa_port = 62201" in out and f'fwknop_key_base64 = "{key}"' in out
    assert "█" in out  # the QR code, drawn in block characters
    assert qr_text(entry) == f"KEY_BASE64:{key} HMAC_KEY_BASE64:{hkey}"


def test_user_add_spa_needs_a_host(cfg: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["user", "add", "bob", "--spa", "--config", str(cfg)]) == 2
    assert "--host" in capsys.readouterr().err
    assert "bob" not in cfg.with_name("users.toml").read_text()


def test_rekey_of_an_spa_user_makes_new_keys_and_no_knock_secret(
    cfg: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    add_spa(cfg, capsys)
    before = dict(users(cfg)["alice"])
    argv = ["user", "rekey", "alice", "--host", "198.51.100.1", "--config", str(cfg)]
    assert main(argv) == 0
    after = users(cfg)["alice"]
    assert after["fwknop_key_base64"] != before["fwknop_key_base64"]
    assert after["fwknop_hmac_key_base64"] != before["fwknop_hmac_key_base64"]
    assert "secret" not in after


def test_user_list_shows_spa_only_users(cfg: Path, capsys: pytest.CaptureFixture[str]) -> None:
    add_spa(cfg, capsys)
    assert main(["user", "list", "--config", str(cfg)]) == 0
    assert "alice\tenabled" in capsys.readouterr().out


def _fwknop(tmp_path: Path, args: list[str]) -> Path:
    exe = shutil.which("fwknop")
    if exe is None:
        if os.environ.get("CI") == "true":
            pytest.fail("the fwknop client is not installed")
        pytest.skip("the fwknop client is not installed")
    out = tmp_path / "spa.pkt"
    out.unlink(missing_ok=True)
    env = {"HOME": str(tmp_path), "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    done = subprocess.run(
        [exe, *args, "--test", "-B", str(out), "--no-save-args"],
        env=env,
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert done.returncode == 0 and out.exists(), done.stderr
    return out


def test_the_printed_fwknoprc_stanza_opens_with_the_real_client(
    cfg: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = add_spa(cfg, capsys)
    stanza = out[out.index("[198.51.100.1]") : out.index("\n\n", out.index("[198.51.100.1]"))]
    rc = tmp_path / "fwknoprc"
    rc.write_text(stanza + "\n")
    rc.chmod(0o600)
    saved = _fwknop(tmp_path, ["-n", "198.51.100.1", "--rc-file", str(rc)])
    code, result = inspect(cfg, capsys, "--source", "198.51.100.10", "--file", str(saved))
    assert code == 0, result
    assert result["ok"] and result["user"] == "alice" and result["reason"] == "spa_accepted"
    assert result["access"] == ["tcp/22"] and result["open_address"] == "198.51.100.10"


def test_the_printed_fwknop_command_line_opens(
    cfg: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = add_spa(cfg, capsys)
    line = next(x for x in out.splitlines() if x.startswith("#   fwknop "))
    rc = tmp_path / "empty-rc"
    rc.touch(mode=0o600)
    saved = _fwknop(tmp_path, [*shlex.split(line[4:])[1:], "--rc-file", str(rc)])
    code, result = inspect(cfg, capsys, "--source", "198.51.100.10", "--file", str(saved))
    assert code == 0 and result["ok"], result


def _spa_config(cfg: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """alice with the test keys (spa_support), so packets can be built offline."""
    add_spa(cfg, capsys)
    path = cfg.with_name("users.toml")
    keys = client()
    path.write_text(
        "[users.alice]\n"
        f'fwknop_key_base64 = "{base64.b64encode(keys.key).decode()}"\n'
        f'fwknop_hmac_key_base64 = "{base64.b64encode(keys.hmac_key or b"").decode()}"\n'
    )


def test_inspect_reads_stdin_and_touches_no_replay_state(
    cfg: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import io
    import sys

    _spa_config(cfg, capsys)
    payload = packet()
    for _ in range(2):  # the same packet twice: never a replay for inspect
        fake = io.TextIOWrapper(io.BytesIO(payload + b"\n"))
        monkeypatch.setattr(sys, "stdin", fake)
        code, result = inspect(cfg, capsys, "--now", str(NOW), "--source", "198.51.100.10")
        assert code == 0 and result["ok"] and result["replay_checked"] is False
        assert result["timestamp"] == NOW and result["message_type"] == "access"
        assert result["age"] == 0 and result["allow_ip"] == "0.0.0.0"


def test_inspect_says_why_a_packet_is_refused(
    cfg: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _spa_config(cfg, capsys)
    saved = tmp_path / "p.spa"
    saved.write_bytes(packet())
    code, result = inspect(cfg, capsys, "--now", str(NOW + 200), "--file", str(saved))
    assert code == 1
    assert result["reason"] == "spa_too_old" and result["age"] == 200 and not result["ok"]
    assert "note" in result  # no --source given
    saved.write_bytes(b"junk")
    code, result = inspect(cfg, capsys, "--file", str(saved))
    assert code == 1 and result["reason"] == "spa_too_short"


@pytest.mark.parametrize(
    "args",
    [
        ["--source", "not-an-ip"],
        ["--now", "yesterday"],
        ["--now", "-5"],
        ["--now", "nan"],
        ["--file", "/nonexistent/p.spa"],
    ],
)
def test_inspect_usage_errors_exit_2(
    cfg: Path, capsys: pytest.CaptureFixture[str], args: list[str]
) -> None:
    capsys.readouterr()
    assert main(["spa", "inspect", "--config", str(cfg), *args]) == 2
    captured = capsys.readouterr()
    assert "error" in captured.err and captured.out == ""


def test_inspect_with_a_bad_config_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _ = inspect(tmp_path / "missing.toml", capsys, "--file", "/dev/null")
    assert code == 2


def test_user_add_spa_keeps_the_status_off_stdout(
    cfg: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["user", "add", "alice", "--spa", "--host", "198.51.100.1", "--config", str(cfg)]
    capsys.readouterr()
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "daemon" in captured.err and "daemon" not in captured.out
