"""Knock-sequence scheme v1: a secret and the time become a sequence of TCP ports.

Standard library only: the client imports this on machines without the daemon's
dependencies.

Theory of operation (the scheme is exact; the conformance vectors in
``tests/vectors/sequence-v1.json`` depend on every detail):

1. ``T = floor(t / X)`` -- the TOTP time step (RFC 6238 section 4.2).
2. ``m = BE64(T)`` when the realm R is empty, else ``BE64(T) || 0x00 || R``;
   ``H_0 = HMAC-SHA-512(K, m)``.  With R empty, H_0 is exactly the RFC 6238
   SHA-512 HMAC, so RFC 6238 Appendix B's SHA-512 TOTP values come out of H_0 by
   dynamic truncation (RFC 4226 section 5.3) -- a cheap cross-check.
3. ``H_c = HMAC-SHA-512(K, H_{c-1})`` for ``c >= 1``: the counter that makes a
   sequence good for one use (seed 000, "iterate the HMAC").
4. ``span = hi - lo + 1``; ``width = bit length of (span - 1)``.
5. Bit stream ``B = H_c || HMAC(K, H_c || BE32(1)) || HMAC(K, H_c || BE32(2)) ...``;
   extension blocks are computed only when the words of the earlier ones ran out.
6. Read ``width``-bit words MSB first (words may span blocks).  Accept
   ``p = lo + w`` when ``w < span`` (rejection sampling: no modulo bias), ``p`` is
   not excluded and not already in the sequence; stop at L ports.

Two extensions of v1, each versioned on its own (:data:`DOOR_DERIVATION`,
:data:`ISN_DERIVATION`) and pinned by ``tests/vectors/sequence-v1-ext.json``; the
sequence itself is unchanged by either:

7. *The door* (users with ``door = "random"``, a ``[[door.forward]]`` range
   ``[dlo, dhi]``): go on reading the same bit stream B right after the word that
   gave the L-th port, in ``dwidth``-bit words (``dspan = dhi - dlo + 1``,
   ``dwidth`` = bit length of ``dspan - 1``); the door is ``dlo + w`` for the first
   word ``w < dspan`` (rejection sampling again; a one-port range needs no bits).
   Client and server compute it alike: the server never has to tell it.
8. *ISNs* (users with ``isn = true``): knock ``i`` (from 0) of the sequence carries
   the TCP initial sequence number ``ISN_i = BE32(S[4i .. 4i+3])`` where ``S =
   HMAC(K, H_c || "isn" || BE32(0)) || HMAC(K, H_c || "isn" || BE32(1)) || ...``
   (each block holds 16 ISNs).  ``"isn"`` is ASCII; the messages are 71 bytes long,
   the extension blocks' of step 5 are 68, so the two streams never share a block.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets as _secrets
import struct
from dataclasses import dataclass, field

MIN_SECRET_BYTES = 16
GENERATED_SECRET_BYTES = 32

DEFAULT_STEP = 30
DEFAULT_PORT_MIN = 1024
DEFAULT_PORT_MAX = 33791
DEFAULT_LENGTH = 32
MAX_LENGTH = 255
# A sequence that needs more than this many extension blocks means the parameters
# leave almost no usable ports; refuse instead of looping for ever.
MAX_BLOCKS = 4096
# Versions of the two v1 extensions (module docstring, steps 7 and 8): a change to
# either derivation is a new version, never a silent edit.
DOOR_DERIVATION = 1
ISN_DERIVATION = 1


class SecretError(ValueError):
    """A secret that cannot be used (bad base32, too short)."""


class SchemeError(ValueError):
    """Sequence parameters that cannot produce a sequence."""


@dataclass(frozen=True)
class SequenceParams:
    """Everything except the secret, the time and the counter."""

    port_min: int = DEFAULT_PORT_MIN
    port_max: int = DEFAULT_PORT_MAX
    length: int = DEFAULT_LENGTH
    step_seconds: int = DEFAULT_STEP
    realm: bytes = b""
    exclude: frozenset[int] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        if not 1 <= self.port_min <= self.port_max <= 65535:
            raise SchemeError(
                f"port range {self.port_min}-{self.port_max} must satisfy 1 <= min <= max <= 65535"
            )
        if not 1 <= self.length <= MAX_LENGTH:
            raise SchemeError(f"length {self.length} must be between 1 and {MAX_LENGTH}")
        if self.step_seconds < 1:
            raise SchemeError(f"step {self.step_seconds} must be at least 1 second")
        usable = self.span - sum(1 for p in self.exclude if self.port_min <= p <= self.port_max)
        if usable < self.length:
            raise SchemeError(
                f"the range {self.port_min}-{self.port_max} has {usable} usable ports "
                f"after exclusions, fewer than the length {self.length}"
            )

    @property
    def span(self) -> int:
        return self.port_max - self.port_min + 1

    @property
    def width(self) -> int:
        return (self.span - 1).bit_length()


def step_of(unix_time: float, step_seconds: int = DEFAULT_STEP) -> int:
    """The TOTP time step T = floor(t / X)."""
    return int(unix_time // step_seconds)


def first_block(secret: bytes, step: int, counter: int, realm: bytes = b"") -> bytes:
    """H_c of the scheme: the counter-th iterate of the HMAC over the step message."""
    if step < 0:
        raise SchemeError(f"time step {step} is negative")
    if counter < 0:
        raise SchemeError(f"counter {counter} is negative")
    message = struct.pack(">Q", step)
    if realm:
        message += b"\x00" + realm
    block = hmac.digest(secret, message, hashlib.sha512)
    for _ in range(counter):
        block = hmac.digest(secret, block, hashlib.sha512)
    return block


def ports_from_block(secret: bytes, block: bytes, params: SequenceParams) -> tuple[int, ...]:
    """Steps 4-6: rejection-sample ``width``-bit words of the bit stream into ports."""
    return _sample(secret, block, params)[0]


def _sample(
    secret: bytes, block: bytes, params: SequenceParams
) -> tuple[tuple[int, ...], int, int, int]:
    """Steps 4-6, and where the stream stands after them: (ports, the unread bits,
    how many, the index of the block they came from) -- step 7 reads on from there."""
    width = params.width
    span = params.span
    lo = params.port_min
    excluded = params.exclude
    chosen: list[int] = []
    seen: set[int] = set()
    # ``acc`` holds ``nbits`` not yet consumed bits, MSB first.
    acc = 0
    nbits = 0
    index = 0
    current = block
    while True:
        acc = (acc << (8 * len(current))) | int.from_bytes(current, "big")
        nbits += 8 * len(current)
        while nbits >= width:
            nbits -= width
            word = acc >> nbits if width else 0
            acc &= (1 << nbits) - 1
            if word >= span:
                continue
            port = lo + word
            if port in excluded or port in seen:
                continue
            chosen.append(port)
            seen.add(port)
            if len(chosen) == params.length:
                return tuple(chosen), acc, nbits, index
        index += 1
        if index > MAX_BLOCKS:
            raise SchemeError("the parameters exhaust the bit stream; widen the port range")
        current = hmac.digest(secret, block + struct.pack(">I", index), hashlib.sha512)


def derive(secret: bytes, step: int, counter: int, params: SequenceParams) -> tuple[int, ...]:
    """The knock sequence for one (step, counter)."""
    return ports_from_block(secret, first_block(secret, step, counter, params.realm), params)


def door_from_block(
    secret: bytes, block: bytes, params: SequenceParams, door_min: int, door_max: int
) -> int:
    """Step 7: the door port in ``door_min``..``door_max`` that follows the sequence
    of ``block`` (= H_c) in its bit stream."""
    if not 1 <= door_min <= door_max <= 65535:
        raise SchemeError(f"door range {door_min}-{door_max} is not within 1-65535")
    span = door_max - door_min + 1
    width = (span - 1).bit_length()
    if width == 0:
        return door_min
    _ports, acc, nbits, index = _sample(secret, block, params)
    while True:
        while nbits >= width:
            nbits -= width
            word = acc >> nbits
            acc &= (1 << nbits) - 1
            if word < span:
                return door_min + word
        index += 1
        if index > MAX_BLOCKS:
            raise SchemeError("the parameters exhaust the bit stream; widen the door range")
        current = hmac.digest(secret, block + struct.pack(">I", index), hashlib.sha512)
        acc = (acc << (8 * len(current))) | int.from_bytes(current, "big")
        nbits += 8 * len(current)


def isns_from_block(secret: bytes, block: bytes, length: int) -> tuple[int, ...]:
    """Step 8: the ISN of each of the ``length`` knocks of the sequence of ``block``."""
    stream = b""
    j = 0
    while len(stream) < 4 * length:
        stream += hmac.digest(secret, block + b"isn" + struct.pack(">I", j), hashlib.sha512)
        j += 1
    return struct.unpack(f">{length}I", stream[: 4 * length])


def door_port(
    secret: bytes, step: int, counter: int, params: SequenceParams, door_min: int, door_max: int
) -> int:
    """The door of one (step, counter) (step 7)."""
    block = first_block(secret, step, counter, params.realm)
    return door_from_block(secret, block, params, door_min, door_max)


def isns(secret: bytes, step: int, counter: int, params: SequenceParams) -> tuple[int, ...]:
    """The ISNs of one (step, counter)'s knocks (step 8)."""
    return isns_from_block(secret, first_block(secret, step, counter, params.realm), params.length)


