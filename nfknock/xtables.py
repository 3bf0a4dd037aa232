"""The iptables/ip6tables adapter: read the tables, replace nfknock's chains.

Everything nfknock changes in one family goes through one ``iptables-restore
--noflush`` transaction: the chains' new contents, the removal of every jump into
them from other chains, the one jump at rule 1 of each hook (``INPUT`` /
``FORWARD`` in the filter table; ``PREROUTING`` in mangle and nat for forwarded
doors), and the removal of chains no longer used.  The kernel applies each table's
section atomically (a restore commits table by table: the filter table first,
then nat and mangle -- every state in between is closed, see nfknock.render_door).
The transaction is first run with ``--test`` (parsed and built, not committed).
What the kernel holds is read back with ``iptables -t TABLE -S`` (its own
normalised text).
"""

from __future__ import annotations

import itertools
import shlex
import shutil
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from nfknock.render import HOOK_CHAINS, OWNED_CHAINS, TABLE_OF

TIMEOUT = 60.0


class RulesError(Exception):
    """A firewall tool failed or is missing."""


@dataclass(frozen=True)
class Family:
    version: int  # 4 | 6
    tool: str  # iptables | ip6tables
    restore: str  # iptables-restore | ip6tables-restore


FAMILIES = (Family(4, "iptables", "iptables-restore"), Family(6, "ip6tables", "ip6tables-restore"))


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise RulesError(f"{name} not found (apt-get install iptables)")
    return path


def _run(argv: Sequence[str], stdin: str | None = None) -> str:
    try:
        proc = subprocess.run(
            argv, input=stdin, capture_output=True, text=True, check=False, timeout=TIMEOUT
        )
    except subprocess.TimeoutExpired:
        raise RulesError(f"{' '.join(argv)} did not finish within {TIMEOUT:.0f} s") from None
    except OSError as exc:
        raise RulesError(f"{argv[0]}: {exc.strerror}") from None
    if proc.returncode != 0:
        raise RulesError(f"{' '.join(argv)} failed: {proc.stderr.strip() or proc.returncode}")
    return proc.stdout


# --- reading ------------------------------------------------------------------


@dataclass(frozen=True)
class Table:
    """One table (``name``) as ``iptables -t NAME -S`` prints it: each chain's rules
    in order, each rule its specification after ``-A CHAIN``."""

    chains: dict[str, list[str]]
    name: str = "filter"

    def references(self, targets: Sequence[str] = OWNED_CHAINS) -> list[tuple[str, int, str]]:
        """(chain, 0-based index, spec) of every rule outside ``targets`` that jumps or
        goes to one of ``targets``."""
        out = []
        for chain, rules in self.chains.items():
            if chain in targets:
                continue
            for i, spec in enumerate(rules):
                if jump_target(spec) in targets:
                    out.append((chain, i, spec))
        return out


def jump_target(spec: str) -> str | None:
    """The chain a rule jumps (-j) or goes (-g) to, if any."""
    try:
        words = shlex.split(spec)
    except ValueError:
        words = spec.split()
    for flag, value in itertools.pairwise(words):
        if flag in ("-j", "--jump", "-g", "--goto"):
            return value
    return None


def parse_listing(text: str) -> Table:
    chains: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.startswith(("-P ", "-N ")):
            chains.setdefault(line.split()[1], [])
        elif line.startswith("-A "):
            _, chain, *rest = line.split(" ", 2)
            chains.setdefault(chain, []).append(rest[0] if rest else "")
    return Table(chains)


def read_table(family: Family, name: str = "filter") -> Table:
    """One whole table of one family: one subprocess call.  (Listing a table that
    does not exist creates nothing.)"""
    table = parse_listing(_run([_tool(family.tool), "-w", "-t", name, "-S"]))
    return Table(table.chains, name)


Tables = Mapping[str, Table]


