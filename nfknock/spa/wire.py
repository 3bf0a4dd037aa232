"""The SPA payload as it travels: shape checks and the split into ciphertext and tag.

``wire = B64(blob)[10:] || B64(hmac)`` -- standard base64 without '=', the first
ten characters (always ``U2FsdGVkX1``, the base64 of ``Salted__``) stripped by the
client, the HMAC tag appended with no separator when HMAC is used.  The tag's
length says nothing the server may rely on: the user's configured digest decides
it (``crypto.HMAC_DIGESTS``).  The HMAC covers the ASCII text ``"U2FsdGVkX1" +
wire_without_tag`` (``lib/fko_hmac.c``).

The shape checks run first and cost a few hundred nanoseconds: junk is dropped
before any per-user work (fwknopd's ``preprocess_spa_data``).
"""

from __future__ import annotations

from nfknock.spa.crypto import b64decode_nopad, b64encode_nopad
from nfknock.spa.reasons import (
    BAD_BASE64,
    BAD_CIPHERTEXT,
    SALTED_PREFIX,
    TOO_LONG,
    TOO_SHORT,
    SpaError,
)

MIN_WIRE = 140  # fwknopd MIN_SPA_DATA_SIZE
MAX_WIRE = 1500  # fwknopd MAX_SPA_PACKET_LEN
SALTED_B64 = b"U2FsdGVkX1"  # base64 of "Salted__", cut at a character boundary
_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def check_shape(payload: bytes) -> None:
    """Length, the refused ``Salted__`` prefix, the base64 alphabet ('=' included
    in neither: libfko strips it from everything it sends)."""
    n = len(payload)
    if n < MIN_WIRE:
        raise SpaError(TOO_SHORT, f"{n} bytes")
    if n > MAX_WIRE:
        raise SpaError(TOO_LONG, f"{n} bytes")
    # A client never sends the prefix; one that does is an attacker prepending it
    # to a seen packet to dodge the replay cache (incoming_spa.c).
    if payload.startswith(SALTED_B64):
        raise SpaError(SALTED_PREFIX)
    if payload.translate(None, _ALPHABET):
        raise SpaError(BAD_BASE64)


def hmac_message(payload: bytes, tag_len: int) -> bytes:
    """What the HMAC covers when the last ``tag_len`` characters are the tag."""
    return SALTED_B64 + payload[:-tag_len]


def decode_tag(tag: bytes) -> bytes | None:
    """The raw HMAC of a base64 tag, or None unless the text is the canonical
    encoding.  Comparing raw bytes is only as strict as libfko's comparison of the
    base64 text when non-canonical spellings (unused low bits set) are refused:
    otherwise one authentic packet would have several spellings, each a fresh
    replay-cache entry."""
    try:
        raw = b64decode_nopad(tag)
    except ValueError:
        return None
    return raw if b64encode_nopad(raw) == tag else None


def decode_blob(ciphertext: bytes) -> bytes:
    """The ``Salted__ || salt || ciphertext`` blob of the wire without its tag.
    Canonical base64 only, for the same reason as :func:`decode_tag` (it matters
    for users without an HMAC, whose wire is otherwise unauthenticated text)."""
    text = SALTED_B64 + ciphertext
    try:
        blob = b64decode_nopad(text)
    except ValueError:
        raise SpaError(BAD_CIPHERTEXT, "not decodable base64") from None
    if b64encode_nopad(blob) != text:
        raise SpaError(BAD_CIPHERTEXT, "non-canonical base64")
    return blob
