"""The decrypted SPA plaintext: parsed into a frozen :class:`SpaMessage`, or built.

Layout (``lib/fko_decode.c``, ``lib/fko_encode.c``, ``lib/fko_message.c``), printable
ASCII, fields separated by ':'::

    rand16 : B64(user) : timestamp : version : msg_type : B64(message)
           [: B64(nat_access)] [: B64(server_auth)] [: client_timeout] : digest

* ``rand16``: exactly 16 decimal digits -- the check that the decryption worked.
* ``digest``: base64 (no '=') of a hash of everything before the last ':'; its
  length names the type: 22 MD5, 27 SHA1, 43 SHA256 (else SHA3-256), 64 SHA384,
  86 SHA512 (else SHA3-512).
* ``message``: ``allowIP,proto/port[,proto/port...]`` (``allowIP,command`` for a
  COMMAND message); ``nat_access``: ``host,port``; both base64 without '='.
* Which optional fields exist follows from ``msg_type`` (``parse_msg_type``).

Parsing is stricter than libfko where libfko's leniency only serves C string
handling (a NUL inside the plaintext, a sign on a number); nothing a real client
sends is refused.  Every failure is :class:`~nfknock.spa.reasons.SpaError`.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import ipaddress
from dataclasses import dataclass

from nfknock.spa.crypto import HMAC_DIGESTS, b64decode_nopad, b64encode_nopad
from nfknock.spa.reasons import BAD_DIGEST, BAD_FIELDS, DECRYPT_FAILED, SpaError

RAND_DIGITS = 16
MIN_PLAINTEXT = 36  # MIN_SPA_ENCODED_MSG_SIZE
MAX_PLAINTEXT = 1499  # below MAX_SPA_ENCODED_MSG_SIZE
MAX_USERNAME_B64 = 64  # MAX_SPA_USERNAME_SIZE
MAX_TIMESTAMP_CHARS = 12
MAX_VERSION_CHARS = 8
MAX_MESSAGE_B64 = 256  # MAX_SPA_MESSAGE_SIZE
MAX_COMMAND = 1400  # MAX_SPA_CMD_LEN
MAX_HOSTNAME = 70
MAX_CLIENT_TIMEOUT = 2 << 15  # libfko's bound in parse_client_timeout
PROTOCOLS = ("tcp", "udp", "icmp", "none")  # validate_proto_port_spec
# Characters validate_username refuses besides non-printable ones.
_USER_REFUSED = frozenset('"/\\[]:;|=,+*?<>')
_NAT_HOST_REFUSED = frozenset(" /?\"'\\")
_PRINTABLE = bytes(range(0x20, 0x7F))
# Inner digest by its base64 length; SHA3 shares lengths with SHA2 and is tried second.
_DIGEST_BY_LEN: dict[int, tuple[str, ...]] = {
    22: ("md5",),
    27: ("sha1",),
    43: ("sha256", "sha3_256"),
    64: ("sha384",),
    86: ("sha512", "sha3_512"),
}


class MessageType(enum.IntEnum):
    """``msg_type`` values (``fko_message_type_t``)."""

    COMMAND = 0
    ACCESS = 1
    NAT_ACCESS = 2
    CLIENT_TIMEOUT_ACCESS = 3
    CLIENT_TIMEOUT_NAT_ACCESS = 4
    LOCAL_NAT_ACCESS = 5
    CLIENT_TIMEOUT_LOCAL_NAT_ACCESS = 6

    @property
    def label(self) -> str:
        return self.name.lower()

    @property
    def has_nat(self) -> bool:
        return self in _NAT_TYPES

    @property
    def has_timeout(self) -> bool:
        return self in _TIMEOUT_TYPES


_NAT_TYPES = frozenset(
    {
        MessageType.NAT_ACCESS,
        MessageType.CLIENT_TIMEOUT_NAT_ACCESS,
        MessageType.LOCAL_NAT_ACCESS,
        MessageType.CLIENT_TIMEOUT_LOCAL_NAT_ACCESS,
    }
)
_TIMEOUT_TYPES = frozenset(
    {
        MessageType.CLIENT_TIMEOUT_ACCESS,
        MessageType.CLIENT_TIMEOUT_NAT_ACCESS,
        MessageType.CLIENT_TIMEOUT_LOCAL_NAT_ACCESS,
    }
)


@dataclass(frozen=True, slots=True)
class SpaMessage:
    """The fields of one decrypted, digest-checked SPA plaintext."""

    rand: str
    username: str
    timestamp: int
    version: str
    message_type: MessageType
    allow_ip: str  # dotted IPv4 as sent; "0.0.0.0" = "the packet's source"
    access: tuple[tuple[str, int], ...] = ()  # (proto, port); empty for COMMAND
    command: str | None = None
    nat_access: tuple[str, int] | None = None
    server_auth: str | None = None
    client_timeout: int | None = None
    digest_type: str = "sha256"

    def access_text(self) -> list[str]:
        return [f"{proto}/{port}" for proto, port in self.access]


# --- parsing ----------------------------------------------------------------------


def parse_plaintext(plain: bytes) -> SpaMessage:
    """Check and parse a decrypted plaintext (padding already stripped)."""
    # The decryption check of _rijndael_decrypt: 16 digits, then ':'.
    if len(plain) <= RAND_DIGITS or not plain[:RAND_DIGITS].isdigit() or plain[RAND_DIGITS] != 0x3A:
        raise SpaError(DECRYPT_FAILED)
    if not MIN_PLAINTEXT <= len(plain) <= MAX_PLAINTEXT:
        raise SpaError(BAD_FIELDS, f"plaintext of {len(plain)} bytes")
    if plain.translate(None, _PRINTABLE):
        raise SpaError(BAD_FIELDS, "non-printable byte in the plaintext")
    text = plain.decode("ascii")
    body, _, digest = text.rpartition(":")
    digest_type = check_digest(body, digest)
    return parse_fields(body.split(":"), digest_type)


def check_digest(body: str, digest: str) -> str:
    """The name of the digest ``digest`` is of ``body``; SpaError if none."""
    names = _DIGEST_BY_LEN.get(len(digest))
    if names is None:
        raise SpaError(BAD_DIGEST, f"digest of {len(digest)} characters")
    raw = body.encode("ascii")
    for name in names:
        mine = b64encode_nopad(hashlib.new(HMAC_DIGESTS[name][0], raw).digest())
        if hmac.compare_digest(mine, digest.encode("ascii")):
            return name
    raise SpaError(BAD_DIGEST, "digest mismatch")


def parse_fields(fields: list[str], digest_type: str = "sha256") -> SpaMessage:
    """The fields before the digest, as ``parse_*`` of fko_decode.c take them."""
    if len(fields) < 6:
        raise SpaError(BAD_FIELDS, f"{len(fields)} fields before the digest, need 6")
    rand, user_b64, ts_text, version, type_text = fields[:5]
    rest = fields[5:]
    if not (len(rand) == RAND_DIGITS and _digits(rand, RAND_DIGITS)):
        raise SpaError(BAD_FIELDS, "random value is not 16 digits")
    username = _username(user_b64)
    if not _digits(ts_text, MAX_TIMESTAMP_CHARS):
        raise SpaError(BAD_FIELDS, "bad timestamp")
    if not 0 < len(version) <= MAX_VERSION_CHARS:
        raise SpaError(BAD_FIELDS, "bad version")
    if not _digits(type_text, 2) or int(type_text) > 6:
        raise SpaError(BAD_FIELDS, f"bad message type {type_text!r}")
    mtype = MessageType(int(type_text))
    # Field count per type (parse_msg_type): message, [nat], [server_auth], [timeout].
    fixed = 1 + mtype.has_nat + mtype.has_timeout
    if not fixed <= len(rest) <= fixed + 1:
        raise SpaError(BAD_FIELDS, f"{len(rest) + 5} fields for a {mtype.label} message")
    message = _b64_text(rest[0], MAX_MESSAGE_B64, "message")
    allow_ip, access, command = _message(message, mtype)
    nat = _nat_access(_b64_text(rest[1], MAX_MESSAGE_B64, "nat_access")) if mtype.has_nat else None
    timeout = None
    if mtype.has_timeout:
        t = rest[-1]
        if not _digits(t, 10) or int(t) > MAX_CLIENT_TIMEOUT:
            raise SpaError(BAD_FIELDS, "bad client timeout")
        timeout = int(t)
    server_auth = None
    if len(rest) == fixed + 1:
        server_auth = _b64_text(rest[fixed - mtype.has_timeout], MAX_MESSAGE_B64, "server_auth")
    return SpaMessage(
        rand=rand,
        username=username,
        timestamp=int(ts_text),
        version=version,
        message_type=mtype,
        allow_ip=allow_ip,
        access=access,
        command=command,
        nat_access=nat,
        server_auth=server_auth,
        client_timeout=timeout,
        digest_type=digest_type,
    )


def _digits(text: str, most: int) -> bool:
    """1..most ASCII decimal digits (str.isdigit alone also takes '²' and '٣')."""
    return 0 < len(text) <= most and text.isascii() and text.isdigit()


def _b64_text(field: str, limit: int, what: str) -> str:
    if not 0 < len(field) <= limit:
        raise SpaError(BAD_FIELDS, f"{what} missing or too long")
    try:
        raw = b64decode_nopad(field.encode("ascii"))
        text = raw.decode("ascii")
    except (ValueError, UnicodeDecodeError):
        raise SpaError(BAD_FIELDS, f"{what} is not base64 of ASCII") from None
    if raw.translate(None, _PRINTABLE):
        raise SpaError(BAD_FIELDS, f"{what} has a non-printable byte")
    return text


def valid_username(name: str) -> bool:
    """validate_username of fko_user.c: printable, none of ``"/\\[]:;|=,+*?<>``."""
    return 0 < len(name) <= 48 and all(
        c.isascii() and (c.isalnum() or (" " <= c <= "~" and c not in _USER_REFUSED)) for c in name
    )


