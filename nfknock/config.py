"""TOML configuration, validated into frozen dataclasses.

Every error is a :class:`ConfigError` naming the file, the key and the problem: the
operator's mistake, fatal at start, never half-applied.  Unknown keys are errors (a
typo must not silently fall back to a default).  The schema is a contract: extend
it, never rename it.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import tomllib
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from nfknock.counters import MAX_LOOKAHEAD
from nfknock.paths import PathKind, path_problem
from nfknock.prefixes import BOUNDS as PREFIX_BOUNDS
from nfknock.prefixes import WIDE as WIDE_GRANT
from nfknock.prefixes import exact
from nfknock.schemes import (
    SCHEME_NAMES,
    V1,
    WEAK_SCHEMES,
    Kommen,
    Livingstone,
    Scheme,
    TotpKnockdRs,
)
from nfknock.sequence import (
    MIN_SECRET_BYTES,
    SchemeError,
    SecretError,
    SequenceParams,
    parse_base32,
)
from nfknock.spa.keys import SpaKeys, parse_spa_keys
from nfknock.trust import UntrustedFile, check_trusted

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

USER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")  # fullmatch: "$" allows "\n"
# Schemes that may be the default for every user; weak ones are opt-in per user.
DEFAULT_SCHEMES = ("v1", "totp-knockd-rs")
DEFAULT_REJECT_MARK = 0x4E4B0001
# [door] mark: forward entry i marks its granted SYNs with mark + 1 + i.
DEFAULT_DOOR_MARK = 0x4E4B0100
MAX_FORWARDS = 255
FORWARD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
# Below these a sequence can be guessed by sweeping the knock range (check warns).
MIN_KNOCKS = 8
MIN_STRENGTH_BITS = 64
# An [[allow]] network wider than this lets a large part of the internet in
# without knocking (check warns); a /0 is refused.
WIDE_PREFIX = {4: 8, 6: 32}
# A config or users file larger than this is not read (100,000 users take ~10 MiB).
MAX_FILE_BYTES = 64 << 20


class ConfigError(Exception):
    """An operator error in a configuration or users file."""

    def __init__(self, file: str | os.PathLike[str], key: str, problem: str) -> None:
        self.file = str(file)
        self.key = key
        self.problem = problem
        shown = printable(key)
        super().__init__(f"{self.file}: {shown}: {problem}" if key else f"{self.file}: {problem}")


def printable(text: str) -> str:
    """``text`` with control characters escaped: a key such as ``"alice\n"`` must
    not break (or forge) a line of the message or the log."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


@dataclass(frozen=True)
class QueueConfig:
    """The kernel queues.  ``number``: the priority queue (new SYNs to protected
    ports, SPA packets, door ports): answered first, never batched.  ``knock_number``:
    the knock range (DROP verdicts batched, ``batch`` at a time).  With ``workers``
    > 1 each is a range of that many queues (``--queue-balance``)."""

    number: int = 0
    knock_number: int = 1
    max_len: int = 8192
    reject_mark: int = DEFAULT_REJECT_MARK
    batch: int = 64
    workers: int = 1

    def priority_queues(self) -> range:
        return range(self.number, self.number + self.workers)

    def knock_queues(self) -> range:
        return range(self.knock_number, self.knock_number + self.workers)


@dataclass(frozen=True)
class KnockConfig:
    scheme: str = "v1"
    port_min: int = 1024
    port_max: int = 33791
    length: int = 32
    step_seconds: int = 30
    skew_steps: int = 1
    realm: str = ""
    sequence_timeout: float = 10.0
    reorder_window: int = 4
    stray_budget: int = 32
    exclude: frozenset[int] = frozenset()
    lookahead: int = 2


@dataclass(frozen=True)
class Forward:
    """One ``[[door.forward]]`` entry: SYNs to a door in ``door_min``..``door_max``
    (on this host) are, once granted, marked ``mark`` and translated to ``address``
    (None: this host) port ``port``.  nfknock.door has the theory of operation."""

    name: str
    door_min: int
    door_max: int
    port: int
    address: IPAddress | None = None
    mark: int = DEFAULT_DOOR_MARK + 1

    @property
    def doors(self) -> range:
        return range(self.door_min, self.door_max + 1)

    def target_text(self) -> str:
        if self.address is None:
            return f"this host port {self.port}"
        host = f"[{self.address}]" if self.address.version == 6 else str(self.address)
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class DoorConfig:
    open_seconds: float = 30.0
    max_connections: int = 1
    # A grant opens the client's address to this many leading bits (nfknock.prefixes);
    # the default for users whose users-file entry does not say.
    grant_prefix_v4: int = 32
    grant_prefix_v6: int = 128
    mark: int = DEFAULT_DOOR_MARK
    forward: tuple[Forward, ...] = ()


@dataclass(frozen=True)
class Protect:
    port: int
    address: IPAddress | None = None


@dataclass(frozen=True)
class Allow:
    network: IPNetwork
    ports: frozenset[int] = frozenset()  # empty: every protected port


@dataclass(frozen=True)
class LimitsConfig:
    max_sources: int = 65536
    max_grants: int = 65536
    max_progress_per_source: int = 16
    stale_counters: int = 8


