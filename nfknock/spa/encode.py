"""Build fwknop-format SPA packets (what ``fwknop`` sends): our client and the tests.

Only the standard library and ``cryptography`` (via ``crypto``/``message``/``wire``):
``nfknock-client`` imports this without the daemon's extras.  Steps (libfko's
``fko_spa_data_final``): build the plaintext with its digest, encrypt it with a
fresh 8-byte salt, base64 the ``Salted__`` blob without '=', drop its first ten
characters (``U2FsdGVkX1``), and append the base64 HMAC of the text with those ten
characters put back.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field

from nfknock.spa.crypto import (
    DEFAULT_HMAC_DIGEST,
    DEFAULT_MODE,
    SALT_BYTES,
    b64encode_nopad,
    encrypt,
    hmac_tag,
)
from nfknock.spa.message import MessageType, SpaMessage, build_plaintext
from nfknock.spa.wire import SALTED_B64

VERSION = "3.0.0"  # what fwknop 2.6.x clients send


@dataclass(frozen=True)
class ClientKeys:
    """A client's fwknop keys (the decoded KEY_BASE64 / HMAC_KEY_BASE64)."""

    key: bytes = field(repr=False)
    hmac_key: bytes | None = field(repr=False)  # None: no HMAC (old servers only)
    hmac_digest: str = DEFAULT_HMAC_DIGEST
    mode: str = DEFAULT_MODE


def random_digits() -> str:
    """The 16-digit random value that opens every plaintext."""
    return f"{secrets.randbelow(10**16):016d}"


def seal(plaintext: bytes, keys: ClientKeys, salt: bytes | None = None) -> bytes:
    """Encrypt and authenticate a plaintext into the wire payload."""
    blob = encrypt(keys.key, plaintext, keys.mode, salt or secrets.token_bytes(SALT_BYTES))
    text = b64encode_nopad(blob)
    if keys.hmac_key is None:
        return text[len(SALTED_B64) :]
    return text[len(SALTED_B64) :] + hmac_tag(keys.hmac_key, keys.hmac_digest, text)


def encode_message(msg: SpaMessage, keys: ClientKeys, salt: bytes | None = None) -> bytes:
    """The wire payload of an arbitrary message (tests build refused types too)."""
    return seal(build_plaintext(msg), keys, salt)


def encode_access(
    keys: ClientKeys,
    *,
    username: str,
    timestamp: int,
    access: Sequence[tuple[str, int]] = (("tcp", 22),),
    allow_ip: str = "0.0.0.0",  # noqa: S104 -- fwknop's "open my source"
    client_timeout: int | None = None,
    digest: str = "sha256",
    salt: bytes | None = None,
    rand: str | None = None,
) -> bytes:
    """An ACCESS request (CLIENT_TIMEOUT_ACCESS when ``client_timeout`` is given):
    ``allow_ip`` ``0.0.0.0`` asks the server to open the packet's source (``-s``)."""
    msg = SpaMessage(
        rand=rand or random_digits(),
        username=username,
        timestamp=timestamp,
        version=VERSION,
        message_type=MessageType.ACCESS
        if client_timeout is None
        else MessageType.CLIENT_TIMEOUT_ACCESS,
        allow_ip=allow_ip,
        access=tuple(access),
        client_timeout=client_timeout,
        digest_type=digest,
    )
    return encode_message(msg, keys, salt)
