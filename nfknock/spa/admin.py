"""SPA admin commands: ``nfknock spa inspect`` and the ``user add/rekey --spa`` output.

``spa inspect`` answers "why did my phone not open?": it verifies a payload exactly
as the daemon would, prints the outcome as JSON and touches no replay state
(exit 0 accepted, 1 refused, 2 usage error).

``user add NAME --spa`` makes keys as ``fwknop --key-gen`` does (a 32-byte
encryption key, an HMAC key of 64 bytes for SHA-256) and prints what each kind of
client needs: a ``~/.fwknoprc`` stanza, the equivalent ``fwknop`` command line,
the keys of an ``nfknock-client`` profile, and a QR code for phone apps.  The QR code holds
``KEY_BASE64:<key> HMAC_KEY_BASE64:<hmac key>`` -- space-separated ``NAME:value``
tokens, the format the Android app Fwknop2 reads from a scanned code (its
``ConfigDetailFragment.onActivityResult``); any other app can split it the same way.
"""

from __future__ import annotations

import argparse
import base64
import ipaddress
import json
import math
import secrets
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from nfknock.spa.crypto import DEFAULT_HMAC_DIGEST, DEFAULT_MODE

DEFAULT_CONFIG = "/etc/nfknock/nfknock.toml"
KEY_BYTES = 32
# fwknop --key-gen's HMAC key length per digest (fko_key_gen); SHA3 has none there.
HMAC_KEY_BYTES = {
    "md5": 16,
    "sha1": 20,
    "sha256": 64,
    "sha384": 128,
    "sha512": 128,
    "sha3_256": 64,
    "sha3_512": 64,
}
DEFAULT_SPA_PORT = 62201


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser("spa", help="Single Packet Authorization tools")
    spa_sub = p.add_subparsers(dest="spa_command", required=True, metavar="SPA_COMMAND")
    i: argparse.ArgumentParser = spa_sub.add_parser(
        "inspect", help="verify one SPA payload as the daemon would (no replay state touched)"
    )
    i.add_argument("--config", default=DEFAULT_CONFIG)
    i.add_argument("--source", default=None, metavar="IP", help="the packet's source address")
    i.add_argument("--now", default=None, metavar="UNIX", help="Unix time (default: now)")
    i.add_argument("--file", default=None, metavar="PAYLOAD", help="default: standard input")
    i.set_defaults(handler=cmd_inspect)


def _usage(message: str) -> int:
    print(f"nfknock spa inspect: error: {message}", file=sys.stderr)
    return 2


def cmd_inspect(args: argparse.Namespace) -> int:
    from nfknock.config import load_config
    from nfknock.door import DoorMap
    from nfknock.spa.verify import Verifier

    src = None
    if args.source is not None:
        try:
            src = ipaddress.ip_address(args.source).packed
        except ValueError:
            return _usage(f"--source {args.source!r} is not an IP address")
    now = time.time()
    if args.now is not None:
        try:
            now = float(args.now)
        except ValueError:
            return _usage(f"--now {args.now!r} is not a Unix time")
        if not math.isfinite(now) or now < 0:
            return _usage(f"--now {args.now!r} is not a Unix time")
    try:
        raw = Path(args.file).read_bytes() if args.file else sys.stdin.buffer.read()
    except OSError as exc:
        return _usage(f"cannot read {args.file}: {exc.strerror or exc}")
    cfg = load_config(args.config)  # a ConfigError is exit 2 in cli.main
    verifier = Verifier(cfg.spa_users, cfg.spa, cfg.protected_ports, DoorMap(cfg.door.forward))
    result = verifier.verify(src, b"", raw.strip(), now, replay=None)
    out: dict[str, object] = {**result.as_dict(), "source": args.source, "now": now}
    if result.timestamp is not None:
        out["age"] = math.floor(now) - result.timestamp
    if src is None:
        out["note"] = "no --source: spa_sources not applied, an allow-IP taken as the source"
    print(json.dumps(out, indent=1))
    return 0 if result.ok else 1


# --- keys and client set-up --------------------------------------------------------


def generate_keys(hmac_digest: str = DEFAULT_HMAC_DIGEST) -> dict[str, str]:
    """Users-file entries of fresh keys, as ``fwknop --key-gen`` makes them."""
    entry = {
        "fwknop_key_base64": base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode(),
        "fwknop_hmac_key_base64": base64.b64encode(
            secrets.token_bytes(HMAC_KEY_BYTES[hmac_digest])
        ).decode(),
    }
    if hmac_digest != DEFAULT_HMAC_DIGEST:
        entry["fwknop_hmac_digest"] = hmac_digest
    return entry


def has_keys(entry: dict[str, Any]) -> bool:
    return "fwknop_key_base64" in entry


