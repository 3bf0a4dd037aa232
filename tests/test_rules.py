"""Rendered rulesets: golden files, the shipped rules/ files, their order, the queue
split and the SPA rules."""

from __future__ import annotations

import os
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from nfknock.admin import CONFIG_TEMPLATE
from nfknock.config import Config, ConfigError, parse_config
from nfknock.render import render_aws_sg, render_iptables, render_nftables

HERE = Path(__file__).parent
GOLDEN = HERE / "golden"
SHIPPED = HERE.parent / "rules"
UPDATE = os.environ.get("NFKNOCK_UPDATE_GOLDEN") == "1"

GATEWAY_CONFIG = """
[queue]
number = 7
[knock]
port_min = 2000
port_max = 2999
length = 8
exclude = [2080, 2443]
[[protect]]
port = 22
[[protect]]
port = 2222
[[protect]]
port = 22
address = "198.51.100.20"
[[protect]]
port = 3389
address = "2001:db8::20"
[[allow]]
network = "203.0.113.0/24"
[[allow]]
network = "2001:db8:1::/48"
ports = [22]
"""


# Two workers per queue (--queue-balance), the knock queues set apart, two SPA ports
# with their own rates, a host behind the gateway.
BALANCED_CONFIG = """
[queue]
number = 4
workers = 2
knock_number = 10
[spa]
ports = [62201, 40000]
rate_per_source = 2
rate_burst = 3
rate_global = 1000
[[protect]]
port = 22
[[protect]]
port = 22
address = "198.51.100.20"
"""

NO_SPA_CONFIG = (
    '[spa]\nports = []\n[[protect]]\nport = 22\n[[protect]]\nport = 22\naddress = "2001:db8::20"\n'
)


def _config(text: str) -> Config:
    return parse_config(Path("/etc/nfknock/nfknock.toml"), tomllib.loads(text), load_users=False)


# (file suffix, renderer) of every text ruleset format.
RENDERERS = [
    ("iptables", lambda c: render_iptables(c, 4)),
    ("ip6tables", lambda c: render_iptables(c, 6)),
    ("nft", render_nftables),
]


def _golden(name: str, text: str, where: Path = GOLDEN) -> None:
    path = where / name
    if UPDATE:
        path.write_text(text)
    assert path.read_text() == text, f"{path} differs; NFKNOCK_UPDATE_GOLDEN=1 regenerates it"


CONFIGS = {"gateway": GATEWAY_CONFIG, "balanced": BALANCED_CONFIG}


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize(("suffix", "render"), RENDERERS)
def test_ruleset_matches_golden(name: str, suffix: str, render: object) -> None:
    assert callable(render)
    _golden(f"{name}.{suffix}", render(_config(CONFIGS[name])))


def _default() -> Config:
    text = CONFIG_TEMPLATE.format(
        config="/etc/nfknock/nfknock.toml",
        state="/var/lib/nfknock/state.db",
        users="/etc/nfknock/users.toml",
        socket="/run/nfknock/control.sock",
    )
    return _config(text)


@pytest.mark.parametrize(("suffix", "render"), RENDERERS)
def test_shipped_rules_match_the_default_config(suffix: str, render: object) -> None:
    assert callable(render)
    _golden(f"nfknock.{suffix}", render(_default()), SHIPPED)


def _order(text: str, *needles: str) -> list[int]:
    lines = text.splitlines()
    return [next(i for i, ln in enumerate(lines) if n in ln) for n in needles]


def test_iptables_order_established_allow_mark_spa_queue_exclude_knock() -> None:
    text = render_iptables(_config(GATEWAY_CONFIG), 4)
    idx = _order(
        text,
        "ESTABLISHED",
        "-s 203.0.113.0/24",
        "--mark",
        "-p udp -m multiport --dports 62201 -j NFKNOCK-SPA",
        "-p tcp -m multiport --dports 62201 --tcp-flags",
        "-p tcp -m multiport --dports 62201 -j DROP",
        "--dports 22,2222 --tcp-flags",
        "--dports 22,2222 -j DROP",
        "--dports 2080,2443 -j RETURN",
        "--dport 2000:2999",
    )
    assert idx == sorted(idx)


