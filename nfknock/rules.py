"""Install, check and remove nfknock's static rules (iptables and ip6tables).

The text and the order of the rules are :mod:`nfknock.render`'s (its docstring is
the security argument); the transactions are :mod:`nfknock.xtables`'; the record of
the last good install is :mod:`nfknock.applied`'s.  This module ties them together:

* :func:`apply` -- render both families, test both transactions, commit them (each
  atomic; if the second fails the first is put back as the last record had it), read
  back the kernel's normalised chains and write the applied record.  Used by
  ``rules --install``, ``reload`` and the daemon's own reload.
* :func:`reapply` -- put the last good record back (a config that does not validate
  must never leave protected ports more open than the last good one).
* :func:`check` -- what lets a protected port past nfknock or drifts from the
  config, as :class:`Problem` values with a stable ``code``: two ``iptables -S``
  calls, cheap enough for the daemon to run periodically.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from nfknock import applied, xtables
from nfknock.applied import DEFAULT_APPLIED, Applied, FamilyRecord, RecordError
from nfknock.config import Config, ConfigError
from nfknock.render import (
    HOOK_CHAINS,
    OWNED_CHAINS,
    TABLE_OF,
    knock_ranges,
    render_aws_sg,
    render_iptables,
    render_nftables,
)
from nfknock.xtables import FAMILIES, Family, RulesError

__all__ = [
    "DEFAULT_APPLIED",
    "Problem",
    "RecordError",
    "RecordNotWritten",
    "RulesError",
    "apply",
    "check",
    "ensure",
    "knock_ranges",
    "reapply",
    "remove",
    "render_aws_sg",
    "render_iptables",
    "render_nftables",
]


class RecordNotWritten(RulesError):
    """The rules are installed, but their record could not be written."""


# How many rules above a misplaced jump a problem quotes.
QUOTE_ABOVE = 3


@dataclass(frozen=True)
class Problem:
    """One finding of :func:`check`.  ``code`` is stable (snake_case, never reworded);
    ``family`` is "iptables", "ip6tables" or "" (both); ``fix`` says what to do."""

    code: str
    family: str
    detail: str
    fix: str

    def __str__(self) -> str:
        return f"{self.family}: {self.detail}" if self.family else self.detail


def _install_command(cfg_path: str | Path, applied_path: Path) -> str:
    extra = "" if applied_path == DEFAULT_APPLIED else f" --applied {applied_path}"
    return f"nfknock rules --install --config {cfg_path}{extra}"


# --- installing ---------------------------------------------------------------------


def _install(texts: dict[str, str], previous: Applied | None) -> dict[str, FamilyRecord]:
    """Commit ``texts`` (tool name -> rendered text) family by family; return what
    the kernel then holds.  Nothing is committed unless both transactions test
    clean; a failure in the second family puts the first back as ``previous`` had it."""
    planned = []
    for fam in FAMILIES:
        tables = xtables.read_tables(fam)
        txn = xtables.transaction(texts[fam.tool], tables)
        try:
            xtables.test_restore(fam, txn)
        except RulesError as exc:
            raise RulesError(f"{exc}; nothing was changed") from None
        planned.append((fam, txn))
    done: list[Family] = []
    for fam, txn in planned:
        try:
            xtables.restore(fam, txn)
        except RulesError as exc:
            raise RulesError(f"{exc}{_roll_back(done, previous)}") from None
        done.append(fam)
    out = {}
    for fam in FAMILIES:
        out[fam.tool] = FamilyRecord(texts[fam.tool], xtables.owned(xtables.read_tables(fam)))
    return out


def _roll_back(done: list[Family], previous: Applied | None) -> str:
    if not done:
        return "; nothing was changed"
    names = ", ".join(f.tool for f in done)
    if previous is None:
        return f"; {names} already carries the new rules (no earlier record to go back to)"
    try:
        for fam in done:
            text = previous.families[fam.tool].rendered
            xtables.restore(fam, xtables.transaction(text, xtables.read_tables(fam)))
    except RulesError as exc:
        return f"; putting {names} back failed too: {exc}"
    return f"; {names} put back to the rules installed at {previous.when()}"


def _previous(applied_path: Path) -> Applied | None:
    try:
        return applied.load(applied_path)
    except RecordError:
        return None


def apply(cfg: Config, applied_path: Path = DEFAULT_APPLIED, now: float | None = None) -> list[str]:
    """Install the rules ``cfg`` renders (both families) and record them as the last
    good ruleset.  :class:`RulesError`: nothing new stays installed (see
    :func:`_install`) and the record is unchanged.  Returns one line per family."""
    texts = {fam.tool: render_iptables(cfg, fam.version) for fam in FAMILIES}
    families = _install(texts, _previous(applied_path))
    record = Applied(os.path.abspath(cfg.path), time.time() if now is None else now, families)
    try:
        applied.save(applied_path, record)
    except OSError as exc:
        raise RecordNotWritten(
            f"the rules are installed, but the record {applied_path} could not be written "
            f"({exc.strerror}): a bad config at the next boot would find no last good ruleset"
        ) from None
    return [
        f"{tool}: installed {', '.join(fam.chains) or 'nothing (no target in this family)'}"
        for tool, fam in families.items()
    ]


def ensure(cfg: Config, applied_path: Path = DEFAULT_APPLIED) -> list[str]:
    """The rules of ``cfg`` in place: nothing to do when the last good record is
    exactly what ``cfg`` renders and the live chains are the ones recorded (a
    privileged ``nfknock reload`` has just applied them -- the daemon's sandbox need
    not be able to); otherwise :func:`apply`.  Returns what was done."""
    record = _previous(applied_path)
    if record is not None:
        wanted = {fam.tool: render_iptables(cfg, fam.version) for fam in FAMILIES}
        same = {t: f.rendered for t, f in record.families.items()} == wanted
        if same and not [p for p in check(cfg, applied_path) if p.code != "applied_record_missing"]:
            return ["the rules of this configuration are in place already"]
    return apply(cfg, applied_path)


def reapply(applied_path: Path = DEFAULT_APPLIED) -> Applied | None:
    """Put the last good ruleset back; None when there is no record.  The record
    itself is left as it is (it still names the config and time it came from)."""
    record = applied.load(applied_path)
    if record is None:
        return None
    _install({t: f.rendered for t, f in record.families.items()}, record)
    return record


def remove() -> list[str]:
    """Remove nfknock's jumps and chains; nothing else."""
    done = []
    for fam in FAMILIES:
        txn = xtables.removal(xtables.read_tables(fam))
        if txn is None:
            done.append(f"{fam.tool}: nothing to remove")
            continue
        xtables.restore(fam, txn)
        done.append(f"{fam.tool}: removed nfknock chains")
    return done


