"""nfknock-client against the real daemon in network namespaces."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from nfknock.netlab import PY, SERVER4, SERVER6, Lab
from nfknock.sequence import format_base32

from .conftest import OTHER_SECRET, SECRET

pytestmark = pytest.mark.kernel


def setup(lab: Lab, users: dict[str, bytes] | None = None, **sections: object) -> Path:
    lab.start_service()
    cfg = lab.write_config(users or {"alice": SECRET}, **sections)
    lab.install_rules(cfg)
    lab.start_daemon(cfg)
    return cfg


def away_from_boundary(step: int = 30, margin: float = 2.0) -> None:
    if time.time() % step > step - margin:
        time.sleep(margin + 0.2)


def knock(lab: Lab, env: dict[str, str], *args: str) -> tuple[int, dict[str, object]]:
    proc = lab.client_cmd("knock", *args, "--json", env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    return proc.returncode, (json.loads(lines[-1]) if lines else {"stderr": proc.stderr})


@pytest.mark.parametrize("address", [SERVER4, SERVER6], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("raw", [False, True], ids=["connect", "raw"])
def test_knock_then_connect(
    lab: Lab, secret_file: Path, client_env: dict[str, str], address: str, raw: bool
) -> None:
    setup(lab, door={"max_connections": 2})
    away_from_boundary()
    code, out = knock(
        lab,
        client_env,
        address,
        "--secret-file",
        str(secret_file),
        "--check",
        *(["--raw"] if raw else []),
    )
    assert code == 0, out
    assert out["ok"] is True and out["counter"] == 0
    assert lab.probe(address)["result"] == "open"  # the second of two connections


def test_plain_knock_does_not_spend_the_connection(
    lab: Lab, secret_file: Path, client_env: dict[str, str]
) -> None:
    setup(lab)
    away_from_boundary()
    code, out = knock(lab, client_env, SERVER4, "--secret-file", str(secret_file))
    assert code == 0 and "door not checked" in str(out["message"])
    assert lab.probe(SERVER4)["result"] == "open"


def test_second_client_of_the_same_user_resyncs_by_itself(
    lab: Lab, secret_file: Path, client_env: dict[str, str], tmp_path: Path
) -> None:
    setup(lab)
    away_from_boundary(margin=4)
    other_env = {"XDG_STATE_HOME": str(tmp_path / "laptop2"), "XDG_CONFIG_HOME": str(tmp_path)}
    code1, out1 = knock(lab, client_env, SERVER4, "--secret-file", str(secret_file), "--check")
    code2, out2 = knock(lab, other_env, SERVER4, "--secret-file", str(secret_file), "--check")
    assert (code1, out1["counter"]) == (0, 0)
    assert (code2, out2["counter"]) == (0, 1), out2
    assert any(e["event"] == "protected_reject" for e in lab.log_events())


def test_second_knock_in_the_same_step_starts_at_the_next_counter(
    lab: Lab, secret_file: Path, client_env: dict[str, str]
) -> None:
    setup(lab)
    away_from_boundary(margin=4)
    knock(lab, client_env, SERVER4, "--secret-file", str(secret_file), "--check")
    code, out = knock(lab, client_env, SERVER4, "--secret-file", str(secret_file), "--check")
    assert (code, out["counter"]) == (0, 1)
    assert not any(e["event"] == "protected_reject" for e in lab.log_events())


def test_knocks_with_loss_free_duplicates_and_reordering_still_open(
    lab: Lab, secret_file: Path, client_env: dict[str, str]
) -> None:
    setup(lab)
    away_from_boundary()
    seq = lab.client_cmd("sequence", "--secret-file", str(secret_file), "--json", env=client_env)
    ports = json.loads(seq.stdout)["ports"]
    rng = random.Random(1)
    order = sorted(range(len(ports)), key=lambda i: i + rng.uniform(0, 4))
    sent = [ports[i] for i in order for _ in range(1 + (rng.random() < 0.4))]
    assert sent != ports
    lab.send_knocks(SERVER4, sent)
    assert lab.probe(SERVER4)["result"] == "open"


def test_knockd_knock_client_sending_our_sequence_opens(
    lab: Lab, secret_file: Path, client_env: dict[str, str]
) -> None:
    if shutil.which("knock") is None:
        pytest.fail("knockd's knock client is not installed (apt-get install knockd)")
    setup(lab)
    away_from_boundary()
    seq = lab.client_cmd("sequence", "--secret-file", str(secret_file), env=client_env)
    ports = seq.stdout.split()
    assert len(ports) == 32
    lab.sh(lab.client, "knock", "-d", "1", SERVER4, *ports)
    assert lab.probe(SERVER4)["result"] == "open"


def test_profile_printed_by_user_add_works_when_pasted(
    lab: Lab, client_env: dict[str, str]
) -> None:
    cfg = setup(lab)
    out = lab.nfknock(
        "user", "add", "dave", "--config", str(cfg), "--host", SERVER4, "--profile", "lab"
    ).stdout
    profile = out[out.index("# nfknock-client profile") : out.index("# or on the command line")]
    client_toml = Path(client_env["XDG_CONFIG_HOME"]) / "nfknock" / "client.toml"
    client_toml.parent.mkdir(parents=True)
    client_toml.write_text(profile)
    client_toml.chmod(0o600)
    away_from_boundary()
    code, result = knock(lab, client_env, "--profile", "lab", "--check")
    assert code == 0, result


SSHD_CONFIG = """Port 2222
ListenAddress 0.0.0.0
HostKey {dir}/host_ed25519
AuthorizedKeysFile {dir}/authorized_keys
PidFile {dir}/sshd.pid
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
"""


@dataclass
class Sshd:
    """A real OpenSSH server in the lab's server namespace, on port 2222."""

    dir: Path
    key: Path


