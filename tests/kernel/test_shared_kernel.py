"""Two gateways sharing one real Redis (issue 12): a real redis-server on a namespace
address, two daemons in two gateway namespaces, one client that reaches both."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nfknock.netlab import PY
from nfknock.netlab.pair import ADDRESS, CLIENT, REDIS, VIP, Gateway, Pair
from nfknock.sequence import SequenceParams, format_base32, sequence_at, step_of

from ..conftest import require_redis
from .conftest import SECRET, _require_lab

pytestmark = [pytest.mark.kernel, pytest.mark.serial]

PARAMS = SequenceParams(exclude=frozenset({22}))
KEY = bytes(range(100, 132))
HMAC_KEY = bytes(range(1, 65))
PASSWORD = "pair-test-" + "x" * 16
CHECK = Path(__file__).parents[2] / "contrib" / "ha" / "nfknock-check"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def start(gw: Gateway, wait: float = 30) -> None:
    gw.start_daemon(gw.workdir / "nfknock.toml", wait=wait)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    _require_lab()
    require_redis()
    with Pair(tmp_path_factory.mktemp("pair")) as pair:
        pair.start_redis(password=PASSWORD)
        for n in range(11, 15):  # a source of its own for each test that needs one
            pair.add_client_address(f"198.51.100.{n}")
        secret = pair.workdir / "redis.pw"
        secret.write_text(PASSWORD + "\n")
        secret.chmod(0o600)
        for gw in pair.gateways():
            gw.start_service()
            cfg = gw.write_config(
                {"alice": SECRET},
                state={
                    "backend": "redis",
                    "url": f"redis://{REDIS}:6379/0",
                    "password_file": str(secret),
                    "prefix": "pair",
                    "timeout": 0.5,
                },
                door={"max_connections": 1},
            )
            (gw.workdir / "users.toml").write_text(
                f'[users.alice]\nsecret = "{format_base32(SECRET)}"\n'
                f'fwknop_key_base64 = "{b64(KEY)}"\nfwknop_hmac_key_base64 = "{b64(HMAC_KEY)}"\n'
            )
            gw.install_rules(cfg)
            start(gw)
        yield pair


def status(gw: Gateway) -> dict[str, Any]:
    out = gw.nfknock("status", "--config", str(gw.workdir / "nfknock.toml"), "--json")
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def health_check(gw: Gateway, *args: str) -> subprocess.CompletedProcess[str]:
    """contrib/ha/nfknock-check against this gateway's real status."""
    argv = [PY, str(CHECK), "--config", str(gw.workdir / "nfknock.toml")]
    argv += ["--nfknock", str(Path(PY).parent / "nfknock"), *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)


def events(gw: Gateway, kind: str) -> list[dict[str, Any]]:
    return [e for e in gw.log_events() if e.get("event") == kind]


def fresh(pair: Pair) -> tuple[int, ...]:
    """The sequence of the next counter neither gateway has seen spent."""
    while time.time() % 30 > 28.0:  # keep knocks and probes inside one step
        time.sleep(0.2)
    step = step_of(time.time(), 30)
    counters = [
        st["users"]["alice"]["counter"] if st["step"] == step else 0
        for st in (status(pair.a), status(pair.b))
    ]
    return sequence_at(SECRET, time.time(), max(counters), PARAMS)