def test_nftables_order_mark_spa_queue_exclude_knock() -> None:
    text = render_nftables(_config(GATEWAY_CONFIG))
    idx = _order(
        text,
        "chain input",
        "meta mark",
        "udp dport { 62201 } jump spa",
        "tcp dport { 62201 } tcp flags",
        "tcp dport { 62201 } drop",
        "tcp dport { 22, 2222 } tcp flags",
        "tcp dport { 2080, 2443 } return",
        "tcp dport 2000-2999",
    )
    assert idx == sorted(idx)


def _all_forms(text: str) -> list[str]:
    cfg = _config(text)
    return [render_iptables(cfg, 4), render_iptables(cfg, 6), render_nftables(cfg)]


@pytest.mark.parametrize("name", CONFIGS)
def test_no_queue_bypass_anywhere(name: str) -> None:
    for text in _all_forms(CONFIGS[name]):
        assert "queue" in text.lower()
        assert "bypass" not in text


def _queue_of(text: str, needle: str) -> str:
    """The queue target of the one kind of rule whose text contains ``needle``."""
    found = {
        ln.split("-j ")[-1] if "-j " in ln else ln.split(" queue ")[-1].strip()
        for ln in text.splitlines()
        if needle in ln and ("NFQUEUE" in ln or " queue " in ln)
    }
    assert len(found) == 1, (needle, found)
    return found.pop()


def test_protected_syns_go_to_the_priority_queue_and_knocks_to_the_knock_queue() -> None:
    cfg = _config(GATEWAY_CONFIG)  # number 7: the knock queue defaults to 8
    for family in (4, 6):
        text = render_iptables(cfg, family)
        assert _queue_of(text, "--dports 22") == "NFQUEUE --queue-num 7"
        assert _queue_of(text, "--dport 2000:2999") == "NFQUEUE --queue-num 8"
        spa = [ln for ln in text.splitlines() if ln.startswith("-A NFKNOCK-SPA -j NFQUEUE")]
        assert spa == ["-A NFKNOCK-SPA -j NFQUEUE --queue-num 7"]
    nft = render_nftables(cfg)
    assert _queue_of(nft, "dport { 22") == "num 7"
    assert _queue_of(nft, "2000-2999") == "num 8"


def test_workers_balance_each_queue_over_its_range() -> None:
    cfg = _config(BALANCED_CONFIG)  # priority 4-5, knock 10-11
    for family in (4, 6):
        text = render_iptables(cfg, family)
        assert _queue_of(text, "--dports 22 ") == "NFQUEUE --queue-balance 4:5"
        assert _queue_of(text, "--dport 1024:33791") == "NFQUEUE --queue-balance 10:11"
        assert "-A NFKNOCK-SPA -j NFQUEUE --queue-balance 4:5" in text
    nft = render_nftables(cfg)
    assert _queue_of(nft, "dport { 22 }") == "num 4-5"
    assert _queue_of(nft, "1024-33791") == "num 10-11"
    assert "\t\tqueue num 4-5\n" in nft  # the SPA chain


def _spa_chain(text: str) -> list[str]:
    return [
        ln.removeprefix("-A NFKNOCK-SPA ") for ln in text.splitlines() if "-A NFKNOCK-SPA" in ln
    ]


def test_spa_chain_drops_per_source_then_global_then_queues() -> None:
    cfg = _config(BALANCED_CONFIG)
    rules4, rules6 = _spa_chain(render_iptables(cfg, 4)), _spa_chain(render_iptables(cfg, 6))
    for rules in (rules4, rules6):
        assert len(rules) == 3
        per_source, everyone, queue = rules
        assert "--hashlimit-above 2/sec --hashlimit-burst 3 --hashlimit-mode srcip" in per_source
        assert per_source.endswith("-j DROP")
        assert "--hashlimit-above 1000/sec --hashlimit-burst 1000 " in everyone
        assert "--hashlimit-mode" not in everyone and everyone.endswith("-j DROP")
        assert queue == "-j NFQUEUE --queue-balance 4:5"
    assert "--hashlimit-srcmask" not in rules4[0]
    assert "--hashlimit-srcmask 64" in rules6[0]  # an IPv6 source is its /64


