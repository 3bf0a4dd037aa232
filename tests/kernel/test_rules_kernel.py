"""The static rules in a real kernel: verify, install order, last good ruleset,
reload, the queue split and the SPA rate limits (iptables in network namespaces)."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from nfknock.netlab import CLIENT4, CLIENT6, PY, SERVER4, SERVER6, Lab

from .conftest import SECRET

pytestmark = pytest.mark.kernel

SINK = Path(__file__).with_name("queue_sink.py")
TCP, UDP = 6, 17


def rules(lab: Lab, cfg: Path, *args: str) -> Any:
    return lab.nfknock(
        "rules", *args, "--config", str(cfg), "--applied", str(lab.applied), check=False
    )


def ours(lab: Lab, save: str = "iptables-save") -> list[str]:
    """nfknock's chains and jumps as the kernel holds them, counters zeroed."""
    text = lab.sh(lab.daemon_ns, save).stdout
    return [re.sub(r"\[\d+:\d+\]", "[0:0]", ln) for ln in text.splitlines() if "NFKNOCK" in ln]


def saved(lab: Lab, save: str = "iptables-save") -> list[str]:
    """The whole table, comments (timestamps) dropped and counters zeroed."""
    text = lab.sh(lab.daemon_ns, save).stdout
    return [re.sub(r"\[\d+:\d+\]", "[0:0]", ln) for ln in text.splitlines() if ln[:1] != "#"]


def ipt(lab: Lab, tool: str, *args: str) -> str:
    return lab.sh(lab.daemon_ns, tool, "-w", *args).stdout


def counters(lab: Lab, chain: str, tool: str = "iptables") -> list[int]:
    """Packet counts of each rule of ``chain``, in order."""
    out = ipt(lab, tool, "-L", chain, "-v", "-x", "-n")
    return [int(ln.split()[0]) for ln in out.splitlines()[2:] if ln.strip()]


@pytest.fixture
def sink(lab: Lab) -> Iterator[Callable[..., Callable[[], list[dict[str, Any]]]]]:
    """Start a consumer on the given queues in the server; returns a reader of what
    it has seen so far."""

    def start(*queues: int) -> Callable[[], list[dict[str, Any]]]:
        out = lab.workdir / "sink.jsonl"
        log = lab.workdir / "sink.log"
        argv = [PY, str(SINK), str(out), *map(str, queues), "--seconds", "120"]
        proc = lab.spawn(lab.daemon_ns, *argv, log=log)
        deadline = time.monotonic() + 10
        while "ready" not in (log.read_text() if log.exists() else ""):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)

        def seen() -> list[dict[str, Any]]:
            text = out.read_text() if out.exists() else ""
            return [json.loads(ln) for ln in text.splitlines()]

        return seen

    yield start


def send_udp(lab: Lab, address: str, port: int, count: int, source: str | None = None) -> None:
    """``count`` datagrams as fast as one socket sends them."""
    fam = "AF_INET6" if ":" in address else "AF_INET"
    code = (
        f"import socket\ns = socket.socket(socket.{fam}, socket.SOCK_DGRAM)\n"
        + (f"s.bind(({source!r}, 0))\n" if source else "")
        + f"for i in range({count}):\n    s.sendto(b'spa %d' % i, ({address!r}, {port}))\n"
    )
    lab.sh(lab.client, PY, "-c", code)


def wait_for(seen: Callable[[], list[dict[str, Any]]], n: int, wait: float = 3.0) -> None:
    deadline = time.monotonic() + wait
    while len(seen()) < n and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # and let stragglers arrive, so "at most" checks see them


# --- verify and install order ------------------------------------------------------


