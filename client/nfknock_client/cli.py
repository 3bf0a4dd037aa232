"""``nfknock-client``: knock or send an SPA packet, check the door, pipe, exec.

``spa`` sends one fwknop-format packet (:mod:`nfknock_client.spa`) instead of 32
knocks; it has no counters, and ``--check``/``--pipe`` retry with a fresh packet
(``--tries``) under the same per-profile lock.

Which counter each knock uses is :mod:`nfknock_client.counters` (its docstring is
the algorithm); the state file and the per-profile lock are
:mod:`nfknock_client.state`.  An invocation holds its profile's lock from choosing a
counter until the outcome is known -- ``--check``/``--pipe``: the probe connected,
was reset, or every immediate retry timed out; plain ``knock``/``--exec``: the last
knock left -- and lets it go while it waits for the next step.  The relay of
``--pipe`` and the command of ``--exec`` run without it.

Exit codes (stable, for scripts; the same for ``knock`` and ``spa``):
  0  opened (or, without --check, knocks / the SPA packet sent)
  1  the door did not open (no answer in two steps: wrong secret, realm, clock,
     firewall; SPA: no answer to --tries packets, or a reset), the connection
     failed, or another invocation held the lock too long
  2  usage, profile, secret, key, host, state-file or stdin/stdout error
  3  resync exhausted (the server kept answering "behind"; knock only)
``--exec`` returns the command's own status.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from nfknock import __version__
from nfknock.schemes import SCHEME_NAMES, V1, make_scheme
from nfknock.sequence import (
    MIN_SECRET_BYTES,
    SchemeError,
    door_port,
    isns,
    parse_port_list,
    parse_port_range,
)
from nfknock.spa.crypto import (
    DEFAULT_HMAC_DIGEST,
    DEFAULT_MODE,
    HMAC_DIGESTS,
    MAX_HMAC_KEY_BYTES,
    MAX_KEY_BYTES,
    MODES,
)
from nfknock.spa.encode import ClientKeys
from nfknock.spa.message import MAX_CLIENT_TIMEOUT, valid_username
from nfknock_client.counters import (
    MAX_HOTP_COUNTER,
    MAX_STEP_COUNTER,
    Action,
    Done,
    Knock,
    Outcome,
    Planner,
    Wait,
)
from nfknock_client.knock import (
    DoorState,
    pipe_problem,
    probe,
    relay,
    resolve,
    send_connect_knocks,
    send_raw_knocks,
)
from nfknock_client.profile import (
    ClientError,
    Target,
    check_port,
    config_path,
    load_profile,
    parse_door_range,
    read_secret_file,
    xdg_dir,
)
from nfknock_client.spa import (
    DEFAULT_SPA_PORT,
    UNSPECIFIED,
    SpaTarget,
    allow_ip_for,
    build_packet,
    check_keys,
    load_spa_profile,
    read_key_file,
    save_packet,
    send_raw_syn,
    send_udp,
)
from nfknock_client.state import LockTimeout, StateError, StateStore

__all__ = ["ClientError", "Target", "config_path", "load_profile", "main", "state_path"]

EXIT_OPENED = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_RESYNC = 3
DEFAULT_LOCK_WAIT = 60.0
DEFAULT_SPA_TRIES = 3


def check_spent(command: str = "knock", verb: str = "knock again") -> str:
    return (
        "the check itself used one connection of the grant: with the server's default "
        "max_connections = 1 that was the only one, and a new connection will time out. "
        f"To connect, {verb} without --check and connect within the open time, or "
        f"use --pipe (ssh -o ProxyCommand='nfknock-client {command} --pipe ...'), where "
        "the checked connection is the session"
    )


CHECK_SPENT = check_spent()


def state_dir() -> Path:
    return xdg_dir("XDG_STATE_HOME", ".local/state") / "nfknock"


def state_path() -> Path:
    return state_dir() / "client-state.json"


# --- the command line -------------------------------------------------------------


def _number(lo: float, hi: float, what: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (math.isfinite(value) and lo <= value <= hi):
            raise argparse.ArgumentTypeError(f"{what} must be between {lo:g} and {hi:g}")
        return value

    return parse


def _counter_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= value <= MAX_HOTP_COUNTER:
        raise argparse.ArgumentTypeError("a counter is an integer >= 0")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nfknock-client",
        description="Open a port guarded by nfknock.",
        epilog="exit codes: 0 opened/sent, 1 did not open, 2 usage or input error, "
        "3 resync exhausted; --exec returns the command's status",
    )
    p.add_argument("--version", action="version", version=f"nfknock-client {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in ("knock", "sequence"):
        s = sub.add_parser(
            name,
            help="knock (and check, pipe or exec)" if name == "knock" else "print the ports",
            epilog="exit codes: 0 opened/sent, 1 did not open, 2 usage or input error, "
            "3 resync exhausted; --exec returns the command's status",
            description="Knock on HOST and open its protected port."
            if name == "knock"
            else "Print the knock sequence the next knock would send (for other knock "
            "tools); records nothing.",
        )
        _where_options(s, "address or name to knock (default: the profile's host)")
        s.add_argument(
            "--secret-file",
            type=Path,
            help="file holding the base32 secret, mode 0600 (default: the profile's secret; "
            "required without --profile)",
        )
        s.add_argument(
            "--scheme",
            choices=SCHEME_NAMES,
            default=None,
            help="knock scheme (default: the profile's, else v1)",
        )
        s.add_argument(
            "--port",
            type=int,
            metavar="PORT",
            default=None,
            help="the protected port to open (default: the profile's, else 22)",
        )
        s.add_argument("--realm", default=None, help="v1 realm (default: the profile's, else '')")
        s.add_argument(
            "--length",
            type=int,
            default=None,
            metavar="N",
            help="knocks per sequence (default: 32)",
        )
        s.add_argument(
            "--range",
            default=None,
            metavar="LO-HI",
            help="knock port range (default: 1024-33791 for v1, 1024-32768 for totp-knockd-rs)",
        )
        s.add_argument(
            "--step",
            type=int,
            default=None,
            metavar="SECONDS",
            help="seconds per time step (default: 30)",
        )
        s.add_argument(
            "--exclude",
            default=None,
            metavar="P,P,...",
            help="ports never knocked, as on the server (default: the profile's; the "
            "protected port is always excluded)",
        )
        s.add_argument(
            "--counter",
            type=_counter_arg,
            metavar="N",
            default=None,
            help="counter of the first knock (default: the next one after those this "
            "client recorded in this step; HOTP: never below the profile's counter)",
        )
        s.add_argument(
            "--doors",
            default=None,
            metavar="LO-HI",
            help='the server\'s forwarded door range for this user (door = "random"): the '
            "knock opens the door that follows the sequence there, and --check/--pipe/--exec "
            "connect to it (default: the profile's; none: the protected port)",
        )
        s.add_argument(
            "--isn",
            action="store_true",
            help="each knock carries its ISN (users with isn = true; implies --raw, needs "
            "root; default: the profile's isn)",
        )
        s.add_argument(
            "--json",
            action="store_true",
            help="print the result as one JSON line on stdout (default: a message on stderr)",
        )
        if name == "sequence":
            continue
        _family_options(s)
        s.add_argument(
            "--raw",
            action="store_true",
            help="send single SYNs from a raw socket (needs root; default: connect() knocks)",
        )
        s.add_argument(
            "--pace-ms",
            type=_number(0, 10000, "--pace-ms"),
            metavar="MS",
            default=0.2,
            help="gap between knocks in milliseconds (default: 0.2)",
        )
        _timeout_option(s)
        _lock_wait_option(s, "seconds to wait while another invocation of this profile knocks")
        _then_options(
            s,
            exec_help="run CMD through the shell once knocked",
            check_help="probe the protected port and retry until it opens",
        )
    _spa_parser(sub)
    return p


def _int_in(lo: int, hi: int, what: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{what} must be between {lo} and {hi}")
        return value

    return parse


def _spa_parser(sub: Any) -> None:
    s = sub.add_parser(
        "spa",
        help="send an fwknop SPA packet (and check, pipe or exec)",
        description="Send one Single Packet Authorization packet in fwknop's format to "
        "HOST and open its protected port (nfknock, or any fwknopd).",
        epilog="exit codes: 0 opened/sent, 1 did not open, 2 usage or input error; "
        "--exec returns the command's status",
    )
    _where_options(s, "address or name (default: the profile's host)")
    s.add_argument(
        "--key-file",
        type=Path,
        help="file holding the base64 encryption key (KEY_BASE64), mode 0600 (default: "
        "the profile's; required without --profile)",
    )
    s.add_argument(
        "--hmac-key-file",
        type=Path,
        help="file holding the base64 HMAC key (HMAC_KEY_BASE64), mode 0600 (default: "
        "the profile's; required without --profile)",
    )
    s.add_argument(
        "--hmac-digest",
        choices=list(HMAC_DIGESTS),
        default=None,
        help=f"HMAC digest, as the server's user has it (default: the profile's, else "
        f"{DEFAULT_HMAC_DIGEST})",
    )
    s.add_argument(
        "--mode",
        choices=[m for m in MODES if m != "legacy"],
        default=None,
        help=f"encryption mode, as the server's user has it (default: the profile's, else "
        f"{DEFAULT_MODE})",
    )
    who = s.add_mutually_exclusive_group()
    who.add_argument(
        "--allow-ip",
        metavar="IP",
        default=None,
        help="the IPv4 address to open, e.g. the address your SSH will come from (the "
        "server honours one other than the packet's source only for users with "
        'spa_allow_ip = "any"; default: --source)',
    )
    who.add_argument(
        "--source",
        action="store_true",
        help="open the packet's source address, as fwknop -s (default: on)",
    )
    s.add_argument(
        "--port",
        type=int,
        metavar="PORT",
        default=None,
        help="the protected TCP port to open (default: the profile's, else 22)",
    )
    s.add_argument(
        "--spa-port",
        type=_int_in(1, 65535, "--spa-port"),
        metavar="PORT",
        default=None,
        help=f"the server's SPA port (default: the profile's, else {DEFAULT_SPA_PORT})",
    )
    s.add_argument(
        "--raw-syn",
        action="store_true",
        help="send the packet as the payload of one TCP SYN from a raw socket (fwknop's "
        "-P tcpraw; needs root; default: one UDP datagram)",
    )
    s.add_argument(
        "--timeout-open",
        type=_int_in(1, MAX_CLIENT_TIMEOUT, "--timeout-open"),
        metavar="SECONDS",
        default=None,
        help="ask for this open time (fwknop -f; the server caps it at its "
        "max_open_seconds; default: none, the server's open_seconds)",
    )
    s.add_argument(
        "--username",
        default=None,
        help="the username in the packet (fwknop -U; checked only for users with "
        "fwknop_username; default: the profile's fwknop_username, else the login name)",
    )
    s.add_argument(
        "--save-packet",
        type=Path,
        metavar="FILE",
        default=None,
        help="also write the payload sent last to FILE, mode 0600, for `nfknock spa "
        "inspect` (it opens the door until it is too old; default: none)",
    )
    _family_options(s)
    _timeout_option(s)
    s.add_argument(
        "--tries",
        type=_int_in(1, 10, "--tries"),
        metavar="N",
        default=DEFAULT_SPA_TRIES,
        help="--check/--pipe: packets to send, each fresh, before giving up "
        f"(default: {DEFAULT_SPA_TRIES})",
    )
    _lock_wait_option(
        s, "--check/--pipe: seconds to wait while another invocation of this profile opens"
    )
    _then_options(
        s,
        exec_help="run CMD through the shell once the packet is sent",
        check_help="probe the protected port, sending a fresh packet until it opens",
    )
    s.add_argument(
        "--json",
        action="store_true",
        help="print the result as one JSON line on stdout (default: a message on stderr)",
    )


# Options that knock and spa (and sequence, for the first) declare alike.


def _where_options(s: argparse.ArgumentParser, host_help: str) -> None:
    s.add_argument("host", nargs="?", help=host_help)
    s.add_argument(
        "--profile", help="profile NAME from client.toml (default: none, use the options)"
    )
    s.add_argument(
        "--config",
        type=Path,
        default=None,
        help="client.toml to read profiles from (default: "
        "$XDG_CONFIG_HOME/nfknock/client.toml or ~/.config/nfknock/client.toml)",
    )


def _family_options(s: argparse.ArgumentParser) -> None:
    fam = s.add_mutually_exclusive_group()
    fam.add_argument(
        "-4", dest="family", action="store_const", const=4, help="IPv4 only (default: any)"
    )
    fam.add_argument(
        "-6", dest="family", action="store_const", const=6, help="IPv6 only (default: any)"
    )


def _timeout_option(s: argparse.ArgumentParser) -> None:
    s.add_argument(
        "--timeout",
        type=_number(0.1, 600, "--timeout"),
        metavar="SECONDS",
        default=3.0,
        help="seconds to wait for the door to answer a probe (default: 3)",
    )


def _lock_wait_option(s: argparse.ArgumentParser, what: str) -> None:
    s.add_argument(
        "--lock-wait",
        type=_number(0, 3600, "--lock-wait"),
        metavar="SECONDS",
        default=DEFAULT_LOCK_WAIT,
        help=f"{what} (default: {DEFAULT_LOCK_WAIT:g}; then exit 1)",
    )


def _then_options(s: argparse.ArgumentParser, exec_help: str, check_help: str) -> None:
    """What happens once the door should be open: --pipe or --exec, and --check."""
    mode = s.add_mutually_exclusive_group()
    mode.add_argument(
        "--pipe",
        action="store_true",
        help="probe, then relay stdin/stdout over the connection (for ssh's "
        "ProxyCommand; stdin and stdout must be pipes or sockets; default: off)",
    )
    mode.add_argument(
        "--exec",
        dest="exec_cmd",
        metavar="CMD",
        help=f"{exec_help} (default: none); with --check, CMD's own connection needs "
        "max_connections >= 2",
    )
    s.add_argument(
        "--check",
        action="store_true",
        help=f"{check_help} (spends one connection of the grant; default: no probe)",
    )


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
    check_port(port)
    opts = dict(t.options)
    try:
        if args.range:
            opts["port_min"], opts["port_max"] = parse_port_range(args.range)
        if args.length is not None:
            opts["length"] = args.length
        if args.step is not None:
            opts["step_seconds"] = args.step
        if args.realm is not None:
            opts["realm"] = args.realm.encode(errors="surrogateescape")
        if args.exclude is not None:
            opts["exclude"] = parse_port_list(args.exclude)
        # The protected port is never a knock (the server excludes it too).
        opts["exclude"] = frozenset(opts.get("exclude", frozenset())) | {port}
        scheme = make_scheme(t.scheme_name, **opts)
    except SchemeError as exc:
        raise ClientError(str(exc)) from None
    limit = MAX_STEP_COUNTER if scheme.time_based else MAX_HOTP_COUNTER
    if args.counter is not None and args.counter > limit:
        raise ClientError(f"--counter {args.counter} is above {limit} for scheme {scheme.name}")
    out = Target(t.name, t.host, port, t.secret, t.scheme_name, opts, t.initial_counter, scheme)
    out.doors = parse_door_range(args.doors) if args.doors else t.doors
    out.isn = args.isn or t.isn
    if (out.doors or out.isn) and not isinstance(scheme, V1):
        raise ClientError("a forwarded door and ISN knocks are derived from scheme v1 sequences")
    return out


def _door(t: Target, step: int, counter: int) -> int | None:
    """The door a knock of (step, counter) opens (sequence.py step 7), if any."""
    if t.doors is None or not isinstance(t.scheme, V1):
        return None
    return door_port(t.secret, step, counter, t.scheme.params, *t.doors)


def _isns(t: Target, step: int, counter: int) -> tuple[int, ...] | None:
    if not t.isn or not isinstance(t.scheme, V1):
        return None
    return isns(t.secret, step, counter, t.scheme.params)


def _planner(t: Target, given: int | None) -> Planner:
    s = t.scheme
    return Planner(
        time_based=s.time_based,
        has_counter=s.has_counter,
        step_length=s.step_length(),
        floor=0 if s.time_based else t.initial_counter,
        given=given,
    )


def _result(args: argparse.Namespace, code: int, message: str, **extra: Any) -> int:
    if args.json:
        print(json.dumps({"ok": code == EXIT_OPENED, "exit": code, "message": message, **extra}))
    else:
        print(f"nfknock-client: {message}", file=sys.stderr)
    return code


def _note(message: str) -> None:
    print(f"nfknock-client: {message}", file=sys.stderr, flush=True)


def cmd_sequence(args: argparse.Namespace) -> int:
    t = _target(args)
    planner = _planner(t, args.counter)
    wall = time.time()
    step = planner.step_of(wall)
    knock = planner.start(wall, StateStore(state_dir()).record(t.name, step))
    ports = t.scheme.derive(t.secret, knock.step, knock.counter)
    door = _door(t, knock.step, knock.counter)
    isn_values = _isns(t, knock.step, knock.counter)
    if args.json:
        out: dict[str, Any] = {
            "scheme": t.scheme.name,
            "ports": list(ports),
            "step": step,
            "counter": knock.counter,
        }
        if door is not None:
            out["door"] = door
        if isn_values is not None:
            out["isns"] = list(isn_values)
        print(json.dumps(out))
    else:
        print(" ".join(map(str, ports)))
        if door is not None:
            print(f"door {door}")
        if isn_values is not None:
            print("isns " + " ".join(map(str, isn_values)))
    return EXIT_OPENED


# --- knocking -----------------------------------------------------------------------


@dataclass
class KnockIO:
    """The edges of ``knock`` (tests replace them: a fake clock, fake probes)."""

    clock: Callable[[], float] = time.time
    sleep: Callable[[float], None] = time.sleep
    send: Callable[[int, str, Sequence[int], float], None] | None = None  # None: by --raw
    probe: Callable[[int, str, int, float], tuple[DoorState, socket.socket | None]] = probe
    relay: Callable[[socket.socket], tuple[int, str | None]] = relay
    tries: list[dict[str, Any]] = field(default_factory=list)


_OUTCOME = {DoorState.OPEN: Outcome.OPEN, DoorState.BEHIND: Outcome.BEHIND}
_RETRY_NOTE = {
    "resend": "knocking counter {c} again at once (its knocks may have been lost)",
    "unconfirmed": "knocking counter {c} at once (sent earlier, never confirmed)",
    "ahead": "knocking counter {c} at once (the server may accept one counter ahead)",
    "resync": "the server says counter {prev} is used; knocking counter {c}",
    "next step": "trying step {s}, counter {c}",
}


def _exec(cmd: str, address: str = "", port: int = 0) -> int:
    """Run the user's command; with a knock, ``NFKNOCK_HOST`` / ``NFKNOCK_PORT`` in
    its environment name where to connect (the forwarded door, or the protected
    port): ``--exec 'ssh -p $NFKNOCK_PORT $NFKNOCK_HOST'``."""
    env = None
    if address:
        env = {**os.environ, "NFKNOCK_HOST": address, "NFKNOCK_PORT": str(port)}
    try:
        code = subprocess.call(cmd, shell=True, env=env)  # noqa: S602 - the user's command line
    except (OSError, ValueError) as exc:
        raise ClientError(f"--exec {cmd!r}: {exc}") from None
    return 128 - code if code < 0 else code


def cmd_knock(args: argparse.Namespace, io: KnockIO | None = None) -> int:
    io = io or KnockIO()
    io.tries = []
    if args.pipe and (problem := pipe_problem()):
        raise ClientError(
            f"--pipe relays stdin/stdout for ssh's ProxyCommand, but {problem}: nothing "
            "was knocked. Use it as ssh -o ProxyCommand='nfknock-client knock --pipe ...', "
            "or knock without --pipe"
        )
    if args.exec_cmd is not None and "\0" in args.exec_cmd:
        raise ClientError("--exec: the command contains a NUL byte")
    t = _target(args)
    family = {4: socket.AF_INET, 6: socket.AF_INET6}.get(args.family or 0, 0)
    try:
        fam, address = resolve(t.host, family)
    except LookupError as exc:
        raise ClientError(str(exc)) from None
    send = io.send or (send_raw_knocks if args.raw or t.isn else send_connect_knocks)
    pace = args.pace_ms / 1000
    probing = args.check or args.pipe
    store = StateStore(state_dir())
    planner = _planner(t, args.counter)
    lock = store.profile_lock(t.name, args.lock_wait)
    try:
        lock.acquire()
        wall = io.clock()
        action: Action = planner.start(wall, store.record(t.name, planner.step_of(wall)))
        prev: Knock | None = None
        while isinstance(action, Knock | Wait):
            if isinstance(action, Wait):
                lock.release()
                wait = max(action.until - io.clock(), 0.0)
                _note(f"no answer in this step; waiting {wait:.1f}s for the next one")
                io.sleep(wait)
                lock.acquire()
                wall = io.clock()
                action = planner.resume(wall, store.record(t.name, planner.step_of(wall)))
            knock = action
            if prev is not None and knock.why in _RETRY_NOTE:
                _note(
                    _RETRY_NOTE[knock.why].format(c=knock.counter, prev=prev.counter, s=knock.step)
                )
            ports = t.scheme.derive(t.secret, knock.step, knock.counter)
            door = _door(t, knock.step, knock.counter)
            isn_values = _isns(t, knock.step, knock.counter)
            store.mark_sent(t.name, knock.step, knock.counter)  # before any knock leaves
            try:
                if isn_values is not None and io.send is None:
                    send_raw_knocks(fam, address, ports, pace, isn_values)
                else:
                    send(fam, address, ports, pace)
            except PermissionError:
                raise ClientError("--raw and ISN knocks need root (CAP_NET_RAW)") from None
            except OSError as exc:
                return _result(args, EXIT_FAILED, f"knocking {address} failed: {exc}")
            info: dict[str, Any] = {
                "step": knock.step,
                "counter": knock.counter,
                "address": address,
            }
            if door is not None:
                info["door"] = door
            if not probing:
                lock.release()
                return _sent(args, t, len(ports), info)
            state, conn = io.probe(fam, address, door or t.port, args.timeout)
            outcome = _OUTCOME.get(state, Outcome.TIMEOUT)
            io.tries.append({**info, "why": knock.why, "result": outcome.value})
            if outcome is not Outcome.TIMEOUT:
                store.mark_used(t.name, knock.step, knock.counter)
            if outcome is Outcome.OPEN and conn is not None:
                lock.release()
                return _opened(args, io, t, conn, info)
            prev, wall = knock, io.clock()
            action = planner.after(outcome, wall, store.record(t.name, planner.step_of(wall)))
        lock.release()
        return _gave_up(args, io, t, address, action, planner.resyncs)
    finally:
        lock.close()


def _sent(args: argparse.Namespace, t: Target, n: int, info: dict[str, Any]) -> int:
    c = info["counter"]
    msg = f"sent {n} knocks to {info['address']} (step {info['step']}"
    if "door" in info:
        msg = f"door {info['door']}: " + msg
    if t.scheme.has_counter:
        msg += (
            f", counter {c}); door not checked (--check would spend a connection). "
            f"Nothing confirms a plain knock, so counter {c} is recorded as sent and the "
            f"next knock uses {c + 1}"
        )
    else:
        msg += "); door not checked (--check would spend a connection)"
    if args.exec_cmd:
        _note(msg)
        return _exec(args.exec_cmd, info["address"], info.get("door", t.port))
    return _result(args, EXIT_OPENED, msg, **info)


def _opened(
    args: argparse.Namespace, io: KnockIO, t: Target, conn: socket.socket, info: dict[str, Any]
) -> int:
    if args.pipe:
        code, message = io.relay(conn)
        if message:
            _note(message)
        return code
    conn.close()
    port = info.get("door", t.port)
    where = f"{info['address']}:{port} (step {info['step']}, counter {info['counter']})"
    if args.exec_cmd:
        _note(
            f"door open: {where}; the check used one connection, so CMD needs the server's "
            "max_connections >= 2"
        )
        return _exec(args.exec_cmd, info["address"], port)
    return _result(
        args, EXIT_OPENED, f"door open: {where} -- {CHECK_SPENT}", tries=io.tries, **info
    )


# --- SPA ------------------------------------------------------------------------------


@dataclass
class SpaIO:
    """The edges of ``spa`` (tests replace them: a fake clock, capture, fake probes)."""

    clock: Callable[[], float] = time.time
    send: Callable[[int, str, int, bytes], None] | None = None  # None: by --raw-syn
    probe: Callable[[int, str, int, float], tuple[DoorState, socket.socket | None]] = probe
    relay: Callable[[socket.socket], tuple[int, str | None]] = relay


def _spa_target(args: argparse.Namespace) -> SpaTarget:
    """The profile (or command line) with command-line overrides, keys checked."""
    if args.profile:
        t = load_spa_profile(args.profile, args.config)
    else:
        if not args.host:
            raise ClientError("give HOST, --key-file and --hmac-key-file, or --profile NAME")
        if not args.key_file or not args.hmac_key_file:
            raise ClientError("--key-file and --hmac-key-file are required without --profile")
        keys = ClientKeys(read_key_file(args.key_file, MAX_KEY_BYTES), None)
        t = SpaTarget(args.host, args.host, 22, DEFAULT_SPA_PORT, keys, None)
    keys = t.keys
    if args.profile and args.key_file:
        keys = replace(keys, key=read_key_file(args.key_file, MAX_KEY_BYTES))
    if args.hmac_key_file:
        keys = replace(keys, hmac_key=read_key_file(args.hmac_key_file, MAX_HMAC_KEY_BYTES))
    if args.hmac_digest:
        if keys.hmac_key is None:
            raise ClientError("--hmac-digest: the profile has fwknop_hmac = false")
        keys = replace(keys, hmac_digest=args.hmac_digest)
    if args.mode:
        keys = replace(keys, mode=args.mode)
    t.keys = check_keys(keys, "the keys given")
    if args.host and args.profile:
        t.host = args.host
    if args.port is not None:
        t.port = args.port
    check_port(t.port)
    if args.spa_port is not None:
        t.spa_port = args.spa_port
    if args.username is not None:
        if not valid_username(args.username):
            raise ClientError(
                f'--username {args.username!r}: 1-48 printable characters, none of "/\\[]:;|=,+*?<>'
            )
        t.username = args.username
    return t


def cmd_spa(args: argparse.Namespace, io: SpaIO | None = None) -> int:
    io = io or SpaIO()
    if args.pipe and (problem := pipe_problem()):
        raise ClientError(
            f"--pipe relays stdin/stdout for ssh's ProxyCommand, but {problem}: nothing "
            "was sent. Use it as ssh -o ProxyCommand='nfknock-client spa --pipe ...', "
            "or send without --pipe"
        )
    if args.exec_cmd is not None and "\0" in args.exec_cmd:
        raise ClientError("--exec: the command contains a NUL byte")
    t = _spa_target(args)
    family = {4: socket.AF_INET, 6: socket.AF_INET6}.get(args.family or 0, 0)
    try:
        fam, address = resolve(t.host, family)
    except LookupError as exc:
        raise ClientError(str(exc)) from None
    allow_ip = allow_ip_for(args.allow_ip, fam)
    send = io.send or (send_raw_syn if args.raw_syn else send_udp)
    info: dict[str, Any] = {
        "address": address,
        "spa_port": t.spa_port,
        "transport": "tcp-syn" if args.raw_syn else "udp",
        "allow_ip": allow_ip,
        "packets": 0,
    }
    probing = args.check or args.pipe
    lock = StateStore(state_dir()).profile_lock(t.name, args.lock_wait) if probing else None
    try:
        if lock is not None:
            # One invocation of a profile at a time from packet to probe outcome: each
            # parallel ProxyCommand gets its own grant and uses it.
            lock.acquire()
        for _ in range(args.tries if probing else 1):
            payload = build_packet(t, allow_ip, io.clock(), args.timeout_open)
            if args.save_packet is not None:
                save_packet(args.save_packet, payload)
            try:
                send(fam, address, t.spa_port, payload)
            except PermissionError:
                raise ClientError("--raw-syn needs root (CAP_NET_RAW)") from None
            except OSError as exc:
                return _result(args, EXIT_FAILED, f"sending to {address} failed: {exc}", **info)
            info["packets"] += 1
            if not probing:
                return _spa_sent(args, t, info)
            state, conn = io.probe(fam, address, t.port, args.timeout)
            if state is DoorState.OPEN and conn is not None:
                if lock is not None:
                    lock.release()
                return _spa_opened(args, io, t, conn, info)
            if state is DoorState.BEHIND:
                msg = (
                    f"{address}:{t.port} answered with a TCP reset: nothing listens there, "
                    "or the server marked this address behind after a stale knock (the next "
                    "good knock or SPA clears it); no further packet sent"
                )
                return _result(args, EXIT_FAILED, msg, **info)
            if info["packets"] < args.tries:
                _note(f"{address}:{t.port} did not answer; sending a fresh packet")
        msg = (
            f"{address}:{t.port} did not open after {info['packets']} SPA packet(s) to "
            f"{info['transport']}/{t.spa_port}. Likely causes: wrong keys, HMAC digest or "
            "encryption mode; this clock is off by more than the server's max_age (120 s "
            f"by default); the user may not open port {t.port}; a firewall between drops "
            "the packets. On the server, `nfknock spa inspect` says why (--save-packet "
            "keeps the packet)"
        )
        return _result(args, EXIT_FAILED, msg, **info)
    finally:
        if lock is not None:
            lock.close()


def _spa_sent(args: argparse.Namespace, t: SpaTarget, info: dict[str, Any]) -> int:
    whom = "the packet's source" if info["allow_ip"] == UNSPECIFIED else info["allow_ip"]
    msg = (
        f"sent an SPA packet to {info['address']} ({info['transport']}/{t.spa_port}) asking "
        f"to open tcp/{t.port} for {whom}; door not checked (--check would spend a "
        "connection)"
    )
    if args.exec_cmd:
        _note(msg)
        return _exec(args.exec_cmd)
    return _result(args, EXIT_OPENED, msg, **info)


def _spa_opened(
    args: argparse.Namespace, io: SpaIO, t: SpaTarget, conn: socket.socket, info: dict[str, Any]
) -> int:
    if args.pipe:
        code, message = io.relay(conn)
        if message:
            _note(message)
        return code
    conn.close()
    where = f"{info['address']}:{t.port} (SPA packet {info['packets']})"
    if args.exec_cmd:
        _note(
            f"door open: {where}; the check used one connection, so CMD needs the server's "
            "max_connections >= 2"
        )
        return _exec(args.exec_cmd)
    spent = check_spent("spa", "send again")
    return _result(args, EXIT_OPENED, f"door open: {where} -- {spent}", **info)


def _gave_up(
    args: argparse.Namespace,
    io: KnockIO,
    t: Target,
    address: str,
    done: Done,
    resyncs: int,
) -> int:
    last = io.tries[-1] if io.tries else {}
    extra = {"step": last.get("step"), "counter": last.get("counter"), "tries": io.tries}
    if done is Done.STEP_USED:
        msg = "the sequence of this step was used; gave up after the next step"
        return _result(args, EXIT_RESYNC, msg, **extra)
    if done is Done.RESYNC_EXHAUSTED:
        msg = f"still behind after {resyncs} resets; giving up"
        return _result(args, EXIT_RESYNC, msg, **extra)
    tried = ", ".join(f"{x['counter']}" for x in io.tries)
    if t.scheme.time_based:
        msg = (
            f"{address}:{t.port} did not open in two steps (counters tried: {tried}). Likely "
            "causes: wrong secret, wrong realm or knock parameters, this clock is off by more "
            "than the server's skew, or a firewall between drops the knock range"
        )
    else:
        msg = (
            f"{address}:{t.port} did not open (counters tried: {tried}; HOTP counter too far "
            "ahead, wrong secret, or a firewall between)"
        )
    return _result(args, EXIT_FAILED, msg, **extra)


def main(argv: list[str] | None = None, io: KnockIO | SpaIO | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command in ("knock", "spa") and args.pipe and args.json:
        parser.error("--json cannot be combined with --pipe: stdout is the connection")
    code, message = EXIT_USAGE, ""
    try:
        if args.command == "spa":
            result = cmd_spa(args, io if isinstance(io, SpaIO) else None)
        elif args.command == "knock":
            result = cmd_knock(args, io if isinstance(io, KnockIO) else None)
        else:
            result = cmd_sequence(args)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return result
    except (ClientError, StateError) as exc:
        message = f"error: {exc}"
    except LockTimeout as exc:
        code, message = EXIT_FAILED, f"error: {exc}"
    except BrokenPipeError:
        # The reader of stdout went away (`... | head`): stop quietly; point stdout
        # at /dev/null so that the interpreter's final flush cannot complain.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
    if getattr(args, "json", False):
        print(json.dumps({"ok": False, "exit": code, "message": message[len("error: ") :]}))
    print(f"nfknock-client: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
