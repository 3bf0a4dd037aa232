"""fwknop keys in the users file (issue 10 item 5): parsed, validated, key named."""

from __future__ import annotations

import base64
import ipaddress
from pathlib import Path

import pytest

from nfknock.cli import main
from nfknock.config import ConfigError, load_config
from nfknock.sequence import format_base32

KEY = base64.b64encode(bytes(range(32))).decode()
HKEY = base64.b64encode(bytes(range(100, 164))).decode()
SECRET = format_base32(bytes(range(32)))


def write(tmp: Path, users: str) -> Path:
    (tmp / "users.toml").write_text(users)
    (tmp / "users.toml").chmod(0o600)
    path = tmp / "nfknock.toml"
    path.write_text('[[protect]]\nport = 22\n[users]\nfile = "users.toml"\n')
    return path


def spa_users(tmp: Path, extra: str = "", keys: str | None = None) -> str:
    if keys is None:
        keys = f'fwknop_key_base64 = "{KEY}"\nfwknop_hmac_key_base64 = "{HKEY}"\n'
    return f"[users.alice]\n{keys}{extra}"


def error(tmp: Path, users: str) -> ConfigError:
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp, users))
    return exc.value


def test_an_spa_only_user_is_an_spa_user_and_not_a_knock_user(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, spa_users(tmp_path)))
    assert cfg.users == ()
    (alice,) = cfg.spa_users
    assert alice.spa is not None and alice.secret == b""
    assert alice.spa.key == bytes(range(32)) and alice.spa.hmac_key == bytes(range(100, 164))
    assert (alice.spa.hmac_digest, alice.spa.mode) == ("sha256", "cbc")
    assert (alice.spa.username, alice.spa.sources, alice.spa.allow_any_ip) == (None, None, False)
    assert [u.name for u in cfg.all_users] == ["alice"]


def test_a_user_may_knock_and_send_spa(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, spa_users(tmp_path, f'secret = "{SECRET}"\n')))
    assert [u.name for u in cfg.users] == ["alice"] == [u.name for u in cfg.spa_users]
    assert cfg.users[0].secret == bytes(range(32))


def test_keys_never_show_in_a_repr(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, spa_users(tmp_path)))
    text = repr(cfg.spa_users)
    assert KEY not in text and "bytes(range" not in text
    assert repr(bytes(range(32))) not in text and repr(bytes(range(100, 164))) not in text


def test_every_spa_key_is_read(tmp_path: Path) -> None:
    extra = (
        'fwknop_hmac_digest = "sha3_512"\nfwknop_mode = "ctr"\nfwknop_username = "alice"\n'
        'spa_sources = ["203.0.113.0/24", "2001:db8::/64", "198.51.100.7"]\n'
        'spa_allow_ip = "any"\n'
    )
    keys = load_config(write(tmp_path, spa_users(tmp_path, extra))).spa_users[0].spa
    assert keys is not None
    assert (keys.hmac_digest, keys.mode, keys.username, keys.allow_any_ip) == (
        "sha3_512",
        "ctr",
        "alice",
        True,
    )
    assert keys.sources == (
        ipaddress.ip_network("203.0.113.0/24"),
        ipaddress.ip_network("2001:db8::/64"),
        ipaddress.ip_network("198.51.100.7/32"),
    )


def test_keys_without_base64_padding_are_accepted(tmp_path: Path) -> None:
    keys = f'fwknop_key_base64 = "{KEY.rstrip("=")}"\nfwknop_hmac_key_base64 = "{HKEY}"\n'
    cfg = load_config(write(tmp_path, spa_users(tmp_path, keys=keys)))
    assert cfg.spa_users[0].spa is not None


def test_a_user_with_neither_secret_nor_keys_is_an_error(tmp_path: Path) -> None:
    exc = error(tmp_path, "[users.alice]\nenabled = true\n")
    assert exc.key == "users.alice.secret" and "fwknop keys" in exc.problem


def test_no_hmac_is_opt_in_and_warned(tmp_path: Path) -> None:
    users = spa_users(tmp_path, "fwknop_hmac = false\n", keys=f'fwknop_key_base64 = "{KEY}"\n')
    cfg = load_config(write(tmp_path, users))
    assert cfg.spa_users[0].spa is not None and cfg.spa_users[0].spa.hmac_key is None
    assert any("fwknop_hmac = false" in w for w in cfg.warnings)