@pytest.mark.parametrize(("tool", "address"), [("iptables", SERVER4), ("ip6tables", SERVER6)])
def test_verify_finds_an_accept_above_the_jump_and_install_puts_the_jump_back(
    lab: Lab, tool: str, address: str
) -> None:
    lab.start_service()
    cfg = lab.write_config({"alice": SECRET})
    assert rules(lab, cfg, "--install").returncode == 0
    assert rules(lab, cfg, "--verify").returncode == 0
    ipt(lab, tool, "-I", "INPUT", "1", "-p", "tcp", "--dport", "22", "-j", "ACCEPT")
    assert lab.probe(address)["result"] == "open"  # what other tools do opens the door

    found = rules(lab, cfg, "--verify")
    assert found.returncode == 1
    assert f"{tool}: the jump to NFKNOCK-INPUT is INPUT rule 2, not 1" in found.stderr
    assert "`-p tcp -m tcp --dport 22 -j ACCEPT`" in found.stderr
    assert "[jump_not_first]" in found.stderr

    assert rules(lab, cfg, "--install").returncode == 0
    listed = ipt(lab, tool, "-S", "INPUT").splitlines()
    assert listed[1:] == [
        "-A INPUT -j NFKNOCK-INPUT",
        "-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT",
    ]
    assert rules(lab, cfg, "--verify").returncode == 0
    assert lab.probe(address)["result"] == "timeout"  # no daemon: the queue drops


def test_verify_finds_a_rule_replaced_inside_our_chain_with_the_same_count(lab: Lab) -> None:
    cfg = lab.write_config({"alice": SECRET})
    assert rules(lab, cfg, "--install").returncode == 0
    chain = ipt(lab, "iptables", "-S", "NFKNOCK-INPUT").splitlines()[1:]
    n = next(i for i, ln in enumerate(chain, 1) if ln.endswith("--dports 22 -j DROP"))
    ipt(
        lab, "iptables", "-R", "NFKNOCK-INPUT", str(n), "-p", "tcp", "--dport", "22", "-j", "ACCEPT"
    )
    found = rules(lab, cfg, "--verify")
    assert found.returncode == 1
    assert f"NFKNOCK-INPUT differs from what nfknock installed: rule {n} is" in found.stderr
    assert "[chain_changed]" in found.stderr


def test_extra_jumps_are_reported_and_removed_by_install(lab: Lab) -> None:
    cfg = lab.write_config({"alice": SECRET})
    assert rules(lab, cfg, "--install").returncode == 0
    ipt(lab, "iptables", "-A", "INPUT", "-i", "c0", "-j", "NFKNOCK-INPUT")
    ipt(lab, "iptables", "-A", "FORWARD", "-j", "NFKNOCK-SPA")
    found = rules(lab, cfg, "--verify")
    assert found.returncode == 1 and "2 more jump(s) into nfknock's chains" in found.stderr
    assert rules(lab, cfg, "--install").returncode == 0
    assert [ln for ln in ours(lab) if ln.startswith("-A INPUT") or "FORWARD" in ln] == [
        "-A INPUT -j NFKNOCK-INPUT"
    ]
    assert rules(lab, cfg, "--verify").returncode == 0


# --- the last good ruleset ------------------------------------------------------------


def _break(cfg: Path) -> None:
    cfg.write_text(cfg.read_text() + '\n[door]\nopen_seconds = "long"\n')


def test_a_config_broken_after_a_good_install_reapplies_the_last_good_ruleset(lab: Lab) -> None:
    lab.start_service()
    cfg = lab.write_config({"alice": SECRET})
    assert rules(lab, cfg, "--install").returncode == 0
    good4, good6 = ours(lab), ours(lab, "ip6tables-save")
    assert rules(lab, cfg, "--remove").returncode == 0  # as after a reboot
    assert ours(lab) == [] and lab.probe(SERVER4)["result"] == "open"

    _break(cfg)
    out = rules(lab, cfg, "--install")
    assert out.returncode == 1
    err = out.stderr.splitlines()
    assert "door.open_seconds: must be float, not a string" in err[0]
    assert err[1].startswith("nfknock rules: re-applied the last good ruleset installed at ")
    assert f" from {cfg}" in err[1]
    assert ours(lab) == good4 and ours(lab, "ip6tables-save") == good6
    assert lab.probe(SERVER4)["result"] == "timeout"