def read_tables(family: Family, names: Iterable[str] | None = None) -> dict[str, Table]:
    """The tables nfknock may have chains in (filter, nat, mangle), or those of
    ``names`` (in that order): one subprocess call each."""
    wanted = set(HOOK_CHAINS if names is None else names)
    return {name: read_table(family, name) for name in HOOK_CHAINS if name in wanted}


def _as_tables(tables: Table | Tables) -> Tables:
    return {tables.name: tables} if isinstance(tables, Table) else tables


def owned(tables: Table | Tables) -> dict[str, list[str]]:
    """nfknock's chains and their normalised rules, as stored in the applied record
    (the chain names are unique across tables)."""
    out: dict[str, list[str]] = {}
    for table in _as_tables(tables).values():
        out.update({c: list(table.chains[c]) for c in OWNED_CHAINS if c in table.chains})
    return out


# --- writing ------------------------------------------------------------------


def sections(rendered: str) -> list[tuple[str, list[str]]]:
    """(table, lines up to its COMMIT) of each section of a restore text; comment
    lines before the first section stay with it."""
    out: list[tuple[str, list[str]]] = []
    lines: list[str] = []
    name = ""
    for line in rendered.rstrip("\n").split("\n"):
        if line.startswith("*"):
            name = line[1:].strip()
        if line == "COMMIT":
            out.append((name, lines))
            lines, name = [], ""
            continue
        lines.append(line)
    return out


def transaction(rendered: str, tables: Table | Tables) -> str:
    """The one restore transaction that makes the tables hold ``rendered``'s chains,
    each hook's jump at rule 1 and nothing else of nfknock's; a table that
    ``rendered`` leaves out loses whatever of ours it holds."""
    tables = _as_tables(tables)
    out: list[str] = []
    done = set()
    for name, body in sections(rendered):
        done.add(name)
        out += [*body, *_ops(tables.get(name, Table({}, name)), body), "COMMIT"]
    for name, table in tables.items():
        if name not in done and _ours(table):
            out += [f"*{name}", *_ops(table, []), "COMMIT"]
    return "\n".join(out) + "\n"


def _ours(table: Table) -> bool:
    return any(c in table.chains for c in OWNED_CHAINS) or bool(table.references())


def _ops(table: Table, body: list[str]) -> list[str]:
    declared = [ln[1:].split()[0] for ln in body if ln.startswith(":")]
    ops = []
    # Every jump into our chains from elsewhere goes (misplaced, duplicated or
    # conditional ones included) ...
    for chain, _i, spec in table.references():
        ops.append(f"-D {chain} {spec}")
    # ... and exactly one comes back, first in its hook.
    hooks = HOOK_CHAINS.get(table.name, {})
    ops += [f"-I {hook} 1 -j {c}" for hook, c in hooks.items() if c in declared]
    stale = [
        c
        for c in OWNED_CHAINS
        if c in table.chains and c not in declared and TABLE_OF[c] == table.name
    ]
    ops += [f"-F {c}" for c in stale] + [f"-X {c}" for c in stale]
    return ops


def test_restore(family: Family, text: str) -> None:
    _run([_tool(family.restore), "-w", "--noflush", "--test"], text)


def restore(family: Family, text: str) -> None:
    _run([_tool(family.restore), "-w", "--noflush"], text)


def removal(tables: Table | Tables) -> str | None:
    """The restore transaction that removes nfknock's jumps and chains (None:
    nothing of ours is there)."""
    out: list[str] = []
    for name, table in _as_tables(tables).items():
        present = [c for c in OWNED_CHAINS if c in table.chains]
        refs = table.references()
        if not present and not refs:
            continue
        ops = [f"-D {chain} {spec}" for chain, _i, spec in refs]
        ops += [f"-F {c}" for c in present] + [f"-X {c}" for c in present]
        out += [f"*{name}", *ops, "COMMIT"]
    return "\n".join(out) + "\n" if out else None
