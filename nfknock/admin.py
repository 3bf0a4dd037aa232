"""Admin subcommands: init, user ..., rules, run, status, doctor, reload."""

from __future__ import annotations

import argparse
import json
import secrets
import shlex
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import toml

from nfknock.applied import DEFAULT_APPLIED
from nfknock.config import (
    Config,
    ConfigError,
    load_config,
    parse_config,
    parse_users,
    printable,
)
from nfknock.fileio import atomic_write
from nfknock.paths import make_dirs
from nfknock.schemes import SCHEME_NAMES
from nfknock.sequence import SchemeError, format_base32, generate_secret, parse_port_list
from nfknock.spa import admin as spa_admin
from nfknock.status_text import format_status

CONFIG_TEMPLATE = """\
# nfknock configuration (TOML).  `nfknock check --config {config}` validates it.
# Every key is optional except [[protect]]; the values shown are the defaults.

[queue]
number = 0              # the NFQUEUE number the static rules send SYNs to
max_len = 8192          # kernel queue length (packets waiting for a verdict)

[knock]
scheme = "v1"
port_min = 1024         # the knock range: SYNs to these ports are knocks (always dropped)
port_max = 33791        # 1024-33791 is exactly 2^15 ports
length = 32             # knocks per sequence
step_seconds = 30       # a new sequence every step (TOTP)
skew_steps = 1          # accept the previous and next step too (clock skew)
realm = ""              # bind sequences to this server (e.g. its name)
sequence_timeout = 10.0 # seconds to send a whole sequence
reorder_window = 4      # knocks may arrive up to this many positions out of order
stray_budget = 32       # unmatched knocks from a source before its progress resets
exclude = []            # public services inside the knock range, e.g. [8080]

[door]
open_seconds = 30       # how long a completed sequence keeps the door open
max_connections = 1     # new connections per opening

[[protect]]
port = 22
# address = "198.51.100.20"   # a host behind this gateway (FORWARD)

# [[allow]]                   # break-glass: always allowed, no knock
# network = "203.0.113.0/24"

# [[door.forward]]            # a random door per opening, forwarded to the service
# name = "ssh"                # (users: door = "random", forward = ["ssh"]; README
# doors = "40000-40999"       #  "Forwarded doors and ISN knocks")
# address = "10.0.0.5"        # absent: this host
# port = 22

[limits]
max_sources = 65536     # sources with knock progress tracked at once (LRU)

[state]
path = "{state}"

[users]
file = "{users}"

[control]
socket = "{socket}"

[log]
level = "info"          # debug logs every knock
format = "auto"         # json when not on a terminal, console on a terminal
"""

USERS_HEADER = (
    "# nfknock users: managed by `nfknock user ...`; keep it mode 0600.\n"
    "# [users.NAME] secret = base32, ports = [...] (default: all protected), enabled\n"
)


DEFAULT_CONFIG = "/etc/nfknock/nfknock.toml"
CONFIG_HELP = "the configuration file"


