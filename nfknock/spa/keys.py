"""A user's fwknop keys in the users file, validated into :class:`SpaKeys`.

Keys of ``[users.NAME]`` (issue 10 item 5)::

    fwknop_key_base64 = "..."        # required for SPA: 1..32 bytes (fwknop --key-gen: 32)
    fwknop_hmac_key_base64 = "..."   # required unless fwknop_hmac = false; 1..128 bytes
    fwknop_hmac = true               # false: no HMAC (opt-in, warned: old clients only)
    fwknop_hmac_digest = "sha256"    # md5 sha1 sha256 sha384 sha512 sha3_256 sha3_512
    fwknop_mode = "cbc"              # cbc cfb ofb ctr ecb, or legacy (pre-2.5 clients)
    fwknop_username = "alice"        # optional: require this username in the packet
    spa_sources = ["203.0.113.0/24"] # optional: only these sources may use this user
    spa_allow_ip = "source"          # or "any": honour an allow-IP other than the source

The parsing is called by ``config.parse_users`` through a small table interface, so
this module does not import the configuration (which imports it).
"""

from __future__ import annotations

import binascii
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from nfknock.spa.crypto import (
    DEFAULT_HMAC_DIGEST,
    DEFAULT_MODE,
    HMAC_DIGESTS,
    LEGACY_KEY_BYTES,
    MAX_HMAC_KEY_BYTES,
    MAX_KEY_BYTES,
    MODES,
)
from nfknock.spa.message import valid_username

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
KEY_NAMES = (
    "fwknop_key_base64",
    "fwknop_hmac_key_base64",
    "fwknop_hmac",
    "fwknop_hmac_digest",
    "fwknop_mode",
    "fwknop_username",
    "spa_sources",
    "spa_allow_ip",
)
ALLOW_IP_CHOICES = ("source", "any")
WEAK_HMAC_KEY_BYTES = 16
T = TypeVar("T")


@dataclass(frozen=True)
class SpaKeys:
    """One user's SPA settings.  Keys never appear in a repr."""

    key: bytes = field(repr=False)
    hmac_key: bytes | None = field(repr=False)  # None: fwknop_hmac = false
    hmac_digest: str = DEFAULT_HMAC_DIGEST
    mode: str = DEFAULT_MODE
    username: str | None = None
    sources: tuple[IPNetwork, ...] | None = None  # None: any source
    allow_any_ip: bool = False  # spa_allow_ip = "any"


class UserTable(Protocol):
    """What ``config._Table`` offers: consume keys, name errors."""

    file: Any
    prefix: str
    data: dict[str, Any]

    def take(self, name: str, kind: type[T], default: T) -> T: ...

    def error(self, name: str, problem: str) -> Exception: ...


def has_spa_keys(u: UserTable) -> bool:
    return any(name in u.data for name in KEY_NAMES)


