"""Installed-rules checks, transactions and the applied record, against fake
``iptables -S`` listings (the real kernel: tests/kernel/test_rules_kernel.py)."""

from __future__ import annotations

import argparse
import os
import stat
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from nfknock import admin, applied, rules, xtables
from nfknock.config import Config, parse_config
from nfknock.render import render_iptables
from nfknock.xtables import FAMILIES, Family, Table, parse_listing

CONFIG = "[knock]\nexclude = [8080]\n[[protect]]\nport = 22\n"
INSTALLED_AT = 1_700_000_000.0


def _config(text: str = CONFIG) -> Config:
    return parse_config(Path("/etc/nfknock/nfknock.toml"), tomllib.loads(text), load_users=False)


def _chains(rendered: str) -> dict[str, list[str]]:
    """Our chains as a fake kernel 'normalises' them (here: the rendered text)."""
    out: dict[str, list[str]] = {}
    for line in rendered.splitlines():
        if line.startswith(":"):
            out[line[1:].split()[0]] = []
        elif line.startswith("-A "):
            _, chain, spec = line.split(" ", 2)
            out[chain].append(spec)
    return out


class FakeKernel:
    """The filter table of each family as lists of rules; read_table serves it."""

    def __init__(self, cfg: Config) -> None:
        self.tables: dict[int, dict[str, list[str]]] = {}
        for fam in FAMILIES:
            chains = _chains(render_iptables(cfg, fam.version))
            table = {"INPUT": ["-j NFKNOCK-INPUT"], "FORWARD": [], "OUTPUT": []}
            self.tables[fam.version] = {**table, **chains}
        self.unreadable = False

    def read(self, family: Family, name: str = "filter") -> Table:
        if self.unreadable:
            raise xtables.RulesError("iptables -S failed: Permission denied")
        if name != "filter":
            return Table({}, name)
        return Table({c: list(r) for c, r in self.tables[family.version].items()})


@pytest.fixture
def kernel(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeKernel]:
    fake = FakeKernel(_config())
    monkeypatch.setattr(xtables, "read_table", fake.read)
    yield fake


def _record(path: Path, cfg: Config) -> applied.Applied:
    families = {}
    for fam in FAMILIES:
        text = render_iptables(cfg, fam.version)
        families[fam.tool] = applied.FamilyRecord(text, _chains(text))
    record = applied.Applied(str(cfg.path), INSTALLED_AT, families)
    applied.save(path, record)
    return record


@pytest.fixture
def record(tmp_path: Path) -> Path:
    path = tmp_path / "lib" / "rules.applied"
    _record(path, _config())
    return path


def _codes(problems: list[rules.Problem]) -> list[tuple[str, str]]:
    return [(p.code, p.family) for p in problems]


# --- check -------------------------------------------------------------------------


def test_check_finds_nothing_when_the_kernel_holds_the_recorded_rules(
    kernel: FakeKernel, record: Path
) -> None:
    assert rules.check(_config(), record) == []


def test_a_rule_above_the_jump_is_reported_with_its_text(kernel: FakeKernel, record: Path) -> None:
    kernel.tables[4]["INPUT"].insert(0, "-p tcp -m tcp --dport 22 -j ACCEPT")
    problems = rules.check(_config(), record)
    assert _codes(problems) == [("jump_not_first", "iptables")]
    assert "INPUT rule 1 `-p tcp -m tcp --dport 22 -j ACCEPT`" in problems[0].detail
    assert "rule 2, not 1" in problems[0].detail
    assert f"nfknock rules --install --config /etc/nfknock/nfknock.toml --applied {record}" in (
        problems[0].fix
    )


def test_many_rules_above_the_jump_are_counted(kernel: FakeKernel, record: Path) -> None:
    kernel.tables[6]["INPUT"][:0] = [f"-s 2001:db8::{i} -j ACCEPT" for i in range(5)]
    (problem,) = rules.check(_config(), record)
    assert problem.code == "jump_not_first" and problem.family == "ip6tables"
    assert "and 2 more" in problem.detail