@dataclass(frozen=True)
class SpaConfig:
    """Single Packet Authorization (fwknop's wire format).  ``ports`` empty: off
    (no SPA rules are rendered).  Rates are the static rules' limits on the SPA
    ports, before the queue: per source address and for all sources together."""

    ports: frozenset[int] = frozenset({62201})
    max_age: int = 120  # seconds, both directions
    max_open_seconds: int = 300  # a client's timeout is honoured up to this
    rate_per_source: int = 4  # packets per second per source address
    rate_burst: int = 8  # packets a source may send at once
    rate_global: int = 500  # packets per second from all sources
    replay_cache: int = 65536  # authenticated payload digests remembered


@dataclass(frozen=True)
class MetricsConfig:
    """``[metrics] listen = "127.0.0.1:9610"``: serve Prometheus metrics there over
    HTTP (:mod:`nfknock.metrics`).  ``listen`` None: off (the default)."""

    listen: tuple[str, int] | None = None  # (IP literal, port)


@dataclass(frozen=True)
class StateConfig:
    """Where claims and shared state live.  ``backend = "embedded"``: the SQLite file
    ``Config.state_path`` (one host).  ``"redis"``: a Redis or Valkey server that every
    gateway of a deployment shares (``url``; the password from ``password_file`` or
    the URL; every key under ``prefix``)."""

    backend: str = "embedded"
    url: str = field(default="", repr=False)  # may carry the password: describe() hides it
    password: str = field(default="", repr=False)
    password_file: Path | None = None
    prefix: str = "nfknock"
    ca_file: Path | None = None  # rediss://: the CA that signed the server's certificate
    timeout: float = 1.0  # seconds to connect or to answer one command

    def describe(self) -> str:
        """The backend in words, without a password."""
        if self.backend != "redis":
            return self.backend
        return f"redis ({redact_url(self.url)}, prefix {self.prefix!r})"


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***``."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rsplit("@", 1)[1]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"
    format: str = "auto"  # auto | json | console


@dataclass(frozen=True)
class User:
    name: str
    # The knock secret; b"" only for an SPA-only user, which is never in
    # Config.users (the knock engine's input) but only in Config.spa_users.
    secret: bytes = field(repr=False)
    ports: frozenset[int] | None = None  # None: every protected port
    enabled: bool = True
    scheme: Scheme | None = None  # None: v1 with the [knock] parameters
    initial_counter: int = 0  # HOTP schemes (kommen): the counter to start from
    spa: SpaKeys | None = None  # fwknop keys (nfknock.spa.keys); None: no SPA
    grant_prefix_v4: int = 32  # [door] grant_prefix_v4 unless the users file says
    grant_prefix_v6: int = 128

    def grant_prefix(self, size: int) -> int | None:
        """The prefix this user's grants open for an address of ``size`` bytes (4 or
        16); None: the exact address (nfknock.prefixes)."""
        return exact(self.grant_prefix_v4 if size == 4 else self.grant_prefix_v6, size)

    # [[door.forward]] entries (by name) this user may use; None: every entry.
    forward: frozenset[str] | None = None
    door: bool = False  # door = "random": a knock opens its forward entry's door
    isn: bool = False  # isn = true: each knock's TCP ISN must carry its HMAC word


@dataclass(frozen=True)
class Config:
    path: Path
    queue: QueueConfig
    knock: KnockConfig
    door: DoorConfig
    protect: tuple[Protect, ...]
    allow: tuple[Allow, ...]
    limits: LimitsConfig
    state_path: Path
    users_file: Path
    control_socket: Path
    log: LogConfig
    users: tuple[User, ...]  # users with a knock secret (the knock engine's input)
    warnings: tuple[str, ...] = ()
    spa: SpaConfig = SpaConfig()
    spa_users: tuple[User, ...] = ()  # users with fwknop keys (may also knock)
    metrics: MetricsConfig = MetricsConfig()
    state: StateConfig = StateConfig()

    @property
    def all_users(self) -> tuple[User, ...]:
        by_name = {u.name: u for u in (*self.spa_users, *self.users)}
        return tuple(by_name[n] for n in sorted(by_name))

    @property
    def protected_ports(self) -> frozenset[int]:
        return frozenset(p.port for p in self.protect)

    def sequence_params(self) -> SequenceParams:
        """Scheme parameters; the protected ports are always excluded from knocks."""
        k = self.knock
        return SequenceParams(
            port_min=k.port_min,
            port_max=k.port_max,
            length=k.length,
            step_seconds=k.step_seconds,
            realm=k.realm.encode(),
            exclude=k.exclude | self.protected_ports,
        )


# --- reading ----------------------------------------------------------------------

T = TypeVar("T")