def _username(field: str) -> str:
    name = _b64_text(field, MAX_USERNAME_B64, "username")
    if not valid_username(name):
        raise SpaError(BAD_FIELDS, "username has a refused character")
    return name


def _ipv4(text: str) -> str:
    if not 7 <= len(text) <= 15:
        raise SpaError(BAD_FIELDS, "allow-IP is not a dotted IPv4 address")
    try:
        ipaddress.IPv4Address(text)
    except ValueError:
        raise SpaError(BAD_FIELDS, "allow-IP is not a dotted IPv4 address") from None
    return text


def _port(text: str) -> int:
    if not _digits(text, 5) or not 1 <= int(text) <= 65535:
        raise SpaError(BAD_FIELDS, f"bad port {text[:8]!r}")
    return int(text)


def _message(
    message: str, mtype: MessageType
) -> tuple[str, tuple[tuple[str, int], ...], str | None]:
    """(allow_ip, access list, command) of the message field (validate_*_msg)."""
    ip_text, comma, rest = message.partition(",")
    if not comma or not rest:
        raise SpaError(BAD_FIELDS, "message is not 'allowIP,...'")
    allow_ip = _ipv4(ip_text)
    if mtype == MessageType.COMMAND:
        if len(message) >= MAX_COMMAND:
            raise SpaError(BAD_FIELDS, "command too long")
        return allow_ip, (), rest
    access = []
    for spec in rest.split(","):
        proto, slash, port = spec.partition("/")
        if not slash or proto not in PROTOCOLS:
            raise SpaError(BAD_FIELDS, f"bad access entry {spec[:16]!r}")
        access.append((proto, _port(port)))
    return allow_ip, tuple(access), None


