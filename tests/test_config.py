"""Configuration: defaults, every error names file, key and problem; check exits 2."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from nfknock.cli import main
from nfknock.config import ConfigError, load_config
from nfknock.sequence import format_base32

SECRET = format_base32(bytes(range(32)))


def write(tmp: Path, config: str, users: str | None = None, mode: int = 0o600) -> Path:
    users_text = users if users is not None else f'[users.alice]\nsecret = "{SECRET}"\n'
    (tmp / "users.toml").write_text(users_text)
    (tmp / "users.toml").chmod(mode)
    path = tmp / "nfknock.toml"
    path.write_text(config + '\n[users]\nfile = "users.toml"\n')
    return path


MINIMAL = "[[protect]]\nport = 22\n"


def test_minimal_config_gets_the_documented_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, MINIMAL))
    assert cfg.queue.number == 0 and cfg.queue.max_len == 8192
    k = cfg.knock
    assert (k.port_min, k.port_max, k.length, k.step_seconds, k.skew_steps) == (
        1024,
        33791,
        32,
        30,
        1,
    )
    assert (k.sequence_timeout, k.reorder_window, k.stray_budget) == (10.0, 4, 32)
    assert (cfg.door.open_seconds, cfg.door.max_connections) == (30.0, 1)
    assert cfg.limits.max_sources == 65536
    assert [u.name for u in cfg.users] == ["alice"]
    assert cfg.users_file == tmp_path / "users.toml"


def test_the_issue_example_config_is_valid(tmp_path: Path) -> None:
    text = """
