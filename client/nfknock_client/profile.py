"""Client profiles (``client.toml``) and secret files.  Standard library only.

A profile holds a knock secret (``secret``, ``secret_utf8`` or ``secret_file``),
fwknop SPA keys (``fwknop_*``, ``spa_port``: read by :mod:`nfknock_client.spa`), or
both -- exactly what ``nfknock user add`` prints for the user.  Every value is
checked for its type and range before use: a wrong type is an error naming the
file, the key and what was expected (exit 2), never a silent conversion (``port =
true`` is not port 1) and never a traceback.
"""

from __future__ import annotations

import os
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nfknock.schemes import SCHEME_NAMES, V1, Scheme
from nfknock.sequence import MIN_SECRET_BYTES, SecretError, parse_base32
from nfknock_client.counters import MAX_HOTP_COUNTER

MAX_FILE_BYTES = 1 << 20  # client.toml and secret files are small


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
    # The server's forwarded door range for this user (door = "random"): the knock
    # opens the door that follows the sequence (sequence.py step 7), not ``port``.
    doors: tuple[int, int] | None = None
    isn: bool = False  # isn = true: each knock carries its ISN (raw SYNs, root)


def xdg_dir(var: str, default: str) -> Path:
    """``$VAR`` or ``~/default``; a ClientError when neither can be known."""
    value = os.environ.get(var)
    if value:
        if not os.path.isabs(value):
            raise ClientError(f"${var} must be an absolute path, not {value!r}")
        return Path(value)
    try:
        return Path.home() / default
    except RuntimeError:
        raise ClientError(f"neither ${var} nor $HOME is set") from None


def config_path() -> Path:
    return xdg_dir("XDG_CONFIG_HOME", ".config") / "nfknock" / "client.toml"


def _private(path: Path, what: str) -> None:
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise ClientError(f"{what} {path} not found") from None
    except (OSError, ValueError) as exc:  # permission, a NUL byte, a name too long
        raise ClientError(f"{what} {path}: {getattr(exc, 'strerror', None) or exc}") from None
    if not stat.S_ISREG(mode):
        raise ClientError(f"{what} {path} is not a regular file")
    if stat.S_IMODE(mode) & 0o077:
        raise ClientError(
            f"{what} {path} has mode {stat.S_IMODE(mode):04o}; it holds a secret and must "
            f"not be accessible by group or others (chmod 600 {path})"
        )


def read_private_text(path: Path, what: str) -> str:
    _private(path, what)
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
        if len(raw) > MAX_FILE_BYTES:
            raise ClientError(f"{what} {path}: larger than {MAX_FILE_BYTES} bytes")
        return raw.decode()
    except (OSError, UnicodeDecodeError) as exc:
        raise ClientError(f"{what} {path}: {exc}") from None


def read_secret_file(path: Path, min_bytes: int = MIN_SECRET_BYTES) -> bytes:
    text = read_private_text(path, "secret file")
    try:
        return parse_base32(text, min_bytes=min_bytes)
    except SecretError as exc:
        raise ClientError(f"secret file {path}: {exc}") from None


# key -> (type, description) of what a profile may hold.
_STR, _INT, _PORTS, _BOOL = "a string", "an integer", "a list of port numbers", "a boolean"
PROFILE_KEYS: dict[str, str] = {
    "host": _STR,
    "port": _INT,
    "scheme": _STR,
    "secret": _STR,
    "secret_file": _STR,
    "secret_utf8": _STR,
    "realm": _STR,
    "port_min": _INT,
    "port_max": _INT,
    "length": _INT,
    "step_seconds": _INT,
    "exclude": _PORTS,
    "counter": _INT,
    "doors": _STR,
    "isn": _BOOL,
    # SPA (nfknock_client.spa); the users file's names where they mean the same.
    "spa_port": _INT,
    "fwknop_key_base64": _STR,
    "fwknop_key_file": _STR,
    "fwknop_hmac_key_base64": _STR,
    "fwknop_hmac_key_file": _STR,
    "fwknop_hmac": _BOOL,
    "fwknop_hmac_digest": _STR,
    "fwknop_mode": _STR,
    "fwknop_username": _STR,
}
_RANGES = {
    "spa_port": (1, 65535),
    "port": (1, 65535),
    "port_min": (1, 65535),
    "port_max": (1, 65535),
    "length": (1, 65535),
    "step_seconds": (1, 1 << 31),
    "counter": (0, MAX_HOTP_COUNTER),
}
SECRET_KEYS = ("secret", "secret_utf8", "secret_file")
SPA_KEY_NAMES = ("fwknop_key_base64", "fwknop_key_file")