def test_spa_ports_take_udp_and_syns_of_any_conntrack_state_and_drop_other_tcp() -> None:
    """Any state: fwknop's -P tcpraw SYN has a zero TCP checksum (conntrack: INVALID)."""
    text = render_iptables(_config(BALANCED_CONFIG), 4)
    for d in ("", "-d 198.51.100.20 "):
        for chain in ("NFKNOCK-INPUT",) if not d else ("NFKNOCK-FORWARD",):
            assert f"-A {chain} -p udp {d}-m multiport --dports 40000,62201 -j NFKNOCK-SPA" in text
            assert (
                f"-A {chain} -p tcp {d}-m multiport --dports 40000,62201 --tcp-flags "
                "SYN,ACK,FIN,RST SYN -j NFKNOCK-SPA"
            ) in text
            assert f"-A {chain} -p tcp {d}-m multiport --dports 40000,62201 -j DROP" in text


def test_nftables_spa_limits_per_source_per_family_then_global() -> None:
    nft = render_nftables(_config(BALANCED_CONFIG))
    chain = nft.split("chain spa {")[1].split("}\n\tchain")[0]
    idx = _order(
        chain,
        "update @spa4 { ip saddr limit",
        "update @spa6 { ip6 saddr and ffff:ffff:ffff:ffff:: limit",
        "limit rate over 1000/second",
        "queue num 4-5",
    )
    assert idx == sorted(idx)
    assert "rate over 2/second burst 3 packets } drop" in chain


def test_without_spa_ports_there_is_no_spa_rule_in_any_form() -> None:
    cfg = _config(NO_SPA_CONFIG)
    for text in _all_forms(NO_SPA_CONFIG):
        assert "SPA" not in text and "spa" not in text and "udp" not in text
    assert '"udp"' not in render_aws_sg(cfg)


def test_hashlimit_names_change_with_the_rates_and_fit_the_kernel() -> None:
    # A hashlimit table keeps the rates of the rule that created it: a new rate under
    # the old name would silently keep the old one.
    def names(text: str) -> list[str]:
        return [w for r in _spa_chain(text) for w in r.split() if w.startswith("nfknock-")]

    base = names(render_iptables(_config(BALANCED_CONFIG), 4))
    faster = names(
        render_iptables(_config(BALANCED_CONFIG.replace("rate_burst = 3", "rate_burst = 4")), 4)
    )
    assert len(base) == 2 and all(len(n) <= 15 for n in base)
    assert base[0] != faster[0] and base[1] == faster[1]


def test_a_global_rate_iptables_cannot_express_is_a_config_error() -> None:
    cfg = _config(BALANCED_CONFIG.replace("rate_global = 1000", "rate_global = 2000000"))
    with pytest.raises(ConfigError, match=r"spa\.rate_global: 2000000/s is above"):
        render_iptables(cfg, 4)
    assert "limit rate over 2000000/second" in render_nftables(cfg)


def test_forward_rules_only_name_the_protected_host() -> None:
    text = render_iptables(_config(GATEWAY_CONFIG), 4)
    forward = [ln for ln in text.splitlines() if ln.startswith("-A NFKNOCK-FORWARD")]
    assert forward and all("198.51.100.20" in ln for ln in forward if "NFQUEUE" in ln)
    assert "2001:db8::20" not in text


def test_multiport_lists_are_split_at_15_ports() -> None:
    text = "\n".join(f"[[protect]]\nport = {p}" for p in range(100, 120))
    rendered = render_iptables(_config(text), 4)
    for line in rendered.splitlines():
        if "--dports" in line:
            ports = line.split("--dports ")[1].split()[0]
            assert len(ports.split(",")) <= 15


