"""nfknock-client without a network: profiles, secrets, arguments, the state file,
--pipe's stdin/stdout, the relay, SYN crafting.  (Counters: test_client_counters.py;
the lock: test_client_lock.py.)"""

from __future__ import annotations

import argparse
import json
import os
import pty
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path

import dpkt
import pytest

from nfknock.sequence import format_base32
from nfknock_client import cli, knock
from nfknock_client.knock import syn_segment

SECRET = bytes(range(32))


@pytest.fixture
def xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    (tmp_path / "cfg" / "nfknock").mkdir(parents=True)
    return tmp_path / "cfg" / "nfknock" / "client.toml"


def write_profile(path: Path, body: str, mode: int = 0o600) -> None:
    path.write_text(body)
    path.chmod(mode)


def test_profile_with_inline_secret_loads(xdg: Path) -> None:
    write_profile(
        xdg,
        f'[profiles.srv]\nhost = "h"\nport = 2222\nsecret = "{format_base32(SECRET)}"\n'
        'realm = "r"\nexclude = [22, 2222]\n',
    )
    t = cli.load_profile("srv")
    assert (t.host, t.port, t.secret, t.options["realm"]) == ("h", 2222, SECRET, b"r")
    assert t.options["exclude"] == {22, 2222}


@pytest.mark.parametrize(
    ("body", "mode", "message"),
    [
        ('[profiles.srv]\nhost = "h"\nsecret = "AAAA"\n', 0o600, "at least 16 bytes"),
        ('[profiles.srv]\nsecret = "x"\n', 0o600, "profiles.srv.host: is required"),
        ('[profiles.srv]\nhost = "h"\n', 0o600, "needs secret, secret_utf8 or secret_file"),
        ('[profiles.srv]\nhost = "h"\nsecret_file = "/nope"\n', 0o600, "not found"),
        ('[profiles.srv]\nhost = "h"\nsekret = "x"\n', 0o600, "sekret: unknown key"),
        ('[profiles.srv]\nhost = "h"\n', 0o644, "chmod 600"),
        ("[profiles.srv\n", 0o600, "client config"),
        ('[profiles.other]\nhost = "h"\n', 0o600, "no profile 'srv' (profiles: other)"),
        (
            f'[profiles.srv]\nhost = "h"\nport = 0\nsecret = "{format_base32(SECRET)}"\n',
            0o600,
            "outside 1-65535",
        ),
    ],
)
def test_bad_profiles_are_refused_with_a_precise_message(
    xdg: Path, body: str, mode: int, message: str
) -> None:
    write_profile(xdg, body, mode)
    with pytest.raises(cli.ClientError, match=message.replace("(", r"\(").replace(")", r"\)")):
        cli.load_profile("srv")


