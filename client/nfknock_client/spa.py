"""SPA for ``nfknock-client spa``: fwknop keys, the packet, and sending it.

The packet is fwknop's (``nfknock.spa.encode``, the same encoder the tests check
against the real ``fwknop`` client and our verifier), so one client serves nfknock
and any fwknopd.  Two transports (``fwknop -P``):

* ``udp`` (default): one datagram to the SPA port (62201), from any user;
* ``--raw-syn`` (fwknop's ``tcpraw``): one TCP SYN carrying the payload, hand-built
  on a raw socket (root) -- for networks that pass only TCP.

Keys come from a profile (the ``fwknop_*`` keys ``nfknock user add --spa`` prints,
the users file's names) or from key files; both are checked like the server checks
them (base64, 1..32 and 1..128 bytes, the HMAC key not the encryption key, ``legacy``
only without HMAC), so a typo is exit 2 here rather than a silent drop there.

The allow-IP field is IPv4 only in fwknop's format: over IPv6 the client always
asks for the packet's source (``0.0.0.0``, ``fwknop -s``).
"""

from __future__ import annotations

import binascii
import getpass
import ipaddress
import math
import os
import random
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nfknock.spa.crypto import (
    DEFAULT_HMAC_DIGEST,
    DEFAULT_MODE,
    HMAC_DIGESTS,
    MAX_HMAC_KEY_BYTES,
    MAX_KEY_BYTES,
    MODES,
)
from nfknock.spa.encode import ClientKeys, encode_access
from nfknock.spa.message import MAX_CLIENT_TIMEOUT, valid_username
from nfknock_client.knock import source_for, syn_segment
from nfknock_client.profile import ClientError, expand_path, read_private_text, read_profile

DEFAULT_SPA_PORT = 62201  # fwknop's
UNSPECIFIED = "0.0.0.0"  # noqa: S104 -- fwknop's "open the packet's source" (-s)
FALLBACK_USERNAME = "nfknock"


@dataclass
class SpaTarget:
    name: str  # profile name, or host for ad-hoc use (key of the profile lock)
    host: str
    port: int  # the protected port to open
    spa_port: int
    keys: ClientKeys
    username: str | None  # None: the login name (fwknop's default)


# --- keys -------------------------------------------------------------------------