@pytest.mark.skipif(
    os.environ.get("CI") != "true" and (shutil.which("nft") is None or os.geteuid() != 0),
    reason="needs nft as root (under CI=true: runs, and fails without them)",
)
def test_nftables_ruleset_passes_nft_check_except_for_the_queue_expression() -> None:
    # `nft --check` validates every rule with the kernel and commits nothing.  This
    # kernel lacks the nft queue expression (CONFIG_NFT_QUEUE), so the queue rules
    # -- and only they -- may be refused; on a kernel that has it, all pass.
    for path in (GOLDEN / "gateway.nft", GOLDEN / "balanced.nft", SHIPPED / "nfknock.nft"):
        proc = subprocess.run(
            ["nft", "--check", "-f", str(path)], capture_output=True, text=True, check=False
        )
        lines = proc.stderr.splitlines()
        errors = [i for i, ln in enumerate(lines) if ": Error: " in ln]
        assert proc.returncode == 0 or errors, proc.stderr
        for i in errors:
            assert "Could not process rule" in lines[i], proc.stderr
            assert "queue num " in lines[i + 1], proc.stderr
        queues = sum("queue num" in ln for ln in path.read_text().splitlines())
        assert len(errors) in (0, queues), proc.stderr


def _with_users(text: str, users: str, tmp: Path) -> Config:
    (tmp / "users.toml").write_text(users)
    (tmp / "users.toml").chmod(0o600)
    (tmp / "nfknock.toml").write_text(text + '\n[users]\nfile = "users.toml"\n')
    from nfknock.config import load_config

    return load_config(tmp / "nfknock.toml")


def test_compat_users_widen_the_knock_range(tmp_path: Path) -> None:
    users = (
        '[users.old]\nscheme = "livingstone"\nsecret = "GEZDGNBVGY3TQOJQ"\n'
        '[users.rs]\nscheme = "totp-knockd-rs"\nsecret_utf8 = "correct horse battery staple"\n'
    )
    cfg = _with_users("[[protect]]\nport = 22\n", users, tmp_path)
    text = render_iptables(cfg, 4)
    assert "--dport 1000:33791 " in text  # 1000-9999 and 1024-32768 merge into v1's range
    assert "tcp dport 1000-33791 " in render_nftables(cfg)


def test_kommen_user_queues_every_port_but_the_excluded(tmp_path: Path) -> None:
    users = '[users.k]\nscheme = "kommen"\nsecret = "DefaultSecretKey"\n'
    cfg = _with_users("[knock]\nexclude = [443]\n[[protect]]\nport = 22\n", users, tmp_path)
    text = render_iptables(cfg, 4)
    idx = _order(text, "--dports 443 -j RETURN", "--dport 1:65535 ")
    assert idx == sorted(idx)


def test_aws_security_group_permissions_match_golden() -> None:
    import json

    text = render_aws_sg(_config(GATEWAY_CONFIG))
    _golden("gateway.aws-sg.json", text)
    perms = json.loads(text)
    assert {(p["IpProtocol"], p["FromPort"], p["ToPort"]) for p in perms} == {
        ("tcp", 2000, 2999),
        ("tcp", 22, 22),
        ("tcp", 2222, 2222),
        ("tcp", 3389, 3389),
        ("udp", 62201, 62201),  # SPA, and its SYN form
        ("tcp", 62201, 62201),
    }


UNIT = HERE.parent / "contrib" / "systemd" / "nfknock-rules.service"


def test_rules_unit_installs_with_the_last_good_fallback_and_never_removes_on_failure() -> None:
    lines = UNIT.read_text().splitlines()
    assert (
        "ExecStart=/usr/local/bin/nfknock rules --install --config /etc/nfknock/nfknock.toml"
        in (lines)
    )
    assert "StateDirectory=nfknock" in lines  # where the last good ruleset is kept
    assert "CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_RAW" in lines
    assert not any(ln.startswith("ExecStartPost") or ln.startswith("ExecStopPost") for ln in lines)


@pytest.mark.skipif(
    os.environ.get("CI") != "true" and shutil.which("systemd-analyze") is None,
    reason="needs systemd-analyze (under CI=true: runs, and fails without it)",
)
def test_rules_unit_exposure_stays_at_most_1_8() -> None:
    proc = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", str(UNIT)],
        capture_output=True,
        text=True,
        check=False,
    )
    score = float(proc.stdout.split("Overall exposure level for nfknock-rules.service: ")[1][:3])
    assert score <= 1.8, proc.stdout