@pytest.fixture
def sshd(lab: Lab, tmp_path: Path) -> Sshd:
    binary = shutil.which("sshd") or "/usr/sbin/sshd"
    if not Path(binary).exists():
        pytest.fail("OpenSSH server is not installed (apt-get install openssh-server)")
    d = tmp_path / "ssh"
    d.mkdir()
    for name in ("host_ed25519", "client"):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)],
            check=True,
            timeout=30,
        )
    (d / "authorized_keys").write_text((d / "client.pub").read_text())
    (d / "sshd_config").write_text(SSHD_CONFIG.format(dir=d))
    Path("/run/sshd").mkdir(exist_ok=True)
    setup(lab, protect=[{"port": 22}, {"port": 2222}])
    lab.spawn(
        lab.server, binary, "-D", "-e", "-f", str(d / "sshd_config"), log=tmp_path / "sshd.log"
    )
    deadline = time.monotonic() + 10
    while not lab.sh(lab.server, "ss", "-Htln", "sport = :2222").stdout.strip():
        assert time.monotonic() < deadline, "sshd did not start"
        time.sleep(0.05)
    return Sshd(d, d / "client")


def write_client_profile(
    client_env: dict[str, str], secret_file: Path, port: int = 22, name: str = "lab"
) -> None:
    client_toml = Path(client_env["XDG_CONFIG_HOME"]) / "nfknock" / "client.toml"
    client_toml.parent.mkdir(parents=True, exist_ok=True)
    client_toml.write_text(
        f'[profiles.{name}]\nhost = "{SERVER4}"\nport = {port}\nsecret_file = "{secret_file}"\n'
        "exclude = [22, 2222]\n"
    )
    client_toml.chmod(0o600)


def ssh_argv(lab: Lab, sshd: Sshd, *command: str) -> list[str]:
    proxy = f"{PY} -m nfknock_client.cli knock --pipe --profile lab"
    return [
        "ip",
        "netns",
        "exec",
        lab.client,
        "ssh",
        "-F",
        "none",
        "-i",
        str(sshd.key),
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "BatchMode=yes",
        "-o",
        f"ProxyCommand={proxy}",
        "root@lab",
        *command,
    ]


