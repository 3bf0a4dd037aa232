"""Knock-sequence schemes: nfknock's own v1 and those of the systems in the seeds.

Standard library only (the client derives sequences with it).  Each scheme turns
(secret, step, counter) into the ports a client knocks, exactly as that system's
client does, so admins can move a server to nfknock and keep their clients:

* ``v1`` -- :mod:`nfknock.sequence` (HMAC-SHA-512 bit stream, rejection sampling).
* ``totp-knockd-rs`` -- the reference client of the TOTP knocking article (seed 000,
  ``totp-knocker``): message = 8-byte **little-endian** Unix time of the interval
  start; counter c is one running HMAC-SHA-512 over ``m || H1 || ... || Hc`` with
  ``H(j+1) = HMAC(K, m || H1 || ... || Hj)`` -- so counter c yields ``H(c+1)``;
  ports are contiguous MSB-first words of ``width`` bits, ``min + (word mod span)``
  (modulo bias and repeated ports included, as in the original).
* ``livingstone`` -- Livingstone's TOTP knocking (seed 001): RFC 6238 SHA-1, 6
  digits, 30 s; two ports: digits 1-4 and digits 3-6 of the zero-padded code, each
  multiplied by 10 until it is at least 1000.  Their code loops for ever on 0 (the
  "0000xx" codes); nfknock uses 1000 for it.  Weak: ~20 bits.
* ``kommen`` -- Kommen's remote access code (seed 004): RFC 4226 HOTP, SHA-512, 15
  digits zero-padded, split into three 5-digit numbers; 0, 80 and 5002 become
  2x+1, values above 65535 become x - 65535.  The counter is the HOTP counter, not
  time.  Weak: dynamic truncation yields 31 bits, so the first number is always 0
  and the port always 1.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import struct
from dataclasses import dataclass, field
from typing import ClassVar

from nfknock.sequence import SchemeError, SequenceParams, derive

SCHEME_NAMES = ("v1", "totp-knockd-rs", "livingstone", "kommen")
WEAK_SCHEMES = frozenset({"livingstone", "kommen"})


@dataclass(frozen=True)
class Scheme:
    """How one user's knock sequences are made."""

    name: ClassVar[str]
    time_based: ClassVar[bool] = True  # steps of wall time (else: HOTP counter only)
    has_counter: ClassVar[bool] = True  # False: one sequence per step, no resync
    lookahead: ClassVar[int] = 0  # counters beyond the server's that still count

    def derive(self, secret: bytes, step: int, counter: int) -> tuple[int, ...]:
        raise NotImplementedError

    def step_length(self) -> int:
        """Seconds per time step (30 unless the scheme is configurable)."""
        return 30

    def knock_ranges(self) -> list[tuple[int, int]]:
        """Inclusive port ranges a knock of this scheme can fall in."""
        raise NotImplementedError

    def strength_bits(self) -> float:
        """How many bits an attacker must guess per attempt (the scheme's own
        strength, not the secret's)."""
        raise NotImplementedError


@dataclass(frozen=True)
class V1(Scheme):
    name: ClassVar[str] = "v1"
    params: SequenceParams = field(default_factory=SequenceParams)

    def derive(self, secret: bytes, step: int, counter: int) -> tuple[int, ...]:
        return derive(secret, step, counter, self.params)

    def step_length(self) -> int:
        return self.params.step_seconds

    def knock_ranges(self) -> list[tuple[int, int]]:
        return [(self.params.port_min, self.params.port_max)]

    def strength_bits(self) -> float:
        usable = self.params.span - len(self.params.exclude)
        return sum(math.log2(usable - i) for i in range(self.params.length))


@dataclass(frozen=True)
class TotpKnockdRs(Scheme):
    name: ClassVar[str] = "totp-knockd-rs"
    port_min: int = 1024
    port_max: int = 32768
    length: int = 32
    step_seconds: int = 30

    def __post_init__(self) -> None:
        if not 1 <= self.port_min <= self.port_max <= 65535:
            raise SchemeError(f"port range {self.port_min}-{self.port_max} is not within 1-65535")
        width = (self.port_max - self.port_min).bit_length()
        if self.length < 1 or self.length * width > 512:
            raise SchemeError(
                f"totp-knockd-rs reads all {self.length} ports from one 512-bit HMAC: "
                f"length x {width} bits must be at most 512"
            )

    def step_length(self) -> int:
        return self.step_seconds

    def digest(self, secret: bytes, step: int, counter: int) -> bytes:
        start = step * self.step_seconds
        running = struct.pack("<Q", start)  # little-endian, as the original client
        block = hmac.digest(secret, running, hashlib.sha512)
        for _ in range(counter):
            running += block
            block = hmac.digest(secret, running, hashlib.sha512)
        return block

    def derive(self, secret: bytes, step: int, counter: int) -> tuple[int, ...]:
        span = self.port_max - self.port_min + 1
        width = (span - 1).bit_length()
        bits = int.from_bytes(self.digest(secret, step, counter), "big")
        total = 512
        ports = []
        for i in range(self.length):
            word = (bits >> (total - width * (i + 1))) & ((1 << width) - 1) if width else 0
            ports.append(self.port_min + word % span)
        return tuple(ports)

    def knock_ranges(self) -> list[tuple[int, int]]:
        return [(self.port_min, self.port_max)]

    def strength_bits(self) -> float:
        return self.length * math.log2(self.port_max - self.port_min + 1)