def test_a_bad_config_without_a_record_installs_nothing_and_exits_2(lab: Lab) -> None:
    cfg = lab.write_config({"alice": SECRET})
    before = saved(lab)
    _break(cfg)
    out = rules(lab, cfg, "--install")
    assert out.returncode == 2
    assert "nothing was installed (no last good ruleset at" in out.stderr
    assert saved(lab) == before
    assert not lab.applied.exists()


# --- reload ------------------------------------------------------------------------


def test_reload_applies_a_new_protected_port_and_a_new_exclude(lab: Lab) -> None:
    for port in (22, 443, 8080):
        lab.start_service(port)
    cfg = lab.write_config({"alice": SECRET})
    lab.install_rules(cfg)
    lab.start_daemon(cfg)
    assert lab.probe(SERVER4, 443)["result"] == "open"  # not protected yet
    assert lab.probe(SERVER4, 8080)["result"] == "timeout"  # a knock port: dropped

    lab.write_config(
        {"alice": SECRET}, protect=[{"port": 22}, {"port": 443}], knock={"exclude": [8080]}
    )
    out = lab.nfknock("reload", "--config", str(cfg), "--applied", str(lab.applied))
    assert "the running daemon reloaded" in out.stdout
    assert lab.probe(SERVER4, 443)["result"] == "timeout"
    assert lab.probe(SERVER4, 8080)["result"] == "open"
    assert rules(lab, cfg, "--verify").returncode == 0


def test_a_reload_with_a_bad_config_leaves_the_rules_and_says_so(lab: Lab) -> None:
    cfg = lab.write_config({"alice": SECRET})
    lab.install_rules(cfg)
    before = ours(lab)
    _break(cfg)
    out = lab.nfknock("reload", "--config", str(cfg), "--applied", str(lab.applied), check=False)
    assert out.returncode == 2 and "nothing was changed" in out.stderr
    assert ours(lab) == before


# --- remove ------------------------------------------------------------------------


def test_stale_chains_go_at_install_and_remove_restores_iptables_save(lab: Lab) -> None:
    for tool in ("iptables", "ip6tables"):
        ipt(lab, tool, "-P", "FORWARD", "DROP")
        ipt(lab, tool, "-A", "INPUT", "-p", "tcp", "--dport", "80", "-j", "ACCEPT")
        ipt(lab, tool, "-N", "MINE")
        ipt(lab, tool, "-A", "FORWARD", "-j", "MINE")
    before4 = saved(lab)
    before6 = saved(lab, "ip6tables-save")
    cfg = lab.write_config(
        {"alice": SECRET},
        queue={"workers": 2},
        protect=[{"port": 22}, {"port": 22, "address": "198.51.100.99"}],
    )
    lab.install_rules(cfg)
    assert any(ln.startswith(":NFKNOCK-FORWARD") for ln in ours(lab))
    cfg = lab.write_config({"alice": SECRET}, spa={"ports": []})
    lab.install_rules(cfg)
    assert [ln for ln in ours(lab) if ln.startswith(":")] == [":NFKNOCK-INPUT - [0:0]"]
    assert rules(lab, cfg, "--verify").returncode == 0
    _break(cfg)
    assert rules(lab, cfg, "--remove").returncode == 0  # needs nothing from the config
    assert saved(lab) == before4
    assert saved(lab, "ip6tables-save") == before6


# --- queues and SPA ------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
def test_protected_and_spa_packets_reach_the_priority_queue_and_knocks_the_knock_queue(
    lab: Lab, sink: Callable[..., Callable[[], list[dict[str, Any]]]], workers: int
) -> None:
    cfg = lab.write_config(
        {"alice": SECRET}, queue={"number": 3, "knock_number": 7, "workers": workers}
    )
    lab.install_rules(cfg)
    priority, knock = set(range(3, 3 + workers)), set(range(7, 7 + workers))
    seen = sink(*priority, *knock)
    for address in (SERVER4, SERVER6):
        lab.probe(address, 22, timeout=0.3)
        lab.probe(address, 62201, timeout=0.3)  # the SYN form of SPA (fwknop -P tcpraw)
        lab.send_knocks(address, [2000, 30000])
        send_udp(lab, address, 62201, 2)
    wait_for(seen, 2 * (1 + 1 + 2 + 2))
    by_kind: dict[tuple[int, int], set[int]] = {}
    for p in seen():
        by_kind.setdefault((p["proto"], p["dport"]), set()).add(p["queue"])
    assert set(by_kind) == {(TCP, 22), (TCP, 62201), (TCP, 2000), (TCP, 30000), (UDP, 62201)}
    for kind in ((TCP, 22), (TCP, 62201), (UDP, 62201)):
        assert by_kind[kind] <= priority, (kind, by_kind)
    for kind in ((TCP, 2000), (TCP, 30000)):
        assert by_kind[kind] <= knock, (kind, by_kind)
    assert {p["src"] for p in seen()} == {CLIENT4, CLIENT6}