# --- checking -----------------------------------------------------------------------


def check(cfg: Config, applied_path: Path = DEFAULT_APPLIED) -> list[Problem]:
    """Everything that lets a protected port past nfknock, or differs from what the
    config renders, in both families (empty: all in place).  Never raises for a
    firewall or record problem: those are problems too."""
    install = _install_command(cfg.path, applied_path)
    problems: list[Problem] = []
    record: Applied | None = None
    try:
        record = applied.load(applied_path)
        if record is None:
            problems.append(
                Problem(
                    "applied_record_missing",
                    "",
                    f"no record of an install at {applied_path}: nfknock's chains cannot be "
                    "compared rule by rule",
                    f"run `{install}`",
                )
            )
    except RecordError as exc:
        problems.append(
            Problem("applied_record_invalid", "", str(exc), f"move it aside and run `{install}`")
        )
    for fam in FAMILIES:
        try:
            rendered = render_iptables(cfg, fam.version)
        except ConfigError as exc:  # valid for the daemon, not expressible in iptables
            problems.append(Problem("config_unrenderable", fam.tool, str(exc), "fix the config"))
            continue
        rec = record.families.get(fam.tool) if record else None
        want = rec.chains if rec else {c: [] for c in OWNED_CHAINS if f":{c} " in rendered}
        # The nat and mangle tables only when doors are installed or configured: the
        # daemon runs this every 30 s, and without doors two calls do.
        names = {"filter", *(TABLE_OF[c] for c in want if c in TABLE_OF)}
        names |= {name for name, _ in xtables.sections(rendered)}
        try:
            tables = xtables.read_tables(fam, names)
        except RulesError as exc:
            problems.append(Problem("firewall_unreadable", fam.tool, str(exc), "check iptables"))
            continue
        problems += _check_jumps(fam.tool, tables, want, install)
        problems += _check_chains(fam.tool, tables, want, rec is not None, install)
        if record and rec and rec.rendered != rendered:
            problems.append(
                Problem(
                    "config_drift",
                    fam.tool,
                    f"the rules installed at {record.when()} from {record.config} differ from "
                    f"what {cfg.path} renders now",
                    f"run `nfknock reload --config {cfg.path}` (or `{install}`)",
                )
            )
    return problems


def _quote(chain: str, index: int, spec: str) -> str:
    return f"{chain} rule {index + 1} `{spec}`"


