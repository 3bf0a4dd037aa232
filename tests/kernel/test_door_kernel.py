"""Forwarded doors and ISN knocks against the real kernel (issue 14): a gateway
forwards a random door to a service in a third namespace, a host forwards a door
to its own port 22, the real fwknop client asks for NAT access, ISN knocks open
and port-only or wrong-ISN knocks do not.  The service port itself stays closed."""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from nfknock.config import load_config
from nfknock.netlab import BEHIND4, CLIENT4, GW_CLIENT_SIDE, SERVER4, SERVER6, Lab
from nfknock.render import render_nftables
from nfknock.sequence import (
    SequenceParams,
    door_port,
    isns,
    sequence_at,
    step_of,
)

from .conftest import SECRET

pytestmark = pytest.mark.kernel

CLIENT2 = "198.51.100.11"
PARAMS = SequenceParams(exclude=frozenset({22}))
GW_DOORS = (40000, 40999)
KEY, HMAC_KEY = bytes(range(100, 132)), bytes(range(1, 65))


def now_step() -> float:
    """Now, away from a step boundary (knock and connect in one step)."""
    now = time.time()
    if now % 30 > 28.5:
        time.sleep(1.6)
        now = time.time()
    return now


def knock_for(now: float, counter: int = 0) -> tuple[tuple[int, ...], int]:
    """The sequence and the door of alice's counter at ``now``."""
    step = step_of(now, 30)
    return (
        sequence_at(SECRET, now, counter, PARAMS),
        door_port(SECRET, step, counter, PARAMS, *GW_DOORS),
    )


def door_config(lab: Lab, forward: dict[str, object], **sections: object) -> Path:
    return lab.write_config(
        {"alice": SECRET},
        user_keys={"alice": {"door": "random", "forward": ["gw"]}},
        **{"door.forward": [{"name": "gw", "doors": "40000-40999", **forward}]},
        **sections,
    )


def test_a_random_door_on_a_gateway_reaches_the_service_behind_it_once(
    gateway_lab: Lab,
) -> None:
    lab = gateway_lab
    lab.add_client_address(f"{CLIENT2}/25")
    lab.start_service(ns=lab.server)
    cfg = door_config(lab, {"address": BEHIND4, "port": 22})
    lab.install_rules(cfg)
    lab.start_daemon(cfg)
    assert lab.probe(BEHIND4, 22, timeout=1.0)["result"] == "timeout"  # closed to everyone
    ports, door = knock_for(now_step())
    lab.send_knocks(GW_CLIENT_SIDE, ports)
    assert lab.probe(GW_CLIENT_SIDE, door, timeout=1.0, source=CLIENT2)["result"] == "timeout"
    assert lab.probe(GW_CLIENT_SIDE, door, hold=0.5) == {
        "result": "open",
        "greeting": "nfknock-ok",
        "echo": "still-here",
    }
    assert lab.probe(GW_CLIENT_SIDE, door, timeout=1.0)["result"] == "timeout"  # used once
    assert lab.probe(BEHIND4, 22, timeout=1.0)["result"] == "timeout"
    # The knock opened nothing but the door: not the gateway's own protected port.
    assert lab.probe(GW_CLIENT_SIDE, 22, timeout=1.0)["result"] == "timeout"
    events = lab.log_events()
    assert [e["code"] for e in events if e.get("event") == "protected_accept"] == ["door"]


def test_a_door_to_this_hosts_own_port_22_and_a_stale_knock_gets_a_reset(lab: Lab) -> None:
    lab.start_service()
    cfg = door_config(lab, {"port": 22})
    lab.install_rules(cfg)
    lab.start_daemon(cfg)
    assert lab.probe(SERVER4, 22, timeout=1.0)["result"] == "timeout"
    now = now_step()
    ports, door = knock_for(now)
    lab.send_knocks(SERVER4, ports)
    assert lab.probe(SERVER4, door)["result"] == "open"
    assert lab.probe(SERVER4, 22, timeout=1.0)["result"] == "timeout"  # no direct grant
    lab.send_knocks(SERVER4, ports)  # the same counter again: the source is behind
    time.sleep(0.3)
    assert lab.probe(SERVER4, door, timeout=2.0)["result"] == "reset"
    assert lab.probe(SERVER6, door, timeout=1.0)["result"] == "timeout"  # nothing over IPv6


def test_the_client_knocks_and_pipes_through_the_door(
    gateway_lab: Lab, secret_file: Path, client_env: dict[str, str]
) -> None:
    lab = gateway_lab
    lab.start_service(ns=lab.server)
    cfg = door_config(lab, {"address": BEHIND4, "port": 22})
    lab.install_rules(cfg)
    lab.start_daemon(cfg)
    now_step()
    done = lab.client_cmd(
        "knock",
        GW_CLIENT_SIDE,
        "--secret-file",
        str(secret_file),
        "--doors",
        "40000-40999",
        "--check",
        "--json",
        env=client_env,
    )
    assert done.returncode == 0, done.stderr
    assert '"door": 4' in done.stdout
    done = lab.client_cmd(
        "knock",
        GW_CLIENT_SIDE,
        "--secret-file",
        str(secret_file),
        "--doors",
        "40000-40999",
        "--exec",
        'python3 -c "import os,socket;'
        "s=socket.create_connection((os.environ['NFKNOCK_HOST'],"
        "int(os.environ['NFKNOCK_PORT'])),timeout=3);print(s.recv(64).decode().strip())\"",
        env=client_env,
    )
    assert done.returncode == 0, done.stderr
    assert "nfknock-ok" in done.stdout


