"""The iptables/ip6tables adapter: read the filter table, replace nfknock's chains.

Everything nfknock changes in one family goes through one ``iptables-restore
--noflush`` transaction, which the kernel applies atomically: the chains' new
contents, the removal of every jump into them from other chains, the one jump at
rule 1 of ``INPUT`` / ``FORWARD``, and the removal of chains no longer used.  The
transaction is first run with ``--test`` (parsed and built, not committed).
What the kernel holds is read back with ``iptables -S`` (its own normalised text).
"""

from __future__ import annotations

import itertools
import shlex
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from nfknock.render import CHAIN, OWNED_CHAINS

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
    """The filter table as ``iptables -S`` prints it: each chain's rules in order,
    each rule its specification after ``-A CHAIN``."""

    chains: dict[str, list[str]]

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


def read_table(family: Family) -> Table:
    """The whole filter table of one family: one subprocess call."""
    return parse_listing(_run([_tool(family.tool), "-w", "-t", "filter", "-S"]))


def owned(table: Table) -> dict[str, list[str]]:
    """nfknock's chains and their normalised rules, as stored in the applied record."""
    return {c: list(table.chains[c]) for c in OWNED_CHAINS if c in table.chains}


# --- writing ------------------------------------------------------------------


def transaction(rendered: str, table: Table) -> str:
    """The one restore transaction that makes ``table`` hold ``rendered``'s chains,
    each hook's jump at rule 1 and nothing else of nfknock's."""
    body = rendered.rstrip("\n").removesuffix("COMMIT").rstrip("\n").split("\n")
    declared = [ln[1:].split()[0] for ln in body if ln.startswith(":")]
    ops = []
    # Every jump into our chains from elsewhere goes (misplaced, duplicated or
    # conditional ones included) ...
    for chain, _i, spec in table.references():
        ops.append(f"-D {chain} {spec}")
    # ... and exactly one comes back, first in its hook.
    ops += [f"-I {hook} 1 -j {c}" for hook, c in CHAIN.items() if c in declared]
    stale = [c for c in OWNED_CHAINS if c in table.chains and c not in declared]
    ops += [f"-F {c}" for c in stale] + [f"-X {c}" for c in stale]
    return "\n".join([*body, *ops, "COMMIT"]) + "\n"


def test_restore(family: Family, text: str) -> None:
    _run([_tool(family.restore), "-w", "--noflush", "--test"], text)


def restore(family: Family, text: str) -> None:
    _run([_tool(family.restore), "-w", "--noflush"], text)


def removal(table: Table) -> str | None:
    """The restore transaction that removes nfknock's jumps and chains (None:
    nothing of ours is there)."""
    present = [c for c in OWNED_CHAINS if c in table.chains]
    refs = table.references()
    if not present and not refs:
        return None
    ops = [f"-D {chain} {spec}" for chain, _i, spec in refs]
    ops += [f"-F {c}" for c in present] + [f"-X {c}" for c in present]
    return "\n".join(["*filter", *ops, "COMMIT"]) + "\n"