def test_ssh_through_pipe_as_proxycommand_runs_a_remote_command(
    lab: Lab, sshd: Sshd, secret_file: Path, client_env: dict[str, str], tmp_path: Path
) -> None:
    away_from_boundary(margin=5)
    write_client_profile(client_env, secret_file, port=2222)
    proc = subprocess.run(
        ssh_argv(lab, sshd, "echo", "hello-from-$(hostname)-$((6*7))"),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, **client_env},
    )
    assert proc.returncode == 0, proc.stderr + (tmp_path / "sshd.log").read_text()
    assert re.match(r"hello-from-.*-42", proc.stdout.strip())


def completed_counters(lab: Lab) -> list[tuple[int, int]]:
    """(step, counter) of every sequence the daemon completed, in order."""
    out = []
    for e in lab.log_events():
        if e.get("event") == "sequence_completed":
            m = re.fullmatch(r"step (\d+) counter (\d+)", str(e["reason"]))
            assert m, e
            out.append((int(m[1]), int(m[2])))
    return out


def test_eight_concurrent_ssh_proxycommands_of_one_profile_all_get_in_at_once(
    lab: Lab, sshd: Sshd, secret_file: Path, client_env: dict[str, str], tmp_path: Path
) -> None:
    """15 B.17: Ansible, scp beside ssh: parallel ProxyCommands from one host."""
    away_from_boundary(margin=15)
    write_client_profile(client_env, secret_file, port=2222)
    env = {**os.environ, **client_env}
    start = time.monotonic()
    procs = [
        subprocess.Popen(
            ssh_argv(lab, sshd, "echo", f"session-{i}"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(8)
    ]
    results = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate(timeout=10)
        results.append((proc.returncode, out.strip(), err))
    elapsed = time.monotonic() - start
    print(f"eight concurrent ssh sessions: {elapsed:.2f}s")
    assert [r[:2] for r in results] == [(0, f"session-{i}") for i in range(8)], results
    assert elapsed < 10, f"eight sessions took {elapsed:.1f}s"
    counters = completed_counters(lab)
    assert len(counters) == 8 and len(set(counters)) == 8, counters
    assert not any(e["event"] == "protected_drop" for e in lab.log_events())


def drop_one_knock_once(lab: Lab, port: int) -> None:
    """The client's namespace drops the next SYN to ``port`` once, as a lossy path
    would: with ``--every 1000 --packet 0`` the first packet matches and the next 999
    do not (checked against this kernel's iptables-nft)."""
    lab.sh(
        lab.client,
        "iptables",
        "-A",
        "OUTPUT",
        "-p",
        "tcp",
        "--syn",
        "--dport",
        str(port),
        "-m",
        "statistic",
        "--mode",
        "nth",
        "--every",
        "1000",
        "--packet",
        "0",
        "-j",
        "DROP",
    )


def pipe_through(
    lab: Lab, env: dict[str, str], *args: str, stdin: bytes = b"hello\n", timeout: float = 90
) -> tuple[subprocess.CompletedProcess[bytes], float]:
    argv = ["ip", "netns", "exec", lab.client, PY, "-m", "nfknock_client.cli", "knock", "--pipe"]
    start = time.monotonic()
    proc = subprocess.run(
        [*argv, *args],
        input=stdin,
        capture_output=True,
        timeout=timeout,
        check=False,
        env={**os.environ, **env},
    )
    return proc, time.monotonic() - start


def test_pipe_whose_knock_was_lost_gets_in_at_once_by_resending(
    lab: Lab, secret_file: Path, client_env: dict[str, str]
) -> None:
    """15 B.16: one knock of the first attempt never arrives; the client must not
    wait for the next step."""
    setup(lab)
    away_from_boundary(margin=12)
    seq = lab.client_cmd("sequence", "--secret-file", str(secret_file), "--json", env=client_env)
    ports = json.loads(seq.stdout)["ports"]
    drop_one_knock_once(lab, ports[7])
    proc, elapsed = pipe_through(lab, client_env, SERVER4, "--secret-file", str(secret_file))
    print(f"lost knock, then in: {elapsed:.2f}s")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"nfknock-ok\nhello\n"
    assert elapsed < 10, f"took {elapsed:.1f}s (the step is 30s)"
    assert [c for _, c in completed_counters(lab)] == [0]  # the same counter, resent


def test_pipe_after_a_plain_knock_that_never_arrived_gets_in_at_once(
    lab: Lab, secret_file: Path, client_env: dict[str, str]
) -> None:
    """15 B.16: a plain knock (no confirmation) lost one SYN; the next --pipe gets in
    well within the step instead of waiting for the next one."""
    setup(lab)
    away_from_boundary(margin=14)
    seq = lab.client_cmd("sequence", "--secret-file", str(secret_file), "--json", env=client_env)
    drop_one_knock_once(lab, json.loads(seq.stdout)["ports"][3])
    code, _out = knock(lab, client_env, SERVER4, "--secret-file", str(secret_file))
    assert code == 0
    assert lab.probe(SERVER4)["result"] == "timeout"  # the door did not open
    proc, elapsed = pipe_through(lab, client_env, SERVER4, "--secret-file", str(secret_file))
    print(f"plain knock lost, then --pipe in: {elapsed:.2f}s")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"nfknock-ok\nhello\n"
    # With the server's look-ahead counter 1 opens at once (without it, counter 1
    # timed out twice before the unconfirmed 0 opened: ~6 s).
    assert elapsed < 12, f"took {elapsed:.1f}s (the step is 30s)"


def test_plain_knock_after_a_lost_plain_knock_opens_with_the_counter_window(
    lab: Lab, secret_file: Path, client_env: dict[str, str]
) -> None:
    """15 B.16 for plain knock: counter 0 lost, the next plain knock takes counter 1."""
    setup(lab)
    away_from_boundary(margin=4)
    seq = lab.client_cmd("sequence", "--secret-file", str(secret_file), "--json", env=client_env)
    drop_one_knock_once(lab, json.loads(seq.stdout)["ports"][3])
    assert knock(lab, client_env, SERVER4, "--secret-file", str(secret_file))[1]["counter"] == 0
    code, out = knock(lab, client_env, SERVER4, "--secret-file", str(secret_file))
    assert (code, out["counter"]) == (0, 1)
    assert lab.probe(SERVER4)["result"] == "open"


@pytest.mark.parametrize("stdin", ["/dev/null", "regular-file"])
def test_pipe_with_stdin_not_a_pipe_exits_2_before_knocking(
    lab: Lab, secret_file: Path, client_env: dict[str, str], tmp_path: Path, stdin: str
) -> None:
    """15 C: it used to open the door, spend the connection, then print a traceback."""
    setup(lab)
    path = Path("/dev/null") if stdin == "/dev/null" else tmp_path / "input"
    if stdin != "/dev/null":
        path.write_bytes(b"hello\n")
    argv = ["ip", "netns", "exec", lab.client, PY, "-m", "nfknock_client.cli", "knock"]
    with path.open("rb") as f:
        proc = subprocess.run(
            [*argv, "--pipe", SERVER4, "--secret-file", str(secret_file)],
            stdin=f,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env={**os.environ, **client_env},
        )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "--pipe" in proc.stderr
    assert not any(e["event"] == "sequence_completed" for e in lab.log_events())


def test_check_says_it_spent_the_only_connection_and_what_to_do(
    lab: Lab, secret_file: Path, client_env: dict[str, str]
) -> None:
    """15 B.18: --check opened and spent the default budget's only connection."""
    setup(lab)
    away_from_boundary()
    code, out = knock(lab, client_env, SERVER4, "--secret-file", str(secret_file), "--check")
    assert code == 0
    message = str(out["message"])
    assert "max_connections" in message and "--pipe" in message, message
    assert lab.probe(SERVER4)["result"] == "timeout"  # what the message warns about


# --- errors and exit codes ---------------------------------------------------------


def test_wrong_secret_fails_after_two_steps_with_exit_1(
    lab: Lab, client_env: dict[str, str], tmp_path: Path
) -> None:
    setup(lab, knock={"step_seconds": 2})
    wrong = tmp_path / "wrong"
    wrong.write_text(format_base32(OTHER_SECRET))
    wrong.chmod(0o600)
    code, out = knock(
        lab,
        client_env,
        SERVER4,
        "--secret-file",
        str(wrong),
        "--check",
        "--step",
        "2",
        "--timeout",
        "0.5",
    )
    assert code == 1
    assert "wrong secret" in str(out["message"]) and "clock" in str(out["message"])


def test_resync_exhausted_exits_3(
    lab: Lab, secret_file: Path, client_env: dict[str, str], tmp_path: Path
) -> None:
    setup(lab, knock={"step_seconds": 600}, limits={"stale_counters": 16})
    busy = {"XDG_STATE_HOME": str(tmp_path / "busy"), "XDG_CONFIG_HOME": str(tmp_path)}
    for _ in range(9):  # another client of alice opens nine times in this step
        code, _out = knock(
            lab, busy, SERVER4, "--secret-file", str(secret_file), "--check", "--step", "600"
        )
        assert code == 0
    code, out = knock(
        lab, client_env, SERVER4, "--secret-file", str(secret_file), "--check", "--step", "600"
    )
    assert code == 3, out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--profile", "nope"], "client.toml not found"),
        (["198.51.100.1", "--secret-file", "/nonexistent"], "not found"),
        (["host.invalid", "--secret-file", "SECRET"], "cannot resolve"),
        (["198.51.100.1", "--secret-file", "SECRET", "--port", "70000"], "outside 1-65535"),
        (["198.51.100.1", "--secret-file", "SECRET", "--range", "9-1"], "port range"),
        (["198.51.100.1"], "--secret-file is required"),
    ],
)
def test_input_errors_exit_2_with_a_clear_message(
    lab: Lab, secret_file: Path, client_env: dict[str, str], args: list[str], message: str
) -> None:
    args = [str(secret_file) if a == "SECRET" else a for a in args]
    proc = lab.client_cmd("knock", *args, env=client_env)
    assert proc.returncode == 2
    assert message in proc.stderr