def test_isn_knocks_open_and_wrong_or_missing_isns_do_not(lab: Lab) -> None:
    lab.start_service()
    cfg = lab.write_config({"alice": SECRET}, user_keys={"alice": {"isn": True}})
    lab.install_rules(cfg)
    lab.start_daemon(cfg)
    now = now_step()
    ports = sequence_at(SECRET, now, 0, PARAMS)
    values = isns(SECRET, step_of(now, 30), 0, PARAMS)
    lab.send_knocks(SERVER4, ports)  # connect() knocks: the kernel's ISNs
    assert lab.probe(SERVER4, 22, timeout=1.0)["result"] == "timeout"
    wrong = [v ^ 1 for v in values]
    lab.send_knocks(SERVER4, ports, isns=wrong)
    assert lab.probe(SERVER4, 22, timeout=1.0)["result"] == "timeout"
    lab.send_knocks(SERVER4, ports, isns=list(values))
    assert lab.probe(SERVER4, 22)["result"] == "open"
    assert lab.probe(SERVER4, 22, timeout=1.0)["result"] == "timeout"


def test_nfknock_client_sends_isn_knocks(
    lab: Lab, secret_file: Path, client_env: dict[str, str]
) -> None:
    lab.start_service()
    cfg = lab.write_config({"alice": SECRET}, user_keys={"alice": {"isn": True}})
    lab.install_rules(cfg)
    lab.start_daemon(cfg)
    now_step()
    argv = ["knock", SERVER4, "--secret-file", str(secret_file), "--isn", "--check"]
    done = lab.client_cmd(*argv, env=client_env)
    assert done.returncode == 0, done.stderr


# --- the real fwknop client -----------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def fwknop(lab: Lab, *args: str, server: str = GW_CLIENT_SIDE) -> subprocess.CompletedProcess[str]:
    """The real client from the client namespace (no ~/.fwknoprc), to the SPA port
    9500 of ``server``, for the user ``phone``."""
    exe = shutil.which("fwknop")
    if exe is None:
        if os.environ.get("CI") == "true":
            pytest.fail("the fwknop client (Debian fwknop-client) is not installed")
        pytest.skip("the fwknop client is not installed")
    home = lab.workdir / "fwknop-home"
    home.mkdir(exist_ok=True)
    rc = home / ".fwknoprc"
    rc.touch(mode=0o600)
    argv = [exe, "-D", server, "-p", "9500", "--no-save-args", "--rc-file", str(rc)]
    argv += ["--key-base64-rijndael", b64(KEY), "--use-hmac", "--key-base64-hmac", b64(HMAC_KEY)]
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
    assert done.returncode == 0, done.stderr
    return done


def add_phone(lab: Lab) -> None:
    users = lab.workdir / "users.toml"
    users.write_text(
        users.read_text() + f'\n[users.phone]\nfwknop_key_base64 = "{b64(KEY)}"\n'
        f'fwknop_hmac_key_base64 = "{b64(HMAC_KEY)}"\n'
    )


def spa_codes(lab: Lab, n: int) -> list[str]:
    """The SPA result codes logged so far, once there are ``n`` (the daemon logs
    after its verdict)."""
    deadline = time.monotonic() + 5
    while True:
        codes = [e["code"] for e in lab.log_events() if e.get("event", "").startswith("spa_")]
        if len(codes) >= n or time.monotonic() > deadline:
            return codes
        time.sleep(0.05)