class _Table:
    """A TOML table being consumed; whatever is left at the end is an unknown key."""

    def __init__(self, file: Path, prefix: str, data: Any) -> None:
        if not isinstance(data, dict):
            raise ConfigError(file, prefix, f"must be a table, not {_kind(data)}")
        self.file = file
        self.prefix = prefix
        self.data: dict[str, Any] = dict(data)

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def error(self, name: str, problem: str) -> ConfigError:
        return ConfigError(self.file, self.key(name), problem)

    def take(self, name: str, kind: type[T], default: T) -> T:
        if name not in self.data:
            return default
        value = self.data.pop(name)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            if abs(value) > 2**53:  # float() would round it, or overflow past 1e308
                raise self.error(name, f"{_number(value)} is far too large")
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise self.error(name, f"must be {kind.__name__}, not {_kind(value)}")
        return value

    def int_in(self, name: str, default: int, lo: int, hi: int) -> int:
        value = self.take(name, int, default)
        if not lo <= value <= hi:
            raise self.error(name, f"{_number(value)} is outside {lo}..{hi}")
        return value

    def float_in(self, name: str, default: float, lo: float, hi: float) -> float:
        value = self.take(name, float, default)
        if not lo <= value <= hi:
            raise self.error(name, f"{value} is outside {lo}..{hi}")
        return value

    def ports(self, name: str) -> frozenset[int] | None:
        if name not in self.data:
            return None
        value = self.data.pop(name)
        if not isinstance(value, list):
            raise self.error(name, f"must be a list of ports, not {_kind(value)}")
        for port in value:
            if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
                raise self.error(name, f"{port!r} is not a port number (1-65535)")
        return frozenset(value)

    def sub(self, name: str) -> _Table:
        return _Table(self.file, self.key(name), self.data.pop(name, {}))

    def finish(self) -> None:
        for name in self.data:
            raise self.error(name, "unknown key")


def _number(value: int) -> str:
    text = str(value)
    return text if len(text) <= 24 else f"a {len(text.lstrip('-'))}-digit number"


def _kind(value: object) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a float",
        str: "a string",
        list: "an array",
        dict: "a table",
    }.get(type(value), type(value).__name__)


