"""Grant prefixes in the configuration: [door] defaults, per-user keys, errors naming
the key, warnings for wide prefixes, and what ``nfknock check`` says."""

from __future__ import annotations

from pathlib import Path

import pytest

from nfknock.cli import main
from nfknock.config import ConfigError, load_config

from .test_config import MINIMAL, SECRET, write


def users(*extra: str) -> str:
    return f'[users.alice]\nsecret = "{SECRET}"\n{"".join(extra)}[users.bob]\nsecret = "{SECRET}"\n'


def test_grants_open_the_exact_address_by_default(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, MINIMAL))
    assert (cfg.door.grant_prefix_v4, cfg.door.grant_prefix_v6) == (32, 128)
    [alice] = cfg.users
    assert (alice.grant_prefix_v4, alice.grant_prefix_v6) == (32, 128)
    assert alice.grant_prefix(4) is None and alice.grant_prefix(16) is None
    assert not any("grant_prefix" in w for w in cfg.warnings)


def test_door_prefixes_are_every_users_default_and_a_user_may_differ(tmp_path: Path) -> None:
    door = "[door]\ngrant_prefix_v4 = 24\ngrant_prefix_v6 = 64\n"
    cfg = load_config(write(tmp_path, door + MINIMAL, users("grant_prefix_v6 = 56\n")))
    by_name = {u.name: u for u in cfg.users}
    assert (by_name["alice"].grant_prefix(4), by_name["alice"].grant_prefix(16)) == (24, 56)
    assert (by_name["bob"].grant_prefix(4), by_name["bob"].grant_prefix(16)) == (24, 64)
    assert not any("grant_prefix" in w for w in cfg.warnings)  # /24, /56, /64: not wide


def test_a_user_may_narrow_back_to_the_exact_address(tmp_path: Path) -> None:
    door = "[door]\ngrant_prefix_v6 = 64\n"
    cfg = load_config(write(tmp_path, door + MINIMAL, users("grant_prefix_v6 = 128\n")))
    by_name = {u.name: u for u in cfg.users}
    assert by_name["alice"].grant_prefix(16) is None and by_name["bob"].grant_prefix(16) == 64


@pytest.mark.parametrize(
    ("config", "users_text", "key", "problem"),
    [
        ("[door]\ngrant_prefix_v4 = 7\n", None, "door.grant_prefix_v4", "7 is outside 8..32"),
        ("[door]\ngrant_prefix_v4 = 33\n", None, "door.grant_prefix_v4", "outside 8..32"),
        ("[door]\ngrant_prefix_v4 = 0\n", None, "door.grant_prefix_v4", "outside 8..32"),
        ('[door]\ngrant_prefix_v4 = "24"\n', None, "door.grant_prefix_v4", "must be int"),
        ("[door]\ngrant_prefix_v4 = 24.0\n", None, "door.grant_prefix_v4", "must be int"),
        ("[door]\ngrant_prefix_v6 = true\n", None, "door.grant_prefix_v6", "must be int"),
        ("[door]\ngrant_prefix_v6 = 15\n", None, "door.grant_prefix_v6", "outside 16..128"),
        ("[door]\ngrant_prefix_v6 = 129\n", None, "door.grant_prefix_v6", "outside 16..128"),
        (
            "",
            users("grant_prefix_v6 = 200\n"),
            "users.alice.grant_prefix_v6",
            "outside 16..128",
        ),
        ("", users("grant_prefix_v4 = -1\n"), "users.alice.grant_prefix_v4", "outside 8..32"),
        ("", users("grant_prefix = 24\n"), "users.alice.grant_prefix", "unknown key"),
    ],
)
def test_bad_grant_prefixes_are_refused_naming_the_key(
    tmp_path: Path, config: str, users_text: str | None, key: str, problem: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, config + MINIMAL, users_text))
    assert info.value.key == key and problem in info.value.problem


def test_wide_prefixes_are_warned_about_where_they_are_set(tmp_path: Path) -> None:
    door = "[door]\ngrant_prefix_v4 = 16\n"
    cfg = load_config(write(tmp_path, door + MINIMAL, users("grant_prefix_v6 = 40\n")))
    wide = [w for w in cfg.warnings if "grant_prefix" in w]
    assert len(wide) == 2, wide  # [door] v4 and alice's own v6: not the v4 she inherits
    assert any("door.grant_prefix_v4: a grant opens a /16 (65,536 addresses)" in w for w in wide)
    assert any("users.alice.grant_prefix_v6: a grant opens a /40" in w for w in wide)


def test_check_shows_what_grants_open(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--config", str(write(tmp_path, MINIMAL))]) == 0
    assert "grants open the client's IPv4 /32 and IPv6 /128 (its address only)" in (
        capsys.readouterr().out
    )
    door = "[door]\ngrant_prefix_v6 = 64\n"
    path = write(tmp_path, door + MINIMAL, users("grant_prefix_v4 = 24\n"))
    assert main(["check", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert (
        "grants open the client's IPv4 /32 and IPv6 /64; users with their own: alice /24 and /64"
        in out
    )