def test_bad_profile_exits_2_with_json_when_asked(
    xdg: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_profile(xdg, '[profiles.srv]\nhost = "h"\n')
    assert cli.main(["knock", "--profile", "srv", "--json"]) == 2
    assert json.loads(capsys.readouterr().out)["exit"] == 2


def test_sequence_command_excludes_the_protected_port(
    xdg: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = tmp_path / "s"
    secret.write_text(format_base32(SECRET))
    secret.chmod(0o600)
    assert (
        cli.main(
            [
                "sequence",
                "--secret-file",
                str(secret),
                "--port",
                "2222",
                "--json",
                "--range",
                "2000-2300",
                "--length",
                "200",
            ]
        )
        == 0
    )
    ports = json.loads(capsys.readouterr().out)["ports"]
    assert 2222 not in ports and len(ports) == 200


@pytest.mark.parametrize("family", [4, 6])
def test_raw_syn_segment_has_a_valid_checksum(family: int) -> None:
    if family == 4:
        src, dst = bytes([198, 51, 100, 10]), bytes([198, 51, 100, 1])
        pseudo = src + dst + struct.pack("!BBH", 0, 6, 20)
    else:
        src = b"\x20\x01\x0d\xb8" + bytes(11) + b"\x10"
        dst = b"\x20\x01\x0d\xb8" + bytes(11) + b"\x01"
        pseudo = src + dst + struct.pack("!I3xB", 20, 6)
    seg = syn_segment(src, dst, 40000, 5000, 7)
    # RFC 1071: the one's-complement sum over pseudo-header and segment, checksum
    # included, is all ones -- dpkt's independent implementation must return 0.
    assert dpkt.in_cksum(pseudo + seg) == 0
    tcp = dpkt.tcp.TCP(seg)
    assert (tcp.flags, tcp.sport, tcp.dport, tcp.seq) == (dpkt.tcp.TH_SYN, 40000, 5000, 7)


# --- profile values of the wrong type -----------------------------------------------

GOOD = f'host = "h"\nsecret = "{format_base32(SECRET)}"\n'


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("port = true", "profiles.srv.port: expected an integer, got a boolean (True)"),
        ('port = "22"', "profiles.srv.port: expected an integer, got a string ('22')"),
        ("port = 22.5", "profiles.srv.port: expected an integer, got a number (22.5)"),
        ("port = 70000", "profiles.srv.port: 70000 is outside 1-65535"),
        ("exclude = 5", "profiles.srv.exclude: expected a list of port numbers"),
        ("exclude = [true]", "profiles.srv.exclude: expected a list of port numbers"),
        ('exclude = ["22"]', "profiles.srv.exclude: expected a list of port numbers"),
        ("length = {a = 1}", "profiles.srv.length: expected an integer, got a dict"),
        ("step_seconds = 0", "profiles.srv.step_seconds: 0 is outside 1-"),
        ("counter = -1", "profiles.srv.counter: -1 is outside 0-"),
        ("realm = 5", "profiles.srv.realm: expected a string"),
        ('scheme = "v2"', "profiles.srv.scheme: 'v2' is not one of"),
        ('secret_utf8 = "x"', "exactly one, not secret and secret_utf8"),
    ],
)
def test_profile_values_of_the_wrong_type_are_refused_by_key(
    xdg: Path, extra: str, message: str
) -> None:
    write_profile(xdg, f"[profiles.srv]\n{GOOD}{extra}\n")
    with pytest.raises(cli.ClientError) as err:
        cli.load_profile("srv")
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('host = 5\nsecret = "x"', "profiles.srv.host: expected a string, got an integer"),
        ('host = ""\nsecret = "x"', "profiles.srv.host: is required"),
        ('secret_file = 5\nhost = "h"', "profiles.srv.secret_file: expected a string"),
    ],
)
def test_profile_host_and_secret_types_are_checked(xdg: Path, body: str, message: str) -> None:
    write_profile(xdg, f"[profiles.srv]\n{body}\n")
    with pytest.raises(cli.ClientError, match=message):
        cli.load_profile("srv")