def test_legacy_mode_without_hmac_is_warned(tmp_path: Path) -> None:
    users = spa_users(
        tmp_path,
        'fwknop_hmac = false\nfwknop_mode = "legacy"\n',
        keys=f'fwknop_key_base64 = "{KEY}"\n',
    )
    cfg = load_config(write(tmp_path, users))
    assert any("legacy" in w for w in cfg.warnings)


@pytest.mark.parametrize(
    ("keys", "extra", "key", "words"),
    [
        ("", 'fwknop_hmac_digest = "sha256"\n', "fwknop_key_base64", "required"),
        ("", 'spa_sources = ["198.51.100.0/24"]\n', "fwknop_key_base64", "required"),
        (f'fwknop_key_base64 = "{KEY}"\n', "", "fwknop_hmac_key_base64", "required"),
        ('fwknop_key_base64 = "not base64!"\n', "", "fwknop_key_base64", "not base64"),
        ('fwknop_key_base64 = ""\n', "", "fwknop_key_base64", "empty"),
        (
            f'fwknop_key_base64 = "{base64.b64encode(bytes(33)).decode()}"\n',
            "",
            "fwknop_key_base64",
            "33 bytes",
        ),
        (
            f'fwknop_key_base64 = "{KEY}"\n'
            f'fwknop_hmac_key_base64 = "{base64.b64encode(bytes(129)).decode()}"\n',
            "",
            "fwknop_hmac_key_base64",
            "129 bytes",
        ),
        (
            f'fwknop_key_base64 = "{KEY}"\nfwknop_hmac_key_base64 = "{KEY}"\n',
            "",
            "fwknop_hmac_key_base64",
            "equals",
        ),
        (
            f'fwknop_key_base64 = "{KEY}"\nfwknop_hmac_key_base64 = "{HKEY}"\n',
            "fwknop_hmac = false\n",
            "fwknop_hmac_key_base64",
            "fwknop_hmac = false",
        ),
        (None, 'fwknop_hmac_digest = "sha224"\n', "fwknop_hmac_digest", "not one of"),
        (None, 'fwknop_mode = "gcm"\n', "fwknop_mode", "not one of"),
        (None, 'fwknop_mode = "legacy"\n', "fwknop_mode", "fwknop_hmac = false"),
        (None, 'fwknop_username = "a:b"\n', "fwknop_username", "not a username"),
        (None, 'fwknop_username = ""\n', "fwknop_username", "not a username"),
        (None, "fwknop_username = 7\n", "fwknop_username", "must be str"),
        (None, 'spa_sources = "198.51.100.0/24"\n', "spa_sources", "list"),
        (None, "spa_sources = []\n", "spa_sources", "list"),
        (None, 'spa_sources = ["198.51.100.7/24"]\n', "spa_sources", "not a network"),
        (None, "spa_sources = [7]\n", "spa_sources", "not a network"),
        (None, 'spa_allow_ip = "everyone"\n', "spa_allow_ip", "not one of"),
        (None, 'fwknop_hmac = "no"\n', "fwknop_hmac", "must be bool"),
        (None, 'fwknop_spelling = "x"\n', "fwknop_spelling", "unknown key"),
    ],
)
def test_bad_spa_keys_name_file_and_key(
    tmp_path: Path, keys: str | None, extra: str, key: str, words: str
) -> None:
    exc = error(tmp_path, spa_users(tmp_path, extra, keys=keys))
    assert exc.file == str(tmp_path / "users.toml")
    assert exc.key == f"users.alice.{key}"
    assert words in exc.problem


def test_check_exits_2_naming_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, spa_users(tmp_path, 'fwknop_mode = "gcm"\n'))
    assert main(["check", "--config", str(path)]) == 2
    assert "users.alice.fwknop_mode" in capsys.readouterr().err


def test_check_counts_spa_users(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, spa_users(tmp_path))
    assert main(["check", "--config", str(path)]) == 0
    assert "1 with SPA keys" in capsys.readouterr().out