def register(sub: Any) -> None:
    def add(name: str, func: Any, help_text: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(handler=func)
        return p

    p = add("init", cmd_init, "write a commented configuration and an empty users file")
    p.add_argument("--config", default=DEFAULT_CONFIG, help="the configuration file to write")
    p.add_argument(
        "--users-file", default=None, help="the users file (default: users.toml beside --config)"
    )
    p.add_argument("--state", default="/var/lib/nfknock/state.db", help="[state] path to write in")
    p.add_argument(
        "--socket", default="/run/nfknock/control.sock", help="[control] socket to write in"
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="overwrite an existing configuration (an existing users file is kept)",
    )
    p.add_argument(
        "--force-users",
        action="store_true",
        help="also replace an existing users file, erasing every user (implies --force)",
    )

    p = add("user", cmd_user, "manage users (add, list, disable, enable, rekey, revoke)")
    p.add_argument(
        "action",
        choices=["add", "list", "disable", "enable", "rekey", "revoke"],
        help="add and rekey print the user's client profile on stdout",
    )
    p.add_argument("name", nargs="?", help="the user (every action but list)")
    p.add_argument("--config", default=DEFAULT_CONFIG, help=CONFIG_HELP)
    p.add_argument(
        "--ports",
        default=None,
        help="protected ports this user may open: P,P,... (default: every protected port)",
    )
    p.add_argument(
        "--host",
        default=None,
        help="the name or address clients knock, written into the profile "
        "(no default: required for add and rekey)",
    )
    p.add_argument(
        "--profile", default=None, help="profile name printed for the client (default: --host)"
    )
    p.add_argument(
        "--scheme",
        choices=SCHEME_NAMES,
        default=None,
        help="sequence scheme for a new user (default: [knock] scheme); livingstone and "
        "kommen are weak, for existing clients only",
    )
    p.add_argument("--spa", action="store_true", help="fwknop SPA keys instead of a knock secret")
    p.add_argument(
        "--door",
        metavar="FORWARD",
        default=None,
        help="a new knock user's knock opens a random door of this [[door.forward]] entry "
        '(door = "random", forward = [FORWARD]) instead of the protected ports (default: none)',
    )
    p.add_argument(
        "--isn",
        action="store_true",
        help="a new knock user's knocks carry their ISN (isn = true; the client sends raw "
        "SYNs, as root; default: off)",
    )

    p = add("rules", cmd_rules, "render, install or remove the static firewall rules")
    p.add_argument("--config", default=DEFAULT_CONFIG, help=CONFIG_HELP)
    p.add_argument(
        "--format",
        choices=["iptables", "ip6tables", "nftables", "aws-sg"],
        default="iptables",
        help="what to print",
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--install",
        action="store_true",
        help="apply (iptables, IPv4 and IPv6) and record them as the last good ruleset; "
        "if the config does not validate, re-apply the last good ruleset and exit 1",
    )
    g.add_argument("--remove", action="store_true", help="remove nfknock's chains only")
    g.add_argument(
        "--verify",
        action="store_true",
        help="exit 1 unless nfknock's jumps come first and its chains are exactly what "
        "was installed and what the config renders",
    )
    p.add_argument(
        "--applied",
        default=str(DEFAULT_APPLIED),
        metavar="PATH",
        help=f"the record of the last good install (default: {DEFAULT_APPLIED})",
    )

    p = add("run", cmd_run, "run the verdict daemon on the NFQUEUE")
    p.add_argument("--config", default=DEFAULT_CONFIG, help=CONFIG_HELP)
    p.add_argument(
        "--applied",
        default=str(DEFAULT_APPLIED),
        metavar="PATH",
        help="the record of the last good rules install: checked every 30 s, "
        f"rewritten when a reload re-applies the rules (default: {DEFAULT_APPLIED})",
    )
    p.add_argument(
        "--rules-check-seconds",
        type=float,
        default=30.0,
        metavar="S",
        help="how often the daemon checks that its rules are in place (default: 30)",
    )
    # [queue] workers > 1: the supervisor starts each worker as `run --worker I`.
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)

    p = add("status", cmd_status, "live grants, counters and verdict counts of the daemon")
    p.add_argument("--config", default=DEFAULT_CONFIG, help=CONFIG_HELP)
    p.add_argument("--json", action="store_true", help="the daemon's status as JSON")
    p.add_argument(
        "--format",
        choices=["text", "json", "prometheus"],
        default="text",
        help="json: as --json; prometheus: the daemon's metrics in the Prometheus text "
        "format, for node_exporter's textfile collector (default: text)",
    )
    p.add_argument(
        "--health",
        action="store_true",
        help="exit 0 if the daemon answers, its queues are bound and its rules and state are "
        "in order, else 1, with one line saying why (keepalived, monitoring)",
    )

    p = add("doctor", cmd_doctor, "check the installation: config, rules, daemon, listeners, clock")
    p.add_argument("--config", default=DEFAULT_CONFIG, help=CONFIG_HELP)
    p.add_argument(
        "--applied",
        default=str(DEFAULT_APPLIED),
        metavar="PATH",
        help=f"the record of the last good install (default: {DEFAULT_APPLIED}); the queue "
        "drop counters of the last check are kept beside it",
    )
    p.add_argument("--json", action="store_true", help="the findings as JSON")

    add("demo", cmd_demo, "a self-contained demonstration in network namespaces (root)")

    p = add(
        "reload",
        cmd_reload,
        "validate the configuration, re-apply the rules, make the running daemon re-read it",
    )
    p.add_argument("--config", default=DEFAULT_CONFIG, help=CONFIG_HELP)
    p.add_argument(
        "--applied",
        default=str(DEFAULT_APPLIED),
        metavar="PATH",
        help=f"the record of the last good install (default: {DEFAULT_APPLIED})",
    )
    spa_admin.register(sub)