def test_the_real_fwknop_client_reaches_the_service_through_the_gateway(
    gateway_lab: Lab,
) -> None:
    """``-N`` with a door named by ``-A``, and ``--nat-rand-port`` (fwknop picks the
    door in 10000-65534: the entry covers that range, the knock range and the SPA
    port lie below it)."""
    lab = gateway_lab
    lab.start_service(ns=lab.server)
    cfg = lab.write_config(
        {"alice": SECRET},
        knock={"port_min": 1024, "port_max": 8999, "length": 16},
        spa={"ports": [9500]},
        **{
            "door.forward": [{"name": "gw", "doors": "10000-65534", "address": BEHIND4, "port": 22}]
        },
    )
    users = lab.workdir / "users.toml"
    users.write_text(
        users.read_text() + f'\n[users.phone]\nfwknop_key_base64 = "{b64(KEY)}"\n'
        f'fwknop_hmac_key_base64 = "{b64(HMAC_KEY)}"\n'
    )
    lab.install_rules(cfg)
    lab.start_daemon(cfg)
    fwknop(lab, "-A", "tcp/40123", "-N", f"{BEHIND4}:22")
    assert lab.probe(GW_CLIENT_SIDE, 40123, hold=0.3)["result"] == "open"
    assert lab.probe(GW_CLIENT_SIDE, 40123, timeout=1.0)["result"] == "timeout"
    assert lab.probe(BEHIND4, 22, timeout=1.0)["result"] == "timeout"
    done = fwknop(lab, "-A", "tcp/22", "--nat-rand-port", "-N", f"{BEHIND4}:22", "-f", "60")
    match = re.search(r"Randomly assigned port '(\d+)'", done.stdout + done.stderr)
    assert match, done.stdout
    door = int(match.group(1))
    assert lab.probe(GW_CLIENT_SIDE, door)["result"] == "open"
    assert spa_codes(lab, 2) == ["spa_accepted", "spa_accepted"]
    fwknop(lab, "-A", "tcp/40124", "-N", "198.51.100.131:22")  # no such target
    assert spa_codes(lab, 3)[-1] == "spa_nat_target_refused"
    assert lab.probe(GW_CLIENT_SIDE, 40124, timeout=1.0)["result"] == "timeout"


def test_the_real_fwknop_client_opens_a_local_nat_door(lab: Lab) -> None:
    """``--nat-local``: the door (``--nat-port``) leads to this host's port 22 (the
    ``-A`` port); with a client timeout (``-f``)."""
    lab.start_service()
    cfg = lab.write_config(
        {"alice": SECRET},
        spa={"ports": [9500]},
        knock={"port_max": 8999},
        **{"door.forward": [{"name": "gw", "doors": "40000-40999", "port": 22}]},
    )
    add_phone(lab)
    lab.install_rules(cfg)
    lab.start_daemon(cfg)
    fwknop(lab, "-A", "tcp/22", "--nat-local", "--nat-port", "40022", "-f", "45", server=SERVER4)
    assert lab.probe(SERVER4, 40022)["result"] == "open"
    assert spa_codes(lab, 1) == ["spa_accepted"]
    assert lab.probe(SERVER4, 22, timeout=1.0)["result"] == "timeout"


# --- rules ------------------------------------------------------------------------------


def test_remove_takes_the_door_chains_and_a_reload_without_doors_drops_them(lab: Lab) -> None:
    cfg = door_config(lab, {"port": 22})
    lab.install_rules(cfg)
    for table in ("mangle", "nat"):
        listing = lab.sh(lab.server, "iptables", "-t", table, "-S").stdout
        assert "-A PREROUTING -j NFKNOCK-" in listing
    out = lab.nfknock("rules", "--verify", "--config", str(cfg), "--applied", str(lab.applied))
    assert out.returncode == 0, out.stdout + out.stderr
    lab.sh(lab.server, "iptables", "-t", "nat", "-I", "PREROUTING", "1", "-j", "ACCEPT")
    out = lab.nfknock(
        "rules", "--verify", "--config", str(cfg), "--applied", str(lab.applied), check=False
    )
    assert out.returncode == 1 and "jump_not_first" in out.stdout + out.stderr
    lab.sh(lab.server, "iptables", "-t", "nat", "-D", "PREROUTING", "1")
    plain = lab.write_config({"alice": SECRET})
    lab.install_rules(plain)
    for tool in ("iptables", "ip6tables"):
        for table in ("mangle", "nat"):
            assert "NFKNOCK" not in lab.sh(lab.server, tool, "-t", table, "-S").stdout
    lab.install_rules(cfg)
    lab.nfknock("rules", "--remove")
    for tool in ("iptables", "ip6tables"):
        for table in ("filter", "mangle", "nat"):
            assert "NFKNOCK" not in lab.sh(lab.server, tool, "-t", table, "-S").stdout


def test_the_nftables_form_of_the_doors_is_accepted_by_nft_but_for_the_queue(lab: Lab) -> None:
    """This kernel has no nftables queue expression: ``nft -c`` checks the door
    rules with the queue statements left out, in the lab's namespace."""
    if shutil.which("nft") is None:
        pytest.skip("nft is not installed")
    cfg = door_config(lab, {"address": BEHIND4, "port": 22})
    text = "\n".join(
        ln for ln in render_nftables(load_config(cfg)).splitlines() if "queue num" not in ln
    )
    path = lab.workdir / "door.nft"
    path.write_text(text + "\n")
    done = lab.sh(lab.server, "nft", "-c", "-f", str(path), check=False)
    assert done.returncode == 0, done.stderr


def test_a_local_door_opens_over_ipv6_too(lab: Lab) -> None:
    lab.start_service()
    cfg = door_config(lab, {"port": 22})
    lab.install_rules(cfg)
    lab.start_daemon(cfg)
    ports, door = knock_for(now_step())
    lab.send_knocks(SERVER6, ports)
    assert lab.probe(SERVER6, 22, timeout=1.0)["result"] == "timeout"
    assert lab.probe(SERVER6, door)["result"] == "open"
    assert lab.probe(SERVER6, door, timeout=1.0)["result"] == "timeout"