[queue]
number = 0
max_len = 8192
[knock]
scheme = "v1"
port_min = 1024
port_max = 33791
length = 32
step_seconds = 30
skew_steps = 1
realm = ""
sequence_timeout = 10.0
reorder_window = 4
stray_budget = 32
exclude = []
[door]
open_seconds = 30
max_connections = 1
[[protect]]
port = 22
[[protect]]
port = 22
address = "198.51.100.20"
[limits]
max_sources = 65536
[state]
path = "/var/lib/nfknock/state.db"
"""
    cfg = load_config(write(tmp_path, text))
    assert cfg.protect[1].address == ipaddress.ip_address("198.51.100.20")


def test_protected_ports_are_excluded_from_knocks(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "[knock]\nexclude = [8080]\n[[protect]]\nport = 2222\n"))
    assert cfg.sequence_params().exclude == {8080, 2222}


@pytest.mark.parametrize(
    ("config", "key", "problem"),
    [
        ("[knock]\nlenght = 3\n" + MINIMAL, "knock.lenght", "unknown key"),
        ("[bogus]\n" + MINIMAL, "bogus", "unknown key"),
        ("[knock]\nlength = 0\n" + MINIMAL, "knock.length", "outside"),
        ('[knock]\nlength = "32"\n' + MINIMAL, "knock.length", "must be int"),
        ("[knock]\nport_min = 5000\nport_max = 4000\n" + MINIMAL, "knock.port_max", "below"),
        ('[knock]\nscheme = "v9"\n' + MINIMAL, "knock.scheme", "not one of"),
        ("[knock]\nexclude = [70000]\n" + MINIMAL, "knock.exclude", "not a port"),
        ("[door]\nmax_connections = true\n" + MINIMAL, "door.max_connections", "must be int"),
        ("", "protect", "at least one"),
        ("[[protect]]\nport = 99999\n", "protect[0].port", "outside"),
        ('[[protect]]\naddress = "198.51.100.1"\n', "protect[0].port", "is required"),
        ('[[protect]]\nport = 22\naddress = "nope"\n', "protect[0].address", "not an IPv4"),
        (MINIMAL + "[[protect]]\nport = 22\n", "protect[1]", "listed twice"),
        (MINIMAL + '[[allow]]\nnetwork = "10.0.0.1/8"\n', "allow[0].network", "not a network"),
        ('[log]\nlevel = "loud"\n' + MINIMAL, "log.level", "not one of"),
        ("[knock]\nport_min = 1000\nport_max = 1010\n" + MINIMAL, "knock", "fewer than"),
    ],
)
def test_config_errors_name_file_key_and_problem(
    tmp_path: Path, config: str, key: str, problem: str
) -> None:
    path = write(tmp_path, config)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.file == str(path)
    assert info.value.key == key
    assert problem in info.value.problem


def test_invalid_toml_is_reported_with_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[knock\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(path)


def test_missing_config_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "absent.toml")


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o622])
def test_users_file_readable_or_writable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    with pytest.raises(ConfigError, match="must not be readable"):
        load_config(write(tmp_path, MINIMAL, mode=mode))


@pytest.mark.parametrize(
    ("users", "key", "problem"),
    [
        ('[users.alice]\nsecret = "AAAA"\n', "users.alice.secret", "at least 16 bytes"),
        ("[users.alice]\nports = [22]\n", "users.alice.secret", "is required"),
        (
            f'[users.alice]\nsecret = "{SECRET}"\nports = [23]\n',
            "users.alice.ports",
            "not protected",
        ),
        (f'[users.alice]\nsecret = "{SECRET}"\nshell = 1\n', "users.alice.shell", "unknown key"),
        (f'[users."bad name"]\nsecret = "{SECRET}"\n', "users.bad name", "user names"),
        (
            f'[users.alice]\nsecret = "{SECRET}"\nenabled = "yes"\n',
            "users.alice.enabled",
            "must be bool",
        ),
    ],
)
def test_users_file_errors_name_the_key(tmp_path: Path, users: str, key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, MINIMAL, users))
    assert info.value.key == key
    assert problem in info.value.problem
    assert info.value.file.endswith("users.toml")


def test_secrets_never_appear_in_reprs(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, MINIMAL))
    assert SECRET not in repr(cfg) and "secret=" not in repr(cfg.users[0])


def test_check_exits_0_on_a_valid_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check", "--config", str(write(tmp_path, MINIMAL))]) == 0
    assert "OK" in capsys.readouterr().out


def test_check_exits_2_and_names_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "[door]\nopen_seconds = -1\n" + MINIMAL)
    assert main(["check", "--config", str(path)]) == 2
    assert f"{path}: door.open_seconds: -1.0 is outside" in capsys.readouterr().err


# --- schemes in the users file --------------------------------------------------


def test_weak_scheme_cannot_be_the_global_default(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="opt-in per user"):
        load_config(write(tmp_path, '[knock]\nscheme = "livingstone"\n' + MINIMAL))


def test_users_may_opt_into_compat_schemes_with_warnings(tmp_path: Path) -> None:
    users = (
        '[users.old]\nscheme = "livingstone"\nsecret = "GEZDGNBVGY3TQOJQ"\n'
        '[users.rs]\nscheme = "totp-knockd-rs"\nsecret_utf8 = "correct horse battery staple"\n'
        "port_min = 2000\nport_max = 2999\nlength = 8\n"
        '[users.hotp]\nscheme = "kommen"\nsecret = "DefaultSecretKey"\ncounter = 1\n'
    )
    cfg = load_config(write(tmp_path, MINIMAL, users))
    by_name = {u.name: u for u in cfg.users}
    assert by_name["old"].scheme is not None and by_name["old"].scheme.name == "livingstone"
    assert by_name["rs"].secret == b"correct horse battery staple"
    assert by_name["hotp"].initial_counter == 1
    text = "\n".join(cfg.warnings)
    assert "users.old: scheme 'livingstone' is weak (~20 bits" in text
    assert "users.hotp: scheme 'kommen' is weak (~31 bits" in text
    assert "users.old: the secret is 10 bytes" in text


@pytest.mark.parametrize(
    ("users", "key", "problem"),
    [
        ('[users.a]\nscheme = "rot13"\nsecret = "x"\n', "users.a.scheme", "not one of"),
        (f'[users.a]\nsecret = "{SECRET}"\nport_min = 2000\n', "users.a.port_min", "unknown key"),
        ('[users.a]\nsecret_utf8 = "short"\n', "users.a.secret_utf8", "at least 16 bytes"),
        (f'[users.a]\nsecret = "{SECRET}"\nsecret_utf8 = "x"\n', "users.a.secret", "only one"),
        (
            '[users.a]\nscheme = "totp-knockd-rs"\nsecret_utf8 = "x"\nlength = 40\n',
            "users.a.scheme",
            "at most 512",
        ),
    ],
)
def test_scheme_errors_name_the_key(tmp_path: Path, users: str, key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, MINIMAL, users))
    assert info.value.key == key and problem in info.value.problem


def test_livingstone_needs_30_second_steps(tmp_path: Path) -> None:
    users = '[users.old]\nscheme = "livingstone"\nsecret = "GEZDGNBVGY3TQOJQ"\n'
    with pytest.raises(ConfigError, match="30 s steps"):
        load_config(write(tmp_path, "[knock]\nstep_seconds = 60\n" + MINIMAL, users))


def test_check_prints_scheme_warnings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    users = '[users.old]\nscheme = "livingstone"\nsecret = "GEZDGNBVGY3TQOJQ"\n'
    assert main(["check", "--config", str(write(tmp_path, MINIMAL, users))]) == 0
    assert "warning:" in capsys.readouterr().err


def test_queue_and_spa_sections_have_documented_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, MINIMAL))
    q = cfg.queue
    assert (q.number, q.knock_number, q.batch, q.workers) == (0, 1, 64, 1)
    assert list(q.priority_queues()) == [0] and list(q.knock_queues()) == [1]
    s = cfg.spa
    assert s.ports == frozenset({62201})
    assert (s.max_age, s.max_open_seconds) == (120, 300)
    assert (s.rate_per_source, s.rate_burst, s.rate_global) == (4, 8, 500)


def test_workers_widen_both_queue_ranges_without_overlap(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "[queue]\nnumber = 10\nworkers = 3\n" + MINIMAL))
    assert list(cfg.queue.priority_queues()) == [10, 11, 12]
    assert list(cfg.queue.knock_queues()) == [13, 14, 15]


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        ("[queue]\nnumber = 4\nknock_number = 4\n", "queue.knock_number", "overlap"),
        ("[queue]\nnumber = 4\nworkers = 2\nknock_number = 5\n", "queue.knock_number", "overlap"),
        ("[queue]\nbatch = 0\n", "queue.batch", "outside"),
        ("[spa]\nports = [22]\n", "spa.ports", "protected"),
        ("[spa]\nports = [2000]\n", "spa.ports", "knock range"),
        ("[spa]\nmax_age = 0\n", "spa.max_age", "outside"),
        ("[spa]\nbogus = 1\n", "spa.bogus", "unknown key"),
    ],
)
def test_bad_queue_and_spa_settings_name_the_key(
    tmp_path: Path, text: str, key: str, problem: str
) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text + MINIMAL))
    assert err.value.key == key
    assert problem in err.value.problem


def test_spa_can_be_switched_off_and_may_sit_on_an_excluded_port(tmp_path: Path) -> None:
    off = load_config(write(tmp_path, "[spa]\nports = []\n" + MINIMAL))
    assert off.spa.ports == frozenset()
    inside = load_config(
        write(tmp_path, "[knock]\nexclude = [2000]\n[spa]\nports = [2000]\n" + MINIMAL)
    )
    assert inside.spa.ports == frozenset({2000})


# --- [state]: the backend ------------------------------------------------------------


def test_the_state_backend_is_embedded_unless_redis_is_chosen(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, MINIMAL))
    assert cfg.state.backend == "embedded" and cfg.state.url == ""
    text = MINIMAL + '[state]\nbackend = "redis"\nurl = "rediss://:pw@10.0.0.5:6380/2"\n'
    cfg = load_config(write(tmp_path, text))
    assert (cfg.state.backend, cfg.state.prefix, cfg.state.timeout) == ("redis", "nfknock", 1.0)
    assert cfg.state.describe() == "redis (rediss://:***@10.0.0.5:6380/2, prefix 'nfknock')"
    assert any("prefer password_file" in w for w in cfg.warnings)
    assert "pw" not in repr(cfg.state)


def test_the_redis_password_comes_from_a_private_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "redis.pw").write_text("hunter2-and-more\n")
    (tmp_path / "redis.pw").chmod(0o600)
    text = (
        MINIMAL + '[state]\nbackend = "redis"\nurl = "unix:///run/redis/redis.sock?db=1"\n'
        'password_file = "redis.pw"\nprefix = "gw-pair.1"\ntimeout = 0.25\n'
    )
    path = write(tmp_path, text)
    cfg = load_config(path)
    assert cfg.state.password == "hunter2-and-more"  # noqa: S105
    assert cfg.state.prefix == "gw-pair.1"
    assert "hunter2" not in repr(cfg)
    assert main(["check", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "state redis (unix:///run/redis/redis.sock?db=1, prefix 'gw-pair.1')" in out
    assert "hunter2" not in out
    (tmp_path / "redis.pw").chmod(0o640)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == "state.password_file" and "chmod 600" in info.value.problem


REDIS = '[state]\nbackend = "redis"\n'


@pytest.mark.parametrize(
    ("state", "key", "problem"),
    [
        ('[state]\nbackend = "etcd"\n', "state.backend", "not one of embedded, redis"),
        ('[state]\nurl = "redis://h"\n', "state.url", 'only used with backend = "redis"'),
        ('[state]\nprefix = "x"\n', "state.prefix", "only used with"),
        (REDIS, "state.url", "is required"),
        (REDIS + 'url = "http://h"\n', "state.url", "must start with redis://"),
        (REDIS + 'url = "redis://"\n', "state.url", "no host"),
        (REDIS + 'url = "redis://h:99999"\n', "state.url", "is not a URL"),
        (REDIS + 'url = "redis://h/x"\n', "state.url", "must be a number"),
        (REDIS + 'url = "redis://h?socket_timeout=9"\n', "state.url", "no query"),
        (REDIS + 'url = "unix://host/sock"\n', "state.url", "names a socket path"),
        (REDIS + 'url = "redis://h"\nprefix = "a b"\n', "state.prefix", "is not 1-64"),
        (REDIS + 'url = "redis://h"\nprefix = ""\n', "state.prefix", "is not 1-64"),
        (REDIS + 'url = "redis://h"\ntimeout = 0\n', "state.timeout", "outside"),
        (REDIS + 'url = "redis://h"\nca_file = "x"\n', "state.ca_file", "only used with a rediss"),
        (REDIS + 'url = "rediss://h"\nca_file = "nope.pem"\n', "state.ca_file", "not a readable"),
        (REDIS + 'url = "redis://h"\npassword_file = "nope"\n', "state.password_file", "not found"),
        (REDIS + 'url = "redis://:pw@h"\npassword_file = "users.toml"\n', "state.password_file",
         "in one place"),
        (REDIS + 'url = "redis://h"\nhost = "h"\n', "state.host", "unknown key"),
    ],
)  # fmt: skip
def test_state_errors_name_the_key(tmp_path: Path, state: str, key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, MINIMAL + state))
    assert info.value.key == key
    assert problem in info.value.problem
    assert "pw@" not in str(info.value)