def hotp(secret: bytes, counter: int, digits: int, digest: str) -> str:
    """RFC 4226 HOTP: dynamic truncation, zero-padded to ``digits``."""
    mac = hmac.digest(secret, struct.pack(">Q", counter), digest)
    offset = mac[-1] & 0x0F
    code = int.from_bytes(mac[offset : offset + 4], "big") & 0x7FFFFFFF
    return str(code % 10**digits).zfill(digits)


def livingstone_ports(code: str) -> tuple[int, int]:
    """Digits 1-4 and 3-6, each times 10 until >= 1000 (0 -> 1000, see above)."""

    def pad(value: int) -> int:
        if value == 0:
            return 1000
        while value < 1000:
            value *= 10
        return value

    return pad(int(code[0:4])), pad(int(code[2:6]))


@dataclass(frozen=True)
class Livingstone(Scheme):
    name: ClassVar[str] = "livingstone"
    has_counter: ClassVar[bool] = False

    def code(self, secret: bytes, step: int) -> str:
        return hotp(secret, step, 6, "sha1")

    def derive(self, secret: bytes, step: int, counter: int) -> tuple[int, ...]:
        return livingstone_ports(self.code(secret, step))

    def knock_ranges(self) -> list[tuple[int, int]]:
        return [(1000, 9999)]

    def strength_bits(self) -> float:
        return math.log2(10**6)


def kommen_ports(code: str) -> tuple[int, int, int]:
    def fix(value: int) -> int:
        if value in (0, 80, 5002):
            return 2 * value + 1
        if value > 65535:
            return value - 65535
        return value

    return fix(int(code[0:5])), fix(int(code[5:10])), fix(int(code[10:15]))


@dataclass(frozen=True)
class Kommen(Scheme):
    name: ClassVar[str] = "kommen"
    time_based: ClassVar[bool] = False
    lookahead: ClassVar[int] = 2  # HOTP: a client may have counted knocks that got lost

    def code(self, secret: bytes, counter: int) -> str:
        return hotp(secret, counter, 15, "sha512")

    def derive(self, secret: bytes, step: int, counter: int) -> tuple[int, ...]:
        return kommen_ports(self.code(secret, counter))

    def knock_ranges(self) -> list[tuple[int, int]]:
        return [(1, 65535)]

    def strength_bits(self) -> float:
        return 31.0  # RFC 4226 truncation: 31 bits, whatever the 15 digits suggest


def merge_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def make_scheme(
    name: str,
    *,
    port_min: int | None = None,
    port_max: int | None = None,
    length: int | None = None,
    step_seconds: int = 30,
    realm: bytes = b"",
    exclude: frozenset[int] = frozenset(),
) -> Scheme:
    """A scheme from command-line style options; each scheme's own defaults apply
    where an option is None.  Options a scheme does not have are ignored."""
    if name == "v1":
        return V1(
            SequenceParams(
                port_min=1024 if port_min is None else port_min,
                port_max=33791 if port_max is None else port_max,
                length=32 if length is None else length,
                step_seconds=step_seconds,
                realm=realm,
                exclude=exclude,
            )
        )
    if name == "totp-knockd-rs":
        return TotpKnockdRs(
            port_min=1024 if port_min is None else port_min,
            port_max=32768 if port_max is None else port_max,
            length=32 if length is None else length,
            step_seconds=step_seconds,
        )
    if name == "livingstone":
        return Livingstone()
    if name == "kommen":
        return Kommen()
    raise SchemeError(f"unknown scheme {name!r} (one of {', '.join(SCHEME_NAMES)})")


def step_for(scheme: Scheme, unix_time: float) -> int:
    """The step a scheme derives from at ``unix_time`` (HOTP schemes: -1, unused)."""
    if not scheme.time_based:
        return -1
    return int(unix_time // scheme.step_length())
