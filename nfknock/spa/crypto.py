"""AES-256 and the HMAC the way libfko (fwknop's library) does them.

Sources: ``lib/cipher_funcs.c`` (``rij_salt_and_iv``, ``rij_encrypt``, ``rij_decrypt``),
``lib/fko_hmac.c`` and ``lib/hmac.c`` of fwknop 2.6.x, checked against Debian 12's
client (``tests/test_spa_fwknop.py``).  Only the standard library and
``cryptography``: the client imports this module too.

* Key and IV: OpenSSL's ``EVP_BytesToKey`` with MD5 and one round -- ``D1 = MD5(p||s)``,
  ``D2 = MD5(D1||p||s)``, ``D3 = MD5(D2||p||s)``; key = D1||D2 (AES-256), IV = D3 --
  where p is the passphrase (the decoded ``KEY_BASE64``, at most 32 bytes) and s
  the 8 random salt bytes the blob carries after ``Salted__``.
* ``legacy`` (pre-2.5 clients) is CBC whose passphrase is right-padded with ASCII
  '0' to 16 bytes, or cut to 16 (both client and server truncate longer keys).
* Every mode is fed PKCS#7-padded plaintext (1..16 bytes), CFB/OFB/CTR too.
  libfko strips padding only when it is consistent; so do we (``strip_padding``).
* The HMAC is RFC 2104 (hashlib/hmac implement exactly that, keys longer than the
  block are hashed first as libfko does).
"""

from __future__ import annotations

import base64
import hashlib
import hmac

from cryptography.hazmat.decrepit.ciphers.modes import CFB, OFB
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from nfknock.spa.reasons import BAD_CIPHERTEXT, SpaError

MODES = ("cbc", "cfb", "ofb", "ctr", "ecb", "legacy")
DEFAULT_MODE = "cbc"
# HMAC digest name -> (hashlib name, length of the base64 tag without '=').
HMAC_DIGESTS: dict[str, tuple[str, int]] = {
    "md5": ("md5", 22),
    "sha1": ("sha1", 27),
    "sha256": ("sha256", 43),
    "sha384": ("sha384", 64),
    "sha512": ("sha512", 86),
    "sha3_256": ("sha3_256", 43),
    "sha3_512": ("sha3_512", 86),
}
DEFAULT_HMAC_DIGEST = "sha256"
MAX_KEY_BYTES = 32  # RIJNDAEL_MAX_KEYSIZE
MAX_HMAC_KEY_BYTES = 128  # what fwknop --key-gen and access.conf accept
LEGACY_KEY_BYTES = 16
SALTED = b"Salted__"
SALT_BYTES = 8
BLOCK = 16


def b64encode_nopad(data: bytes) -> bytes:
    """Standard base64 with the '=' padding removed, as libfko sends everything."""
    return base64.b64encode(data).rstrip(b"=")


def b64decode_nopad(text: bytes) -> bytes:
    """Decode standard base64 with or without '=' padding; ValueError if invalid."""
    text = text.rstrip(b"=")
    if len(text) % 4 == 1:
        raise ValueError("impossible base64 length")
    return base64.b64decode(text + b"=" * (-len(text) % 4), validate=True)


def passphrase(key: bytes, mode: str) -> bytes:
    """The passphrase the key derivation sees for ``mode``."""
    if mode == "legacy":
        return key[:LEGACY_KEY_BYTES].ljust(LEGACY_KEY_BYTES, b"0")
    return key


def derive_key_iv(secret: bytes, salt: bytes) -> tuple[bytes, bytes]:
    """EVP_BytesToKey(MD5, one round): 32 key bytes and a 16-byte IV."""
    # MD5 is fwknop's choice (OpenSSL's old default), not ours: the wire needs it.
    d1 = hashlib.md5(secret + salt).digest()  # noqa: S324
    d2 = hashlib.md5(d1 + secret + salt).digest()  # noqa: S324
    d3 = hashlib.md5(d2 + secret + salt).digest()  # noqa: S324
    return d1 + d2, d3


_Mode = modes.ModeWithInitializationVector | modes.ModeWithNonce | modes.ECB


def _cipher(key: bytes, mode: str, salt: bytes) -> Cipher[_Mode]:
    aes_key, iv = derive_key_iv(passphrase(key, mode), salt)
    chosen: _Mode
    if mode in ("cbc", "legacy"):
        chosen = modes.CBC(iv)
    elif mode == "cfb":
        chosen = CFB(iv)  # 128-bit feedback (libfko's MODE_CFB); 'decrepit', not broken
    elif mode == "ofb":
        chosen = OFB(iv)
    elif mode == "ctr":
        chosen = modes.CTR(iv)  # the IV is the first counter block, big-endian
    elif mode == "ecb":
        chosen = modes.ECB()  # noqa: S305 -- fwknop's -M ecb; each plaintext is unique
    else:
        raise ValueError(f"unknown encryption mode {mode!r}")
    return Cipher(algorithms.AES(aes_key), chosen)


def pad(plaintext: bytes) -> bytes:
    """PKCS#7 to whole blocks: 1..16 bytes, each the count (a full block if aligned)."""
    n = BLOCK - len(plaintext) % BLOCK
    return plaintext + bytes([n]) * n


def strip_padding(data: bytes) -> bytes:
    """Remove PKCS#7 padding only when it is consistent, as ``rij_decrypt`` does:
    a last byte of 0..16 whose run matches is removed, anything else is kept (the
    non-printable leftovers then fail the plaintext checks)."""
    if not data:
        return data
    n = data[-1]
    if n <= BLOCK and n <= len(data) and data[len(data) - n :] == bytes([n]) * n:
        return data[: len(data) - n]
    return data


def encrypt(key: bytes, plaintext: bytes, mode: str, salt: bytes) -> bytes:
    """The blob ``Salted__ || salt || AES-256(plaintext + padding)``."""
    if len(salt) != SALT_BYTES:
        raise ValueError("the salt is 8 bytes")
    enc = _cipher(key, mode, salt).encryptor()
    return SALTED + salt + enc.update(pad(plaintext)) + enc.finalize()


def decrypt(key: bytes, blob: bytes, mode: str) -> bytes:
    """Plaintext of a blob, padding stripped as libfko does.  The blob must be the
    8-byte ``Salted__`` marker, the salt and at least one whole AES block (libfko
    takes the salt without looking at the marker; we insist on it, which costs a
    legitimate client nothing)."""
    if len(blob) < 2 * BLOCK or len(blob) % BLOCK:
        raise SpaError(BAD_CIPHERTEXT, f"{len(blob)} bytes is not whole AES blocks")
    if blob[:8] != SALTED:
        raise SpaError(BAD_CIPHERTEXT, "no 'Salted__' marker")
    dec = _cipher(key, mode, blob[8:BLOCK]).decryptor()
    return strip_padding(dec.update(blob[BLOCK:]) + dec.finalize())


def hmac_state(key: bytes, digest: str) -> hmac.HMAC:
    """A keyed HMAC state, made once per user; ``.copy()`` it per packet."""
    return hmac.new(key, digestmod=HMAC_DIGESTS[digest][0])


def hmac_tag(key: bytes, digest: str, text: bytes) -> bytes:
    """The base64 tag (no '=') libfko appends: HMAC over ``text``."""
    return b64encode_nopad(hmac.new(key, text, HMAC_DIGESTS[digest][0]).digest())
