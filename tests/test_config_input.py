"""Bad configuration input gets a ConfigError naming the key, never a traceback
(issue 15 C): deep nesting, unusable paths, user names with control characters,
settings that void the protection."""

from __future__ import annotations

from pathlib import Path

import pytest

from nfknock.cli import main
from nfknock.config import ConfigError, load_config
from nfknock.sequence import format_base32

SECRET = format_base32(bytes(range(32)))
MINIMAL = "[[protect]]\nport = 22\n"
USERS = f'[users.alice]\nsecret = "{SECRET}"\n'


def write(tmp: Path, config: str, users: str = USERS, sections: str | None = None) -> Path:
    (tmp / "users.toml").write_text(users)
    (tmp / "users.toml").chmod(0o600)
    path = tmp / "nfknock.toml"
    tail = (
        sections
        if sections is not None
        else f'[users]\nfile = "users.toml"\n[control]\nsocket = "{tmp}/ctl.sock"\n'
        f'[state]\npath = "{tmp}/state.json"\n'
    )
    path.write_text(config + "\n" + tail)
    return path


def deep(n: int, kind: str) -> str:
    if kind == "array":
        return "[" * n + "]" * n
    return "{a = " * n + "1" + "}" * n


@pytest.mark.parametrize("kind", ["array", "inline table"])
def test_deep_nesting_in_the_config_is_a_config_error(tmp_path: Path, kind: str) -> None:
    path = write(tmp_path, MINIMAL + f"[knock]\nexclude = {deep(5000, kind)}\n")
    with pytest.raises(ConfigError, match="nesting too deep") as err:
        load_config(path)
    assert err.value.file == str(path)


@pytest.mark.parametrize("kind", ["array", "inline table"])
def test_deep_nesting_in_the_users_file_is_a_config_error(tmp_path: Path, kind: str) -> None:
    path = write(tmp_path, MINIMAL, users=USERS + f"ports = {deep(5000, kind)}\n")
    with pytest.raises(ConfigError, match="nesting too deep") as err:
        load_config(path)
    assert err.value.file.endswith("users.toml")


