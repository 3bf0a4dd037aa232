"""``nfknock``: the one command-line entry point.

Exit codes: 0 success, 1 a runtime failure (e.g. iptables refused a rule, stdout
closed early), 2 bad input (usage, configuration, users file, secret).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from nfknock import __version__
from nfknock.config import Config, ConfigError, load_config
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
EXIT_FAILURE = 1
EXIT_USAGE = 2
DEFAULT_CONFIG = "/etc/nfknock/nfknock.toml"
# `sequence --counter`: each counter is one more HMAC in the chain (scheme v1 step
# 3), so an absurd counter would compute for ever.  Far above any real counter.
MAX_COUNTER = 1_000_000
# `sequence --time`: seconds since 1970 up to the year 9999.
MAX_TIME = 253_402_300_799


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" after an option's help unless the help already says
    what the default is, or there is none worth saying (a flag, None)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if "default" in text or default is None or default is False or default == argparse.SUPPRESS:
            return text
        if default == "":
            return f"{text} (default: empty)"
        return super()._get_help_string(action)


class _SubcommandParser(argparse.ArgumentParser):
    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(**kwargs)


class UsageError(Exception):
    """Bad command-line input: exit 2 with the message."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nfknock",
        description="TOTP port knocking on NFQUEUE (server side and admin commands).",
        epilog="exit codes: 0 success, 1 runtime failure, 2 bad input",
    )
    p.add_argument("--version", action="version", version=f"nfknock {__version__}")
    sub = p.add_subparsers(
        dest="command",
        required=True,
        metavar="COMMAND",
        parser_class=_SubcommandParser,
    )

    what = "print a knock sequence (debugging, external checks)"
    s = sub.add_parser("sequence", help=what, description=what)
    s.add_argument("--scheme", default="v1", choices=SCHEME_NAMES, help="the sequence scheme")
    sec = s.add_mutually_exclusive_group(required=True)
    sec.add_argument("--secret-base32", metavar="S", help="the secret, base32")
    sec.add_argument("--secret-utf8", metavar="S", help="a raw string secret (totp-knockd-rs)")
    s.add_argument("--time", type=float, default=None, metavar="T", help="Unix time (default: now)")
    s.add_argument("--counter", type=int, default=0, metavar="C", help="the counter")
    s.add_argument("--realm", default="", metavar="R", help="the server's realm")
    s.add_argument(
        "--length", type=int, default=None, metavar="L", help="knocks (default: the scheme's)"
    )
    s.add_argument(
        "--range", default=None, metavar="LO-HI", help="knock port range (default: the scheme's)"
    )
    s.add_argument("--step", type=int, default=DEFAULT_STEP, metavar="X", help="step seconds")
    s.add_argument(
        "--exclude", default="", metavar="P,P,...", help="ports never knocked (default: none)"
    )
    s.add_argument("--json", action="store_true", help="print JSON with the step and counter")

    what = "validate a configuration and its users file (exit 0 valid, 2 invalid)"
    c = sub.add_parser("check", help=what, description=what)
    c.add_argument("--config", default=DEFAULT_CONFIG, help="the configuration file")

    from nfknock import admin  # the admin commands register their own subparsers

    admin.register(sub)
    return p


def cmd_sequence(args: argparse.Namespace) -> int:
    try:
        if args.time is not None and not 0 <= args.time <= MAX_TIME:  # also NaN
            raise SchemeError(f"time {args.time} is not a Unix time from 1970 to 9999")
        if not 0 <= args.counter <= MAX_COUNTER:
            raise SchemeError(f"counter {args.counter} is outside 0..{MAX_COUNTER}")
        if args.secret_utf8 is not None:
            secret = os.fsencode(args.secret_utf8)  # argv's bytes, even if not UTF-8
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
            realm=os.fsencode(args.realm),
            exclude=parse_port_list(args.exclude),
        )
        now = time.time() if args.time is None else args.time
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
        f"{cfg.knock.port_min}-{cfg.knock.port_max}, {cfg.knock.length} knock(s); "
        f"{len(cfg.all_users)} user(s), {enabled} enabled ({cfg.users_file})"
        + (f"; {len(cfg.spa_users)} with SPA keys" if cfg.spa_users else "")
    )
    store = cfg.state.describe()
    where = f" ({cfg.state_path})" if cfg.state.backend == "embedded" else ""
    workers = f"; {cfg.queue.workers} worker processes" if cfg.queue.workers > 1 else ""
    print(f"{cfg.path}: state {store}{where}{workers}")
    print(f"{cfg.path}: {grant_prefixes_text(cfg)}")
    return EXIT_OK


def grant_prefixes_text(cfg: Config) -> str:
    """What a grant opens: the [door] prefixes, and every user with others."""
    door = (cfg.door.grant_prefix_v4, cfg.door.grant_prefix_v6)
    own = [
        f"{u.name} /{u.grant_prefix_v4} and /{u.grant_prefix_v6}"
        for u in cfg.all_users
        if (u.grant_prefix_v4, u.grant_prefix_v6) != door
    ]
    text = f"grants open the client's IPv4 /{door[0]} and IPv6 /{door[1]}"
    if door == (32, 128):
        text += " (its address only)"
    return text + (f"; users with their own: {', '.join(own)}" if own else "")


COMMANDS = {"sequence": cmd_sequence, "check": cmd_check}


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    handler = args.handler if hasattr(args, "handler") else COMMANDS[args.command]
    try:
        code = int(handler(args))
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return code
    except (UsageError, ConfigError) as exc:
        print(f"nfknock {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        # The reader went away (`... | head`): stop quietly, as other tools do.
        # Point stdout at /dev/null so that Python's final flush cannot complain.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
