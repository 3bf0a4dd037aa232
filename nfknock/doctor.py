"""``nfknock doctor``: find the mistakes that lock people out, before and after.

Read-only (one exception: the queue drop counters of this check are kept beside
the applied record, mode 0600, to report drops *since the last check*).  Every
check yields :class:`Finding` values -- ``ok``, ``warning`` or ``error``, a stable
snake_case ``code`` (``--json``; never reworded), the detail and the fix -- and
``nfknock doctor`` prints one line each and exits 0 (no error), 1 (errors) or 2
(usage).  The checks, in order:

1. the configuration and the users file validate; the files are owned by root (or
   by whoever runs nfknock) and nobody else can change them, the users file is
   unreadable to others (``config.check_file``);
2. the installed rules are what the configuration renders, in both families, with
   the jump first (``rules.check``: its problems keep their codes);
3. a process is bound to each queue, and the daemon answers on its control
   socket (with its state store writable); queue drops since the last check;
4. no TCP service listens inside the knock range unless ``[knock] exclude`` lists
   it -- its clients' SYNs would be eaten as knocks.  Loopback-only listeners are
   harmless: ``lo`` is never queued;
5. something listens on each protected port (INPUT mode);
6. the kernel says the clock is synchronised (``adjtimex``);
7. an ``[[allow]]`` break-glass exists when this machine is reached over the
   network (``SSH_CONNECTION``, or an established connection to a protected port).

``/proc/net`` shows the network namespace doctor runs in: run it where the rules
and the daemon are.
"""

from __future__ import annotations

import ctypes
import ipaddress
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nfknock import rules
from nfknock.config import Config, ConfigError, check_file, load_config
from nfknock.fileio import atomic_write
from nfknock.procnet import (
    TCP_ESTABLISHED,
    TCP_LISTEN,
    QueueLine,
    TcpSocket,
    read_queues,
    read_tcp,
)

OK, WARNING, ERROR = "ok", "warning", "error"
STATUS_TIMEOUT = 5.0
RECORD_NAME = "doctor-queues.json"  # beside the applied record
# adjtimex(2): the return value TIME_ERROR and the status bit STA_UNSYNC both mean
# "not synchronised" (include/uapi/linux/timex.h).
TIME_ERROR = 5
STA_UNSYNC = 0x0040


@dataclass(frozen=True)
class Finding:
    level: str  # ok | warning | error
    code: str  # stable snake_case
    detail: str
    fix: str = ""

    def line(self) -> str:
        fix = f" -- fix: {self.fix}" if self.fix and self.level != OK else ""
        return f"{self.level:<7} {self.code}: {self.detail}{fix}"


# --- the machine, as doctor reads it (tests replace parts) ----------------------------


class _Timeval(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_usec", ctypes.c_long)]


class _Timex(ctypes.Structure):
    """``struct timex`` (include/uapi/linux/timex.h), as glibc declares it."""

    _fields_ = [
        ("modes", ctypes.c_uint),
        ("offset", ctypes.c_long),
        ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long),
        ("esterror", ctypes.c_long),
        ("status", ctypes.c_int),
        ("constant", ctypes.c_long),
        ("precision", ctypes.c_long),
        ("tolerance", ctypes.c_long),
        ("time", _Timeval),
        ("tick", ctypes.c_long),
        ("ppsfreq", ctypes.c_long),
        ("jitter", ctypes.c_long),
        ("shift", ctypes.c_int),
        ("stabil", ctypes.c_long),
        ("jitcnt", ctypes.c_long),
        ("calcnt", ctypes.c_long),
        ("errcnt", ctypes.c_long),
        ("stbcnt", ctypes.c_long),
        ("tai", ctypes.c_int),
        ("_reserved", ctypes.c_int * 11),
    ]


@dataclass(frozen=True)
class ClockState:
    state: int  # adjtimex's return value: TIME_OK (0) .. TIME_ERROR (5)
    status: int  # STA_* bits
    maxerror_us: int


