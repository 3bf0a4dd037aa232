"""Rendered rulesets: golden files, the shipped rules/ files, and their order."""

from __future__ import annotations

import os
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from nfknock.admin import CONFIG_TEMPLATE
from nfknock.config import Config, parse_config
from nfknock.rules import render_aws_sg, render_iptables, render_nftables

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


@pytest.mark.parametrize(("suffix", "render"), RENDERERS)
def test_gateway_ruleset_matches_golden(suffix: str, render: object) -> None:
    assert callable(render)
    _golden(f"gateway.{suffix}", render(_config(GATEWAY_CONFIG)))


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


def test_iptables_order_established_allow_mark_queue_exclude_knock() -> None:
    text = render_iptables(_config(GATEWAY_CONFIG), 4)
    idx = _order(
        text,
        "ESTABLISHED",
        "-s 203.0.113.0/24",
        "--mark",
        "--dports 22,2222 --tcp-flags",
        "--dports 22,2222 -j DROP",
        "--dports 2080,2443 -j RETURN",
        "--dport 2000:2999",
    )
    assert idx == sorted(idx)


def test_no_queue_bypass_anywhere() -> None:
    for text in (
        render_iptables(_config(GATEWAY_CONFIG), 4),
        render_iptables(_config(GATEWAY_CONFIG), 6),
        render_nftables(_config(GATEWAY_CONFIG)),
    ):
        assert "bypass" not in text


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
    path = GOLDEN / "gateway.nft"
    proc = subprocess.run(
        ["nft", "--check", "-f", str(path)], capture_output=True, text=True, check=False
    )
    lines = proc.stderr.splitlines()
    errors = [i for i, ln in enumerate(lines) if ": Error: " in ln]
    assert proc.returncode == 0 or errors, proc.stderr
    for i in errors:
        assert "Could not process rule" in lines[i], proc.stderr
        assert "queue num 7" in lines[i + 1], proc.stderr
    assert len(errors) in (0, sum("queue num" in ln for ln in path.read_text().splitlines()))


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
    assert {(p["FromPort"], p["ToPort"]) for p in perms} == {
        (2000, 2999),
        (22, 22),
        (2222, 2222),
        (3389, 3389),
    }
    assert all(p["IpProtocol"] == "tcp" for p in perms)
