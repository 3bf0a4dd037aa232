"""Who may change what nfknock reads and writes (issue 15 A.5).

Modes are explicit whatever the umask; config and users files (and every directory
above them) that anyone but root or the user running nfknock could change are
refused.  The situations are built for real: files chowned to ``nobody``, world-
writable directories in the test's own tmp tree.
"""

from __future__ import annotations

import os
import pwd
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from nfknock.cli import main
from nfknock.config import ConfigError, load_config
from nfknock.fileio import atomic_write
from nfknock.sequence import format_base32

NOBODY = pwd.getpwnam("nobody")
SECRET = format_base32(bytes(range(32)))

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 and os.environ.get("CI") != "true",
    reason="chown to another user needs root",
)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask_000() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def init(tmp_path: Path, config: Path) -> Path:
    argv = ["init", "--config", str(config), "--state", str(tmp_path / "var" / "state.json")]
    assert main([*argv, "--socket", str(tmp_path / "run" / "ctl.sock")]) == 0
    return config


def test_init_under_umask_000_creates_private_directories(tmp_path: Path, umask_000: None) -> None:
    config = init(tmp_path, tmp_path / "etc" / "nfknock" / "nfknock.toml")
    assert mode(tmp_path / "etc") == 0o700
    assert mode(tmp_path / "etc" / "nfknock") == 0o700
    assert mode(config) == 0o600
    assert mode(config.with_name("users.toml")) == 0o600


def test_atomic_write_under_umask_000_creates_private_parents(
    tmp_path: Path, umask_000: None
) -> None:
    target = tmp_path / "a" / "b" / "state.json"
    atomic_write(target, b"{}\n")
    assert mode(tmp_path / "a") == mode(tmp_path / "a" / "b") == 0o700
    assert mode(target) == 0o600


def test_daemon_control_socket_directories_are_private_under_umask_000(
    tmp_path: Path, umask_000: None
) -> None:
    from nfknock.control import ControlServer, Mailbox

    config = init(tmp_path, tmp_path / "etc" / "nfknock.toml")
    mailbox = Mailbox()
    server = ControlServer(load_config(config).control_socket, mailbox)
    try:
        assert mode(tmp_path / "run") == 0o700
        assert mode(tmp_path / "run" / "ctl.sock") == 0o600
    finally:
        server.close()
        mailbox.close()


def check(config: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["check", "--config", str(config)])
    return code, capsys.readouterr().err


@needs_root
def test_users_file_replaced_by_another_users_0600_file_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The reproduced attack: an unprivileged user swaps in their own 0600 users file."""
    config = init(tmp_path, tmp_path / "etc" / "nfknock.toml")
    users = config.with_name("users.toml")
    users.write_text(f'[users.mallory]\nsecret = "{SECRET}"\n')
    os.chown(users, NOBODY.pw_uid, NOBODY.pw_gid)
    users.chmod(0o600)
    code, err = check(config, capsys)
    assert code == 2
    assert f"{users}: owned by nobody (uid {NOBODY.pw_uid})" in err
    assert f"chown root {users}" in err


@needs_root
def test_config_file_owned_by_another_user_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = init(tmp_path, tmp_path / "etc" / "nfknock.toml")
    os.chown(config, NOBODY.pw_uid, NOBODY.pw_gid)
    code, err = check(config, capsys)
    assert code == 2 and f"{config}: owned by nobody" in err


def test_config_file_writable_by_group_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = init(tmp_path, tmp_path / "etc" / "nfknock.toml")
    config.chmod(0o664)
    code, err = check(config, capsys)
    assert code == 2
    assert "writable by group or others (mode 0664" in err and f"chmod go-w {config}" in err


@pytest.mark.parametrize("depth", [0, 1, 2])
def test_a_world_writable_directory_above_the_users_file_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], depth: int
) -> None:
    config = init(tmp_path, tmp_path / "a" / "b" / "etc" / "nfknock.toml")
    weak = config.parents[depth]
    weak.chmod(0o777)
    code, err = check(config, capsys)
    assert code == 2
    assert f"{weak}: a directory above it is writable by group or others (mode 0777" in err
    assert f"chmod go-w {weak}" in err


@needs_root
def test_a_directory_owned_by_another_user_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = init(tmp_path, tmp_path / "etc" / "nfknock.toml")
    os.chown(config.parent, NOBODY.pw_uid, NOBODY.pw_gid)
    code, err = check(config, capsys)
    assert code == 2 and f"{config.parent}: a directory above it is owned by nobody" in err


def test_a_sticky_world_writable_directory_is_accepted_when_the_entries_are_root_owned(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Like /tmp: others may create names there, but not replace root's entries."""
    config = init(tmp_path, tmp_path / "shared" / "nfknock.toml")
    config.parent.chmod(0o1777)
    assert check(config, capsys)[0] == 0


@needs_root
def test_a_users_file_symlink_owned_by_another_user_in_a_sticky_directory_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = init(tmp_path, tmp_path / "etc" / "nfknock.toml")
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    link = shared / "users.toml"
    link.symlink_to(config.with_name("users.toml"))
    os.lchown(link, NOBODY.pw_uid, NOBODY.pw_gid)
    config.write_text(config.read_text().replace(str(config.with_name("users.toml")), str(link)))
    code, err = check(config, capsys)
    assert code == 2 and f"{link}: owned by nobody" in err


def test_a_reload_with_a_tampered_users_file_keeps_the_running_users(tmp_path: Path) -> None:
    """The attack ended with a reload: it must now be refused."""
    from nfknock.logs import EventLogger
    from nfknock.service import Service

    config = init(tmp_path, tmp_path / "etc" / "nfknock.toml")
    service = Service(load_config(config), EventLogger())
    config.parent.chmod(0o777)
    with pytest.raises(ConfigError, match="writable by group or others"):
        service.reload()
    assert service.cfg.users == ()