def _fail(message: str) -> int:
    print(f"nfknock: error: {message}", file=sys.stderr)
    return 2


def _say(message: str) -> None:
    """A status line: stderr, so that stdout carries only what may be redirected."""
    print(message, file=sys.stderr)


def cmd_init(args: argparse.Namespace) -> int:
    config = Path(args.config)
    users = Path(args.users_file) if args.users_file else config.with_name("users.toml")
    force = args.force or args.force_users
    if config.exists() and not force:
        return _fail(f"{config} exists; use --force to overwrite (the users file is kept)")
    keep_users = users.exists() and not args.force_users
    text = _render_config(config, users, args.state, args.socket)
    if users.exists() and not keep_users:
        _say(f"replacing {users}: {_count_users(users)} user(s) erased (--force-users)")
    make_dirs(config.parent, 0o700)  # every missing level, whatever the umask
    atomic_write(config, text.encode(), mode=0o600)
    if keep_users:
        _say(
            f"kept the existing {users} ({_count_users(users)} user(s)); --force-users replaces it"
        )
        print(f"wrote {config} (mode 0600)")
    else:
        make_dirs(users.parent, 0o700)
        atomic_write(users, USERS_HEADER.encode(), mode=0o600)
        print(f"wrote {config} and {users} (mode 0600)")
    print(f"next: nfknock user add NAME --host HOST --config {config}")
    return 0


def _toml_string(text: str) -> str:
    """The inside of a TOML basic string: JSON's escapes are TOML's (RFC 8259
    section 7, TOML "Basic strings") for anything a path may hold but a lone
    surrogate (refused before) and DEL, which JSON leaves raw and TOML forbids."""
    return json.dumps(text, ensure_ascii=False)[1:-1].replace("\x7f", "\\u007f")


def _render_config(config: Path, users: Path, state: str, sock: str) -> str:
    """The commented config, refused (ConfigError) if check would refuse it."""
    for what, value in (
        ("--config", str(config)),
        ("--users-file", str(users)),
        ("--state", state),
        ("--socket", sock),
    ):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ConfigError(
                config, "", f"{what} {value!r} is not UTF-8 (TOML files are)"
            ) from None
    text = CONFIG_TEMPLATE.format(
        config=printable(str(config)),
        state=_toml_string(state),
        users=_toml_string(str(users.resolve())),
        socket=_toml_string(sock),
    )
    parse_config(config, tomllib.loads(text), load_users=False)
    return text


def _count_users(path: Path) -> str:
    try:
        users = tomllib.loads(path.read_text()).get("users", {})
    except (OSError, ValueError, RecursionError):  # ValueError: also TOML, UTF-8
        return "an unknown number of"
    return str(len(users)) if isinstance(users, dict) else "an unknown number of"


def _read_users(cfg: Config) -> dict[str, Any]:
    try:
        raw = tomllib.loads(cfg.users_file.read_text())
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: also TOML, UTF-8
        raise ConfigError(cfg.users_file, "", str(exc) or type(exc).__name__) from None
    users = raw.get("users", {})
    return dict(users) if isinstance(users, dict) else {}