def adjtimex() -> ClockState | None:
    """The kernel's clock discipline state (modes = 0: read only); None if unknown."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        tx = _Timex()
        state = int(libc.adjtimex(ctypes.byref(tx)))
    except (OSError, AttributeError):
        return None
    if state < 0:
        return None
    return ClockState(state, int(tx.status), int(tx.maxerror))


def daemon_status(path: Path) -> dict[str, Any]:
    from nfknock.control import control_request

    reply = control_request(path, "status", timeout=STATUS_TIMEOUT)
    status = reply.get("status")
    if not reply.get("ok") or not isinstance(status, dict):
        raise ValueError(f"the daemon refused the status request: {reply.get('error')}")
    return status


@dataclass
class Host:
    queues: Callable[[], dict[int, QueueLine]] = read_queues
    sockets: Callable[[], list[TcpSocket]] = read_tcp
    clock: Callable[[], ClockState | None] = adjtimex
    status: Callable[[Path], dict[str, Any]] = daemon_status
    environ: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    now: Callable[[], float] = time.time


# --- 1. configuration and files --------------------------------------------------------


def check_config(path: Path) -> tuple[Config | None, list[Finding]]:
    """The configuration (without users when only the users file is bad), or None."""
    unsafe = _unsafe(path, "config", False)
    if unsafe:  # the daemon would refuse it: say why, with the fix
        return None, [
            Finding(ERROR, "file_unsafe", p, "make it root's and not writable by others")
            for p in unsafe
        ]
    try:
        base = load_config(path, load_users=False)
    except ConfigError as exc:
        return None, [
            Finding(
                ERROR,
                "config_invalid",
                str(exc),
                f"`nfknock check --config {path}` says the same; fix what it names",
            )
        ]
    out = file_modes(base)
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        if not any(f.code == "file_unsafe" and str(base.users_file) in f.detail for f in out):
            out.append(Finding(ERROR, "users_file_invalid", str(exc), "fix the entry it names"))
        return base, out
    users = len(cfg.all_users)
    out.insert(
        0,
        Finding(
            OK,
            "config_valid",
            f"{path} and {cfg.users_file} validate ({users} user(s), "
            f"{sum(1 for u in cfg.all_users if u.enabled)} enabled)",
        ),
    )
    out += [Finding(WARNING, "config_warning", w, "see the warning") for w in cfg.warnings]
    return cfg, out


def _unsafe(path: Path, what: str, secret: bool) -> list[str]:
    """Why ``path`` could have been changed (or, holding secrets, read) by someone
    other than root or us: the very check the daemon refuses to start with
    (``config.check_file``, :mod:`nfknock.trust`: the file, every directory above it
    and every symlink on the way)."""
    try:
        check_file(path, secret=secret)
    except ConfigError as exc:
        return [f"{what} {exc.problem}"]
    return []


def file_modes(cfg: Config) -> list[Finding]:
    checks = [
        (cfg.path, "config", False),
        (cfg.users_file, "users file", True),
        (cfg.state_path, "state file", False),
    ]
    out = []
    for path, what, secret in checks:
        for problem in _unsafe(path, what, secret):
            fix = f"chown root: {path} && chmod 600 {path}; chmod go-w {path.parent}"
            out.append(Finding(ERROR, "file_unsafe", problem, fix))
    if not out:
        out.append(
            Finding(OK, "file_modes_ok", "config, users file and state: writable only by root")
        )
    return out


# --- 2. rules -----------------------------------------------------------------------------


def check_rules(cfg: Config, applied_path: Path) -> list[Finding]:
    problems = rules.check(cfg, applied_path)
    if not problems:
        return [
            Finding(
                OK,
                "rules_ok",
                "nfknock's rules are installed, entered first and exactly what the config "
                "renders (IPv4 and IPv6)",
            )
        ]
    return [Finding(ERROR, p.code, str(p), p.fix) for p in problems]


# --- 3. the daemon ------------------------------------------------------------------------


def _queue_numbers(cfg: Config) -> list[tuple[int, str]]:
    return [(q, "priority") for q in cfg.queue.priority_queues()] + [
        (q, "knock") for q in cfg.queue.knock_queues()
    ]


def check_daemon(cfg: Config, host: Host, bound: dict[int, QueueLine]) -> list[Finding]:
    out = []
    start = "systemctl start nfknock (journalctl -u nfknock says why it stopped)"
    unbound = [f"{q} ({role})" for q, role in _queue_numbers(cfg) if not _is_bound(bound, q)]
    if unbound:
        out.append(
            Finding(
                ERROR,
                "queue_unbound",
                f"no process is bound to queue(s) {', '.join(unbound)} in this network "
                "namespace: the kernel drops what the rules send there (protected ports "
                "closed to everyone, knocks lost)",
                start,
            )
        )
    else:
        names = ", ".join(f"{q} ({role})" for q, role in _queue_numbers(cfg))
        out.append(Finding(OK, "queues_bound", f"a process is bound to queue(s) {names}"))
    try:
        status = host.status(cfg.control_socket)
    except (OSError, ValueError) as exc:
        out.append(
            Finding(
                ERROR,
                "daemon_not_answering",
                f"no daemon answers on {cfg.control_socket} ({exc})",
                start,
            )
        )
        return out
    out.append(
        Finding(
            OK,
            "daemon_answers",
            f"the daemon (pid {status.get('pid')}, up {status.get('uptime')} s) answers on "
            f"{cfg.control_socket}",
        )
    )
    state = status.get("state") or {}
    if not state.get("ok", True):
        out.append(
            Finding(
                ERROR,
                "state_not_writable",
                f"the daemon cannot record claims in {state.get('store')}: "
                f"{state.get('error')} -- nothing opens",
                "make the state file's filesystem writable (space, read-only mount)",
            )
        )
    errors = status.get("internal_errors") or 0
    if errors:
        out.append(
            Finding(
                WARNING,
                "internal_errors",
                f"the daemon caught {errors} internal error(s) since it started (each "
                "packet was dropped)",
                "look for internal_error events in the log and report them",
            )
        )
    running = set(status.get("users") or {})
    configured = {u.name for u in cfg.all_users}
    if configured and running != configured:
        out.append(
            Finding(
                WARNING,
                "daemon_config_stale",
                "the daemon's users differ from the users file "
                f"({len(running)} running, {len(configured)} in the file)",
                f"nfknock reload --config {cfg.path}",
            )
        )
    return out


def _is_bound(bound: dict[int, QueueLine], queue: int) -> bool:
    line = bound.get(queue)
    return line is not None and line.portid != 0


def check_queue_drops(
    cfg: Config, record: Path, bound: dict[int, QueueLine], now: float
) -> list[Finding]:
    """Drops since the last check (same binding), kept in a small 0600 record."""
    previous = _load_record(record)
    last = previous.get("time")
    since = (
        f"since the last check at {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(last))}"
        if isinstance(last, int | float)
        else "since the queue was bound (no earlier check recorded)"
    )
    out = []
    seen: dict[str, dict[str, int]] = {}
    for q, role in _queue_numbers(cfg):
        line = bound.get(q)
        if line is None:
            continue
        seen[str(q)] = {
            "portid": line.portid,
            "queue_dropped": line.queue_dropped,
            "user_dropped": line.user_dropped,
        }
        full, socket_full = line.queue_dropped, line.user_dropped
        before = (previous.get("queues") or {}).get(str(q))
        fresh = since
        if isinstance(before, dict) and before.get("portid") == line.portid:
            full -= int(before.get("queue_dropped", 0))
            socket_full -= int(before.get("user_dropped", 0))
        elif isinstance(last, int | float):
            fresh = "since the queue was bound (rebound after the last check)"
        if full < 0 or socket_full < 0:  # counters went back: a new binding
            full, socket_full = line.queue_dropped, line.user_dropped
        if full + socket_full:
            out.append(
                Finding(
                    WARNING,
                    "queue_drops",
                    f"queue {q} ({role}): the kernel dropped {full + socket_full:,} "
                    f"packet(s) {fresh} ({full:,} queue full, {socket_full:,} socket "
                    "buffer full): the daemon did not keep up",
                    "a flood? raise [queue] max_len or workers, or rate-limit the knock "
                    "range upstream; watch nfknock_queue_dropped_total",
                )
            )
    try:
        if record.parent.is_dir():
            text = json.dumps({"time": now, "queues": seen}, sort_keys=True) + "\n"
            atomic_write(record, text.encode(), mode=0o600)
        else:
            since += f" (not recorded: {record.parent} does not exist)"
    except OSError as exc:
        since += f" (not recorded: {record}: {exc.strerror})"
    if not out and seen:
        out.append(Finding(OK, "queue_no_drops", f"no queue drops {since}"))
    return out


def _load_record(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


# --- 4./5. listeners ------------------------------------------------------------------------


def _listeners(sockets: Iterable[TcpSocket]) -> dict[int, list[TcpSocket]]:
    out: dict[int, list[TcpSocket]] = {}
    for s in sockets:
        if s.state == TCP_LISTEN:
            out.setdefault(s.local_port, []).append(s)
    return out


def _where(socks: list[TcpSocket]) -> str:
    return ", ".join(sorted({str(s.local) for s in socks}))


def check_knock_range(cfg: Config, sockets: list[TcpSocket]) -> list[Finding]:
    if not any(p.address is None for p in cfg.protect):
        return [
            Finding(
                OK,
                "knock_range_not_local",
                "every protected port is on a host behind this gateway (FORWARD): this "
                "host's own services are not in the knock range; list the protected hosts' "
                "public services in [knock] exclude",
            )
        ]
    ranges = rules.knock_ranges(cfg)
    spared = cfg.knock.exclude | cfg.protected_ports | cfg.spa.ports
    text = ", ".join(f"{lo}-{hi}" for lo, hi in ranges)
    out = []
    for port, socks in sorted(_listeners(sockets).items()):
        reachable = [s for s in socks if not s.loopback_only]
        if port in spared or not reachable or not any(lo <= port <= hi for lo, hi in ranges):
            continue
        out.append(
            Finding(
                ERROR,
                "listener_in_knock_range",
                f"TCP port {port} listens (on {_where(reachable)}) inside the knock range "
                f"{text} and is not in [knock] exclude: its clients' SYNs are taken as "
                "knocks and dropped",
                f"add {port} to [knock] exclude and run `nfknock reload`, or move the "
                f"service (`ss -tlnp 'sport = :{port}'` names it)",
            )
        )
    if not out:
        out.append(
            Finding(
                OK,
                "knock_range_clear",
                f"no service listens inside the knock range {text} outside [knock] exclude "
                "(loopback-only listeners are not queued)",
            )
        )
    return out


def check_protected_listeners(cfg: Config, sockets: list[TcpSocket]) -> list[Finding]:
    listening = _listeners(sockets)
    out = []
    for port in sorted({p.port for p in cfg.protect if p.address is None}):
        socks = listening.get(port, [])
        reachable = [s for s in socks if not s.loopback_only]
        if reachable:
            out.append(
                Finding(
                    OK,
                    "protected_listening",
                    f"protected port {port} has a listener ({_where(reachable)})",
                )
            )
            continue
        where = f"only on {_where(socks)}" if socks else "nothing listens"
        out.append(
            Finding(
                WARNING,
                "protected_not_listening",
                f"protected port {port}: {where} -- a knock opens it and the connection is refused",
                "start the service on it (or remove its [[protect]] entry)",
            )
        )
    return out


# --- 6. clock -------------------------------------------------------------------------------


def check_clock(cfg: Config, clock: ClockState | None) -> list[Finding]:
    tolerance = cfg.knock.skew_steps * cfg.knock.step_seconds
    fix = "run a time daemon (systemd-timesyncd, chrony or ntpd); `timedatectl` shows it"
    if clock is None:
        return [Finding(WARNING, "clock_unknown", "adjtimex could not be read", fix)]
    if clock.state == TIME_ERROR or clock.status & STA_UNSYNC:
        return [
            Finding(
                WARNING,
                "clock_unsynchronised",
                f"the kernel says the clock is not synchronised (adjtimex state "
                f"{clock.state}, status 0x{clock.status:04x}): clients whose clocks differ "
                f"by more than about {tolerance} s (skew_steps x step_seconds) cannot open",
                fix,
            )
        ]
    return [
        Finding(
            OK,
            "clock_synchronised",
            f"the kernel says the clock is synchronised (maximum error "
            f"{clock.maxerror_us / 1000:.0f} ms)",
        )
    ]


# --- 7. break-glass -----------------------------------------------------------------------------


def check_break_glass(
    cfg: Config, sockets: list[TcpSocket], environ: Mapping[str, str]
) -> list[Finding]:
    if cfg.allow:
        nets = ", ".join(str(a.network) for a in cfg.allow)
        return [Finding(OK, "break_glass_present", f"[[allow]] break-glass: {nets}")]
    seen = []
    ssh = environ.get("SSH_CONNECTION", "").split()
    if ssh:
        seen.append(f"{ssh[0]} (SSH_CONNECTION)")
    local = {p.port for p in cfg.protect if p.address is None}
    for s in sockets:
        if s.state == TCP_ESTABLISHED and s.local_port in local and not s.remote_is_loopback:
            seen.append(f"{_plain(s.remote)} to port {s.local_port}")
    if not seen:
        return [
            Finding(
                OK,
                "no_remote_session",
                "no [[allow]] break-glass, and no remote session to a protected port seen",
            )
        ]
    return [
        Finding(
            WARNING,
            "no_break_glass",
            f"no [[allow]] break-glass entry while this machine is reached over the "
            f"network ({'; '.join(sorted(set(seen)))}): if knocking fails (clock, lost "
            "secret, daemon down) nobody gets in",
            'add [[allow]] network = "<your admin network>" to the config and run `nfknock reload`',
        )
    ]


def _plain(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


# --- all of it ----------------------------------------------------------------------------------


def run(config: Path, applied_path: Path, host: Host | None = None) -> list[Finding]:
    host = host or Host()
    try:
        cfg, findings = check_config(config)
    except Exception as exc:  # e.g. a path the OS refuses: a finding, not a traceback
        return [Finding(ERROR, "config_invalid", f"{config}: {type(exc).__name__}: {exc}")]
    if cfg is None:
        return findings
    bound: dict[int, QueueLine] = {}
    sockets: list[TcpSocket] = []

    def read() -> list[Finding]:
        bound.update(host.queues())
        sockets.extend(host.sockets())
        return []

    checks: list[tuple[str, Callable[[], list[Finding]]]] = [
        ("read /proc", read),
        ("rules", lambda: check_rules(cfg, applied_path)),
        ("daemon", lambda: check_daemon(cfg, host, bound)),
        (
            "queue drops",
            lambda: check_queue_drops(cfg, applied_path.with_name(RECORD_NAME), bound, host.now()),
        ),
        ("knock range", lambda: check_knock_range(cfg, sockets)),
        ("protected ports", lambda: check_protected_listeners(cfg, sockets)),
        ("clock", lambda: check_clock(cfg, host.clock())),
        ("break-glass", lambda: check_break_glass(cfg, sockets, host.environ)),
    ]
    for name, check in checks:
        try:
            findings += check()
        except Exception as exc:  # a check that breaks is a finding, never a traceback
            findings.append(
                Finding(
                    ERROR, "check_failed", f"the {name} check failed: {type(exc).__name__}: {exc}"
                )
            )
    return findings


def main(config: Path, applied_path: Path, as_json: bool = False) -> int:
    findings = run(config, applied_path)
    errors = sum(1 for f in findings if f.level == ERROR)
    warnings = sum(1 for f in findings if f.level == WARNING)
    if as_json:
        out = {"findings": [asdict(f) for f in findings], "errors": errors, "warnings": warnings}
        print(json.dumps(out, indent=1))
    else:
        for f in findings:
            print(f.line())
        print(f"nfknock doctor: {errors} error(s), {warnings} warning(s)", file=sys.stderr)
    return 1 if errors else 0