def rekey(entry: dict[str, Any]) -> None:
    """New fwknop keys for a users-file entry that has them (same digest)."""
    if not has_keys(entry):
        return
    entry["fwknop_key_base64"] = generate_keys()["fwknop_key_base64"]
    if "fwknop_hmac_key_base64" in entry:
        digest = entry.get("fwknop_hmac_digest", DEFAULT_HMAC_DIGEST)
        entry["fwknop_hmac_key_base64"] = generate_keys(digest)["fwknop_hmac_key_base64"]


def qr_text(entry: dict[str, Any]) -> str:
    """What the QR code holds (Fwknop2's scan format, see the module docstring)."""
    text = f"KEY_BASE64:{entry['fwknop_key_base64']}"
    if "fwknop_hmac_key_base64" in entry:
        text += f" HMAC_KEY_BASE64:{entry['fwknop_hmac_key_base64']}"
    return text


def client_setup(
    name: str, entry: dict[str, Any], host: str, ports: list[int], spa_port: int
) -> str:
    """The fwknoprc stanza and the equivalent fwknop command line."""
    key = entry["fwknop_key_base64"]
    hmac_key = entry.get("fwknop_hmac_key_base64")
    digest = entry.get("fwknop_hmac_digest", DEFAULT_HMAC_DIGEST)
    mode = entry.get("fwknop_mode", DEFAULT_MODE)
    access = ",".join(f"tcp/{p}" for p in ports)
    rc = [
        f"# fwknop: paste into ~/.fwknoprc (chmod 600), then run: fwknop -n {host}",
        f"[{host}]",
        f"SPA_SERVER          {host}",
        f"SPA_SERVER_PORT     {spa_port}",
        "SPA_SERVER_PROTO    udp",
        f"ACCESS              {access}",
        "ALLOW_IP            source",
        f"KEY_BASE64          {key}",
    ]
    cmd = f"fwknop -A {access} -s -D {host} -p {spa_port} --key-base64-rijndael {key}"
    if hmac_key is not None:
        rc += [
            f"HMAC_KEY_BASE64     {hmac_key}",
            "USE_HMAC            Y",
            f"HMAC_DIGEST_TYPE    {digest}",
        ]
        cmd += f" --use-hmac --key-base64-hmac {hmac_key} --hmac-digest-type {digest}"
    rc.append(f"ENCRYPTION_MODE     {mode}")
    cmd += f" -M {mode}"
    return "\n".join(
        [
            f"# SPA keys of user {name!r} (shown once; keep them secret)",
            *rc,
            "",
            "# or the same on the command line (the keys show in ps and in shell history):",
            f"#   {cmd}",
        ]
    )


def profile_lines(entry: dict[str, Any], spa_port: int) -> list[str]:
    """The SPA keys of an ``nfknock-client`` profile (``nfknock_client.spa`` reads
    them under the users file's names)."""
    lines = [
        f"spa_port = {spa_port}",
        f"fwknop_key_base64 = {json.dumps(entry['fwknop_key_base64'])}",
    ]
    if "fwknop_hmac_key_base64" in entry:
        digest = entry.get("fwknop_hmac_digest", DEFAULT_HMAC_DIGEST)
        lines += [
            f"fwknop_hmac_key_base64 = {json.dumps(entry['fwknop_hmac_key_base64'])}",
            f"fwknop_hmac_digest = {json.dumps(digest)}",
        ]
    else:
        lines.append("fwknop_hmac = false")
    lines.append(f"fwknop_mode = {json.dumps(entry.get('fwknop_mode', DEFAULT_MODE))}")
    if "fwknop_username" in entry:
        lines.append(f"fwknop_username = {json.dumps(entry['fwknop_username'])}")
    return lines


def spa_port_of(spa_ports: frozenset[int]) -> int:
    return min(spa_ports) if spa_ports else DEFAULT_SPA_PORT


def print_qr(entry: dict[str, Any], out: TextIO) -> None:
    import segno

    print(
        "# for phone apps (Fwknop2 and others): a QR code of "
        "'KEY_BASE64:<key> HMAC_KEY_BASE64:<key>'",
        file=out,
    )
    segno.make(qr_text(entry), error="m").terminal(out=out, compact=True)


def print_client_setup(
    name: str,
    entry: dict[str, Any],
    host: str,
    ports: list[int],
    spa_ports: frozenset[int],
    out: TextIO | None = None,
) -> None:
    """The fwknop set-ups and the QR code (the nfknock-client profile is printed by
    ``nfknock.admin.profile_text``, with the knock secret when the user has one)."""
    out = out or sys.stdout
    print(client_setup(name, entry, host, ports, spa_port_of(spa_ports)), file=out)
    print(file=out)
    print_qr(entry, out)
    if not spa_ports:
        print("nfknock: warning: [spa] ports is empty: SPA is off until it is set", file=sys.stderr)