def _write_users(cfg: Config, users: dict[str, Any]) -> None:
    # Validate the whole new file before writing anything (never half-applied).
    parse_users(cfg.users_file, {"users": users}, cfg)
    body = toml.dumps({"users": users}) if users else ""
    atomic_write(cfg.users_file, (USERS_HEADER + body).encode(), mode=0o600)


def _signal_daemon(cfg: Config) -> str:
    from nfknock.control import control_request

    try:
        reply = control_request(cfg.control_socket, "reload")
    except (OSError, ValueError):
        return "no running daemon answered; the change applies when it starts"
    if reply.get("ok"):
        return "the running daemon reloaded"
    return f"the running daemon refused the reload: {reply.get('error')}"


def new_secret(scheme: str) -> tuple[str, str]:
    """(key in the users file, value) of a fresh secret in the form the scheme's own
    clients take: base32 for v1 and kommen; a random base32 *string* used as raw
    UTF-8 for totp-knockd-rs; 10 bytes (16 base32 characters) for livingstone,
    whose client refuses other lengths."""
    if scheme == "totp-knockd-rs":
        return "secret_utf8", format_base32(generate_secret())
    if scheme == "livingstone":
        return "secret", format_base32(secrets.token_bytes(10))
    return "secret", format_base32(generate_secret())


def profile_text(
    cfg: Config, name: str, entry: dict[str, Any], host: str, profile: str, port: int
) -> str:
    """The client profile for one user, exactly as nfknock-client reads it: the knock
    secret and its parameters, the SPA keys, or both."""
    k = cfg.knock
    scheme = entry.get("scheme", k.scheme)
    lines = [
        f"# nfknock-client profile for user {name!r}: paste into",
        "# ~/.config/nfknock/client.toml (chmod 600)",
        f"[profiles.{json.dumps(profile)}]",
        f"host = {json.dumps(host)}",
        f"port = {port}",
    ]
    if spa_admin.has_keys(entry):
        lines += spa_admin.profile_lines(entry, spa_admin.spa_port_of(cfg.spa.ports))
    if {"secret", "secret_utf8"}.isdisjoint(entry):
        return "\n".join(lines)
    if scheme != "v1":
        lines.append(f"scheme = {json.dumps(scheme)}")
    key = "secret_utf8" if "secret_utf8" in entry else "secret"
    lines.append(f"{key} = {json.dumps(entry[key])}")
    if scheme == "v1":
        lines += [
            f"realm = {json.dumps(k.realm)}",
            f"port_min = {k.port_min}",
            f"port_max = {k.port_max}",
            f"length = {k.length}",
            f"step_seconds = {k.step_seconds}",
            f"exclude = {json.dumps(sorted(k.exclude | cfg.protected_ports))}",
        ]
    elif scheme == "totp-knockd-rs":
        lines += [
            f"{opt} = {entry[opt]}" for opt in ("port_min", "port_max", "length") if opt in entry
        ]
        lines.append(f"step_seconds = {k.step_seconds}")
    elif scheme == "kommen":
        lines.append(f"counter = {entry.get('counter', 0)}")
    usable = [f for f in cfg.door.forward if f.name in entry.get("forward", [f.name])]
    if entry.get("door") == "random" and len(usable) == 1:
        lines.append(f'doors = "{usable[0].door_min}-{usable[0].door_max}"')
    if entry.get("isn") is True:
        lines.append("isn = true")
    return "\n".join(lines)


def _host_problem(host: str | None) -> str | None:
    if not host:
        return (
            "needs --host: the name or address clients knock, as they reach it "
            "(this machine's own name is rarely that, and localhost never is)"
        )
    if any(c.isspace() or not c.isprintable() for c in host):
        return f"--host {host!r} is not a host name or address"
    return None


