"""Shared pieces of the SPA tests: keys, users, packets built by our encoder."""

from __future__ import annotations

import ipaddress
from dataclasses import replace

from nfknock.config import SpaConfig, User
from nfknock.spa.crypto import hmac_tag
from nfknock.spa.encode import ClientKeys, encode_access, encode_message, random_digits
from nfknock.spa.keys import SpaKeys
from nfknock.spa.message import MessageType, SpaMessage
from nfknock.spa.verify import Verifier
from nfknock.spa.wire import SALTED_B64

KEY = bytes(range(32))
HMAC_KEY = bytes(range(100, 164))
OTHER_KEY = bytes(range(200, 232))
NOW = 1_800_000_000
PROTECTED = frozenset({22, 2222})


def ip(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


SRC = ip("198.51.100.10")
SRC2 = ip("198.51.100.11")
DST = ip("198.51.100.1")
SRC6 = ip("2001:db8::10")


def spa_user(name: str = "alice", **keys: object) -> User:
    base = SpaKeys(key=KEY, hmac_key=HMAC_KEY)
    return User(name, b"", spa=replace(base, **keys))  # type: ignore[arg-type]


def verifier(*users: User, **spa: object) -> Verifier:
    return Verifier(users or (spa_user(),), replace(SpaConfig(), **spa), PROTECTED)  # type: ignore[arg-type]


def client(**kw: object) -> ClientKeys:
    return replace(ClientKeys(KEY, HMAC_KEY), **kw)  # type: ignore[arg-type]


def packet(keys: ClientKeys | None = None, **kw: object) -> bytes:
    """A valid ACCESS packet for ``alice`` at NOW, tcp/22, allow-IP 0.0.0.0."""
    args: dict[str, object] = {"username": "alice", "timestamp": NOW}
    args.update(kw)
    return encode_access(keys or client(), **args)  # type: ignore[arg-type]


def message(**kw: object) -> SpaMessage:
    base = SpaMessage(
        rand=random_digits(),
        username="alice",
        timestamp=NOW,
        version="3.0.0",
        message_type=MessageType.ACCESS,
        allow_ip="0.0.0.0",
        access=(("tcp", 22),),
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def sealed(msg: SpaMessage, keys: ClientKeys | None = None) -> bytes:
    return encode_message(msg, keys or client())


def with_tag(ciphertext: bytes, key: bytes = HMAC_KEY, digest: str = "sha256") -> bytes:
    """Any ciphertext text, correctly HMAC'd: reaches the checks after the HMAC."""
    return ciphertext + hmac_tag(key, digest, SALTED_B64 + ciphertext)