def test_secret_file_readable_by_others_is_refused(
    lab: Lab, secret_file: Path, client_env: dict[str, str]
) -> None:
    secret_file.chmod(0o644)
    proc = lab.client_cmd("knock", SERVER4, "--secret-file", str(secret_file), env=client_env)
    assert proc.returncode == 2 and "chmod 600" in proc.stderr


def test_knockd_knock_client_opens_for_a_livingstone_user(lab: Lab, tmp_path: Path) -> None:
    """Seed 001's setup: knockd's `knock` sending the two TOTP-derived ports."""
    if shutil.which("knock") is None:
        pytest.fail("knockd's knock client is not installed (apt-get install knockd)")
    lab.start_service()
    cfg = lab.write_config({})
    users = lab.workdir / "users.toml"
    users.write_text('[users.old]\nscheme = "livingstone"\nsecret = "GEZDGNBVGY3TQOJQ"\n')
    lab.install_rules(cfg)
    lab.start_daemon(cfg)
    assert any(e["event"] == "config_warning" for e in lab.log_events())
    away_from_boundary()
    out = lab.nfknock(
        "sequence", "--scheme", "livingstone", "--secret-base32", "GEZDGNBVGY3TQOJQ", "--json"
    ).stdout
    ports = json.loads(out)["ports"]
    lab.sh(lab.client, "knock", "-d", "1", SERVER4, *map(str, ports))
    assert lab.probe(SERVER4)["result"] == "open"
    lab.sh(lab.client, "knock", "-d", "1", SERVER4, *map(str, ports))  # a replay
    assert lab.probe(SERVER4)["result"] == "reset"


def test_exec_runs_the_command_once_knocked_and_returns_its_status(
    lab: Lab, secret_file: Path, client_env: dict[str, str]
) -> None:
    setup(lab)
    away_from_boundary()
    proc = lab.client_cmd(
        "knock",
        SERVER4,
        "--secret-file",
        str(secret_file),
        "--exec",
        f"{PY} -m nfknock.netlab.probe {SERVER4} 22; exit 7",
        env=client_env,
    )
    assert proc.returncode == 7
    assert json.loads(proc.stdout)["result"] == "open"
    assert "door not checked" in proc.stderr