def cmd_user(args: argparse.Namespace) -> int:
    action, name = args.action, args.name
    if action in ("add", "rekey"):
        problem = _host_problem(args.host)
        if problem:
            return _fail(f"user {action} {problem}")
    cfg = load_config(args.config)
    users = _read_users(cfg)
    if action == "list":
        if not cfg.all_users:
            print("no users")
        for u in cfg.all_users:
            ports = ",".join(map(str, sorted(u.ports))) if u.ports is not None else "all"
            print(f"{u.name}\t{'enabled' if u.enabled else 'disabled'}\tports={ports}")
        return 0
    if not name:
        return _fail(f"user {action} needs a NAME")
    if action == "add":
        if name in users:
            return _fail(f"user {name!r} exists (use rekey for a new secret)")
        scheme = args.scheme or cfg.knock.scheme
        if args.spa and not args.host:
            return _fail("user add --spa needs --host (the address clients send SPA to)")
        key, value = new_secret(scheme)
        entry: dict[str, Any] = {key: value, "enabled": True}
        if args.spa:
            entry = {**spa_admin.generate_keys(), "enabled": True}
        if scheme != cfg.knock.scheme:
            entry["scheme"] = scheme
        if args.ports:
            try:
                entry["ports"] = sorted(parse_port_list(args.ports))
            except SchemeError as exc:
                return _fail(str(exc))
        if (args.door or args.isn) and (args.spa or scheme != "v1"):
            return _fail("--door and --isn are for v1 knock users (not --spa, not other schemes)")
        if args.door:
            if args.door not in {f.name for f in cfg.door.forward}:
                return _fail(f"--door {args.door!r}: no [[door.forward]] entry of that name")
            entry.update(door="random", forward=[args.door])
        if args.isn:
            entry["isn"] = True
        users[name] = entry
    elif name not in users:
        return _fail(f"no user {name!r} in {cfg.users_file}")
    elif action in ("disable", "enable"):
        users[name]["enabled"] = action == "enable"
    elif action == "rekey":
        spa_admin.rekey(users[name])
        if not spa_admin.has_keys(users[name]) or {"secret", "secret_utf8"} & users[name].keys():
            for old in ("secret", "secret_utf8"):
                users[name].pop(old, None)
            key, value = new_secret(users[name].get("scheme", cfg.knock.scheme))
            users[name][key] = value
    elif action == "revoke":
        del users[name]
    try:
        _write_users(cfg, users)
    except ConfigError as exc:
        return _fail(f"nothing changed: {exc}")
    # Status on stderr, the profile alone on stdout (`... > alice.toml` works), and
    # the daemon told before the profile is printed: a reader that goes away
    # (`| head`) must not leave the daemon on the old secret.
    _say(f"user {name}: {action} done ({cfg.users_file})")
    _say(_signal_daemon(cfg))
    if action in ("add", "rekey"):
        allowed = users[name].get("ports") or sorted(cfg.protected_ports)
        profile = args.profile if args.profile is not None else args.host
        spa = spa_admin.has_keys(users[name])
        knock = not {"secret", "secret_utf8"}.isdisjoint(users[name])
        if spa:
            # The fwknop set-ups and the QR code go to the terminal (stderr): stdout
            # stays the nfknock-client profile alone (`> alice.toml` works).
            spa_admin.print_client_setup(
                name, users[name], args.host, allowed, cfg.spa.ports, out=sys.stderr
            )
        print(profile_text(cfg, name, users[name], args.host, profile, allowed[0]))
        print("# or on the command line (secret and keys in files only you can read):")
        if knock:
            realm = f" --realm {shlex.quote(cfg.knock.realm)}" if cfg.knock.realm else ""
            extra = ""
            for line in profile_text(cfg, name, users[name], "", "", 0).splitlines():
                if line.startswith("doors = "):
                    extra += f" --doors {line.split(chr(34))[1]}"
                elif line == "isn = true":
                    extra += " --isn"
            print(
                f"#   nfknock-client knock {args.host} --secret-file ~/.nfknock-{name} "
                f"--port {allowed[0]}{printable(realm)}{extra}"
            )
        if spa:
            spa_port = spa_admin.spa_port_of(cfg.spa.ports)
            print(
                f"#   nfknock-client spa {args.host} --key-file ~/.nfknock-{name}.key "
                f"--hmac-key-file ~/.nfknock-{name}.hmac --port {allowed[0]}"
                + (f" --spa-port {spa_port}" if spa_port != spa_admin.DEFAULT_SPA_PORT else "")
            )
    return 0