def wait_for(check: Any, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def fwknop(pair: Pair, dst: str, *args: str) -> None:
    exe = shutil.which("fwknop")
    if exe is None:
        if os.environ.get("CI") == "true":
            pytest.fail("the fwknop client (Debian fwknop-client) is not installed")
        pytest.skip("the fwknop client is not installed")
    home = pair.workdir / "fwknop-home"
    home.mkdir(exist_ok=True)
    rc = home / ".fwknoprc"
    rc.touch(mode=0o600)
    argv = [exe, "-D", dst, "--no-save-args", "--rc-file", str(rc), "--use-hmac", "-A", "tcp/22"]
    argv += ["-a", CLIENT, "--key-base64-rijndael", b64(KEY), "--key-base64-hmac", b64(HMAC_KEY)]
    done = subprocess.run(
        ["ip", "netns", "exec", pair.client, *argv, *args],
        env={"HOME": str(home), "PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def test_a_sequence_completed_through_a_and_replayed_through_b_opens_nothing(
    pair: Pair,
) -> None:
    ports = fresh(pair)
    pair.a.send_knocks(ADDRESS["a"], ports)
    assert pair.a.probe(ADDRESS["a"])["result"] == "open"
    pair.b.send_knocks(ADDRESS["b"], ports)  # the replay, through the other gateway
    assert pair.b.probe(ADDRESS["b"])["result"] == "reset"  # "behind"
    stale = events(pair.b, "sequence_stale")
    assert stale and stale[-1]["code"] in ("counter_spent", "claimed_elsewhere")


def test_an_spa_packet_used_through_a_opens_nothing_through_b(pair: Pair) -> None:
    saved = pair.workdir / "saved.spa"
    fwknop(pair, ADDRESS["a"], "-B", str(saved))
    assert pair.a.probe(ADDRESS["a"])["result"] == "open"
    payload = saved.read_text().strip()
    send = [
        "ip", "netns", "exec", pair.client, "python3", "-c",
        "import socket,sys; s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);"
        f"s.sendto(sys.argv[1].encode(),('{ADDRESS['b']}',62201))",
        payload,
    ]  # fmt: skip
    subprocess.run(send, check=True, timeout=10)
    assert pair.b.probe(ADDRESS["b"])["result"] != "open"
    refused = [e.get("code") for e in events(pair.b, "spa_refused")]
    stale = [e.get("code") for e in events(pair.b, "sequence_stale")]
    assert "spa_replay" in refused or "claimed_elsewhere" in stale
    assert not [e for e in events(pair.b, "grant_opened") if e.get("code") == "granted_spa"]


def test_a_grant_made_through_a_is_honoured_by_b_after_the_address_moves(pair: Pair) -> None:
    pair.move_vip(pair.a)
    pair.a.send_knocks(VIP, fresh(pair))
    wait_for(lambda: any(g["destination"] == VIP for g in status(pair.b)["grants"]))
    on_a = [g for g in status(pair.a)["grants"] if g["destination"] == VIP]
    on_b = [g for g in status(pair.b)["grants"] if g["destination"] == VIP]
    assert abs(on_a[0]["expires"] - on_b[0]["expires"]) < 1.0  # the same window: A's
    pair.move_vip(pair.b)  # the failover: the client's next SYN reaches B
    assert pair.b.probe(VIP, hold=0.3)["result"] == "open"
    assert events(pair.b, "protected_accept")[-1]["dst"] == VIP
    # B spent the one connection: A hears of it and drops its copy too.
    wait_for(lambda: not [g for g in status(pair.a)["grants"] if g["destination"] == VIP])
    pair.move_vip(pair.a)
    assert pair.a.probe(VIP)["result"] == "timeout"


def test_one_counter_completed_on_both_at_the_same_instant_opens_exactly_once(
    pair: Pair,
) -> None:
    rounds, both, src = 8, f"{ADDRESS['a']},{ADDRESS['b']}", "198.51.100.11"
    lost_in_redis = 0
    for _ in range(rounds):
        before = [len(events(gw, "sequence_stale")) for gw in pair.gateways()]
        pair.a.send_knocks(both, fresh(pair), source=src)  # each knock to A, then B
        results = {
            pair.a.probe(ADDRESS["a"], source=src)["result"],
            pair.b.probe(ADDRESS["b"], source=src)["result"],
        }
        assert results == {"open", "reset"}
        new = [
            events(gw, "sequence_stale")[n:] for gw, n in zip(pair.gateways(), before, strict=True)
        ]
        codes = [e["code"] for part in new for e in part]
        assert len(codes) == 1, codes
        lost_in_redis += codes == ["claimed_elsewhere"]
    # At least once, both claimed before either heard of the other: Redis decided.
    assert lost_in_redis >= 1


def test_while_redis_is_stopped_nothing_new_opens_and_it_recovers(pair: Pair) -> None:
    assert pair.redis is not None
    src, a = "198.51.100.12", ADDRESS["a"]
    pair.a.send_knocks(a, fresh(pair), source=src)  # a grant known before Redis goes
    wait_for(lambda: bool(status(pair.a)["grants"]))
    pair.redis.stop()
    wait_for(lambda: not status(pair.a)["state"]["reachable"])
    assert pair.a.probe(a, source=src)["result"] == "open"  # known locally: still works
    pair.a.send_knocks(a, fresh(pair), source=src)  # its claim fails: nothing opens
    assert pair.a.probe(a, source=src)["result"] == "timeout"
    st = status(pair.a)
    assert st["state"]["ok"] is False and "unreachable" in st["state"]["error"]
    assert st["state"]["claim_failures"] >= 1
    assert pair.a.daemon is not None and pair.a.daemon.poll() is None  # no crash
    assert events(pair.a, "state_unreachable")
    check = health_check(pair.a)  # keepalived's track_script sees it
    assert check.returncode == 1 and "state store" in check.stdout
    assert health_check(pair.a, "--allow-store-down").returncode == 0
    pair.redis.start()
    wait_for(lambda: status(pair.a)["state"]["reachable"], 20)
    wait_for(lambda: status(pair.b)["state"]["reachable"], 20)
    pair.a.send_knocks(a, fresh(pair), source=src)
    assert pair.a.probe(a, source=src)["result"] == "open"
    assert status(pair.a)["state"]["ok"] is True


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm"])
def test_a_restart_of_either_gateway_loses_no_counter(pair: Pair, how: int) -> None:
    ports, src = fresh(pair), "198.51.100.13"
    pair.a.send_knocks(ADDRESS["a"], ports, source=src)
    assert pair.a.probe(ADDRESS["a"], source=src)["result"] == "open"
    for gw in pair.gateways():
        gw.stop_daemon(how)
        start(gw)
        gw.send_knocks(gw.address, ports, source=src)
        assert gw.probe(gw.address, source=src)["result"] == "reset", gw.name