def test_a_missing_jump_is_reported(kernel: FakeKernel, record: Path) -> None:
    kernel.tables[4]["INPUT"] = []
    assert _codes(rules.check(_config(), record)) == [("jump_missing", "iptables")]


def test_a_jump_with_conditions_is_not_a_jump(kernel: FakeKernel, record: Path) -> None:
    kernel.tables[4]["INPUT"] = ["-i eth0 -j NFKNOCK-INPUT"]
    (problem,) = rules.check(_config(), record)
    assert problem.code == "jump_conditional"
    assert "`-i eth0 -j NFKNOCK-INPUT`" in problem.detail


def test_second_jumps_from_anywhere_are_reported(kernel: FakeKernel, record: Path) -> None:
    kernel.tables[4]["INPUT"].append("-i eth1 -j NFKNOCK-INPUT")
    kernel.tables[4]["MINE"] = ["-g NFKNOCK-SPA"]
    (problem,) = rules.check(_config(), record)
    assert problem.code == "jump_extra"
    assert "INPUT rule 2 `-i eth1 -j NFKNOCK-INPUT`" in problem.detail
    assert "MINE rule 1 `-g NFKNOCK-SPA`" in problem.detail


def test_a_rule_replaced_inside_our_chain_is_found_though_the_count_is_equal(
    kernel: FakeKernel, record: Path
) -> None:
    chain = kernel.tables[4]["NFKNOCK-INPUT"]
    i = next(i for i, r in enumerate(chain) if r.endswith("--dports 22 -j DROP"))
    chain[i] = "-p tcp -m multiport --dports 22 -j ACCEPT"
    (problem,) = rules.check(_config(), record)
    assert problem.code == "chain_changed"
    assert f"rule {i + 1} is `-p tcp -m multiport --dports 22 -j ACCEPT`" in problem.detail


def test_added_and_removed_rules_in_our_chains_are_found(kernel: FakeKernel, record: Path) -> None:
    kernel.tables[4]["NFKNOCK-SPA"].append("-j ACCEPT")
    kernel.tables[6]["NFKNOCK-INPUT"].pop()
    problems = rules.check(_config(), record)
    assert _codes(problems) == [("chain_changed", "iptables"), ("chain_changed", "ip6tables")]
    assert "`-j ACCEPT` was added" in problems[0].detail
    assert "is gone" in problems[1].detail


def test_missing_and_stale_chains_are_reported(kernel: FakeKernel, record: Path) -> None:
    del kernel.tables[4]["NFKNOCK-SPA"]
    kernel.tables[6]["NFKNOCK-FORWARD"] = []
    assert _codes(rules.check(_config(), record)) == [
        ("chain_missing", "iptables"),
        ("chain_stale", "ip6tables"),
    ]


def test_a_config_that_renders_other_rules_is_drift(kernel: FakeKernel, record: Path) -> None:
    changed = _config(CONFIG.replace("[8080]", "[8080, 8443]"))
    problems = rules.check(changed, record)
    assert _codes(problems) == [("config_drift", "iptables"), ("config_drift", "ip6tables")]
    assert "installed at 2023-11-14T22:13:20Z" in problems[0].detail
    assert "nfknock reload" in problems[0].fix


def test_without_a_record_the_jumps_and_chains_are_still_checked(
    kernel: FakeKernel, tmp_path: Path
) -> None:
    kernel.tables[4]["INPUT"].insert(0, "-j ACCEPT")
    del kernel.tables[6]["NFKNOCK-SPA"]
    assert _codes(rules.check(_config(), tmp_path / "none")) == [
        ("applied_record_missing", ""),
        ("jump_not_first", "iptables"),
        ("chain_missing", "ip6tables"),
    ]