def test_check_exits_2_on_deep_nesting(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, MINIMAL + f"a = {deep(3000, 'array')}\n")
    assert main(["check", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "nesting too deep" in err and "Traceback" not in err


LONG = "x" * 256
# (section, key, value, problem) -- value is the TOML string's *contents*
BAD_PATHS = [
    ("users", "file", "/etc/users\\u0000.toml", "NUL byte"),
    ("users", "file", f"/tmp/{LONG}/users.toml", "longer than 255 bytes"),
    ("users", "file", "/etc/passwd/x", "/etc/passwd is not a directory"),
    ("users", "file", "/proc/self/mem", "/proc"),
    ("state", "path", "/var/lib/nfknock\\u0000/state.json", "NUL byte"),
    ("state", "path", f"/var/lib/{LONG}.json", "longer than 255 bytes"),
    ("state", "path", "/etc/passwd/state.json", "/etc/passwd is not a directory"),
    ("state", "path", "/proc/self/mem", "/proc"),
    ("state", "path", "/dev/null", "/dev"),
    ("control", "socket", "/run/" + "s" * 103 + ".sock", "108 bytes"),
    ("control", "socket", "/dev/null", "/dev"),
    ("control", "socket", "/etc/passwd/ctl.sock", "/etc/passwd is not a directory"),
    ("control", "socket", "/run/nfknock\\u0000.sock", "NUL byte"),
]


@pytest.mark.parametrize(("section", "key", "value", "problem"), BAD_PATHS)
def test_unusable_paths_are_config_errors_naming_the_key(
    tmp_path: Path, section: str, key: str, value: str, problem: str
) -> None:
    sections = {
        "users": f'file = "{tmp_path}/users.toml"',
        "state": f'path = "{tmp_path}/state.json"',
        "control": f'socket = "{tmp_path}/ctl.sock"',
    }
    sections[section] = f'{key} = "{value}"'
    text = "".join(f"[{name}]\n{line}\n" for name, line in sections.items())
    path = write(tmp_path, MINIMAL, sections=text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert err.value.key == f"{section}.{key}"
    assert problem in err.value.problem


def test_an_existing_non_socket_at_the_control_path_is_refused(tmp_path: Path) -> None:
    (tmp_path / "ctl.sock").write_text("")
    with pytest.raises(ConfigError, match="not a socket") as err:
        load_config(write(tmp_path, MINIMAL))
    assert err.value.key == "control.socket"


def test_a_directory_at_the_state_path_is_refused(tmp_path: Path) -> None:
    (tmp_path / "state.json").mkdir()
    with pytest.raises(ConfigError, match="is a directory") as err:
        load_config(write(tmp_path, MINIMAL))
    assert err.value.key == "state.path"


def test_a_107_byte_control_socket_path_is_accepted(tmp_path: Path) -> None:
    name = "s" * (107 - len(f"{tmp_path}/"))
    sections = (
        f'[users]\nfile = "users.toml"\n[control]\nsocket = "{tmp_path}/{name}"\n'
        f'[state]\npath = "{tmp_path}/state.json"\n'
    )
    cfg = load_config(write(tmp_path, MINIMAL, sections=sections))
    assert len(str(cfg.control_socket)) == 107


@pytest.mark.parametrize("name", ["alice\\n", "alice\\r", "alice\\u0000", " alice", "al ice"])
def test_user_names_with_control_characters_or_spaces_are_refused(
    tmp_path: Path, name: str
) -> None:
    with pytest.raises(ConfigError, match="user names") as err:
        load_config(write(tmp_path, MINIMAL, users=f'[users."{name}"]\nsecret = "{SECRET}"\n'))
    assert err.value.file.endswith("users.toml")


@pytest.mark.parametrize(
    ("knock", "weak"),
    [
        ("length = 1", "1 knock"),
        ("length = 4", "4 knocks"),
        ("length = 7", "7 knocks"),
        ("port_min = 2000\nport_max = 2099\nlength = 8", "bits"),
    ],
)
def test_check_warns_on_sequences_too_short_to_be_secure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], knock: str, weak: str
) -> None:
    path = write(tmp_path, f"[knock]\n{knock}\n" + MINIMAL)
    assert main(["check", "--config", str(path)]) == 0
    err = capsys.readouterr().err
    assert "warning:" in err and "knock.length" in err and weak in err


def test_the_default_sequence_gets_no_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check", "--config", str(write(tmp_path, MINIMAL))]) == 0
    assert capsys.readouterr().err == ""


def test_a_short_per_user_totp_knockd_rs_sequence_is_warned_about(tmp_path: Path) -> None:
    users = (
        '[users.rs]\nscheme = "totp-knockd-rs"\nsecret_utf8 = "correct horse battery staple"\n'
        "length = 3\n"
    )
    cfg = load_config(write(tmp_path, MINIMAL, users=users))
    assert any("users.rs.length" in w and "3 knocks" in w for w in cfg.warnings)


@pytest.mark.parametrize("network", ["0.0.0.0/0", "::/0"])
def test_an_allow_entry_for_everyone_is_refused(tmp_path: Path, network: str) -> None:
    path = write(tmp_path, MINIMAL + f'[[allow]]\nnetwork = "{network}"\n')
    with pytest.raises(ConfigError, match="every address") as err:
        load_config(path)
    assert err.value.key == "allow[0].network"


@pytest.mark.parametrize("network", ["0.0.0.0/1", "2000::/3"])
def test_a_very_wide_allow_entry_is_warned_about(tmp_path: Path, network: str) -> None:
    cfg = load_config(write(tmp_path, MINIMAL + f'[[allow]]\nnetwork = "{network}"\n'))
    assert any("allow[0].network" in w and "without knocking" in w for w in cfg.warnings)


def test_an_admin_network_allow_entry_gets_no_warning(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, MINIMAL + '[[allow]]\nnetwork = "203.0.113.0/24"\n'))
    assert cfg.warnings == ()


@pytest.mark.parametrize("value", ["1" + "0" * 400, "9007199254740993", "1e400", "nan", "-inf"])
def test_absurd_numbers_for_a_float_key_are_config_errors(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, MINIMAL + f"[door]\nopen_seconds = {value}\n"))
    assert err.value.key == "door.open_seconds"


def test_a_number_with_thousands_of_digits_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="thousands of digits"):
        load_config(write(tmp_path, MINIMAL + "[door]\nmax_connections = " + "1" * 5000 + "\n"))