def sequence_at(
    secret: bytes, unix_time: float, counter: int, params: SequenceParams
) -> tuple[int, ...]:
    """The knock sequence at wall-clock ``unix_time``."""
    return derive(secret, step_of(unix_time, params.step_seconds), counter, params)


def totp(block: bytes, digits: int = 8) -> str:
    """RFC 4226 section 5.3 dynamic truncation, for the RFC 6238 cross-check."""
    offset = block[-1] & 0x0F
    code = int.from_bytes(block[offset : offset + 4], "big") & 0x7FFFFFFF
    return str(code % 10**digits).zfill(digits)


# --- secrets ---------------------------------------------------------------------


def parse_base32(text: str, *, min_bytes: int = MIN_SECRET_BYTES) -> bytes:
    """RFC 4648 base32: case-insensitive, spaces and padding optional."""
    cleaned = "".join(text.split()).upper().rstrip("=")
    if not cleaned:
        raise SecretError("the secret is empty")
    padded = cleaned + "=" * (-len(cleaned) % 8)
    try:
        raw = base64.b32decode(padded)
    except (binascii.Error, ValueError) as exc:
        raise SecretError(f"the secret is not valid base32 ({exc})") from None
    if len(raw) < min_bytes:
        raise SecretError(
            f"the secret is {len(raw)} bytes; at least {min_bytes} bytes "
            f"({(min_bytes * 8 + 4) // 5} base32 characters) are required"
        )
    return raw


def format_base32(secret: bytes) -> str:
    """Base32 without padding (what ``user add`` prints and writes)."""
    return base64.b32encode(secret).decode("ascii").rstrip("=")


def generate_secret() -> bytes:
    return _secrets.token_bytes(GENERATED_SECRET_BYTES)


def parse_port_range(text: str) -> tuple[int, int]:
    """``LO-HI`` as on the command line."""
    lo_text, sep, hi_text = text.partition("-")
    if not sep:
        raise SchemeError(f"port range {text!r} must look like LO-HI, e.g. 1024-33791")
    try:
        lo, hi = int(lo_text), int(hi_text)
    except ValueError:
        raise SchemeError(f"port range {text!r} must be two integers, LO-HI") from None
    return lo, hi


def parse_port_list(text: str) -> frozenset[int]:
    """``P,P,...`` as on the command line (empty string: no ports)."""
    ports: set[int] = set()
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        try:
            port = int(item)
        except ValueError:
            raise SchemeError(f"{item!r} is not a port number") from None
        if not 1 <= port <= 65535:
            raise SchemeError(f"port {port} is outside 1-65535")
        ports.add(port)
    return frozenset(ports)
