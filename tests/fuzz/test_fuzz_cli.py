"""Random argument vectors for ``nfknock`` and ``nfknock-client``: every one ends
in exit 0, 1 or 2 (the client: 0-3), never in a traceback.

In-process for speed (an escaping exception fails the test), plus a few real
subprocesses with raw bytes in argv.  Nothing here may touch the machine: config
paths that are written to are always in a fresh temporary directory, ``rules``
never gets --install/--remove/--verify, ``run`` and ``demo`` are never drawn, and
the client's network functions are replaced by ones that refuse (belt and braces:
the vocabulary never holds a usable secret for ``knock`` either).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from nfknock.cli import main as nfknock_main
from nfknock_client import cli as client_cli

from .conftest import budget
from .targets import SECRET, run_quietly, write_setup

FUZZ = budget(500)

NUMBERS = ["0", "-1", "1", "2", "32", "65535", "65536", "1e400", "nan", "inf", "-inf"]
NUMBERS += ["1" + "0" * 30, "0x10", "abc", "", " 5", "\u0663", "1.5", "-0"]
TEXT = st.text(
    st.characters(codec="utf-8") | st.sampled_from("\x00\n\u202e/-=,"),
    max_size=40,
)
# Free-form tokens never start with "-": argparse would expand an abbreviation
# such as "--rem" to a real option.
JUNK = TEXT.filter(lambda s: not s.startswith("-")) | st.sampled_from(
    ["--", "-", "--bogus", "-x", "--help", "-h", "--version"]
)
PORTS = st.sampled_from(["22", "22,2222", "", "0", "70000", "22,,22", "a,b", "1-5", "-22"]) | TEXT
RANGES = st.sampled_from(["1024-33791", "1-1", "5-1", "0-65536", "a-b", "-", "1024"]) | TEXT
NAMES = st.sampled_from(["alice", "bob", "alice\n", "a" * 65, "", "-x", "é", "..", "a b"]) | TEXT


def option(name: str, values: st.SearchStrategy[str]) -> st.SearchStrategy[list[str]]:
    return values.map(lambda v: [name, v])


def flag(name: str) -> st.SearchStrategy[list[str]]:
    return st.just([name])


def argv_of(
    head: list[str], options: list[st.SearchStrategy[list[str]]]
) -> st.SearchStrategy[list[str]]:
    parts = st.lists(st.one_of(*options, JUNK.map(lambda j: [j])), max_size=6)
    return parts.map(lambda ps: head + [t for p in ps for t in p])


def nfknock_vectors(tmp: Path) -> st.SearchStrategy[list[str]]:
    config = str(tmp / "nfknock.toml")
    tmp_paths = st.sampled_from(
        [config, str(tmp / "absent.toml"), str(tmp / "users.toml"), str(tmp), str(tmp / "x")]
    )
    any_paths = tmp_paths | st.sampled_from(
        ["/etc/passwd/x", "/proc/self/mem", "/dev/null", "/", "", "/" + "n" * 300]
    )
    init_dir = tmp / "init"
    numbers = st.one_of(st.sampled_from(NUMBERS), st.sampled_from(NUMBERS), TEXT)
    schemes = st.sampled_from(["v1", "totp-knockd-rs", "livingstone", "kommen", "rot13", ""])
    return st.one_of(
        argv_of(["check"], [option("--config", any_paths)]),
        argv_of(
            ["sequence", "--secret-base32", SECRET],
            [
                option("--scheme", schemes),
                option("--secret-base32", st.sampled_from([SECRET, "AAAA", "!!", ""]) | TEXT),
                option("--secret-utf8", TEXT),
                option("--time", numbers),
                option("--counter", numbers),
                option("--realm", TEXT),
                option("--length", numbers),
                option("--range", RANGES),
                option("--step", numbers),
                option("--exclude", PORTS),
                flag("--json"),
            ],
        ),
        st.tuples(
            st.sampled_from(["add", "list", "disable", "enable", "rekey", "revoke", "bogus"]),
            NAMES,
        ).flatmap(
            lambda an: argv_of(
                ["user", an[0], an[1], "--config", config, "--host", "198.51.100.1"],
                [
                    option("--config", tmp_paths),
                    option("--ports", PORTS),
                    option("--host", st.sampled_from(["198.51.100.1", "", "::1"]) | TEXT),
                    option("--profile", TEXT),
                    option("--scheme", schemes),
                ],
            )
        ),
        argv_of(
            ["rules", "--config", config],
            [
                option("--config", tmp_paths),
                option(
                    "--format", st.sampled_from(["iptables", "ip6tables", "nftables", "aws-sg"])
                ),
                option("--format", TEXT),
            ],
        ),
        argv_of(
            ["init", "--config", str(init_dir / "nfknock.toml")],
            [
                option("--config", st.sampled_from([str(init_dir / "c.toml"), config])),
                option("--users-file", st.sampled_from([str(init_dir / "u.toml"), config])),
                option("--state", any_paths | TEXT),
                option("--socket", any_paths | TEXT),
                flag("--force"),
                flag("--force-users"),
            ],
        ),
        argv_of(["status", "--config", config], [flag("--json"), option("--config", tmp_paths)]),
        argv_of(["reload", "--config", config], [option("--config", tmp_paths)]),
    )


FORBIDDEN = ("--install", "--remove", "--verify")


def harmless(argv: list[str]) -> bool:
    """No rules change, daemon or demo can follow from ``argv``."""
    if argv[0] in ("run", "demo"):
        return False
    return not any(
        len(t) > 2 and any(f.startswith(t.split("=")[0]) for f in FORBIDDEN) for t in argv
    )


@pytest.fixture
def no_side_effects() -> Iterator[None]:
    """Whatever a vector reaches, it cannot change the firewall or start anything."""

    from nfknock.rules import RulesError

    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("the fuzzer reached an action it must never take")

    def firewall_refuses(*_: object, **__: object) -> None:
        # What a reload reaches: the firewall saying no is an ordinary outcome (exit 1).
        raise RulesError("the fuzzer's firewall refuses every change")

    with (
        mock.patch("nfknock.rules.apply", firewall_refuses),
        mock.patch("nfknock.rules.reapply", refuse),
        mock.patch("nfknock.rules.remove", refuse),
        mock.patch("nfknock.rules.check", refuse),
        mock.patch("nfknock.daemon.Daemon.run", refuse),
        mock.patch("nfknock.demo.run_demo", refuse),
    ):
        yield


@FUZZ
@given(data=st.data())
def test_nfknock_argument_vectors_exit_0_1_or_2(no_side_effects: None, data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory(prefix="nfknock-fuzz-") as tmp:
        write_setup(Path(tmp))
        argv = data.draw(nfknock_vectors(Path(tmp)).filter(harmless), label="argv")
        code, _out, err = run_quietly(nfknock_main, argv)
        event(f"nfknock {argv[0]} exit {code}")
        assert code in (0, 1, 2), (code, err)


def client_vectors(tmp: Path) -> st.SearchStrategy[list[str]]:
    files = st.sampled_from(
        [str(tmp / n) for n in ("good.secret", "open.secret", "junk.secret", "absent", "")]
        + [str(tmp)]
    )
    configs = st.sampled_from([str(tmp / "client.toml"), str(tmp / "absent.toml"), str(tmp)])
    numbers = st.one_of(st.sampled_from(NUMBERS), st.sampled_from(NUMBERS), TEXT)
    common = [
        option("--profile", st.sampled_from(["srv", "nosecret", "missing", ""]) | TEXT),
        option("--config", configs),
        option("--secret-file", files),
        option("--scheme", st.sampled_from(["v1", "totp-knockd-rs", "kommen", "nope"])),
        option("--port", numbers),
        option("--realm", TEXT),
        option("--length", numbers),
        option("--range", RANGES),
        option("--step", numbers),
        option("--exclude", PORTS),
        # Small counters only: the client computes a huge one for ever (recorded
        # in tests/test_client_input.py; the client is another engineer's).
        option("--counter", st.sampled_from(["0", "1", "7", "-1", "abc", "", "1e3", "0x1"])),
        flag("--json"),
    ]
    knock_only = [
        flag("-4"),
        flag("-6"),
        flag("--raw"),
        option("--pace-ms", numbers),
        option("--timeout", numbers),
        flag("--pipe"),
        option("--exec", st.just("true")),
        flag("--check"),
    ]
    hosts = st.sampled_from(["198.51.100.7", "2001:db8::7", "", "a b", "x" * 300]) | TEXT
    return st.one_of(
        hosts.flatmap(lambda h: argv_of(["sequence", h], common)),
        hosts.flatmap(lambda h: argv_of(["knock", h], common + knock_only)),
    )


def client_setup(tmp: Path) -> None:
    for name, text, mode in [
        ("good.secret", SECRET, 0o600),
        ("open.secret", SECRET, 0o644),
        ("junk.secret", "not base32 at all\n", 0o600),
    ]:
        (tmp / name).write_text(text)
        (tmp / name).chmod(mode)
    (tmp / "client.toml").write_text(
        f'[profiles.srv]\nhost = "198.51.100.7"\nsecret = "{SECRET}"\n'
        '[profiles.nosecret]\nhost = "198.51.100.7"\n'
    )
    (tmp / "client.toml").chmod(0o600)


@FUZZ
@given(data=st.data())
def test_nfknock_client_argument_vectors_never_raise(data: st.DataObject) -> None:
    def no_network(*_: object, **__: object) -> None:
        raise LookupError("the fuzzing tier never resolves or knocks")

    with tempfile.TemporaryDirectory(prefix="nfknock-fuzz-") as tmp:
        client_setup(Path(tmp))
        env = {"XDG_CONFIG_HOME": tmp, "XDG_STATE_HOME": tmp}
        with mock.patch.dict(os.environ, env), mock.patch.object(client_cli, "resolve", no_network):
            argv = data.draw(client_vectors(Path(tmp)), label="argv")
            code, _out, err = run_quietly(client_cli.main, argv)
        event(f"nfknock-client {argv[0]} exit {code}")
        assert code in (0, 1, 2, 3), (code, err)


# --- real processes ----------------------------------------------------------------

BYTES_TOKENS = st.sampled_from([b"\xff", b"caf\xc3\xa9", b"\xed\xa0\x80", b"a\xffb", b"--\xff"])


@budget(20)
@given(
    command=st.sampled_from(["check", "sequence", "status", "init", "user"]),
    junk=st.lists(BYTES_TOKENS, min_size=1, max_size=3),
)
def test_raw_bytes_in_argv_give_no_traceback(command: str, junk: list[bytes]) -> None:
    with tempfile.TemporaryDirectory(prefix="nfknock-fuzz-") as tmp:
        config = write_setup(Path(tmp))
        head: list[bytes] = {
            "check": [b"check", b"--config", os.fsencode(tmp) + b"/" + junk[0]],
            "sequence": [b"sequence", b"--secret-base32", SECRET.encode(), b"--realm", junk[0]],
            "status": [b"status", b"--config", os.fsencode(config)],
            "init": [b"init", b"--config", os.fsencode(tmp) + b"/" + junk[0] + b"/n.toml"],
            "user": [b"user", b"add", junk[0], b"--config", os.fsencode(config), b"--host", b"h"],
        }[command]
        proc = subprocess.run(
            [os.fsencode(sys.executable), b"-m", b"nfknock.cli", *head, *junk[1:]],
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode in (0, 1, 2), proc.stderr
        assert b"Traceback" not in proc.stderr, proc.stderr.decode(errors="replace")
