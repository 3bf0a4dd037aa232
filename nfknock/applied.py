"""The "applied" record: the last ruleset nfknock installed successfully.

Written after every successful install (atomically, mode 0600, its directory 0700):
per family the rendered restore text and the kernel's normalised read-back of
nfknock's chains, with the config path and the time.  Two uses:

* ``rules --verify`` / :func:`nfknock.rules.check` compare the live chains with the
  read-back (rule text, not counts) and the rendered text with what the config
  renders now (config drift);
* when the config does not validate, ``rules --install`` re-applies the rendered text
  of the last good install, so a typo never leaves ports more open than before.

The record is fed back to ``iptables-restore`` as root, so it is trusted only when
owned by us and writable by nobody else, and its text may only declare and fill
nfknock's own chains (:func:`_check_rendered`).
"""

from __future__ import annotations

import json
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nfknock.fileio import atomic_write
from nfknock.render import HOOK_CHAINS, OWNED_CHAINS, TABLE_OF

DEFAULT_APPLIED = Path("/var/lib/nfknock/rules.applied")
VERSION = 1
MAX_BYTES = 16 << 20


class RecordError(Exception):
    """The applied record exists but cannot be trusted or read."""


@dataclass(frozen=True)
class FamilyRecord:
    rendered: str  # the iptables-restore text as rendered from the config
    chains: dict[str, list[str]]  # nfknock's chains as `iptables -S` printed them


@dataclass(frozen=True)
class Applied:
    config: str
    installed_at: float  # Unix time
    families: dict[str, FamilyRecord]  # "iptables" | "ip6tables"

    def when(self) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.installed_at))

    def to_json(self) -> dict[str, Any]:
        return {
            "version": VERSION,
            "config": self.config,
            "installed_at": self.installed_at,
            "installed": self.when(),
            "families": {
                name: {"rendered": f.rendered, "chains": f.chains}
                for name, f in sorted(self.families.items())
            },
        }


def save(path: Path, record: Applied) -> None:
    _make_dirs(path.parent)
    text = json.dumps(record.to_json(), indent=1, sort_keys=True) + "\n"
    atomic_write(path, text.encode(), mode=0o600)


def _make_dirs(directory: Path) -> None:
    """Create missing directories 0700 (whatever the umask), parents included."""
    missing = []
    d = directory
    while not d.exists():
        missing.append(d)
        d = d.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode=0o700)
        except FileExistsError:
            continue
        os.chmod(d, 0o700)


def load(path: Path) -> Applied | None:
    """The record, or None when there is none; :class:`RecordError` when it exists
    but is not ours alone or not a record."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise RecordError(f"{path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise RecordError(f"{path}: not a regular file")
        if st.st_uid != os.geteuid() or st.st_mode & 0o022:
            raise RecordError(
                f"{path}: owned by uid {st.st_uid} with mode {stat.S_IMODE(st.st_mode):04o}; "
                "it must belong to this user and be writable by nobody else"
            )
        try:
            raw = f.read(MAX_BYTES + 1)
        except OSError as exc:
            raise RecordError(f"{path}: {exc.strerror}") from None
    if len(raw) > MAX_BYTES:
        raise RecordError(f"{path}: larger than {MAX_BYTES} bytes")
    try:
        return _parse(json.loads(raw))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise RecordError(f"{path}: not an applied-rules record ({exc})") from None


def _parse(data: Any) -> Applied:
    if not isinstance(data, dict) or data.get("version") != VERSION:
        raise ValueError(f"expected a JSON object with version {VERSION}")
    config, at, families = data.get("config"), data.get("installed_at"), data.get("families")
    if not isinstance(config, str) or not isinstance(families, dict):
        raise ValueError("config or families missing")
    if isinstance(at, bool) or not isinstance(at, int | float) or not 0 <= at < 1e11:
        raise ValueError("installed_at is not a Unix time")
    out = {}
    for name in ("iptables", "ip6tables"):
        fam = families.get(name)
        if not isinstance(fam, dict):
            raise ValueError(f"families.{name} missing")
        rendered, chains = fam.get("rendered"), fam.get("chains")
        if not isinstance(rendered, str) or not isinstance(chains, dict):
            raise ValueError(f"families.{name}: rendered or chains missing")
        _check_rendered(rendered)
        for chain, rules in chains.items():
            if chain not in OWNED_CHAINS or not isinstance(rules, list):
                raise ValueError(f"families.{name}.chains: {chain!r} is not nfknock's")
            if not all(isinstance(r, str) for r in rules):
                raise ValueError(f"families.{name}.chains.{chain}: rules must be strings")
        out[name] = FamilyRecord(rendered, {c: list(r) for c, r in chains.items()})
    return Applied(config, float(at), out)


def _check_rendered(text: str) -> None:
    """Only what the renderer writes: the filter table (and, with forwarded doors,
    the nat and mangle tables), each once and closed by its COMMIT, nfknock's
    chains -- each in its own table -- and nothing else."""
    lines = text.splitlines()
    table = ""
    for line in lines:
        if line.startswith("*") and not table:
            table = line[1:]
            continue
        if line == "COMMIT" and table:
            table = ""
            continue
        if line.startswith("#"):
            continue
        words = line[1:].split() if line.startswith(":") else line[3:].split(" ", 1)
        chain = words[0] if words else ""
        if not (line.startswith((":", "-A ")) and TABLE_OF.get(chain) == table) or (
            line.startswith("-A ") and not line.startswith(f"-A {chain} ")
        ):
            raise ValueError(f"rendered text touches more than nfknock's chains: {line[:80]!r}")
    heads = [ln for ln in lines if ln.startswith("*")]
    if (
        not heads
        or heads[0] != "*filter"
        or len(set(heads)) != len(heads)
        or not set(heads) <= {f"*{t}" for t in HOOK_CHAINS}
        or lines.count("COMMIT") != len(heads)
        or lines[-1] != "COMMIT"
    ):
        raise ValueError("rendered text is not a *filter [*nat] [*mangle] ... COMMIT transaction")