def cmd_rules(args: argparse.Namespace) -> int:
    from nfknock import rules

    applied_path = Path(args.applied)
    if args.install:
        return _install_or_last_good(args.config, applied_path)
    try:
        if args.remove:  # needs nothing from the config: works when it is broken too
            for line in rules.remove():
                print(line)
            return 0
        cfg = load_config(args.config)  # the users' schemes widen the knock range
        if args.verify:
            problems = rules.check(cfg, applied_path)
            for problem in problems:
                print(f"nfknock rules: {problem} [{problem.code}]", file=sys.stderr)
                print(f"  fix: {problem.fix}", file=sys.stderr)
            if problems:
                return 1
            print(
                "nfknock rules: installed, entered first from INPUT/FORWARD, and exactly "
                "what the config renders (IPv4 and IPv6)"
            )
        elif args.format == "nftables":
            sys.stdout.write(rules.render_nftables(cfg))
        elif args.format == "aws-sg":
            sys.stdout.write(rules.render_aws_sg(cfg))
        else:
            sys.stdout.write(rules.render_iptables(cfg, 4 if args.format == "iptables" else 6))
    except rules.RulesError as exc:
        print(f"nfknock rules: error: {exc}", file=sys.stderr)
        return 1
    return 0


def _install_or_last_good(config: str, applied_path: Path) -> int:
    """``rules --install``: the config's rules, or -- when the config does not validate
    or its rules are refused -- the last good ruleset, loudly (exit 1): a bad config
    must never leave the protected ports more open than the last good one."""
    from nfknock import rules

    try:
        for line in rules.apply(load_config(config), applied_path):
            print(line)
        return 0
    except rules.RecordNotWritten as exc:  # the new rules are in place
        print(f"nfknock rules: error: {exc}", file=sys.stderr)
        return 1
    except (ConfigError, rules.RulesError) as exc:
        print(f"nfknock rules: error: {exc}", file=sys.stderr)
        failed = 2 if isinstance(exc, ConfigError) else 1
    try:
        record = rules.reapply(applied_path)
    except rules.RecordError as exc:
        print(f"nfknock rules: error: no usable last good ruleset: {exc}", file=sys.stderr)
        record = None
    except rules.RulesError as exc:
        print(
            f"nfknock rules: error: re-applying the last good ruleset from {applied_path} "
            f"failed: {exc}",
            file=sys.stderr,
        )
        return 1
    if record is None:
        print(
            f"nfknock rules: nothing was installed (no last good ruleset at {applied_path}); "
            "fix the error above and run `nfknock rules --install` again",
            file=sys.stderr,
        )
        return failed
    print(
        f"nfknock rules: re-applied the last good ruleset installed at {record.when()} "
        f"from {record.config}; fix the error above and run `nfknock rules --install` again",
        file=sys.stderr,
    )
    return 1


def cmd_run(args: argparse.Namespace) -> int:
    from nfknock import logs
    from nfknock.store import StateError

    cfg = load_config(args.config)
    logs.configure(cfg.log.level, cfg.log.format)
    from nfknock.daemon import Daemon

    if not 0.5 <= args.rules_check_seconds <= 86400:
        return _fail("--rules-check-seconds must be between 0.5 and 86400")
    if not has_capability(CAP_NET_ADMIN):
        print(
            "nfknock run: error: this process lacks CAP_NET_ADMIN, which binding an "
            "NFQUEUE needs: run it as root (the systemd unit keeps only that capability)",
            file=sys.stderr,
        )
        return 1
    try:
        applied = Path(args.applied)
        if args.worker is not None or cfg.queue.workers > 1:
            from nfknock import supervisor

            if args.worker is not None:
                return supervisor.run_worker(cfg, applied, args.rules_check_seconds, args.worker)
            return supervisor.Supervisor(cfg, applied, args.rules_check_seconds).run()
        return Daemon(cfg, applied, args.rules_check_seconds).run()
    except StateError as exc:
        print(
            f"nfknock run: error: {exc} (move it aside to start without it; "
            "sequences used before may then be replayed within the skew window)",
            file=sys.stderr,
        )
        return 2
    except OSError as exc:
        # netfilterqueue refuses in its constructor ("Failed to bind family 2. Are
        # you root?") when CAP_NET_ADMIN is missing; say which it is.
        if not has_capability(CAP_NET_ADMIN):
            print(
                "nfknock run: error: this process lacks CAP_NET_ADMIN, which binding an "
                "NFQUEUE needs: run it as root (the systemd unit keeps only that "
                f"capability) ({exc})",
                file=sys.stderr,
            )
        else:
            print(f"nfknock run: error: {exc}", file=sys.stderr)
        return 1