def decode_key(text: str, limit: int, what: str) -> bytes:
    """A base64 key (``KEY_BASE64`` / ``HMAC_KEY_BASE64``, '=' padding optional)."""
    t = text.strip().rstrip("=")
    try:
        raw = binascii.a2b_base64((t + "=" * (-len(t) % 4)).encode(), strict_mode=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise ClientError(f"{what}: is not base64 (standard alphabet)") from None
    if not raw:
        raise ClientError(f"{what}: is empty")
    if len(raw) > limit:
        raise ClientError(f"{what}: is {len(raw)} bytes; fwknop takes at most {limit}")
    return raw


def read_key_file(path: Path, limit: int) -> bytes:
    """A key file: the base64 key on one line, mode 0600 (like secret files)."""
    return decode_key(read_private_text(path, "key file"), limit, f"key file {path}")


def check_keys(keys: ClientKeys, where: str) -> ClientKeys:
    """The server's rules for a key set (``nfknock.spa.keys``), as client errors."""
    if keys.hmac_digest not in HMAC_DIGESTS:
        raise ClientError(
            f"{where}: HMAC digest {keys.hmac_digest!r} is not one of {', '.join(HMAC_DIGESTS)}"
        )
    if keys.mode not in MODES:
        raise ClientError(
            f"{where}: encryption mode {keys.mode!r} is not one of {', '.join(MODES)}"
        )
    if keys.hmac_key is not None and keys.hmac_key == keys.key:
        raise ClientError(f"{where}: the HMAC key equals the encryption key (fwknop refuses that)")
    if keys.mode == "legacy" and keys.hmac_key is not None:
        raise ClientError(f"{where}: mode 'legacy' is for old servers without HMAC only")
    return keys


def load_spa_profile(name: str, path: Path | None = None) -> SpaTarget:
    """Profile ``name`` for SPA: its ``fwknop_*`` keys (inline or in key files)."""
    where, p = read_profile(name, path)
    inline = [k for k in ("fwknop_key_base64", "fwknop_key_file") if k in p]
    if len(inline) != 1:
        knock_only = not inline and any(k in p for k in ("secret", "secret_utf8", "secret_file"))
        raise ClientError(
            f"{where}: needs fwknop_key_base64 or fwknop_key_file"
            + (f" (exactly one, not {' and '.join(inline)})" if inline else "")
            + (
                f" for SPA; it has a knock secret: use nfknock-client knock --profile {name}"
                if knock_only
                else ""
            )
        )
    key = _profile_key(where, p, "fwknop_key", MAX_KEY_BYTES)
    use_hmac = p.get("fwknop_hmac", True)
    hmac_names = [k for k in ("fwknop_hmac_key_base64", "fwknop_hmac_key_file") if k in p]
    hmac_key = None
    if use_hmac:
        if len(hmac_names) != 1:
            raise ClientError(
                f"{where}: needs fwknop_hmac_key_base64 or fwknop_hmac_key_file"
                + (" (exactly one)" if hmac_names else " (or fwknop_hmac = false)")
            )
        hmac_key = _profile_key(where, p, "fwknop_hmac_key", MAX_HMAC_KEY_BYTES)
    else:
        for extra in (*hmac_names, "fwknop_hmac_digest"):
            if extra in p:
                raise ClientError(f"{where}.{extra}: is set but fwknop_hmac = false")
    username = p.get("fwknop_username")
    if username is not None and not valid_username(username):
        raise ClientError(f"{where}.fwknop_username: {username!r} is not a username fwknop sends")
    keys = ClientKeys(
        key,
        hmac_key,
        p.get("fwknop_hmac_digest", DEFAULT_HMAC_DIGEST),
        p.get("fwknop_mode", DEFAULT_MODE),
    )
    return SpaTarget(
        name,
        p["host"],
        p.get("port", 22),
        p.get("spa_port", DEFAULT_SPA_PORT),
        check_keys(keys, where),
        username,
    )


def _profile_key(where: str, p: dict[str, Any], stem: str, limit: int) -> bytes:
    if f"{stem}_base64" in p:
        return decode_key(p[f"{stem}_base64"], limit, f"{where}.{stem}_base64")
    return read_key_file(expand_path(where, f"{stem}_file", p[f"{stem}_file"]), limit)


# --- the packet -------------------------------------------------------------------


def login_name() -> str:
    """fwknop's default username: the login name, if fwknop could send it."""
    try:
        name = getpass.getuser()
    except (OSError, KeyError, ImportError):
        return FALLBACK_USERNAME
    return name if valid_username(name) else FALLBACK_USERNAME


def allow_ip_for(given: str | None, family: int) -> str:
    """The allow-IP field: ``0.0.0.0`` (the packet's source) unless ``given``."""
    if given is None:
        return UNSPECIFIED
    try:
        address = ipaddress.IPv4Address(given)
    except ValueError:
        raise ClientError(
            f"--allow-ip {given!r} is not an IPv4 address (fwknop's packet carries an IPv4 "
            "allow-IP only; over IPv6 use --source, the default)"
        ) from None
    if family == socket.AF_INET6 and str(address) != UNSPECIFIED:
        raise ClientError(
            f"--allow-ip {given} is IPv4 but the packet goes over IPv6: the server opens "
            "only addresses of the packet's family; use --source (the default) or -4"
        )
    return str(address)


def build_packet(
    t: SpaTarget, allow_ip: str, wall: float, client_timeout: int | None = None
) -> bytes:
    """One fresh ACCESS packet (CLIENT_TIMEOUT_ACCESS with ``client_timeout``) asking
    for tcp/``t.port``, stamped with ``wall``."""
    if client_timeout is not None and not 1 <= client_timeout <= MAX_CLIENT_TIMEOUT:
        raise ClientError(f"--timeout-open must be between 1 and {MAX_CLIENT_TIMEOUT}")
    return encode_access(
        t.keys,
        username=t.username or login_name(),
        timestamp=math.floor(wall),
        access=(("tcp", t.port),),
        allow_ip=allow_ip,
        client_timeout=client_timeout,
    )


# --- sending ------------------------------------------------------------------------


def send_udp(family: int, address: str, port: int, payload: bytes) -> None:
    """One datagram (fwknop's default transport)."""
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.sendto(payload, (address, port))


def send_raw_syn(family: int, address: str, port: int, payload: bytes) -> None:
    """One TCP SYN carrying the payload, from a raw socket (CAP_NET_RAW)."""
    src = socket.inet_pton(family, source_for(family, address))
    dst = socket.inet_pton(family, address)
    rng = random.SystemRandom()
    seg = syn_segment(src, dst, rng.randint(32768, 60999), port, rng.getrandbits(32), payload)
    with socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_TCP) as s:
        s.sendto(seg, (address, 0))


def save_packet(path: Path, payload: bytes) -> None:
    """``--save-packet``: the payload for ``nfknock spa inspect`` (mode 0600: until
    it is too old it opens the door for whoever holds it)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            os.fchmod(fd, 0o600)  # an existing, wider file too
            os.write(fd, payload + b"\n")
        finally:
            os.close(fd)
    except OSError as exc:
        raise ClientError(f"--save-packet {path}: {exc.strerror or exc}") from None