def _load_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(path, "", "file not found") from None
    except PermissionError:
        raise ConfigError(path, "", "permission denied") from None
    except IsADirectoryError:
        raise ConfigError(path, "", "is a directory, not a file") from None
    except OSError as exc:  # e.g. "/etc/passwd/x", a name too long, EIO
        raise ConfigError(path, "", exc.strerror or str(exc)) from None
    except ValueError as exc:  # a NUL byte in the path
        raise ConfigError(path, "", str(exc)) from None
    if len(raw) > MAX_FILE_BYTES:
        raise ConfigError(path, "", f"larger than {MAX_FILE_BYTES >> 20} MiB")
    try:
        return tomllib.loads(raw.decode())
    except UnicodeDecodeError as exc:
        raise ConfigError(path, "", f"not UTF-8 text: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, "", f"invalid TOML: {exc}") from None
    except RecursionError:
        # tomllib parses nested arrays and inline tables recursively; a few
        # thousand "[" exhaust Python's stack (issue 15 C: 103 of 2,000 mutants).
        raise ConfigError(path, "", "nesting too deep (arrays or inline tables)") from None
    except ValueError:  # int(): Python refuses to convert more than 4300 digits
        raise ConfigError(path, "", "a number with thousands of digits") from None


def _address(table: _Table, name: str) -> IPAddress | None:
    text = table.take(name, str, "")
    if not text:
        return None
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise table.error(name, f"{text!r} is not an IPv4 or IPv6 address") from None


def _network(table: _Table, name: str) -> IPNetwork:
    if name not in table.data:
        raise table.error(name, "is required")
    text = table.take(name, str, "")
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        raise table.error(name, f"{text!r} is not a network ({exc})") from None


def _array_of_tables(root: _Table, name: str, build: Callable[[_Table], T]) -> tuple[T, ...]:
    raw = root.data.pop(name, [])
    if not isinstance(raw, list):
        raise root.error(
            name, f"must be an array of tables ([[{root.key(name)}]]), not {_kind(raw)}"
        )
    items = []
    for i, entry in enumerate(raw):
        table = _Table(root.file, f"{root.key(name)}[{i}]", entry)
        items.append(build(table))
        table.finish()
    return tuple(items)


def _protect(table: _Table) -> Protect:
    if "port" not in table.data:
        raise table.error("port", "is required")
    return Protect(port=table.int_in("port", 22, 1, 65535), address=_address(table, "address"))


def _forward(table: _Table) -> Forward:
    for key in ("name", "doors", "port"):
        if key not in table.data:
            raise table.error(key, "is required")
    name = table.take("name", str, "")
    if not FORWARD_NAME.fullmatch(name):
        raise table.error(
            "name", f"{printable(name)!r} is not 1-32 of A-Z a-z 0-9 _ . - (first alphanumeric)"
        )
    text = table.take("doors", str, "")
    lo_text, sep, hi_text = text.partition("-")
    if not (lo_text.isdigit() and (not sep or hi_text.isdigit())):
        raise table.error("doors", f"{printable(text)!r} is not a port range LO-HI (or one port)")
    lo, hi = int(lo_text), int(hi_text) if sep else int(lo_text)
    if not 1 <= lo <= hi <= 65535:
        raise table.error("doors", f"{text!r}: need 1 <= LO <= HI <= 65535")
    port = table.int_in("port", 22, 1, 65535)
    address = _address(table, "address")
    if address is not None and (
        address.is_unspecified or address.is_multicast or address.is_loopback
    ):
        raise table.error("address", f"{address} is not a unicast host address")
    return Forward(name, lo, hi, port, address)


def _door(d: _Table) -> DoorConfig:
    mark = d.int_in("mark", DEFAULT_DOOR_MARK, 1, 0xFFFFFFFF)
    forwards = _array_of_tables(d, "forward", _forward)
    v4, v6 = _grant_prefixes(d, 32, 128)
    door = DoorConfig(
        open_seconds=d.float_in("open_seconds", 30.0, 1.0, 86400.0),
        max_connections=d.int_in("max_connections", 1, 1, 1 << 20),
        grant_prefix_v4=v4,
        grant_prefix_v6=v6,
        mark=mark,
        forward=tuple(
            Forward(f.name, f.door_min, f.door_max, f.port, f.address, mark + 1 + i)
            for i, f in enumerate(forwards)
        ),
    )
    d.finish()
    if len(forwards) > MAX_FORWARDS:
        raise d.error("forward", f"{len(forwards)} entries; at most {MAX_FORWARDS}")
    if mark + len(forwards) > 0xFFFFFFFF:
        raise d.error("mark", f"0x{mark:x} + {len(forwards)} entries passes 0xffffffff")
    names: set[str] = set()
    for i, f in enumerate(door.forward):
        if f.name in names:
            raise ConfigError(d.file, f"door.forward[{i}].name", f"{f.name!r} is used twice")
        names.add(f.name)
        for j, g in enumerate(door.forward[:i]):
            if f.door_min <= g.door_max and g.door_min <= f.door_max:
                raise ConfigError(
                    d.file,
                    f"door.forward[{i}].doors",
                    f"{f.door_min}-{f.door_max} overlaps door.forward[{j}] "
                    f"({g.door_min}-{g.door_max}): a door leads to one target",
                )
    return door


def _check_doors(
    path: Path,
    door: DoorConfig,
    knock: KnockConfig,
    protected: set[int],
    spa: SpaConfig,
    reject_mark: int,
) -> None:
    """Door ranges are ports of their own: no knock, protected or SPA port may lie in
    one (the door's queue rule comes before all of them, in mangle PREROUTING)."""
    if not door.forward:
        return
    if door.mark < reject_mark <= door.mark + len(door.forward):
        raise ConfigError(
            path, "door.mark", f"the door marks include the reject mark 0x{reject_mark:x}"
        )
    for i, f in enumerate(door.forward):
        key = f"door.forward[{i}].doors"
        if f.door_min <= knock.port_max and knock.port_min <= f.door_max:
            raise ConfigError(
                path,
                key,
                f"{f.door_min}-{f.door_max} overlaps the knock range "
                f"{knock.port_min}-{knock.port_max}",
            )
        for what, ports in (("protected port", protected), ("SPA port", spa.ports)):
            inside = sorted(p for p in ports if p in f.doors)
            if inside:
                raise ConfigError(
                    path, key, f"{f.door_min}-{f.door_max} holds the {what} {inside[0]}"
                )


def _allow(table: _Table) -> Allow:
    network = _network(table, "network")
    if network.prefixlen == 0:
        raise table.error(
            "network",
            f"{network} is every address: everyone would reach the protected ports "
            "without knocking, which switches nfknock off for them. Allow your admin "
            "network only (or remove the [[protect]] entry if the port is meant to be public)",
        )
    return Allow(network=network, ports=table.ports("ports") or frozenset())


def _allow_warnings(path: Path, allow: tuple[Allow, ...]) -> list[str]:
    return [
        f"{path}: allow[{i}].network: {a.network} holds {a.network.num_addresses:,} addresses "
        "that reach the protected ports without knocking; is it really your admin network?"
        for i, a in enumerate(allow)
        if a.network.prefixlen < WIDE_PREFIX[a.network.version]
    ]


PREFIX_KEYS = ("grant_prefix_v4", "grant_prefix_v6")


def _grant_prefixes(table: _Table, v4: int, v6: int) -> tuple[int, int]:
    """``grant_prefix_v4`` / ``grant_prefix_v6`` of ``[door]`` or of a user (defaults
    ``v4``, ``v6``), within nfknock.prefixes.BOUNDS."""
    return (
        table.int_in(PREFIX_KEYS[0], v4, *PREFIX_BOUNDS[4]),
        table.int_in(PREFIX_KEYS[1], v6, *PREFIX_BOUNDS[16]),
    )


def _prefix_warnings(
    path: Path, where: str, v4: int, v6: int, inherited: tuple[int, int] = (32, 128)
) -> list[str]:
    """A grant prefix wide enough that strangers share the grant (nfknock.prefixes);
    not for a value ``inherited`` from where it was warned about already."""
    out = []
    for name, prefix, size, was in (
        (PREFIX_KEYS[0], v4, 4, inherited[0]),
        (PREFIX_KEYS[1], v6, 16, inherited[1]),
    ):
        if prefix < WIDE_GRANT[size] and prefix != was:
            out.append(
                f"{path}: {where}.{name}: a grant opens a /{prefix} "
                f"({2 ** (8 * size - prefix):,} addresses): everyone in it may connect "
                "while the grant lasts; is the client's network really that wide?"
            )
    return out


def _weak_sequence(key: str, length: int, choices: int, bits: float) -> str | None:
    """The warning for a sequence an attacker can guess, or None."""
    if length >= MIN_KNOCKS and bits >= MIN_STRENGTH_BITS:
        return None
    return (
        f"{key}: {length} knock{'' if length == 1 else 's'} from {choices} ports: only "
        f"~{bits:.0f} bits per attempt; an attacker sweeping the knock range can guess "
        f"the sequence (use at least {MIN_KNOCKS} knocks and {MIN_STRENGTH_BITS} bits; "
        "the default, 32 knocks from 2^15 ports, is ~480 bits)"
    )


def _queue(q: _Table) -> QueueConfig:
    number = q.int_in("number", 0, 0, 65535)
    workers = q.int_in("workers", 1, 1, 64)
    default_knock = number + workers if number + 2 * workers <= 65536 else 0
    knock_number = q.int_in("knock_number", default_knock, 0, 65535)
    if knock_number + workers > 65536 or number + workers > 65536:
        raise q.error("workers", f"{workers} queues from {number}/{knock_number} pass 65535")
    if not (knock_number >= number + workers or number >= knock_number + workers):
        raise q.error(
            "knock_number",
            f"queues {knock_number}..{knock_number + workers - 1} overlap the priority "
            f"queues {number}..{number + workers - 1}",
        )
    queue = QueueConfig(
        number=number,
        knock_number=knock_number,
        max_len=q.int_in("max_len", 8192, 1, 1 << 24),
        reject_mark=q.int_in("reject_mark", DEFAULT_REJECT_MARK, 1, 0xFFFFFFFF),
        batch=q.int_in("batch", 64, 1, 4096),
        workers=workers,
    )
    q.finish()
    return queue


def _spa(s: _Table) -> SpaConfig:
    ports = s.ports("ports")
    spa = SpaConfig(
        ports=SpaConfig.ports if ports is None else ports,
        max_age=s.int_in("max_age", 120, 1, 3600),
        max_open_seconds=s.int_in("max_open_seconds", 300, 1, 86400),
        rate_per_source=s.int_in("rate_per_source", 4, 1, 100000),
        rate_burst=s.int_in("rate_burst", 8, 1, 100000),
        rate_global=s.int_in("rate_global", 500, 1, 10_000_000),
        replay_cache=s.int_in("replay_cache", 65536, 1024, 1 << 24),
    )
    s.finish()
    return spa


def parse_listen(text: str) -> tuple[str, int]:
    """``ADDRESS:PORT`` with an IP literal (IPv6 in brackets: ``[::1]:9610``) into
    (address, port); ValueError says what is wrong.  No host names: nothing is
    resolved at start."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{text!r} is not ADDRESS:PORT (e.g. 127.0.0.1:9610 or [::1]:9610)")
    bracketed = host.startswith("[") and host.endswith("]")
    if bracketed:
        host = host[1:-1]
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{host!r} is not an IPv4 or IPv6 address") from None
    if addr.version == 6 and not bracketed:
        raise ValueError(f"write an IPv6 address in brackets: [{host}]:{port_text}")
    if addr.version == 4 and bracketed:
        raise ValueError(f"brackets are for IPv6 addresses: {host}:{port_text}")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"{port_text!r} is not a port number (1-65535)")
    return str(addr), int(port_text)


def _metrics(m: _Table, knock: KnockConfig, protected: set[int]) -> tuple[MetricsConfig, list[str]]:
    text = m.take("listen", str, "")
    m.finish()
    if not text:
        return MetricsConfig(), []
    try:
        host, port = parse_listen(text)
    except ValueError as exc:
        raise m.error("listen", str(exc)) from None
    warnings = []
    if not ipaddress.ip_address(host).is_loopback:
        where = f"{m.file}: metrics.listen"
        warnings.append(
            f"{where}: {text} serves the metrics without authentication to whoever reaches "
            "it; allow only your Prometheus server there (firewall), or listen on 127.0.0.1"
        )
        if knock.port_min <= port <= knock.port_max and port not in knock.exclude | protected:
            warnings.append(
                f"{where}: port {port} lies in the knock range {knock.port_min}-"
                f"{knock.port_max}: a remote scraper's SYNs would be taken as knocks and "
                f"dropped; add {port} to [knock] exclude"
            )
    return MetricsConfig((host, port)), warnings


REDIS_KEYS = ("url", "password_file", "prefix", "ca_file", "timeout")
STATE_PREFIX = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")


def _state(st: _Table) -> tuple[StateConfig, tuple[str, ...]]:
    """``[state]`` beyond ``path``: the backend and, for Redis/Valkey, where it is and
    how to log in.  The password is read here (a private file, like the users file)
    so that ``nfknock check`` finds every problem before the daemon starts."""
    backend = st.take("backend", str, "embedded")
    if backend not in ("embedded", "redis"):
        raise st.error("backend", f"{backend!r} is not one of embedded, redis")
    if backend == "embedded":
        for name in REDIS_KEYS:
            if name in st.data:
                raise st.error(name, 'only used with backend = "redis"')
        return StateConfig(), ()
    if "url" not in st.data:
        raise st.error("url", 'is required with backend = "redis" (e.g. "redis://10.0.0.5:6379/0")')
    url = st.take("url", str, "")
    parts = _redis_url(st, url)
    warnings: tuple[str, ...] = ()
    password = ""
    password_file = None
    if "password_file" in st.data:
        password_file = _resolve(st.file, st.take("password_file", str, ""))
        if parts.password is not None:
            raise st.error("password_file", "the url carries a password too: give it in one place")
        password = _read_password(st, password_file)
    elif parts.password is not None:
        warnings = (
            f"{st.file}: state.url: carries the Redis password; prefer password_file (a file "
            "only root can read) so the secret need not sit in the configuration",
        )
    prefix = st.take("prefix", str, "nfknock")
    if not STATE_PREFIX.match(prefix):
        raise st.error(
            "prefix", f"{prefix!r} is not 1-64 of A-Z a-z 0-9 _ . : - (first alphanumeric)"
        )
    ca_file = None
    if "ca_file" in st.data:
        if parts.scheme != "rediss":
            raise st.error("ca_file", "only used with a rediss:// (TLS) url")
        ca_file = _resolve(st.file, st.take("ca_file", str, ""))
        if not ca_file.is_file():
            raise st.error("ca_file", f"{ca_file}: not a readable file")
    timeout = st.float_in("timeout", 1.0, 0.05, 30.0)
    state = StateConfig("redis", url, password, password_file, prefix, ca_file, timeout)
    return state, warnings


def _redis_url(st: _Table, url: str) -> urllib.parse.SplitResult:
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise st.error("url", f"{redact_url(url)!r} is not a URL ({exc})") from None
    shown = redact_url(url)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise st.error("url", f"{shown!r} must start with redis://, rediss:// (TLS) or unix://")
    if parts.fragment:
        raise st.error("url", f"{shown!r}: no #fragment")
    if parts.scheme == "unix":
        if not parts.path.startswith("/") or parts.netloc.rsplit("@", 1)[-1]:
            raise st.error(
                "url", f"{shown!r}: a unix:// url names a socket path (unix:///run/redis.sock)"
            )
        query = urllib.parse.parse_qs(parts.query, keep_blank_values=True)
        if set(query) - {"db"} or any(len(v) != 1 for v in query.values()):
            raise st.error("url", f"{shown!r}: the only query parameter is db")
        db = query.get("db", ["0"])[0]
    else:
        if not parts.hostname:
            raise st.error("url", f"{shown!r}: no host")
        if port == 0:
            raise st.error("url", f"{shown!r}: port 0")
        if parts.query:
            raise st.error("url", f"{shown!r}: no query parameters (timeouts are state.timeout)")
        db = parts.path.lstrip("/") or "0"
    if not db.isdigit() or int(db) > 1_000_000:
        raise st.error("url", f"{shown!r}: the database must be a number, not {db!r}")
    return parts


def _read_password(st: _Table, path: Path) -> str:
    try:
        check_file(path, secret=True)
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise st.error("password_file", f"{path}: not found") from None
    except ConfigError as exc:
        raise st.error("password_file", f"{path}: {exc.problem}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise st.error("password_file", f"{path}: cannot read it ({exc})") from None
    password = text.rstrip("\r\n")
    if not password or "\n" in password:
        raise st.error("password_file", f"{path}: must hold the password on one line")
    return password


def _resolve(base: Path, text: str) -> Path:
    p = Path(text)
    return p if p.is_absolute() else (base.parent / p)


def parse_config(path: Path, data: Mapping[str, Any], *, load_users: bool = True) -> Config:
    root = _Table(path, "", data)

    queue = _queue(root.sub("queue"))

    k = root.sub("knock")
    scheme = k.take("scheme", str, "v1")
    if scheme in WEAK_SCHEMES:
        raise k.error("scheme", f"{scheme!r} is weak and opt-in per user: set it in the users file")
    if scheme not in DEFAULT_SCHEMES:
        raise k.error("scheme", f"{scheme!r} is not one of {', '.join(DEFAULT_SCHEMES)}")
    length = k.int_in("length", 32, 1, 255)
    knock = KnockConfig(
        scheme=scheme,
        port_min=k.int_in("port_min", 1024, 1, 65535),
        port_max=k.int_in("port_max", 33791, 1, 65535),
        length=length,
        step_seconds=k.int_in("step_seconds", 30, 1, 86400),
        skew_steps=k.int_in("skew_steps", 1, 0, 10),
        realm=k.take("realm", str, ""),
        sequence_timeout=k.float_in("sequence_timeout", 10.0, 0.1, 3600.0),
        reorder_window=k.int_in("reorder_window", 4, 0, 64),
        stray_budget=k.int_in("stray_budget", length, 0, 1 << 20),
        exclude=k.ports("exclude") or frozenset(),
        lookahead=k.int_in("lookahead", 2, 0, MAX_LOOKAHEAD),
    )
    if knock.port_min > knock.port_max:
        raise k.error("port_max", f"{knock.port_max} is below port_min {knock.port_min}")
    k.finish()

    door = _door(root.sub("door"))

    protect = _array_of_tables(root, "protect", _protect)
    if not protect:
        raise ConfigError(path, "protect", "at least one [[protect]] port is required")
    seen: set[tuple[int, IPAddress | None]] = set()
    for i, p in enumerate(protect):
        if (p.port, p.address) in seen:
            raise ConfigError(path, f"protect[{i}]", f"port {p.port} is listed twice")
        seen.add((p.port, p.address))
    allow = _array_of_tables(root, "allow", _allow)

    spa = _spa(root.sub("spa"))
    protected = {p.port for p in protect}
    for port in sorted(spa.ports):
        if port in protected:
            raise ConfigError(path, "spa.ports", f"{port} is also a protected port")
        if knock.port_min <= port <= knock.port_max and port not in knock.exclude:
            raise ConfigError(
                path,
                "spa.ports",
                f"{port} lies in the knock range {knock.port_min}-{knock.port_max} "
                "(move it out, or list it in [knock] exclude)",
            )

    _check_doors(path, door, knock, protected, spa, queue.reject_mark)

    lim = root.sub("limits")
    limits = LimitsConfig(
        max_sources=lim.int_in("max_sources", 65536, 16, 1 << 24),
        max_grants=lim.int_in("max_grants", 65536, 16, 1 << 24),
        max_progress_per_source=lim.int_in("max_progress_per_source", 16, 1, 1024),
        stale_counters=lim.int_in("stale_counters", 8, 0, 1024),
    )
    lim.finish()

    st = root.sub("state")
    state_path = _path(st, "path", "/var/lib/nfknock/state.db", "state")
    state, state_warnings = _state(st)
    st.finish()
    us = root.sub("users")
    users_file = _path(us, "file", "/etc/nfknock/users.toml", "file")
    us.finish()
    ct = root.sub("control")
    control_socket = _path(ct, "socket", "/run/nfknock/control.sock", "socket")
    ct.finish()
    lg = root.sub("log")
    level = lg.take("level", str, "info")
    if level not in ("debug", "info", "warning", "error"):
        raise lg.error("level", f"{level!r} is not one of debug, info, warning, error")
    fmt = lg.take("format", str, "auto")
    if fmt not in ("auto", "json", "console"):
        raise lg.error("format", f"{fmt!r} is not one of auto, json, console")
    lg.finish()
    metrics, metrics_warnings = _metrics(root.sub("metrics"), knock, protected)
    root.finish()

    cfg = Config(
        path=path,
        queue=queue,
        knock=knock,
        door=door,
        protect=protect,
        allow=allow,
        limits=limits,
        state_path=state_path,
        users_file=users_file,
        control_socket=control_socket,
        log=LogConfig(level=level, format=fmt),
        users=(),
        spa=spa,
        metrics=metrics,
        state=state,
        warnings=tuple(metrics_warnings) + state_warnings,
    )
    try:
        params = cfg.sequence_params()
    except SchemeError as exc:
        raise ConfigError(path, "knock", str(exc)) from None
    warnings = _allow_warnings(path, allow)
    warnings += _prefix_warnings(path, "door", door.grant_prefix_v4, door.grant_prefix_v6)
    usable = params.span - sum(1 for p in params.exclude if knock.port_min <= p <= knock.port_max)
    bits = sum(math.log2(usable - i) for i in range(knock.length))  # distinct ports
    weak = _weak_sequence("knock.length", knock.length, usable, bits)
    if weak:
        warnings.insert(0, f"{path}: {weak}")
    users: tuple[User, ...] = ()
    if load_users:
        users, user_warnings = load_users_file(users_file, cfg)
        warnings += user_warnings
        knockers = tuple(u for u in users if u.secret)
        spa_users = tuple(u for u in users if u.spa is not None)
        cfg = Config(
            **{
                **cfg.__dict__,
                "users": knockers,
                "spa_users": spa_users,
                "warnings": cfg.warnings + tuple(warnings),
            }
        )
        return cfg
    return Config(**{**cfg.__dict__, "warnings": cfg.warnings + tuple(warnings)})


def _path(table: _Table, name: str, default: str, kind: PathKind) -> Path:
    """A configured path (relative: beside the config file), refused now if it
    cannot work later."""
    text = table.take(name, str, default)
    resolved = _resolve(table.file, text)
    problem = path_problem(text, resolved, kind)
    if problem:
        raise table.error(name, f"{printable(text)!r} {problem}")
    return resolved


def load_config(path: str | os.PathLike[str], *, load_users: bool = True) -> Config:
    p = Path(path)
    check_file(p, secret=False)
    return parse_config(p, _load_toml(p), load_users=load_users)


def check_file(path: Path, *, secret: bool) -> None:
    """Refuse a file that someone other than root (or the user running nfknock)
    could have written -- or, holding ``secret``s, could read (see
    :mod:`nfknock.trust`)."""
    try:
        check_trusted(path, secret=secret)
    except UntrustedFile as exc:
        raise ConfigError(path, "", exc.problem) from None


def load_users_file(path: Path, cfg: Config) -> tuple[tuple[User, ...], tuple[str, ...]]:
    check_file(path, secret=True)
    return parse_users(path, _load_toml(path), cfg)


def _secret(u: _Table, scheme: str) -> bytes:
    """``secret`` (base32) or ``secret_utf8`` (raw string, as totp-knockd-rs keeps it)."""
    if "secret" not in u.data and "secret_utf8" not in u.data:
        raise u.error(
            "secret",
            "is required (base32; or secret_utf8 for a raw string; or fwknop keys for SPA)",
        )
    if "secret" in u.data and "secret_utf8" in u.data:
        raise u.error("secret", "give only one of secret (base32) and secret_utf8")
    if "secret_utf8" in u.data:
        raw = u.take("secret_utf8", str, "").encode()
        if not raw:
            raise u.error("secret_utf8", "is empty")
        if scheme == "v1" and len(raw) < MIN_SECRET_BYTES:
            raise u.error("secret_utf8", f"v1 needs at least {MIN_SECRET_BYTES} bytes")
        return raw
    try:
        return parse_base32(
            u.take("secret", str, ""), min_bytes=MIN_SECRET_BYTES if scheme == "v1" else 1
        )
    except SecretError as exc:
        raise u.error("secret", str(exc)) from None


def _user_scheme(u: _Table, name: str, cfg: Config) -> Scheme:
    """The scheme object of one user; scheme-specific keys are only valid there."""
    default = cfg.knock.scheme
    scheme_name = u.take("scheme", str, default)
    if scheme_name not in SCHEME_NAMES:
        raise u.error("scheme", f"{scheme_name!r} is not one of {', '.join(SCHEME_NAMES)}")
    step = cfg.knock.step_seconds
    if scheme_name == "totp-knockd-rs":
        try:
            return TotpKnockdRs(
                port_min=u.int_in("port_min", 1024, 1, 65535),
                port_max=u.int_in("port_max", 32768, 1, 65535),
                length=u.int_in("length", 32, 2, 255),
                step_seconds=step,
            )
        except SchemeError as exc:
            raise u.error("scheme", str(exc)) from None
    if scheme_name == "livingstone":
        if step != 30:
            raise u.error("scheme", "livingstone uses 30 s steps: [knock] step_seconds must be 30")
        return Livingstone()
    if scheme_name == "kommen":
        return Kommen()
    return V1(cfg.sequence_params())


def parse_users(
    path: Path, data: Mapping[str, Any], cfg: Config
) -> tuple[tuple[User, ...], tuple[str, ...]]:
    root = _Table(path, "", data)
    table = root.sub("users")
    root.finish()
    users = []
    warnings: list[str] = []
    for name in sorted(table.data):
        if not USER_NAME.fullmatch(name):
            raise table.error(
                name, "user names are 1-64 of A-Z a-z 0-9 _ . @ - (first alphanumeric)"
            )
        u = table.sub(name)
        scheme = _user_scheme(u, name, cfg)
        spa, spa_warnings = parse_spa_keys(u)
        warnings += spa_warnings
        knocks = spa is None or "secret" in u.data or "secret_utf8" in u.data
        secret = _secret(u, scheme.name) if knocks else b""
        ports = u.ports("ports")
        if ports is not None:
            stray = sorted(ports - cfg.protected_ports)
            if stray:
                raise u.error(
                    "ports",
                    f"{', '.join(map(str, stray))} not protected by any [[protect]] entry",
                )
        initial = u.int_in("counter", 0, 0, 1 << 62) if scheme.name == "kommen" else 0
        enabled = u.take("enabled", bool, True)
        default = (cfg.door.grant_prefix_v4, cfg.door.grant_prefix_v6)
        v4, v6 = _grant_prefixes(u, *default)
        forward, door, isn = _user_door(u, cfg, scheme.name, knocks)
        u.finish()
        # (the [door] defaults were warned about already)
        warnings += _prefix_warnings(path, f"users.{name}", v4, v6, default)
        if scheme.name in WEAK_SCHEMES:
            warnings.append(
                f"{path}: users.{name}: scheme {scheme.name!r} is weak "
                f"(~{scheme.strength_bits():.0f} bits per attempt); use it only to keep "
                "existing clients"
            )
        if isinstance(scheme, TotpKnockdRs):
            span = scheme.port_max - scheme.port_min + 1
            weak = _weak_sequence(
                f"users.{name}.length", scheme.length, span, scheme.strength_bits()
            )
            if weak:
                warnings.append(f"{path}: {weak}")
        if knocks and len(secret) < MIN_SECRET_BYTES:
            warnings.append(
                f"{path}: users.{name}: the secret is {len(secret)} bytes, below v1's "
                f"minimum of {MIN_SECRET_BYTES}"
            )
        users.append(
            User(
                name=name,
                secret=secret,
                ports=ports,
                enabled=enabled,
                scheme=None if scheme.name == "v1" else scheme,
                initial_counter=initial,
                spa=spa,
                grant_prefix_v4=v4,
                grant_prefix_v6=v6,
                forward=forward,
                door=door,
                isn=isn,
            )
        )
    return tuple(users), tuple(warnings)


def _user_door(
    u: _Table, cfg: Config, scheme: str, knocks: bool
) -> tuple[frozenset[str] | None, bool, bool]:
    """``forward`` (the [[door.forward]] entries the user may use), ``door =
    "random"`` (a knock opens the door of the one entry instead of the protected
    ports) and ``isn = true`` (knocks carry their ISN word): the last two are v1
    derivations (sequence.py steps 7 and 8), for knock users only."""
    names = {f.name for f in cfg.door.forward}
    forward: frozenset[str] | None = None
    if "forward" in u.data:
        value = u.data.pop("forward")
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise u.error(
                "forward", f"must be a list of [[door.forward]] names, not {_kind(value)}"
            )
        unknown = sorted(set(value) - names)
        if unknown:
            raise u.error("forward", f"{printable(unknown[0])!r} is no [[door.forward]] name")
        forward = frozenset(value)
    door = False
    if "door" in u.data:
        mode = u.take("door", str, "")
        if mode != "random":
            raise u.error("door", f'{printable(mode)!r}: the only door mode is "random"')
        if not knocks or scheme != "v1":
            raise u.error(
                "door",
                "a random door is derived from a v1 knock sequence: "
                "the user needs a knock secret and scheme v1",
            )
        usable = names if forward is None else forward
        if len(usable) != 1:
            raise u.error(
                "door",
                f"the user may use {len(usable)} [[door.forward]] entries; a knock opens the "
                'door of exactly one: set forward = ["NAME"]',
            )
        door = True
    isn = u.take("isn", bool, False)
    if isn and (not knocks or scheme != "v1"):
        raise u.error(
            "isn", "ISN knocks are a v1 derivation: the user needs a knock secret and scheme v1"
        )
    return forward, door, isn