CAP_NET_ADMIN = 12  # linux/capability.h


def has_capability(cap: int, status: Path = Path("/proc/self/status")) -> bool:
    """Whether ``cap`` is in this process's effective set (``CapEff``, proc(5))."""
    try:
        for line in status.read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> cap & 1)
    except (OSError, ValueError, IndexError):
        pass
    return True  # cannot tell: do not claim it is missing


def cmd_status(args: argparse.Namespace) -> int:
    from nfknock.control import control_request

    cfg = load_config(args.config, load_users=False)
    if args.health or args.format == "prometheus":
        return _status_health_or_metrics(cfg, args.health)
    args.json = args.json or args.format == "json"
    try:
        reply = control_request(cfg.control_socket, "status")
    except (OSError, ValueError) as exc:
        print(f"nfknock status: error: no daemon at {cfg.control_socket} ({exc})", file=sys.stderr)
        return 1
    if not reply.get("ok", True):
        print(f"nfknock status: error: the daemon said: {reply.get('error')}", file=sys.stderr)
        return 1
    st = reply.get("status", {})
    if args.json:
        print(json.dumps(st, indent=1))
        return 0
    for line in format_status(st if isinstance(st, dict) else {}, time.time()):
        print(line)
    return 0


def _status_health_or_metrics(cfg: Config, health: bool) -> int:
    """``status --health`` (nfknock.health) or ``status --format prometheus``."""
    if health:
        from nfknock import health as health_check

        return health_check.main(cfg)
    from nfknock import metrics
    from nfknock.control import control_request

    try:
        reply = control_request(cfg.control_socket, "metrics")
    except (OSError, ValueError) as exc:
        print(f"nfknock status: error: no daemon at {cfg.control_socket} ({exc})", file=sys.stderr)
        return 1
    if not reply.get("ok") or not isinstance(reply.get("metrics"), dict):
        print(f"nfknock status: error: the daemon said: {reply.get('error')}", file=sys.stderr)
        return 1
    sys.stdout.write(metrics.render(reply["metrics"]))
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from nfknock import doctor

    return doctor.main(Path(args.config), Path(args.applied), as_json=args.json)


def cmd_demo(args: argparse.Namespace) -> int:
    from nfknock.demo import run_demo

    return run_demo()


def cmd_reload(args: argparse.Namespace) -> int:
    """Validate, re-apply the rules (refused: the old rules and the running config
    stay), then ask the daemon to re-read its configuration."""
    from nfknock import rules

    failed = False
    try:
        cfg = load_config(args.config)
        lines = rules.apply(cfg, Path(args.applied))
    except rules.RecordNotWritten as exc:  # the new rules are in place: tell the daemon
        print(f"nfknock reload: error: {exc}", file=sys.stderr)
        failed, lines = True, []
    except ConfigError as exc:
        print(f"nfknock reload: error: {exc}; nothing was changed", file=sys.stderr)
        return 2
    except rules.RulesError as exc:
        print(
            f"nfknock reload: error: the new rules could not be installed: {exc}; the "
            "running configuration stays",
            file=sys.stderr,
        )
        return 1
    for line in lines:
        print(line)
    message = _signal_daemon(cfg)
    print(message)
    return 0 if message == "the running daemon reloaded" and not failed else 1