def _typed(where: str, key: str, value: object) -> None:
    """Raise ClientError unless ``value`` has the type (and range) of ``key``."""
    want = PROFILE_KEYS[key]
    if want == _STR:
        ok = isinstance(value, str) and "\0" not in value
    elif want == _INT:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif want == _BOOL:
        ok = isinstance(value, bool)
    else:
        ok = isinstance(value, list) and all(
            isinstance(p, int) and not isinstance(p, bool) and 1 <= p <= 65535 for p in value
        )
    if not ok:
        raise ClientError(f"{where}.{key}: expected {want}, got {_show(value)}")
    if key in _RANGES:
        lo, hi = _RANGES[key]
        if not lo <= value <= hi:  # type: ignore[operator]
            raise ClientError(f"{where}.{key}: {value} is outside {lo}-{hi}")


def _show(value: object) -> str:
    kind = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(
        type(value), f"a {type(value).__name__}"
    )
    text = repr(value)
    return f"{kind} ({text[:40]}{'...' if len(text) > 40 else ''})"


def read_profile(name: str, path: Path | None = None) -> tuple[str, dict[str, Any]]:
    """``(where, table)`` of profile ``name``: every key known, every value of its
    type and range, ``host`` set.  ``where`` names the profile in error messages."""
    path = path or config_path()
    text = read_private_text(path, "client config")
    try:
        data = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, RecursionError) as exc:
        raise ClientError(f"client config {path}: {exc}") from None
    profiles = data.get("profiles", {})
    if not isinstance(profiles, dict):
        raise ClientError(f"{path}: profiles: expected a table of [profiles.NAME]")
    if name not in profiles or not isinstance(profiles[name], dict):
        known = ", ".join(sorted(k for k, v in profiles.items() if isinstance(v, dict)))
        raise ClientError(f"{path}: no profile {name!r} (profiles: {known or 'none'})")
    p: dict[str, Any] = profiles[name]
    where = f"{path}: profiles.{name}"
    unknown = set(p) - set(PROFILE_KEYS)
    if unknown:
        raise ClientError(f"{where}.{sorted(unknown)[0]}: unknown key")
    for key, value in p.items():
        _typed(where, key, value)
    if not p.get("host", "").strip():
        raise ClientError(f"{where}.host: is required")
    return where, p


def expand_path(where: str, key: str, text: str) -> Path:
    """A ``*_file`` value as a path (``~`` expanded)."""
    try:
        return Path(text).expanduser()
    except RuntimeError:
        raise ClientError(f"{where}.{key}: cannot expand ~ without $HOME") from None


def load_profile(name: str, path: Path | None = None) -> Target:
    """Profile ``name`` for knocking (its knock secret)."""
    where, p = read_profile(name, path)
    scheme_name = p.get("scheme", "v1")
    if scheme_name not in SCHEME_NAMES:
        raise ClientError(
            f"{where}.scheme: {scheme_name!r} is not one of {', '.join(SCHEME_NAMES)}"
        )
    given = [k for k in SECRET_KEYS if k in p]
    if len(given) != 1:
        spa_only = not given and any(k in p for k in SPA_KEY_NAMES)
        raise ClientError(
            f"{where}: needs secret, secret_utf8 or secret_file"
            + (f" (exactly one, not {' and '.join(given)})" if given else "")
            + (
                f" to knock; it has fwknop keys: use nfknock-client spa --profile {name}"
                if spa_only
                else ""
            )
        )
    min_bytes = MIN_SECRET_BYTES if scheme_name == "v1" else 1
    if "secret" in p:
        try:
            secret = parse_base32(p["secret"], min_bytes=min_bytes)
        except SecretError as exc:
            raise ClientError(f"{where}.secret: {exc}") from None
    elif "secret_utf8" in p:
        secret = p["secret_utf8"].encode()
        if not secret:
            raise ClientError(f"{where}.secret_utf8: is empty")
    else:
        secret = read_secret_file(expand_path(where, "secret_file", p["secret_file"]), min_bytes)
    options: dict[str, Any] = {
        k: p[k] for k in ("port_min", "port_max", "length", "step_seconds") if k in p
    }
    if "realm" in p:
        options["realm"] = p["realm"].encode()
    if "exclude" in p:
        options["exclude"] = frozenset(p["exclude"])
    doors = None
    if "doors" in p:
        try:
            doors = parse_door_range(p["doors"])
        except ClientError as exc:
            raise ClientError(f"{where}.doors: {exc}") from None
    t = Target(
        name, p["host"], p.get("port", 22), secret, scheme_name, options, p.get("counter", 0)
    )
    t.doors, t.isn = doors, p.get("isn", False)
    return t


def parse_door_range(text: str) -> tuple[int, int]:
    """``LO-HI`` (or one port): a forwarded door range, as the server's ``doors``."""
    lo_text, sep, hi_text = text.partition("-")
    if not (lo_text.isdigit() and (not sep or hi_text.isdigit())):
        raise ClientError(f"{text!r} is not a port range LO-HI")
    lo = int(lo_text)
    hi = int(hi_text) if sep else lo
    if not 1 <= lo <= hi <= 65535:
        raise ClientError(f"{text!r}: need 1 <= LO <= HI <= 65535")
    return lo, hi


def check_port(port: int) -> None:
    if not 1 <= port <= 65535:
        raise ClientError(f"port {port} is outside 1-65535")