def _check_jumps(
    tool: str, tables: xtables.Tables, want: dict[str, list[str]], install: str
) -> list[Problem]:
    """Each hook's chain must be entered by exactly one rule: ``-j CHAIN``, the first
    rule of the hook; nothing else may jump into nfknock's chains.  (Filter hooks
    are named as before; the others with their table: ``PREROUTING (nat)``.)"""
    out = []
    for name, hooks in HOOK_CHAINS.items():
        out += _check_table_jumps(tool, tables.get(name), hooks, want, install)
    return out


def _check_table_jumps(
    tool: str,
    table: xtables.Table | None,
    hooks: dict[str, str],
    want: dict[str, list[str]],
    install: str,
) -> list[Problem]:
    if table is None:
        return []
    out = []
    refs = table.references()
    accepted: set[tuple[str, int]] = set()
    for hook_name, chain in hooks.items():
        if chain not in want:
            continue
        rules = table.chains.get(hook_name, [])
        hook = hook_name if table.name == "filter" else f"{hook_name} ({table.name})"
        first = next((i for i, spec in enumerate(rules) if spec == f"-j {chain}"), None)
        if first is None:
            partial = [r for r in refs if r[0] == hook_name and xtables.jump_target(r[2]) == chain]
            code, detail = "jump_missing", f"{hook} does not jump to {chain}: {hook} is unguarded"
            if partial:
                code = "jump_conditional"
                detail = (
                    f"{hook} jumps to {chain} only under conditions "
                    f"({_quote(*partial[0])}): other packets pass nfknock"
                )
            out.append(Problem(code, tool, detail, f"run `{install}`"))
            accepted.update((r[0], r[1]) for r in partial)
            continue
        accepted.add((hook_name, first))
        if first > 0:
            above = "; ".join(_quote(hook, i, rules[i]) for i in range(min(first, QUOTE_ABOVE)))
            more = f" and {first - QUOTE_ABOVE} more" if first > QUOTE_ABOVE else ""
            out.append(
                Problem(
                    "jump_not_first",
                    tool,
                    f"the jump to {chain} is {hook} rule {first + 1}, not 1: {above}{more} "
                    "decide(s) before nfknock and may let a protected port through",
                    f"run `{install}` (puts the jump back at rule 1); have the tool that "
                    "inserted them add its rules below nfknock's jump, or use [[allow]]",
                )
            )
    extra = [r for r in refs if (r[0], r[1]) not in accepted]
    if extra:
        quoted = "; ".join(f"{_quote(*r)}" for r in extra[:QUOTE_ABOVE])
        more = f" and {len(extra) - QUOTE_ABOVE} more" if len(extra) > QUOTE_ABOVE else ""
        out.append(
            Problem(
                "jump_extra",
                tool,
                f"{len(extra)} more jump(s) into nfknock's chains: {quoted}{more}",
                f"run `{install}` (keeps only the jump at rule 1 of each hook)",
            )
        )
    return out


def _check_chains(
    tool: str, tables: xtables.Tables, want: dict[str, list[str]], exact: bool, install: str
) -> list[Problem]:
    out = []
    for chain in OWNED_CHAINS:
        table = tables.get(TABLE_OF[chain])
        have = table.chains.get(chain) if table is not None else None
        if chain not in want:
            if have is not None:
                out.append(
                    Problem(
                        "chain_stale",
                        tool,
                        f"chain {chain} exists but the installed ruleset has none",
                        f"run `{install}`",
                    )
                )
            continue
        if have is None:
            out.append(
                Problem(
                    "chain_missing",
                    tool,
                    f"chain {chain} is missing: its ports are not guarded",
                    f"run `{install}`",
                )
            )
        elif exact and have != want[chain]:
            out.append(
                Problem(
                    "chain_changed",
                    tool,
                    f"{chain} differs from what nfknock installed: "
                    + _first_difference(have, want[chain]),
                    f"run `{install}` (rewrites nfknock's chains; put local changes in the "
                    "config, e.g. [[allow]] or [knock] exclude)",
                )
            )
    return out


def _first_difference(have: list[str], want: list[str]) -> str:
    for i, (h, w) in enumerate(zip(have, want, strict=False)):
        if h != w:
            return f"rule {i + 1} is `{h}`, installed `{w}`"
    counts = f"({len(have)} rules, installed {len(want)})"
    if len(have) > len(want):
        return f"rule {len(want) + 1} `{have[len(want)]}` was added {counts}"
    return f"rule {len(have) + 1} `{want[len(have)]}` is gone {counts}"