def _nat_access(text: str) -> tuple[str, int]:
    host, comma, port = text.partition(",")
    if not comma or "," in port or not 0 < len(host) <= MAX_HOSTNAME:
        raise SpaError(BAD_FIELDS, "nat_access is not 'host,port'")
    if _NAT_HOST_REFUSED.intersection(host):
        raise SpaError(BAD_FIELDS, "nat_access host has a refused character")
    return host, _port(port)


# --- building ---------------------------------------------------------------------


def b64_field(text: str) -> str:
    return b64encode_nopad(text.encode("ascii")).decode("ascii")


def build_plaintext(msg: SpaMessage) -> bytes:
    """The plaintext a libfko client would encrypt for ``msg`` (digest appended).

    No validation beyond what encoding needs: tests build malformed ones on purpose."""
    if msg.message_type == MessageType.COMMAND:
        message = f"{msg.allow_ip},{msg.command or ''}"
    else:
        message = ",".join([msg.allow_ip, *msg.access_text()])
    fields = [
        msg.rand,
        b64_field(msg.username),
        str(msg.timestamp),
        msg.version,
        str(int(msg.message_type)),
        b64_field(message),
    ]
    if msg.nat_access is not None:
        fields.append(b64_field(f"{msg.nat_access[0]},{msg.nat_access[1]}"))
    if msg.server_auth is not None:
        fields.append(b64_field(msg.server_auth))
    if msg.client_timeout is not None:
        fields.append(str(msg.client_timeout))
    body = ":".join(fields).encode("ascii")
    digest = b64encode_nopad(hashlib.new(HMAC_DIGESTS[msg.digest_type][0], body).digest())
    return body + b":" + digest