def test_a_record_others_can_write_is_not_trusted(kernel: FakeKernel, record: Path) -> None:
    record.chmod(0o620)
    (problem,) = rules.check(_config(), record)
    assert problem.code == "applied_record_invalid"
    assert "writable by nobody else" in problem.detail


def test_an_unreadable_firewall_is_a_problem_not_an_exception(
    kernel: FakeKernel, record: Path
) -> None:
    kernel.unreadable = True
    assert _codes(rules.check(_config(), record)) == [
        ("firewall_unreadable", "iptables"),
        ("firewall_unreadable", "ip6tables"),
    ]


def test_a_config_iptables_cannot_express_is_a_problem(kernel: FakeKernel, record: Path) -> None:
    cfg = _config(CONFIG + "[spa]\nrate_global = 5000000\n")
    problems = rules.check(cfg, record)
    assert _codes(problems) == [
        ("config_unrenderable", "iptables"),
        ("config_unrenderable", "ip6tables"),
    ]
    assert "spa.rate_global" in problems[0].detail


# --- transactions ------------------------------------------------------------------


def test_install_transaction_moves_every_jump_to_rule_1_and_drops_stale_chains() -> None:
    table = parse_listing(
        "-P INPUT ACCEPT\n-P FORWARD ACCEPT\n-N MINE\n-N NFKNOCK-INPUT\n-N NFKNOCK-FORWARD\n"
        "-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT\n-A INPUT -j NFKNOCK-INPUT\n"
        "-A INPUT -i eth0 -j NFKNOCK-INPUT\n"
        '-A MINE -m comment --comment "not -j NFKNOCK-INPUT" -j RETURN\n'
        "-A MINE -j NFKNOCK-FORWARD\n-A NFKNOCK-FORWARD -j DROP\n"
    )
    rendered = render_iptables(_config(), 4)
    txn = xtables.transaction(rendered, table).splitlines()
    body = rendered.splitlines()[:-1]
    assert txn[: len(body)] == body
    assert txn[len(body) :] == [
        "-D INPUT -j NFKNOCK-INPUT",
        "-D INPUT -i eth0 -j NFKNOCK-INPUT",
        "-D MINE -j NFKNOCK-FORWARD",
        "-I INPUT 1 -j NFKNOCK-INPUT",
        "-F NFKNOCK-FORWARD",
        "-X NFKNOCK-FORWARD",
        "COMMIT",
    ]


def test_removal_touches_only_our_chains_and_the_jumps_into_them() -> None:
    table = parse_listing(
        "-P INPUT ACCEPT\n-N NFKNOCK-INPUT\n-N NFKNOCK-SPA\n-A INPUT -j ACCEPT\n"
        "-A INPUT -j NFKNOCK-INPUT\n-A NFKNOCK-INPUT -j NFKNOCK-SPA\n"
    )
    assert xtables.removal(table) == (
        "*filter\n-D INPUT -j NFKNOCK-INPUT\n-F NFKNOCK-INPUT\n-F NFKNOCK-SPA\n"
        "-X NFKNOCK-INPUT\n-X NFKNOCK-SPA\nCOMMIT\n"
    )
    assert xtables.removal(parse_listing("-P INPUT ACCEPT\n-A INPUT -j ACCEPT\n")) is None


def test_a_refused_second_family_puts_the_first_back_and_keeps_the_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kernel: FakeKernel
) -> None:
    path = tmp_path / "rules.applied"
    old = _record(path, _config())
    committed: list[tuple[str, str]] = []

    def restore(family: Family, text: str) -> None:
        if family.version == 6 and not any(t == "ip6tables" for t, _ in committed):
            committed.append(("ip6tables", "refused"))
            raise xtables.RulesError("ip6tables-restore failed: line 9")
        committed.append((family.tool, text))

    monkeypatch.setattr(xtables, "test_restore", lambda family, text: None)
    monkeypatch.setattr(xtables, "restore", restore)
    new = _config(CONFIG.replace("[8080]", "[8443]"))
    with pytest.raises(rules.RulesError) as raised:
        rules.apply(new, path)
    assert "line 9; iptables put back to the rules installed at 2023-11-14T22:13:20Z" in str(
        raised.value
    )
    (first, text1), refused, (again, text2) = committed
    assert (first, again, refused[0]) == ("iptables", "iptables", "ip6tables")
    assert "8443" in text1 and "8080" in text2 and "8443" not in text2
    assert applied.load(path) == old  # the record still names the rules in force


