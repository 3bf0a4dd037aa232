"""``nfknock``: the one command-line entry point.

Exit codes: 0 success, 1 a runtime failure (e.g. iptables refused a rule), 2 bad
input (usage, configuration, users file, secret).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

from nfknock import __version__
from nfknock.config import ConfigError, load_config
from nfknock.schemes import SCHEME_NAMES, Kommen, Livingstone, make_scheme, step_for
from nfknock.sequence import (
    DEFAULT_STEP,
    MIN_SECRET_BYTES,
    SchemeError,
    SecretError,
    parse_base32,
    parse_port_list,
    parse_port_range,
)

EXIT_OK = 0
EXIT_USAGE = 2
DEFAULT_CONFIG = "/etc/nfknock/nfknock.toml"


class UsageError(Exception):
    """Bad command-line input: exit 2 with the message."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nfknock",
        description="TOTP port knocking on NFQUEUE (server side and admin commands).",
    )
    p.add_argument("--version", action="version", version=f"nfknock {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("sequence", help="print a knock sequence (debugging, external checks)")
    s.add_argument("--scheme", default="v1", choices=SCHEME_NAMES)
    sec = s.add_mutually_exclusive_group(required=True)
    sec.add_argument("--secret-base32", metavar="S")
    sec.add_argument("--secret-utf8", metavar="S", help="a raw string secret (totp-knockd-rs)")
    s.add_argument("--time", type=float, default=None, metavar="T", help="Unix time (default: now)")
    s.add_argument("--counter", type=int, default=0, metavar="C")
    s.add_argument("--realm", default="", metavar="R")
    s.add_argument("--length", type=int, default=None, metavar="L")
    s.add_argument("--range", default=None, metavar="LO-HI")
    s.add_argument("--step", type=int, default=DEFAULT_STEP, metavar="X")
    s.add_argument("--exclude", default="", metavar="P,P,...")
    s.add_argument("--json", action="store_true")

    c = sub.add_parser("check", help="validate a configuration and its users file")
    c.add_argument("--config", default=DEFAULT_CONFIG)

    from nfknock import admin  # the admin commands register their own subparsers

    admin.register(sub)
    return p


def cmd_sequence(args: argparse.Namespace) -> int:
    try:
        if args.secret_utf8 is not None:
            secret = args.secret_utf8.encode()
            if args.scheme == "v1" and len(secret) < MIN_SECRET_BYTES:
                raise SecretError(f"v1 needs a secret of at least {MIN_SECRET_BYTES} bytes")
        else:
            # Compatibility schemes take the secrets their systems use: the base32
            # decodes to the exact key bytes, whatever their length.
            secret = parse_base32(
                args.secret_base32, min_bytes=MIN_SECRET_BYTES if args.scheme == "v1" else 1
            )
        lo, hi = parse_port_range(args.range) if args.range else (None, None)
        scheme = make_scheme(
            args.scheme,
            port_min=lo,
            port_max=hi,
            length=args.length,
            step_seconds=args.step,
            realm=args.realm.encode(),
            exclude=parse_port_list(args.exclude),
        )
        if args.counter < 0:
            raise SchemeError(f"counter {args.counter} is negative")
        now = time.time() if args.time is None else args.time
        if now < 0:
            raise SchemeError(f"time {now} is negative")
        step = step_for(scheme, now)
        ports = scheme.derive(secret, step, args.counter)
    except (SecretError, SchemeError) as exc:
        raise UsageError(str(exc)) from None
    if args.json:
        out: dict[str, object] = {"scheme": scheme.name, "ports": list(ports)}
        out["step"] = step if scheme.time_based else None
        out["counter"] = args.counter if scheme.has_counter else 0
        if scheme.time_based:
            out["valid_from"] = step * scheme.step_length()
            out["valid_until"] = (step + 1) * scheme.step_length()
        if isinstance(scheme, Livingstone):
            out["code"] = scheme.code(secret, step)
        if isinstance(scheme, Kommen):
            out["code"] = scheme.code(secret, args.counter)
        print(json.dumps(out))
    else:
        print(" ".join(map(str, ports)))
    return EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    for warning in cfg.warnings:
        print(f"nfknock check: warning: {warning}", file=sys.stderr)
    enabled = sum(1 for u in cfg.all_users if u.enabled)
    ports = ", ".join(f"{p.port}@{p.address}" if p.address else str(p.port) for p in cfg.protect)
    print(
        f"{cfg.path}: OK — protects {ports}; knock range "
        f"{cfg.knock.port_min}-{cfg.knock.port_max}, {cfg.knock.length} knocks; "
        f"{len(cfg.all_users)} user(s), {enabled} enabled ({cfg.users_file})"
        + (f"; {len(cfg.spa_users)} with SPA keys" if cfg.spa_users else "")
    )
    store = cfg.state.describe()
    where = f" ({cfg.state_path})" if cfg.state.backend == "embedded" else ""
    workers = f"; {cfg.queue.workers} worker processes" if cfg.queue.workers > 1 else ""
    print(f"{cfg.path}: state {store}{where}{workers}")
    return EXIT_OK


COMMANDS = {"sequence": cmd_sequence, "check": cmd_check}


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    handler = args.handler if hasattr(args, "handler") else COMMANDS[args.command]
    try:
        return int(handler(args))
    except (UsageError, ConfigError) as exc:
        print(f"nfknock {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