@pytest.mark.parametrize(
    "text",
    ['profiles = "srv"', "profiles = [1, 2]", "[profiles]\nsrv = 3", "a = " + "[" * 5000],
)
def test_malformed_client_configs_exit_2_without_a_traceback(
    xdg: Path, text: str, capsys: pytest.CaptureFixture[str]
) -> None:
    write_profile(xdg, text + "\n")
    assert cli.main(["knock", "--profile", "srv"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and str(xdg) in err


# --- command-line arguments ------------------------------------------------------------


@pytest.fixture
def secret(tmp_path: Path, xdg: Path) -> Path:
    path = tmp_path / "secret"
    path.write_text(format_base32(SECRET))
    path.chmod(0o600)
    return path


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--timeout", "nan"], "--timeout must be between"),
        (["--timeout", "0"], "--timeout must be between"),
        (["--pace-ms=-1"], "--pace-ms must be between"),
        (["--lock-wait", "inf"], "--lock-wait must be between"),
        (["--counter=-1"], "a counter is an integer >= 0"),
        (["--counter", "x"], "not an integer"),
        (["--pipe", "--json"], "--json cannot be combined with --pipe"),
        (["--pipe", "--exec", "true"], "not allowed with argument"),
    ],
)
def test_bad_option_values_exit_2_with_usage(
    secret: Path, args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["knock", "127.0.0.1", "--secret-file", str(secret), *args])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["127.0.0.1", "--secret-file", "a\0b"], "embedded null"),
        (["a\0b", "--secret-file", "SECRET"], "cannot resolve"),
        (["x" * 300, "--secret-file", "SECRET"], "cannot resolve"),
        (["127.0.0.1", "--secret-file", "SECRET", "--exec", "a\0b"], "NUL byte"),
        (["127.0.0.1", "--secret-file", "SECRET", "--counter", "70000"], "above 65535"),
        (["127.0.0.1", "--secret-file", "SECRET", "--step", "0"], "at least 1 second"),
        (["127.0.0.1", "--secret-file", "SECRET", "--length", "100000"], "length"),
        (["127.0.0.1", "--secret-file", "SECRET", "--exclude", "a,b"], "not a port"),
        (["127.0.0.1", "--secret-file", "/"], "not a regular file"),
    ],
)
def test_bad_values_exit_2_with_a_message_and_no_traceback(
    secret: Path, args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [str(secret) if a == "SECRET" else a for a in args]
    assert cli.main(["knock", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_realm_of_undecodable_bytes_is_used_as_bytes(
    secret: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    realm = b"\xff\xfe".decode(errors="surrogateescape")
    assert cli.main(["sequence", "--secret-file", str(secret), "--realm", realm]) == 0


def test_every_option_says_its_default() -> None:
    parser = cli._parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, command in sub.choices.items():
        for action in command._actions:
            if action.dest != "help":
                assert action.help and "default" in action.help, (name, action.dest)


# --- the state file and the state directory ---------------------------------------------


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("garbage", "not valid JSON"),
        ("[" * 100000, "nested too deeply"),
        ("null", "expected a JSON object"),
        ('{"version": 2, "profiles": {"h": {"step": 1e400, "sent": [], "used": []}}}', "step"),
        ('{"version": 2, "profiles": {"h": {"step": 1, "sent": [true], "used": []}}}', "sent"),
        ('{"version": 2, "profiles": {"h": {"step": 1, "sent": [-1], "used": []}}}', "sent"),
        ('{"version": 2, "profiles": {"h": {"step": 1, "sent": []}}}', "{step, sent, used}"),
        ('{"version": 3, "profiles": {}}', "expected {version: 2, profiles}"),
        ('{"h": {"step": 1, "counter": "1"}}', "'h'.counter"),
        ('{"h": {"step": 1, "counter": 1, "x": 2}}', "expected {step, counter}"),
        (b"\xff\xfe", "not UTF-8"),
    ],
)
def test_a_corrupt_state_file_exits_2_naming_it_and_nothing_is_knocked(
    secret: Path, content: str | bytes, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = cli.state_path()
    path.parent.mkdir(parents=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    sent: list[object] = []
    io_ = cli.KnockIO(send=lambda *a: sent.append(a))
    assert cli.main(["knock", "127.0.0.1", "--secret-file", str(secret)], io=io_) == 2
    err = capsys.readouterr().err
    assert message in err and str(path) in err and "remove it" in err
    assert sent == [] and "Traceback" not in err


def test_the_state_file_of_the_previous_version_is_read_as_sent(secret: Path) -> None:
    path = cli.state_path()
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"127.0.0.1": {"step": 1_000_000, "counter": 4}}))
    io_ = cli.KnockIO(clock=lambda: 30_000_001.0, send=lambda *a: None)
    assert cli.main(["knock", "127.0.0.1", "--secret-file", str(secret), "--json"], io=io_) == 0
    data = json.loads(path.read_text())
    assert data["profiles"]["127.0.0.1"] == {"step": 1_000_000, "sent": [4, 5], "used": []}


@pytest.mark.parametrize("how", ["a file", "relative", "no home", "state is a directory"])
def test_an_unusable_state_directory_exits_2_before_knocking(
    secret: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    how: str,
) -> None:
    if how == "a file":
        (tmp_path / "f").write_text("")
        monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "f"))
        expected = "cannot create the state directory"
    elif how == "state is a directory":
        cli.state_path().mkdir(parents=True)
        expected = "cannot read the client state"
    elif how == "relative":
        monkeypatch.setenv("XDG_STATE_HOME", "relative/dir")
        expected = "must be an absolute path"
    else:
        monkeypatch.delenv("XDG_STATE_HOME")
        monkeypatch.delenv("HOME", raising=False)
        monkeypatch.setattr(Path, "home", lambda: (_ for _ in ()).throw(RuntimeError("no")))
        expected = "neither $XDG_STATE_HOME nor $HOME is set"
    sent: list[object] = []
    io_ = cli.KnockIO(send=lambda *a: sent.append(a))
    assert cli.main(["knock", "127.0.0.1", "--secret-file", str(secret)], io=io_) == 2
    assert expected in capsys.readouterr().err and sent == []