def test_nothing_is_committed_unless_both_families_test_clean(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kernel: FakeKernel
) -> None:
    def test_restore(family: Family, text: str) -> None:
        if family.version == 6:
            raise xtables.RulesError("ip6tables-restore --test failed: hashlimit")

    monkeypatch.setattr(xtables, "test_restore", test_restore)
    monkeypatch.setattr(xtables, "restore", _no_firewall)
    with pytest.raises(rules.RulesError, match="hashlimit; nothing was changed"):
        rules.apply(_config(), tmp_path / "rules.applied")
    assert not (tmp_path / "rules.applied").exists()


# --- the applied record ------------------------------------------------------------


def test_the_record_and_its_directories_are_private_whatever_the_umask(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "rules.applied"
    old = os.umask(0)
    try:
        written = _record(path, _config())
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.parent.parent.stat().st_mode) == 0o700
    assert applied.load(path) == written


def test_no_record_is_none_and_a_symlink_is_refused(tmp_path: Path, record: Path) -> None:
    assert applied.load(tmp_path / "missing") is None
    link = tmp_path / "link"
    link.symlink_to(record)
    with pytest.raises(applied.RecordError):
        applied.load(link)


@pytest.mark.parametrize(
    "line",
    ["-F INPUT", "-A INPUT -j ACCEPT", "*nat", ":INPUT ACCEPT [0:0]", "-P INPUT ACCEPT"],
)
def test_a_record_that_would_touch_more_than_our_chains_is_refused(
    tmp_path: Path, line: str
) -> None:
    path = tmp_path / "rules.applied"
    record = _record(path, _config())
    bad = record.families["iptables"].rendered.replace("COMMIT", f"{line}\nCOMMIT")
    families = {**record.families, "iptables": applied.FamilyRecord(bad, {})}
    applied.save(path, applied.Applied(record.config, INSTALLED_AT, families))
    with pytest.raises(applied.RecordError, match="more than nfknock's chains"):
        applied.load(path)


@pytest.mark.parametrize(
    "text", ["", "null", "[]", '{"version": 2}', '{"version": 1, "config": "x"}', "[" * 100_000]
)
def test_a_broken_record_is_a_record_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "rules.applied"
    path.write_text(text)
    path.chmod(0o600)
    with pytest.raises(applied.RecordError, match="not an applied-rules record"):
        applied.load(path)


# --- the commands, without a kernel ------------------------------------------------


def _write_config(tmp_path: Path, text: str) -> Path:
    (tmp_path / "users.toml").write_text("")
    (tmp_path / "users.toml").chmod(0o600)
    path = tmp_path / "nfknock.toml"
    path.write_text(text + '[users]\nfile = "users.toml"\n')
    return path


def _no_firewall(*args: object, **kw: object) -> None:
    raise AssertionError("the firewall must not be touched")


def test_install_with_a_bad_config_and_no_record_installs_nothing_and_exits_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(xtables, "_run", _no_firewall)
    config = _write_config(tmp_path, "[[protect]]\nport = 22\n[knock]\nlenght = 8\n")
    args = argparse.Namespace(install=True, config=str(config), applied=str(tmp_path / "none"))
    assert admin.cmd_rules(args) == 2
    err = capsys.readouterr().err
    assert "knock.lenght: unknown key" in err
    assert "nothing was installed" in err


