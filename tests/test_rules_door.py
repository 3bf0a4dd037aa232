"""The static rules of forwarded doors (nfknock.render_door): golden files of both
families and the nftables form, their order, the tables they touch, and that a
config without doors renders exactly what it did."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from nfknock import applied, xtables
from nfknock.config import Config, parse_config
from nfknock.render import render_aws_sg, render_iptables, render_nftables
from nfknock.xtables import Table, parse_listing
from tests.test_rules import GATEWAY_CONFIG, _golden, _order

DOOR_CONFIG = """
[queue]
number = 3
[knock]
port_min = 2000
port_max = 2999
length = 8
[[protect]]
port = 22
[[protect]]
port = 3389
address = "2001:db8::20"
[[door.forward]]
name = "ssh-behind"
doors = "40000-40999"
address = "198.51.100.130"
port = 22
[[door.forward]]
name = "here"
doors = "41000-41099"
port = 22
[[door.forward]]
name = "rdp6"
doors = "42000-42099"
address = "2001:db8::20"
port = 3389
"""


def _config(text: str = DOOR_CONFIG) -> Config:
    return parse_config(Path("/etc/nfknock/nfknock.toml"), tomllib.loads(text), load_users=False)


@pytest.mark.parametrize(
    ("suffix", "render"),
    [
        ("iptables", lambda c: render_iptables(c, 4)),
        ("ip6tables", lambda c: render_iptables(c, 6)),
        ("nft", render_nftables),
        ("aws-sg.json", render_aws_sg),
    ],
)
def test_door_ruleset_matches_golden(suffix: str, render: object) -> None:
    assert callable(render)
    _golden(f"door.{suffix}", render(_config()))


def test_the_queue_hook_is_in_mangle_prerouting_and_the_translation_in_nat() -> None:
    text = render_iptables(_config(), 4)
    names = [t for t, _ in xtables.sections(text)]
    assert names == ["filter", "nat", "mangle"]  # filter first: see render_door
    mangle = dict(xtables.sections(text))["mangle"]
    idx = _order("\n".join(mangle), "-i lo -j RETURN", "--mark 0x4e4b0001 -j RETURN", "NFQUEUE")
    assert idx == sorted(idx)
    queued = [ln for ln in mangle if "NFQUEUE" in ln]
    assert queued == [
        "-A NFKNOCK-DOOR -p tcp -m addrtype --dst-type LOCAL --dport 40000:40999 "
        "--tcp-flags SYN,ACK,FIN,RST SYN -m conntrack --ctstate NEW -j NFQUEUE --queue-num 3",
        "-A NFKNOCK-DOOR -p tcp -m addrtype --dst-type LOCAL --dport 41000:41099 "
        "--tcp-flags SYN,ACK,FIN,RST SYN -m conntrack --ctstate NEW -j NFQUEUE --queue-num 3",
    ]
    nat = dict(xtables.sections(text))["nat"]
    assert [ln for ln in nat if "DNAT" in ln and "-A" in ln] == [
        "-A NFKNOCK-DNAT -p tcp -m mark --mark 0x4e4b0101 --dport 40000:40999 -j DNAT "
        "--to-destination 198.51.100.130:22",
        "-A NFKNOCK-DNAT -p tcp -m mark --mark 0x4e4b0102 --dport 41000:41099 -j DNAT "
        "--to-destination :22",
    ]


def test_marked_translated_syns_are_accepted_before_anything_queues_or_rejects() -> None:
    text = render_iptables(_config(), 4)
    idx = _order(
        text,
        "-A NFKNOCK-INPUT -p tcp --dport 22 --tcp-flags SYN,ACK,FIN,RST SYN -m mark --mark "
        "0x4e4b0102 -m conntrack --ctstate DNAT --ctorigdstport 41000:41099 -j ACCEPT",
        "-A NFKNOCK-INPUT -p tcp -m mark --mark 0x4e4b0001 -j REJECT",
        "-A NFKNOCK-INPUT -p tcp --dport 40000:40999 -j DROP",
        "-A NFKNOCK-INPUT -p tcp --dport 41000:41099 -j DROP",
        "-A NFKNOCK-INPUT -p tcp -m multiport --dports 22 --tcp-flags",
    )
    assert idx == sorted(idx)
    # The target behind the gateway is not protected: closed but for the door.
    forward = [ln for ln in text.splitlines() if ln.startswith("-A NFKNOCK-FORWARD")]
    assert forward == [
        "-A NFKNOCK-FORWARD -p tcp -d 198.51.100.130 --dport 22 --tcp-flags SYN,ACK,FIN,RST SYN "
        "-m mark --mark 0x4e4b0101 -m conntrack --ctstate DNAT --ctorigdstport 40000:40999 "
        "-j ACCEPT",
        "-A NFKNOCK-FORWARD -p tcp -d 198.51.100.130 --dport 22 -m conntrack --ctstate "
        "ESTABLISHED,RELATED -j ACCEPT",
        "-A NFKNOCK-FORWARD -p tcp -s 198.51.100.130 --sport 22 -m conntrack --ctstate "
        "ESTABLISHED,RELATED -j ACCEPT",
        "-A NFKNOCK-FORWARD -p tcp -d 198.51.100.130 --dport 22 -j DROP",
        "-A NFKNOCK-FORWARD -p tcp -m mark --mark 0x4e4b0001 -j REJECT --reject-with tcp-reset",
    ]


def test_an_entry_of_the_other_family_is_only_closed() -> None:
    text6 = render_iptables(_config(), 6)
    assert "198.51.100.130" not in text6 and "40000:40999 -j DNAT" not in text6
    assert "-A NFKNOCK-INPUT -p tcp --dport 40000:40999 -j DROP" in text6
    assert "--to-destination [2001:db8::20]:3389" in text6
    # The IPv6 target is protected: its own rules stay, the door adds its accept only.
    assert "-d 2001:db8::20 --dport 3389 -j DROP" not in text6


def test_without_doors_nothing_changes_and_no_other_table_is_rendered() -> None:
    cfg = _config(GATEWAY_CONFIG)
    for family in (4, 6):
        text = render_iptables(cfg, family)
        assert [t for t, _ in xtables.sections(text)] == ["filter"]
        assert "NFKNOCK-DOOR" not in text and "NFKNOCK-DNAT" not in text
    assert "door_" not in render_nftables(cfg)


def test_a_door_only_host_still_renders_its_input_chain() -> None:
    text = GATEWAY_CONFIG.split("[[protect]]")[0] + (
        '[[protect]]\nport = 3389\naddress = "2001:db8::20"\n'
        '[[door.forward]]\nname = "d"\ndoors = "40000-40009"\nport = 22\n'
    )
    out = render_iptables(_config(text), 4)
    assert ":NFKNOCK-INPUT - [0:0]" in out and ":NFKNOCK-SPA" not in out


def test_the_transaction_jumps_from_every_hook_and_removes_what_the_config_drops() -> None:
    rendered = render_iptables(_config(), 4)
    tables = {
        "filter": parse_listing("-P INPUT ACCEPT\n"),
        "nat": Table({"PREROUTING": ["-j DOCKER"]}, "nat"),
        "mangle": Table({"PREROUTING": []}, "mangle"),
    }
    txn = xtables.transaction(rendered, tables).splitlines()
    for table, line in (
        ("filter", "-I INPUT 1 -j NFKNOCK-INPUT"),
        ("nat", "-I PREROUTING 1 -j NFKNOCK-DNAT"),
        ("mangle", "-I PREROUTING 1 -j NFKNOCK-DOOR"),
    ):
        head = txn.index(f"*{table}")
        assert line in txn[head : txn.index("COMMIT", head)]
    # Now the doors go from the config: both chains are flushed and deleted.
    installed = {
        "filter": parse_listing("-P INPUT ACCEPT\n-N NFKNOCK-INPUT\n-A INPUT -j NFKNOCK-INPUT\n"),
        "nat": Table({"PREROUTING": ["-j NFKNOCK-DNAT"], "NFKNOCK-DNAT": []}, "nat"),
        "mangle": Table(
            {"PREROUTING": ["-j NFKNOCK-DOOR"], "NFKNOCK-DOOR": ["-j RETURN"]}, "mangle"
        ),
    }
    text = xtables.transaction(render_iptables(_config(GATEWAY_CONFIG), 4), installed)
    assert "*nat\n-D PREROUTING -j NFKNOCK-DNAT\n-F NFKNOCK-DNAT\n-X NFKNOCK-DNAT\nCOMMIT" in text
    gone = "-D PREROUTING -j NFKNOCK-DOOR\n-F NFKNOCK-DOOR\n-X NFKNOCK-DOOR"
    assert f"*mangle\n{gone}\nCOMMIT" in text
    removal = xtables.removal(installed)
    assert removal is not None and removal.count("COMMIT") == 3


def test_a_record_with_door_tables_loads_and_one_smuggling_a_rule_elsewhere_does_not(
    tmp_path: Path,
) -> None:
    rendered = render_iptables(_config(), 4)
    applied._check_rendered(rendered)
    for bad in (
        rendered.replace(":NFKNOCK-DNAT - [0:0]", ":NFKNOCK-DNAT - [0:0]\n-A PREROUTING -j ACCEPT"),
        rendered.replace("*nat\n:NFKNOCK-DNAT", "*nat\n:NFKNOCK-DOOR - [0:0]\n:NFKNOCK-DNAT"),
        rendered.replace("*mangle", "*raw"),
        rendered + "*nat\nCOMMIT\n",
    ):
        with pytest.raises(ValueError):
            applied._check_rendered(bad)


def test_the_periodic_check_reads_nat_and_mangle_only_with_doors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nfknock import rules

    read: list[str] = []

    def fake_read(family: xtables.Family, name: str = "filter") -> Table:
        read.append(name)
        return Table({}, name)

    monkeypatch.setattr(xtables, "read_table", fake_read)
    rules.check(_config(GATEWAY_CONFIG), tmp_path / "none")
    assert set(read) == {"filter"} and len(read) == 2
    read.clear()
    problems = rules.check(_config(), tmp_path / "none")
    assert sorted(set(read)) == ["filter", "mangle", "nat"]
    missing = {p.detail.split()[1] for p in problems if p.code == "chain_missing"}
    assert {"NFKNOCK-DOOR", "NFKNOCK-DNAT"} <= missing
    jumps = [p.detail for p in problems if p.code == "jump_missing"]
    assert any("PREROUTING (nat)" in d for d in jumps)
    assert any("PREROUTING (mangle)" in d for d in jumps)
