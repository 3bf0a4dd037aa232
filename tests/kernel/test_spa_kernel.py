"""SPA against the real kernel: the real Debian ``fwknop`` client and ``nfknock-client
spa`` open nfknock's door through the priority queue; nothing they should not opens.

One lab and one daemon serve most tests of this module (``door``): users for every
HMAC digest and mode, one that may name another address, one without HMAC.  Each
test reads only the log lines written since it started and uses every grant it
opens (``max_connections = 1``), so the tests do not see each other.  The daemon's
per-source SPA limit is raised there (the tests send many packets from one
address); the flood test has a lab of its own with the default limits.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from nfknock.netlab import CLIENT4, PY, SERVER4, SERVER6, Lab
from nfknock.sequence import format_base32

from .conftest import SECRET, _require_lab
from .test_client_kernel import SSHD_CONFIG

pytestmark = pytest.mark.kernel

KEY = bytes(range(100, 132))
HMAC_KEY = bytes(range(1, 65))
BOB_KEY, BOB_HMAC = bytes(range(40, 72)), bytes(range(140, 204))
OLD_KEY = b"sixteen-byte-key"
CLIENT2, CLIENT3 = "198.51.100.11", "198.51.100.12"
FLOOD_SOURCE = "192.0.2.77"
FLOOD = Path(__file__).with_name("spa_flood.py")
PROTECT = [{"port": 22}, {"port": 2222}, {"port": 23}]  # alice may open 22 and 2222
# One user per HMAC digest; the modes cycle, so every digest and every mode is used.
DIGEST_MODES = [
    ("md5", "cbc"),
    ("sha1", "cfb"),
    ("sha256", "ofb"),
    ("sha384", "ctr"),
    ("sha512", "ecb"),
    ("sha3_256", "cfb"),
    ("sha3_512", "ctr"),
]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def digest_keys(digest: str) -> tuple[bytes, bytes]:
    n = [d for d, _ in DIGEST_MODES].index(digest)
    return bytes([n + 1]) * 32, bytes([n + 101]) * 64


def users_toml() -> str:
    text = (
        f'[users.alice]\nsecret = "{format_base32(SECRET)}"\nports = [22, 2222]\n'
        f'fwknop_key_base64 = "{b64(KEY)}"\nfwknop_hmac_key_base64 = "{b64(HMAC_KEY)}"\n\n'
        f'[users.bob]\nports = [22]\nspa_allow_ip = "any"\n'
        f'fwknop_key_base64 = "{b64(BOB_KEY)}"\nfwknop_hmac_key_base64 = "{b64(BOB_HMAC)}"\n\n'
        f'[users.old]\nfwknop_key_base64 = "{b64(OLD_KEY)}"\nfwknop_hmac = false\n'
        f'fwknop_mode = "legacy"\nspa_sources = ["{CLIENT3}/32"]\n\n'
    )
    for digest, mode in DIGEST_MODES:
        key, hmac_key = digest_keys(digest)
        text += (
            f'[users.d_{digest}]\nfwknop_key_base64 = "{b64(key)}"\n'
            f'fwknop_hmac_key_base64 = "{b64(hmac_key)}"\n'
            f'fwknop_hmac_digest = "{digest}"\nfwknop_mode = "{mode}"\n\n'
        )
    return text


@dataclass
class Door:
    """The module's lab and daemon, and reading its log from a point on."""

    lab: Lab
    cfg: Path

    def mark(self) -> int:
        return self.lab.daemon_log.stat().st_size

    def events(self, since: int, *kinds: str) -> list[dict[str, Any]]:
        out = []
        for line in self.lab.log_text(since).splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("event") in kinds:
                out.append(event)
        return out

    def spa_codes(self, since: int, n: int, timeout: float = 10.0) -> list[str]:
        """The codes of the first ``n`` SPA results since ``since`` (waits for them:
        the daemon logs after its verdict)."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.events(since, "spa_accepted", "spa_refused")
            if len(found) >= n or time.monotonic() > deadline:
                return [str(e["code"]) for e in found]
            time.sleep(0.02)

    def probe(self, address: str = SERVER4, source: str | None = None) -> str:
        return str(self.lab.probe(address, 22, timeout=3.0, source=source)["result"])

    def shut(self, address: str = SERVER4, source: str | None = None) -> str:
        """A probe expected to time out: a short timeout (a grant answers in ms)."""
        return str(self.lab.probe(address, 22, timeout=1.0, source=source)["result"])


@pytest.fixture(scope="module")
def door(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Door]:
    _require_lab()
    with Lab(tmp_path_factory.mktemp("spa")) as lab:
        lab.add_client_address(f"{CLIENT2}/24")
        lab.add_client_address(f"{CLIENT3}/24")
        lab.start_service()
        cfg = lab.write_config(
            {"alice": SECRET},
            protect=PROTECT,
            spa={"rate_per_source": 200, "rate_burst": 400},
        )
        (lab.workdir / "users.toml").write_text(users_toml())
        lab.install_rules(cfg)
        lab.start_daemon(cfg)
        yield Door(lab, cfg)


def fwknop(
    lab: Lab,
    *args: str,
    key: bytes = KEY,
    hmac_key: bytes | None = HMAC_KEY,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """The real client, from the client namespace, with no ~/.fwknoprc.  Adds ``-A
    tcp/22`` and ``-a <client>`` unless the arguments say otherwise."""
    exe = shutil.which("fwknop")
    if exe is None:
        if os.environ.get("CI") == "true":
            pytest.fail("the fwknop client (Debian fwknop-client) is not installed")
        pytest.skip("the fwknop client is not installed")
    home = lab.workdir / "fwknop-home"
    home.mkdir(exist_ok=True)
    rc = home / ".fwknoprc"
    rc.touch(mode=0o600)
    argv = [exe, "-D", SERVER4, "--no-save-args", "--rc-file", str(rc)]
    argv += ["--key-base64-rijndael", b64(key)]
    if hmac_key is not None:
        argv += ["--use-hmac", "--key-base64-hmac", b64(hmac_key)]
    if "-A" not in args and "--server-cmd" not in args:
        argv += ["-A", "tcp/22"]
    if "-s" not in args and "-a" not in args:
        argv += ["-a", CLIENT4]
    env = {"HOME": str(home), "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    done = subprocess.run(
        ["ip", "netns", "exec", lab.client, *argv, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if check:
        assert done.returncode == 0, done.stderr
    return done


def saved_packet(lab: Lab, *args: str, **keys: Any) -> str:
    """A packet the real client builds but does not send (``--test -B``)."""
    path = lab.workdir / "saved.spa"
    path.unlink(missing_ok=True)
    fwknop(lab, "--test", "-B", str(path), *args, **keys)
    return path.read_text().strip()


def send_payload(lab: Lab, payload: str, source: str = CLIENT4) -> None:
    """One UDP datagram to the SPA port from ``source`` (a saved packet, resent)."""
    code = (
        "import socket,sys; s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);"
        f"s.bind(({source!r},0)); s.sendto(sys.argv[1].encode(),({SERVER4!r},62201))"
    )
    lab.sh(lab.client, PY, "-c", code, payload)


# --- the real fwknop client opens once --------------------------------------------------


@pytest.mark.parametrize("allow", ["-a", "-s"])
def test_the_real_fwknop_client_opens_port_22_once(door: Door, allow: str) -> None:
    since = door.mark()
    fwknop(door.lab, *(["-a", CLIENT4] if allow == "-a" else ["-s"]))
    assert door.probe() == "open"
    assert door.shut() == "timeout"  # one connection per opening
    assert door.spa_codes(since, 1) == ["spa_accepted"]
    [opened] = door.events(since, "grant_opened")
    assert opened["user"] == "alice" and opened["src"] == CLIENT4


def test_the_syn_form_of_the_real_client_opens(door: Door) -> None:
    since = door.mark()
    fwknop(door.lab, "-P", "tcpraw")
    assert door.probe() == "open"
    assert door.spa_codes(since, 1) == ["spa_accepted"]


@pytest.mark.parametrize(("digest", "mode"), DIGEST_MODES)
def test_every_hmac_digest_and_mode_of_the_real_client_opens(
    door: Door, digest: str, mode: str
) -> None:
    since = door.mark()
    key, hmac_key = digest_keys(digest)
    fwknop(door.lab, "--hmac-digest-type", digest, "-M", mode, key=key, hmac_key=hmac_key)
    assert door.probe() == "open"
    assert door.spa_codes(since, 1) == ["spa_accepted"]
    assert door.events(since, "spa_accepted")[0]["user"] == f"d_{digest}"


def test_legacy_mode_without_hmac_opens_only_from_its_spa_sources(door: Door) -> None:
    since = door.mark()
    args = ["-M", "legacy", "-s"]
    send_payload(door.lab, saved_packet(door.lab, *args, key=OLD_KEY, hmac_key=None), CLIENT4)
    assert door.spa_codes(since, 1) == ["spa_no_hmac_match"]  # not a candidate from here
    send_payload(door.lab, saved_packet(door.lab, *args, key=OLD_KEY, hmac_key=None), CLIENT3)
    assert door.probe(source=CLIENT3) == "open"
    assert door.spa_codes(since, 2) == ["spa_no_hmac_match", "spa_accepted"]


# --- replays -------------------------------------------------------------------------


def test_a_replayed_packet_opens_nothing_from_any_source_also_after_kill_9(door: Door) -> None:
    """A -s packet names no address: resent from elsewhere it would open that address
    if the replay cache did not refuse it first."""
    lab = door.lab
    since = door.mark()
    path = lab.workdir / "replayed.spa"
    fwknop(lab, "-s", "-B", str(path))
    assert door.probe() == "open"
    payload = path.read_text().strip()
    send_payload(lab, payload, CLIENT4)
    send_payload(lab, payload, CLIENT2)
    assert door.shut() == "timeout" and door.shut(source=CLIENT2) == "timeout"
    lab.stop_daemon(signal.SIGKILL)
    lab.start_daemon(door.cfg)
    send_payload(lab, payload, CLIENT4)
    send_payload(lab, payload, CLIENT2)
    assert door.shut() == "timeout" and door.shut(source=CLIENT2) == "timeout"
    assert door.spa_codes(since, 5) == ["spa_accepted"] + ["spa_replay"] * 4
    assert len(door.events(since, "grant_opened")) == 1


# --- nothing it should not opens ----------------------------------------------------------


def test_wrong_keys_digest_or_mode_open_nothing_each_with_its_reason(door: Door) -> None:
    since = door.mark()
    fwknop(door.lab, key=bytes(32))
    fwknop(door.lab, hmac_key=bytes(64))
    fwknop(door.lab, "--hmac-digest-type", "sha512")  # alice's keys, alice has sha256
    fwknop(door.lab, "-M", "cfb")  # alice has cbc
    assert door.spa_codes(since, 4) == [
        "spa_decrypt_failed",
        "spa_no_hmac_match",
        "spa_no_hmac_match",
        "spa_decrypt_failed",
    ]
    assert door.shut() == "timeout"


def test_packets_200_s_old_or_ahead_open_nothing(door: Door) -> None:
    since = door.mark()
    fwknop(door.lab, "--time-offset-minus", "200s")
    fwknop(door.lab, "--time-offset-plus", "200s")
    assert door.spa_codes(since, 2) == ["spa_too_old", "spa_from_future"]
    assert door.shut() == "timeout"


def test_other_ports_nat_command_and_a_foreign_allow_ip_open_nothing(door: Door) -> None:
    lab = door.lab
    marker = lab.workdir / "spa-command-ran"
    since = door.mark()
    fwknop(lab, "-A", "tcp/23")  # protected, but not one alice may open
    fwknop(lab, "-A", "udp/22")
    fwknop(lab, "-N", f"{SERVER4}:22")
    fwknop(lab, "--nat-local")
    fwknop(lab, "--server-cmd", f"touch {marker}")
    fwknop(lab, "-a", CLIENT2)  # alice may not name another address
    assert door.spa_codes(since, 6) == [
        "spa_port_not_allowed",
        "spa_port_not_allowed",
        "spa_nat_refused",
        "spa_nat_refused",
        "spa_command_refused",
        "spa_allow_ip_refused",
    ]
    assert door.shut() == "timeout" and door.shut(source=CLIENT2) == "timeout"
    assert not marker.exists()
    assert door.events(since, "grant_opened") == []


def test_spa_allow_ip_any_opens_the_named_address_only(door: Door) -> None:
    since = door.mark()
    fwknop(door.lab, "-a", CLIENT2, key=BOB_KEY, hmac_key=BOB_HMAC)  # sent from CLIENT4
    assert door.shut() == "timeout"
    assert door.probe(source=CLIENT2) == "open"
    assert door.spa_codes(since, 1) == ["spa_accepted"]
    [opened] = door.events(since, "grant_opened")
    assert opened["user"] == "bob" and opened["src"] == CLIENT2


# --- our client -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def key_files(door: Door) -> tuple[str, str]:
    paths = []
    for name, data in (("alice.key", KEY), ("alice.hmac", HMAC_KEY)):
        path = door.lab.workdir / name
        path.write_text(b64(data) + "\n")
        path.chmod(0o600)
        paths.append(str(path))
    return paths[0], paths[1]


def client_env(lab: Lab, name: str) -> dict[str, str]:
    base = lab.workdir / f"client-{name}"
    (base / "config" / "nfknock").mkdir(parents=True, exist_ok=True)
    return {"XDG_CONFIG_HOME": str(base / "config"), "XDG_STATE_HOME": str(base / "state")}


@pytest.mark.parametrize("address", [SERVER4, SERVER6], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("raw", [False, True], ids=["udp", "raw-syn"])
def test_our_client_opens_over_ipv4_and_ipv6(
    door: Door, key_files: tuple[str, str], address: str, raw: bool
) -> None:
    since = door.mark()
    args = [address, "--key-file", key_files[0], "--hmac-key-file", key_files[1]]
    proc = door.lab.client_cmd(
        "spa", *args, "--check", "--json", *(["--raw-syn"] if raw else []),
        env=client_env(door.lab, "direct"),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["ok"] and out["packets"] == 1 and out["address"] == address
    assert door.spa_codes(since, 1) == ["spa_accepted"]
    [opened] = door.events(since, "grant_opened")
    assert opened["src"] == (CLIENT4 if address == SERVER4 else "2001:db8::10")


def test_our_client_with_a_wrong_key_does_not_open_and_exits_1(
    door: Door, key_files: tuple[str, str]
) -> None:
    since = door.mark()
    wrong = door.lab.workdir / "wrong.hmac"
    wrong.write_text(b64(bytes(64)))
    wrong.chmod(0o600)
    args = [SERVER4, "--key-file", key_files[0], "--hmac-key-file", str(wrong)]
    proc = door.lab.client_cmd(
        "spa", *args, "--check", "--tries", "2", "--timeout", "0.5",
        env=client_env(door.lab, "wrong"),
    )  # fmt: skip
    assert proc.returncode == 1 and "did not open after 2 SPA packet(s)" in proc.stderr
    assert door.spa_codes(since, 2) == ["spa_no_hmac_match"] * 2


# --- ssh through nfknock-client spa --pipe ---------------------------------------------


@pytest.fixture(scope="module")
def ssh_key(door: Door) -> Path:
    lab = door.lab
    binary = shutil.which("sshd") or "/usr/sbin/sshd"
    if not Path(binary).exists():
        pytest.fail("OpenSSH server is not installed (apt-get install openssh-server)")
    d = lab.workdir / "ssh"
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
    lab.spawn(lab.server, binary, "-D", "-e", "-f", str(d / "sshd_config"), log=d / "sshd.log")
    deadline = time.monotonic() + 10
    while not lab.sh(lab.server, "ss", "-Htln", "sport = :2222").stdout.strip():
        assert time.monotonic() < deadline, "sshd did not start"
        time.sleep(0.05)
    return d / "client"


def ssh_through_spa(lab: Lab, key: Path, env: dict[str, str], *command: str) -> list[str]:
    proxy = f"{PY} -m nfknock_client.cli spa --pipe --profile lab"
    return [
        "ip", "netns", "exec", lab.client, "ssh", "-F", "none", "-i", str(key),
        "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
        "-o", "BatchMode=yes", "-o", f"ProxyCommand={proxy}", "root@lab", *command,
    ]  # fmt: skip


def test_ssh_through_spa_pipe_as_proxycommand_also_four_at_once(door: Door, ssh_key: Path) -> None:
    lab = door.lab
    env = client_env(lab, "ssh")
    profile = Path(env["XDG_CONFIG_HOME"]) / "nfknock" / "client.toml"
    profile.write_text(
        f'[profiles.lab]\nhost = "{SERVER4}"\nport = 2222\n'
        f'fwknop_key_base64 = "{b64(KEY)}"\nfwknop_hmac_key_base64 = "{b64(HMAC_KEY)}"\n'
    )
    profile.chmod(0o600)
    since = door.mark()
    full_env = {**os.environ, **env}
    procs = [
        subprocess.Popen(
            ssh_through_spa(lab, ssh_key, env, "echo", f"session-{i}-$((6*7))"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=full_env,
        )
        for i in range(4)
    ]
    results = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate(timeout=10)
        results.append((proc.returncode, out.strip(), err))
    assert [r[:2] for r in results] == [(0, f"session-{i}-42") for i in range(4)], results
    assert door.spa_codes(since, 4) == ["spa_accepted"] * 4
    assert len(door.events(since, "protected_accept")) == 4


def test_the_profile_printed_by_user_add_spa_opens_when_pasted(door: Door) -> None:
    lab = door.lab
    out = lab.nfknock(
        "user", "add", "dave", "--spa", "--host", SERVER4, "--profile", "lab",
        "--config", str(door.cfg),
    ).stdout  # fmt: skip
    profile = out[out.index("# nfknock-client profile") : out.index("# or on the command line")]
    env = client_env(lab, "pasted")
    client_toml = Path(env["XDG_CONFIG_HOME"]) / "nfknock" / "client.toml"
    client_toml.write_text(profile)
    client_toml.chmod(0o600)
    deadline = time.monotonic() + 10  # user add signalled the daemon to reload
    while "dave" not in lab.nfknock("status", "--config", str(door.cfg), "--json").stdout:
        assert time.monotonic() < deadline, "the daemon did not reload"
        time.sleep(0.1)
    since = door.mark()
    proc = lab.client_cmd("spa", "--profile", "lab", "--check", env=env)
    assert proc.returncode == 0, proc.stderr
    assert door.events(since, "spa_accepted")[0]["user"] == "dave"


# --- a flood at the rate limit --------------------------------------------------------------


def queue_line(lab: Lab, number: int = 0) -> dict[str, int]:
    """Queue ``number``'s line of /proc/net/netfilter/nfnetlink_queue (the server's)."""
    text = lab.sh(lab.server, "cat", "/proc/net/netfilter/nfnetlink_queue").stdout
    for line in text.splitlines():
        f = line.split()
        if f and f[0] == str(number):
            return {"waiting": int(f[2]), "queue_dropped": int(f[5]), "user_dropped": int(f[6])}
    raise AssertionError(f"queue {number} is not bound: {text!r}")


def start_spa_flood(lab: Lab, rate: int, seconds: float, sources: str) -> subprocess.Popen[str]:
    argv = ["ip", "netns", "exec", lab.client, PY, str(FLOOD), SERVER4, "--rate", str(rate)]
    argv += ["--seconds", str(seconds), "--count", str(int(rate * seconds)), "--sources", sources]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lab.procs.append(proc)
    return proc


@pytest.mark.serial
def test_a_flood_of_spa_packets_at_the_rate_limit_leaves_the_door_working(
    lab: Lab, tmp_path: Path
) -> None:
    """Random and well-formed-but-unauthenticated packets from spoofed sources: 400/s
    from many sources (under the global limit of 500/s) plus 1,000/s from one source
    (cut to its 4/s by the per-source limit).  A legitimate packet still opens, the
    daemon stays up and answers, and the queue loses nothing."""
    lab.start_service()
    cfg = lab.write_config({"alice": SECRET}, protect=PROTECT)
    (lab.workdir / "users.toml").write_text(users_toml())
    lab.install_rules(cfg)
    daemon = lab.start_daemon(cfg)
    lab.sh(lab.server, "sysctl", "-qw", "net.ipv4.conf.all.rp_filter=0",
           "net.ipv4.conf.default.rp_filter=0", "net.ipv4.conf.s0.rp_filter=0")  # fmt: skip
    before = queue_line(lab)
    floods = [
        start_spa_flood(lab, 400, 6, "doc4"),
        start_spa_flood(lab, 1000, 6, f"fixed:{FLOOD_SOURCE}"),
    ]
    time.sleep(1.5)  # the flood is on
    fwknop(lab)
    assert lab.probe(SERVER4, timeout=3)["result"] == "open"
    keys = []
    for name, data in (("k", KEY), ("h", HMAC_KEY)):
        (tmp_path / name).write_text(b64(data))
        (tmp_path / name).chmod(0o600)
        keys.append(str(tmp_path / name))
    env = {"XDG_CONFIG_HOME": str(tmp_path / "c"), "XDG_STATE_HOME": str(tmp_path / "s")}
    proc = lab.client_cmd(
        "spa", SERVER4, "--key-file", keys[0], "--hmac-key-file", keys[1], "--check",
        "--json", env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    sent = [json.loads(f.communicate(timeout=30)[0])["sent"] for f in floods]
    assert sent[0] >= 2000 and sent[1] >= 5000, sent
    time.sleep(0.5)
    assert daemon.poll() is None
    after = queue_line(lab)
    assert after["waiting"] == 0
    assert after["queue_dropped"] == before["queue_dropped"]
    assert after["user_dropped"] == before["user_dropped"]
    status = json.loads(lab.nfknock("status", "--config", str(cfg), "--json").stdout)
    results = status["spa"]["results"]
    refused = results.get("spa_no_hmac_match", 0)
    # Nearly all of the 400/s reached the daemon, the one-source 1,000/s only at its
    # per-source rate; the two legitimate packets opened.
    assert results.get("spa_accepted") == 2, results
    assert 0.8 * sent[0] <= refused <= sent[0] + 8 + 4 * 8, (refused, sent)
    assert status["internal_errors"] == 0 and status["malformed"] == 0
    listing = lab.sh(lab.server, "iptables", "-L", "NFKNOCK-SPA", "-v", "-x", "-n").stdout
    per_source_drops = int(listing.splitlines()[2].split()[0])
    assert per_source_drops >= sent[1] - 8 - 4 * 8, (per_source_drops, sent)
    print(f"flood sent {sent}, refused by the daemon {refused}, per-source drops "
          f"{per_source_drops}, queue {after}")  # fmt: skip