def test_an_spa_burst_above_the_per_source_limit_is_dropped_before_the_queue(
    lab: Lab, sink: Callable[..., Callable[[], list[dict[str, Any]]]]
) -> None:
    cfg = lab.write_config(
        {"alice": SECRET}, spa={"rate_per_source": 2, "rate_burst": 5, "rate_global": 1000}
    )
    lab.install_rules(cfg)
    lab.add_client_address("198.51.100.11/24")
    seen = sink(0)
    started = time.monotonic()
    send_udp(lab, SERVER4, 62201, 40, source=CLIENT4)
    send_udp(lab, SERVER4, 62201, 3, source="198.51.100.11")  # its own budget
    elapsed = time.monotonic() - started
    wait_for(seen, 8)
    first = [p for p in seen() if p["src"] == CLIENT4]
    assert all(p["queue"] == 0 and p["proto"] == UDP for p in seen())
    assert 5 <= len(first) <= 5 + int(2 * elapsed) + 1, (len(first), elapsed)
    assert len([p for p in seen() if p["src"] == "198.51.100.11"]) == 3
    per_source, everyone, queued = counters(lab, "NFKNOCK-SPA")
    assert per_source == 40 - len(first)  # dropped by the per-source rule, before the queue
    assert everyone == 0 and queued == len(seen())


def test_an_ipv6_source_is_its_slash_64_for_the_spa_limit(
    lab: Lab, sink: Callable[..., Callable[[], list[dict[str, Any]]]]
) -> None:
    cfg = lab.write_config(
        {"alice": SECRET}, spa={"rate_per_source": 1, "rate_burst": 4, "rate_global": 1000}
    )
    lab.install_rules(cfg)
    lab.add_client_address("2001:db8::11/64")
    seen = sink(0)
    started = time.monotonic()
    send_udp(lab, SERVER6, 62201, 10, source=CLIENT6)
    send_udp(lab, SERVER6, 62201, 10, source="2001:db8::11")  # the same /64: same budget
    elapsed = time.monotonic() - started
    wait_for(seen, 4)
    assert 4 <= len(seen()) <= 4 + int(elapsed) + 1, (seen(), elapsed)
    assert counters(lab, "NFKNOCK-SPA", "ip6tables")[0] == 20 - len(seen())


def test_the_global_spa_limit_bounds_what_all_sources_put_on_the_queue(
    lab: Lab, sink: Callable[..., Callable[[], list[dict[str, Any]]]]
) -> None:
    cfg = lab.write_config(
        {"alice": SECRET}, spa={"rate_per_source": 1000, "rate_burst": 1000, "rate_global": 3}
    )
    lab.install_rules(cfg)
    lab.add_client_address("198.51.100.11/24")
    seen = sink(0)
    started = time.monotonic()
    send_udp(lab, SERVER4, 62201, 10, source=CLIENT4)
    send_udp(lab, SERVER4, 62201, 10, source="198.51.100.11")
    elapsed = time.monotonic() - started
    wait_for(seen, 3)
    assert 3 <= len(seen()) <= 3 + int(3 * elapsed) + 1, (len(seen()), elapsed)
    per_source, everyone, queued = counters(lab, "NFKNOCK-SPA")
    assert per_source == 0 and everyone == 20 - len(seen()) and queued == len(seen())