def test_install_with_a_bad_config_reapplies_the_last_good_ruleset_loudly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "rules.applied"
    good = _record(path, _config())
    installed: list[dict[str, str]] = []
    monkeypatch.setattr(rules, "_install", lambda texts, previous: installed.append(texts))
    config = _write_config(tmp_path, "[[protect]]\nport = 'ssh'\n")
    args = argparse.Namespace(install=True, config=str(config), applied=str(path))
    assert admin.cmd_rules(args) == 1
    assert installed == [{t: f.rendered for t, f in good.families.items()}]
    err = capsys.readouterr().err.splitlines()
    assert "protect[0].port: must be int" in err[0]
    assert err[1].startswith(
        "nfknock rules: re-applied the last good ruleset installed at 2023-11-14T22:13:20Z "
        "from /etc/nfknock/nfknock.toml"
    )


def test_reload_with_a_bad_config_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(xtables, "_run", _no_firewall)
    monkeypatch.setattr(admin, "_signal_daemon", _no_firewall)
    config = _write_config(tmp_path, "[[protect]]\nport = 0\n")
    args = argparse.Namespace(config=str(config), applied=str(tmp_path / "rules.applied"))
    assert admin.cmd_reload(args) == 2
    assert "nothing was changed" in capsys.readouterr().err
    assert not (tmp_path / "rules.applied").exists()


def test_reload_applies_the_rules_before_the_daemon_and_not_at_all_if_they_fail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    calls: list[str] = []
    config = _write_config(tmp_path, "[[protect]]\nport = 443\n")
    args = argparse.Namespace(config=str(config), applied=str(tmp_path / "rules.applied"))

    def apply(cfg: Config, path: Path) -> list[str]:
        calls.append(f"apply {sorted(cfg.protected_ports)} {path}")
        return ["iptables: installed NFKNOCK-INPUT"]

    def signal(cfg: Config) -> str:
        calls.append("signal")
        return "the running daemon reloaded"

    monkeypatch.setattr(rules, "apply", apply)
    monkeypatch.setattr(admin, "_signal_daemon", signal)
    assert admin.cmd_reload(args) == 0
    assert calls == [f"apply [443] {tmp_path / 'rules.applied'}", "signal"]

    def refused(cfg: Config, path: Path) -> list[str]:
        raise rules.RulesError("iptables-restore failed: line 7")

    calls.clear()
    monkeypatch.setattr(rules, "apply", refused)
    assert admin.cmd_reload(args) == 1
    assert calls == []
    assert "line 7; the running configuration stays" in capsys.readouterr().err


# --- ensure: the daemon's reload -------------------------------------------------------


def test_ensure_touches_nothing_when_the_installed_rules_are_this_configs(
    kernel: FakeKernel, record: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a privileged `nfknock reload` leaves for the sandboxed daemon."""
    monkeypatch.setattr(xtables, "test_restore", lambda family, text: None)
    monkeypatch.setattr(xtables, "restore", lambda *_: pytest.fail("must not install"))
    assert rules.ensure(_config(), record) == [
        "the rules of this configuration are in place already"
    ]


@pytest.mark.parametrize("change", ["config", "kernel"])
def test_ensure_installs_when_the_config_or_the_live_chains_differ(
    kernel: FakeKernel, record: Path, monkeypatch: pytest.MonkeyPatch, change: str
) -> None:
    installed: list[str] = []
    monkeypatch.setattr(xtables, "test_restore", lambda family, text: None)
    monkeypatch.setattr(xtables, "restore", lambda family, text: installed.append(family.tool))
    cfg = _config()
    if change == "config":
        cfg = _config(CONFIG.replace("[8080]", "[8443]"))
    else:
        kernel.tables[4]["INPUT"].insert(0, "-p tcp --dport 22 -j ACCEPT")
    rules.ensure(cfg, record)
    assert installed == ["iptables", "ip6tables"]
