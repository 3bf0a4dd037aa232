"""``nfknock-client``: knock, check the door, resync the counter, pipe, exec.

Exit codes (stable, for scripts):
  0  opened (or, without --check, knocks sent)
  1  the door did not open (timeout in two steps: wrong secret, realm, clock, firewall)
  2  usage, profile, secret or host error
  3  resync exhausted (the server kept answering "behind")
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nfknock import __version__
from nfknock.schemes import SCHEME_NAMES, V1, Scheme, make_scheme, step_for
from nfknock.sequence import (
    MIN_SECRET_BYTES,
    SchemeError,
    SecretError,
    parse_base32,
    parse_port_list,
    parse_port_range,
)
from nfknock_client.knock import (
    DoorState,
    probe,
    relay,
    resolve,
    send_connect_knocks,
    send_raw_knocks,
)

EXIT_OPENED = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_RESYNC = 3
MAX_RESYNC = 8


class ClientError(Exception):
    """Bad input: exit 2."""


@dataclass
class Target:
    name: str  # profile name, or host for ad-hoc use (key of the counter state)
    host: str
    port: int
    secret: bytes = field(repr=False)
    scheme_name: str = "v1"
    # Scheme options (port_min, port_max, length, step_seconds, realm, exclude);
    # absent ones take the scheme's defaults.
    options: dict[str, Any] = field(default_factory=dict)
    initial_counter: int = 0
    scheme: Scheme = field(default_factory=V1)


def _xdg(var: str, default: str) -> Path:
    return Path(os.environ.get(var) or Path.home() / default)


def config_path() -> Path:
    return _xdg("XDG_CONFIG_HOME", ".config") / "nfknock" / "client.toml"


def state_path() -> Path:
    return _xdg("XDG_STATE_HOME", ".local/state") / "nfknock" / "client-state.json"


def _private(path: Path, what: str) -> None:
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise ClientError(f"{what} {path} not found") from None
    except PermissionError:
        raise ClientError(f"{what} {path}: permission denied") from None
    if stat.S_IMODE(mode) & 0o077:
        raise ClientError(
            f"{what} {path} has mode {stat.S_IMODE(mode):04o}; it holds a secret and must "
            f"not be accessible by group or others (chmod 600 {path})"
        )


def read_secret_file(path: Path, min_bytes: int = MIN_SECRET_BYTES) -> bytes:
    _private(path, "secret file")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ClientError(f"secret file {path}: {exc}") from None
    try:
        return parse_base32(text, min_bytes=min_bytes)
    except SecretError as exc:
        raise ClientError(f"secret file {path}: {exc}") from None


PROFILE_KEYS = {
    "host",
    "port",
    "scheme",
    "secret",
    "secret_file",
    "secret_utf8",
    "realm",
    "port_min",
    "port_max",
    "length",
    "step_seconds",
    "exclude",
    "counter",
}


def load_profile(name: str, path: Path | None = None) -> Target:
    path = path or config_path()
    _private(path, "client config")
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ClientError(f"client config {path}: {exc}") from None
    profiles = data.get("profiles", {})
    if name not in profiles or not isinstance(profiles[name], dict):
        known = ", ".join(sorted(profiles)) or "none"
        raise ClientError(f"{path}: no profile {name!r} (profiles: {known})")
    p: dict[str, Any] = profiles[name]
    where = f"{path}: profiles.{name}"
    unknown = set(p) - PROFILE_KEYS
    if unknown:
        raise ClientError(f"{where}.{sorted(unknown)[0]}: unknown key")
    if "host" not in p:
        raise ClientError(f"{where}.host: is required")
    scheme_name = str(p.get("scheme", "v1"))
    if scheme_name not in SCHEME_NAMES:
        raise ClientError(
            f"{where}.scheme: {scheme_name!r} is not one of {', '.join(SCHEME_NAMES)}"
        )
    min_bytes = MIN_SECRET_BYTES if scheme_name == "v1" else 1
    try:
        if "secret" in p:
            secret = parse_base32(str(p["secret"]), min_bytes=min_bytes)
        elif "secret_utf8" in p:
            secret = str(p["secret_utf8"]).encode()
        elif "secret_file" in p:
            secret = read_secret_file(Path(str(p["secret_file"])).expanduser(), min_bytes)
        else:
            raise ClientError(f"{where}: needs secret, secret_utf8 or secret_file")
        options: dict[str, Any] = {
            k: int(p[k]) for k in ("port_min", "port_max", "length", "step_seconds") if k in p
        }
        if "realm" in p:
            options["realm"] = str(p["realm"]).encode()
        if "exclude" in p:
            options["exclude"] = frozenset(int(x) for x in p["exclude"])
        port = int(p.get("port", 22))
        counter = int(p.get("counter", 0))
    except (SecretError, TypeError, ValueError) as exc:
        raise ClientError(f"{where}: {exc}") from None
    _check_port(port)
    return Target(name, str(p["host"]), port, secret, scheme_name, options, counter)


def _check_port(port: int) -> None:
    if not 1 <= port <= 65535:
        raise ClientError(f"port {port} is outside 1-65535")


# --- counter state ------------------------------------------------------------


def load_counter(key: str, step: int) -> int:
    try:
        data = json.loads(state_path().read_text())
        entry = data[key]
        return int(entry["counter"]) + 1 if int(entry["step"]) == step else 0
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def save_counter(key: str, step: int, counter: int) -> None:
    path = state_path()
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            data = {}
    except (OSError, ValueError):
        data = {}
    data[key] = {"step": step, "counter": counter}
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


# --- the command ----------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nfknock-client",
        description="Open a port guarded by nfknock.",
        epilog="exit codes: 0 opened/sent, 1 did not open, 2 usage or input error, "
        "3 resync exhausted",
    )
    p.add_argument("--version", action="version", version=f"nfknock-client {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in ("knock", "sequence"):
        s = sub.add_parser(name, help="knock and open" if name == "knock" else "print the ports")
        s.add_argument("host", nargs="?")
        s.add_argument("--profile")
        s.add_argument(
            "--config", type=Path, default=None, help="client.toml to read profiles from"
        )
        s.add_argument("--secret-file", type=Path, help="base32 secret, mode 0600")
        s.add_argument("--scheme", choices=SCHEME_NAMES, default=None, help="default: v1")
        s.add_argument("--port", type=int, default=None, help="the protected port (default 22)")
        s.add_argument("--realm", default=None)
        s.add_argument("--length", type=int, default=None)
        s.add_argument("--range", default=None, metavar="LO-HI")
        s.add_argument("--step", type=int, default=None)
        s.add_argument("--exclude", default=None, metavar="P,P,...")
        s.add_argument("--counter", type=int, default=None, help="override the saved counter")
        s.add_argument("--json", action="store_true")
        if name == "knock":
            fam = s.add_mutually_exclusive_group()
            fam.add_argument("-4", dest="family", action="store_const", const=4)
            fam.add_argument("-6", dest="family", action="store_const", const=6)
            s.add_argument(
                "--raw", action="store_true", help="single SYNs from a raw socket (root)"
            )
            s.add_argument("--pace-ms", type=float, default=0.2, help="gap between knocks (ms)")
            s.add_argument("--timeout", type=float, default=3.0, help="door check timeout (s)")
            mode = s.add_mutually_exclusive_group()
            mode.add_argument(
                "--pipe", action="store_true", help="relay stdin/stdout (ProxyCommand)"
            )
            mode.add_argument("--exec", dest="exec_cmd", metavar="CMD", help="run CMD once open")
            s.add_argument(
                "--check",
                action="store_true",
                help="probe the protected port (spends one connection of the budget)",
            )
    return p


def _target(args: argparse.Namespace) -> Target:
    """The profile (or command line) with command-line overrides, scheme built."""
    if args.profile:
        t = load_profile(args.profile, args.config)
    else:
        if not args.host and args.command == "knock":
            raise ClientError("give HOST and --secret-file, or --profile NAME")
        if not args.secret_file:
            raise ClientError("--secret-file is required without --profile")
        scheme_name = args.scheme or "v1"
        min_bytes = MIN_SECRET_BYTES if scheme_name == "v1" else 1
        host = args.host or ""
        t = Target(host, host, 22, read_secret_file(args.secret_file, min_bytes), scheme_name)
    if args.scheme:
        t.scheme_name = args.scheme
    if args.host and args.profile:
        t.host = args.host
    port = args.port if args.port is not None else t.port
    _check_port(port)
    opts = dict(t.options)
    try:
        if args.range:
            opts["port_min"], opts["port_max"] = parse_port_range(args.range)
        if args.length is not None:
            opts["length"] = args.length
        if args.step is not None:
            opts["step_seconds"] = args.step
        if args.realm is not None:
            opts["realm"] = args.realm.encode()
        if args.exclude is not None:
            opts["exclude"] = parse_port_list(args.exclude)
        # The protected port is never a knock (the server excludes it too).
        opts["exclude"] = frozenset(opts.get("exclude", frozenset())) | {port}
        scheme = make_scheme(t.scheme_name, **opts)
    except SchemeError as exc:
        raise ClientError(str(exc)) from None
    return Target(t.name, t.host, port, t.secret, t.scheme_name, opts, t.initial_counter, scheme)


def _counter(t: Target, step: int, override: int | None) -> int:
    if override is not None:
        return override
    if not t.scheme.has_counter:
        return 0
    saved = load_counter(t.name, step)
    return max(saved, t.initial_counter) if not t.scheme.time_based else saved


def _result(args: argparse.Namespace, code: int, message: str, **extra: Any) -> int:
    if args.json:
        print(json.dumps({"ok": code == EXIT_OPENED, "exit": code, "message": message, **extra}))
    else:
        print(f"nfknock-client: {message}", file=sys.stderr)
    return code


def cmd_sequence(args: argparse.Namespace) -> int:
    t = _target(args)
    step = step_for(t.scheme, time.time())
    counter = _counter(t, step, args.counter)
    ports = t.scheme.derive(t.secret, step, counter)
    if args.json:
        out = {"scheme": t.scheme.name, "ports": list(ports), "step": step, "counter": counter}
        print(json.dumps(out))
    else:
        print(" ".join(map(str, ports)))
    return EXIT_OPENED


def cmd_knock(args: argparse.Namespace) -> int:
    t = _target(args)
    import socket

    family = {4: socket.AF_INET, 6: socket.AF_INET6}.get(args.family or 0, 0)
    try:
        fam, address = resolve(t.host, family)
    except LookupError as exc:
        raise ClientError(str(exc)) from None
    send = send_raw_knocks if args.raw else send_connect_knocks
    pace = max(args.pace_ms, 0.0) / 1000
    check = args.check or args.pipe
    retried_step = False
    attempts = 0
    while True:
        step = step_for(t.scheme, time.time())
        counter = _counter(t, step, args.counter if attempts == 0 else None)
        ports = t.scheme.derive(t.secret, step, counter)
        try:
            send(fam, address, ports, pace)
        except PermissionError:
            raise ClientError("--raw needs root (CAP_NET_RAW)") from None
        except OSError as exc:
            return _result(args, EXIT_FAILED, f"knocking {address} failed: {exc}")
        save_counter(t.name, step, counter)
        attempts += 1
        if not check:
            msg = (
                f"sent {len(ports)} knocks to {address} (step {step}, counter {counter}); "
                "door not checked (--check spends one connection)"
            )
            if args.exec_cmd:
                print(f"nfknock-client: {msg}", file=sys.stderr)
                return subprocess.call(args.exec_cmd, shell=True)  # noqa: S602 - the user's command line
            return _result(args, EXIT_OPENED, msg, step=step, counter=counter, address=address)
        state, conn = probe(fam, address, t.port, args.timeout)
        if state is DoorState.OPEN and conn is not None:
            if args.pipe:
                relay(conn)
                return EXIT_OPENED
            conn.close()
            msg = f"door open: {address}:{t.port} (step {step}, counter {counter})"
            if args.exec_cmd:
                print(f"nfknock-client: {msg}", file=sys.stderr)
                return subprocess.call(args.exec_cmd, shell=True)  # noqa: S602
            return _result(args, EXIT_OPENED, msg, step=step, counter=counter, address=address)
        if state is DoorState.BEHIND and not t.scheme.has_counter:
            # This step's one sequence is used up (a scheme without counters):
            # only the next step can open.
            if retried_step:
                return _result(
                    args,
                    EXIT_RESYNC,
                    "the sequence of this step was used; gave up after the next step",
                    step=step,
                    counter=counter,
                )
            retried_step = True
            time.sleep(max((step + 1) * t.scheme.step_length() - time.time() + 0.05, 0.0))
            continue
        if state is DoorState.BEHIND:
            if attempts >= MAX_RESYNC:
                return _result(
                    args,
                    EXIT_RESYNC,
                    f"still behind after {attempts} knocks; giving up",
                    step=step,
                    counter=counter,
                )
            continue  # the saved counter now points past the stale one
        if retried_step:
            return _result(
                args,
                EXIT_FAILED,
                f"{address}:{t.port} did not open in two steps. Likely causes: wrong secret, "
                "wrong realm or knock parameters, this clock is off by more than the server's "
                "skew, or a firewall between drops the knock range",
                step=step,
                counter=counter,
            )
        retried_step = True
        if not t.scheme.time_based:
            return _result(
                args,
                EXIT_FAILED,
                f"{address}:{t.port} did not open (HOTP "
                "counter too far ahead, wrong secret, or a firewall between)",
                step=step,
                counter=counter,
            )
        wait = (step + 1) * t.scheme.step_length() - time.time() + 0.05
        time.sleep(max(wait, 0.0))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return cmd_knock(args) if args.command == "knock" else cmd_sequence(args)
    except ClientError as exc:
        if getattr(args, "json", False):
            print(json.dumps({"ok": False, "exit": EXIT_USAGE, "message": str(exc)}))
        print(f"nfknock-client: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