def parse_spa_keys(u: UserTable) -> tuple[SpaKeys | None, list[str]]:
    """The user's :class:`SpaKeys` (None if the table has no SPA key) and warnings.
    Raises the table's error (a ConfigError naming file and key) on bad input."""
    if not has_spa_keys(u):
        return None, []
    warnings: list[str] = []
    where = f"{u.file}: {u.prefix}"
    if "fwknop_key_base64" not in u.data:
        present = ", ".join(n for n in KEY_NAMES if n in u.data)
        raise u.error("fwknop_key_base64", f"is required for SPA ({present} set)")
    key = _b64_key(u, "fwknop_key_base64", MAX_KEY_BYTES)
    use_hmac = u.take("fwknop_hmac", bool, True)
    hmac_key: bytes | None = None
    if use_hmac:
        if "fwknop_hmac_key_base64" not in u.data:
            raise u.error(
                "fwknop_hmac_key_base64",
                "is required (or set fwknop_hmac = false for clients without HMAC)",
            )
        hmac_key = _b64_key(u, "fwknop_hmac_key_base64", MAX_HMAC_KEY_BYTES)
        if hmac_key == key:
            raise u.error(
                "fwknop_hmac_key_base64", "equals fwknop_key_base64 (fwknop refuses that too)"
            )
        if len(hmac_key) < WEAK_HMAC_KEY_BYTES:
            warnings.append(
                f"{where}: the HMAC key is {len(hmac_key)} bytes: one sniffed packet lets "
                "it be guessed offline (fwknop --key-gen makes 64)"
            )
    else:
        if "fwknop_hmac_key_base64" in u.data:
            raise u.error("fwknop_hmac_key_base64", "is set but fwknop_hmac = false")
        warnings.append(
            f"{where}: fwknop_hmac = false: packets are not authenticated before "
            "decryption and can be malleated; use it only for old clients"
        )
    digest = u.take("fwknop_hmac_digest", str, DEFAULT_HMAC_DIGEST)
    if digest not in HMAC_DIGESTS:
        raise u.error("fwknop_hmac_digest", f"{digest!r} is not one of {', '.join(HMAC_DIGESTS)}")
    if not use_hmac and "fwknop_hmac_digest" in u.data:
        raise u.error("fwknop_hmac_digest", "is set but fwknop_hmac = false")
    mode = u.take("fwknop_mode", str, DEFAULT_MODE)
    if mode not in MODES:
        raise u.error("fwknop_mode", f"{mode!r} is not one of {', '.join(MODES)}")
    if mode == "legacy" and use_hmac:
        raise u.error(
            "fwknop_mode", "'legacy' needs fwknop_hmac = false (fwknop's client refuses both)"
        )
    if mode == "legacy":
        warnings.append(
            f"{where}: fwknop_mode = 'legacy' (pre-2.5 clients): the key is padded or cut "
            f"to {LEGACY_KEY_BYTES} bytes; upgrade the client"
        )
    username = None
    if "fwknop_username" in u.data:
        username = u.take("fwknop_username", str, "")
        if not valid_username(username):
            raise u.error(
                "fwknop_username",
                f"{username!r} is not a username fwknop sends (1-48 printable "
                'characters, none of "/\\[]:;|=,+*?<>)',
            )
    sources = _sources(u) if "spa_sources" in u.data else None
    allow = u.take("spa_allow_ip", str, "source")
    if allow not in ALLOW_IP_CHOICES:
        raise u.error("spa_allow_ip", f"{allow!r} is not one of {', '.join(ALLOW_IP_CHOICES)}")
    keys = SpaKeys(
        key=key,
        hmac_key=hmac_key,
        hmac_digest=digest,
        mode=mode,
        username=username,
        sources=sources,
        allow_any_ip=allow == "any",
    )
    return keys, warnings


def _b64_key(u: UserTable, name: str, limit: int) -> bytes:
    text = u.take(name, str, "").strip().rstrip("=")
    try:  # with or without the '=' padding
        raw = binascii.a2b_base64((text + "=" * (-len(text) % 4)).encode(), strict_mode=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise u.error(name, "is not base64 (standard alphabet)") from None
    if not raw:
        raise u.error(name, "is empty")
    if len(raw) > limit:
        raise u.error(name, f"is {len(raw)} bytes; fwknop takes at most {limit}")
    return raw


def _sources(u: UserTable) -> tuple[IPNetwork, ...]:
    value = u.data.pop("spa_sources")
    if not isinstance(value, Sequence) or isinstance(value, str) or not value:
        raise u.error("spa_sources", "must be a non-empty list of networks")
    nets = []
    for item in value:
        if not isinstance(item, str):
            raise u.error("spa_sources", f"{item!r} is not a network string")
        try:
            nets.append(ipaddress.ip_network(item, strict=True))
        except ValueError as exc:
            raise u.error("spa_sources", f"{item!r} is not a network ({exc})") from None
    return tuple(nets)