# --- --pipe: stdin/stdout checked before knocking; the relay ends cleanly -----------------


def test_pipe_problem_accepts_pipes_and_sockets_only(tmp_path: Path) -> None:
    r, w = os.pipe()
    a, b = socket.socketpair()
    f = (tmp_path / "file").open("w+b")
    null = os.open(os.devnull, os.O_RDWR)
    master, tty = pty.openpty()
    try:
        assert knock.pipe_problem(r, w) is None
        assert knock.pipe_problem(a.fileno(), b.fileno()) is None
        assert knock.pipe_problem(f.fileno(), w) == "stdin is a regular file"
        assert knock.pipe_problem(null, w) == "stdin is a character device"
        assert knock.pipe_problem(tty, w) == "stdin is a terminal"
        assert knock.pipe_problem(r, tty) == "stdout is a terminal"
        assert knock.pipe_problem(w, r) == "stdin is not open for reading"
        os.close(w)
        assert knock.pipe_problem(r, w) == "stdout is closed"
    finally:
        for fd in (r, null, master, tty):
            os.close(fd)
        for closable in (a, b, f):
            closable.close()


PIPE_ARGV = [sys.executable, "-m", "nfknock_client.cli", "knock", "--pipe"]


@pytest.mark.parametrize("stdin", ["/dev/null", "file"])
def test_pipe_with_a_bad_stdin_exits_2_before_anything_is_knocked(
    secret: Path, tmp_path: Path, stdin: str
) -> None:
    path = Path(os.devnull) if stdin == "/dev/null" else tmp_path / "in"
    if stdin == "file":
        path.write_bytes(b"data")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    with path.open("rb") as f:
        proc = subprocess.run(
            [*PIPE_ARGV, "127.0.0.1", "--secret-file", str(secret)],
            stdin=f,
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            check=False,
        )
    assert proc.returncode == 2, proc.stderr
    assert "nothing was knocked" in proc.stderr and "Traceback" not in proc.stderr
    assert not cli.state_path().exists()


def _relay_pair() -> tuple[socket.socket, socket.socket, int, int, int, int]:
    conn, peer = socket.socketpair()
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    return conn, peer, in_r, in_w, out_r, out_w


def test_relay_copies_both_ways_and_ends_0_when_the_server_closes() -> None:
    conn, peer, in_r, in_w, out_r, out_w = _relay_pair()
    os.write(in_w, b"ping")
    os.close(in_w)
    result: list[tuple[int, str | None]] = []
    t = threading.Thread(target=lambda: result.append(knock.relay(conn, in_r, out_w)))
    t.start()
    assert peer.recv(10) == b"ping" and peer.recv(10) == b""  # stdin EOF half-closes
    peer.sendall(b"pong")
    peer.close()
    t.join(10)
    assert result == [(0, None)] and os.read(out_r, 10) == b"pong"
    for fd in (in_r, out_r, out_w):
        os.close(fd)


def test_relay_ends_0_when_the_reader_of_stdout_is_gone() -> None:
    conn, peer, in_r, in_w, out_r, out_w = _relay_pair()
    os.close(out_r)  # ssh exited
    peer.sendall(b"data")
    assert knock.relay(conn, in_r, out_w) == (0, None)
    for fd in (in_r, in_w, out_w):
        os.close(fd)
    peer.close()


def test_relay_ends_1_with_a_message_when_the_connection_is_reset() -> None:
    conn, peer, in_r, in_w, out_r, out_w = _relay_pair()
    conn.close()
    conn = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(conn.getsockname())
    server_side, _ = conn.accept()
    conn.close()
    server_side.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    server_side.close()  # RST
    code, message = knock.relay(client, in_r, out_w)
    assert code == 1 and message is not None and "lost" in message
    for fd in (in_r, in_w, out_r, out_w):
        os.close(fd)
    peer.close()
