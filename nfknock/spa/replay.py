"""The replay cache: digests of authenticated SPA payloads, bounded and time-keyed.

Theory of operation.  An authenticated packet is good while ``|now - timestamp| <=
max_age``: one stamped up to ``max_age`` in the future stays good for ``2 x
max_age`` after it first arrives.  So every digest is remembered for ``keep =
2 x max_age + 1`` seconds of wall time after its claim, and a claim of a digest
still remembered is a replay.  A packet stamped *more* than ``max_age`` ahead is
refused when it arrives but becomes good later, until ``timestamp + max_age``: the
claim's ``good_until`` keeps it that long (a sniffed copy resent in its window is
still a replay).  The payload digest (SHA-256 of the wire string, as
fwknopd keys its cache) is enough: the HMAC covers every character but the tag,
and the tag must be spelled canonically (``wire.decode_tag``), so one authentic
packet has exactly one wire form.

Bounded by ``[spa] replay_cache``: when every slot holds a live entry a new claim
fails closed (``Claim.FULL``) -- evicting a live entry would let that packet be
replayed.  Only authenticated packets are claimed, so only a key holder can fill it.

Sans-IO: time is an argument; ``export``/``restore`` give plain data the caller
persists with its state (atomically) so a replay fails after a restart too.  Wall
time going backwards keeps entries longer (safe); going forwards also ages the
packets it would admit.
"""

from __future__ import annotations

import enum
import heapq
import math
from collections.abc import Iterable

DIGEST_BYTES = 32


class Claim(enum.Enum):
    FRESH = "fresh"  # not seen: now remembered
    REPLAY = "replay"  # seen within keep seconds
    FULL = "full"  # no room without forgetting a live entry: refuse


class ReplayStateError(ValueError):
    """Exported replay data that cannot be restored (corrupt or foreign)."""


class ReplayCache:
    def __init__(self, capacity: int, keep_seconds: float) -> None:
        if capacity < 1 or not keep_seconds > 0:
            raise ValueError("capacity and keep_seconds must be positive")
        self.capacity = capacity
        self.keep = float(keep_seconds)
        self._expires: dict[bytes, float] = {}  # digest -> expiry (wall time)
        # (expiry, digest) of every entry: expiries come in any order (good_until).
        self._heap: list[tuple[float, bytes]] = []

    @classmethod
    def for_max_age(cls, capacity: int, max_age: float) -> ReplayCache:
        return cls(capacity, 2 * max_age + 1)

    def __len__(self) -> int:
        return len(self._expires)

    def __contains__(self, digest: object) -> bool:
        return digest in self._expires

    def seen(self, digest: bytes, wall: float) -> bool:
        """Is ``digest`` remembered (not expired) at ``wall``?  Records nothing."""
        expires = self._expires.get(digest)
        return expires is not None and wall < expires

    def claim(self, digest: bytes, wall: float, good_until: float = 0.0) -> Claim:
        """Check and record in one step (what the verifier calls).  ``good_until``:
        the end of the packet's own window, when later than ``wall + keep``."""
        if self.seen(digest, wall):
            return Claim.REPLAY
        self.expire(wall)  # an expired entry of this digest goes too
        if len(self._expires) >= self.capacity:
            return Claim.FULL
        expires = max(wall + self.keep, good_until)
        self._expires[digest] = expires
        heapq.heappush(self._heap, (expires, digest))
        return Claim.FRESH

    def expire(self, wall: float) -> int:
        """Forget entries expired at ``wall``; how many (O(log n) each)."""
        gone = 0
        heap = self._heap
        while heap and heap[0][0] <= wall:
            expires, digest = heapq.heappop(heap)
            if self._expires.get(digest) == expires:
                del self._expires[digest]
                gone += 1
        return gone

    def export(self) -> list[list[str | float]]:
        """Plain data (JSON-ready): ``[[hex digest, expiry wall time], ...]``."""
        return [[d.hex(), e] for d, e in self._expires.items()]

    def restore(self, data: Iterable[object], wall: float) -> int:
        """Add exported entries still live at ``wall`` (keeping the later expiry of
        a digest known twice).  Over capacity, the entries expiring last are kept
        and the number dropped is returned.  ReplayStateError on malformed data;
        nothing is added then."""
        entries: dict[bytes, float] = {}
        if isinstance(data, str | bytes) or not isinstance(data, Iterable):
            raise ReplayStateError("replay data is not a list")
        for item in data:
            if not (isinstance(item, list | tuple) and len(item) == 2):
                raise ReplayStateError(f"replay entry {item!r} is not [digest, expiry]")
            text, expires = item
            if not isinstance(text, str) or isinstance(expires, bool):
                raise ReplayStateError(f"replay entry {item!r} is malformed")
            if not isinstance(expires, int | float) or not math.isfinite(expires):
                raise ReplayStateError(f"replay entry {item!r} has a bad expiry")
            try:
                digest = bytes.fromhex(text)
            except ValueError:
                raise ReplayStateError(f"replay digest {text!r} is not hex") from None
            if len(digest) != DIGEST_BYTES:
                raise ReplayStateError(f"replay digest {text!r} is not {DIGEST_BYTES} bytes")
            if expires > wall:
                entries[digest] = max(float(expires), entries.get(digest, 0.0))
        for digest, expires in self._expires.items():
            if expires > wall:
                entries[digest] = max(expires, entries.get(digest, 0.0))
        ordered = sorted(entries.items(), key=lambda kv: kv[1])
        dropped = max(0, len(ordered) - self.capacity)
        self._expires = dict(ordered[dropped:])
        self._heap = [(e, d) for d, e in ordered[dropped:]]  # sorted: already a heap
        return dropped
