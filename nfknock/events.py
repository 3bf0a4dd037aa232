"""What the verdict engine decides and reports: small immutable values, no I/O."""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass
from typing import NamedTuple


class Verdict(enum.IntEnum):
    DROP = 0
    ACCEPT = 1
    REJECT = 2  # a TCP reset, sent by the static rule for nfknock's reject mark
    # Not a kernel verdict: the adapter keeps the packet (bounded, briefly) until the
    # claim of the grant it would use resolves, then decides it again.  Fails closed:
    # a packet held too long, or that finds no room, is dropped.
    HOLD = 3


class EventKind(enum.Enum):
    KNOCK_PROGRESS = "knock_progress"
    SEQUENCE_COMPLETED = "sequence_completed"
    SEQUENCE_STALE = "sequence_stale"
    PROGRESS_RESET = "progress_reset"
    GRANT_OPENED = "grant_opened"
    GRANT_EXPIRED = "grant_expired"
    GRANT_REVOKED = "grant_revoked"
    GRANT_NARROWED = "grant_narrowed"
    GRANT_SHARED = "grant_shared"  # a grant made on another gateway or worker, honoured here
    SPA_ACCEPTED = "spa_accepted"
    SPA_REFUSED = "spa_refused"
    CLAIM_FAILED = "claim_failed"
    REPLAY_STATE_GAP = "replay_state_gap"
    PROTECTED_ACCEPT = "protected_accept"
    PROTECTED_REJECT = "protected_reject"
    PROTECTED_DROP = "protected_drop"
    SOURCE_EVICTED = "source_evicted"
    MALFORMED_PACKET = "malformed_packet"
    INTERNAL_ERROR = "internal_error"


@dataclass(frozen=True, slots=True)
class Event:
    """One thing worth logging.  Addresses stay packed (``src``, ``dst``: 4 or 16
    bytes, empty when unknown) until someone reads ``source``/``destination``: the
    packet path never pays for formatting an address nobody logs."""

    kind: EventKind
    src: bytes
    dst: bytes = b""
    user: str | None = None
    port: int | None = None
    reason: str = ""
    # A stable, machine-readable reason (snake_case) beside the prose of ``reason``:
    # fail2ban filters, metrics and ``spa inspect`` key on it; never reworded.
    code: str = ""

    @property
    def source(self) -> str:
        return addr_text(self.src)

    @property
    def destination(self) -> str:
        return addr_text(self.dst) if self.dst else ""

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"event": self.kind.value, "src": self.source}
        if self.dst:
            out["dst"] = self.destination
        if self.user is not None:
            out["user"] = self.user
        if self.port is not None:
            out["port"] = self.port
        if self.reason:
            out["reason"] = self.reason
        if self.code:
            out["code"] = self.code
        return out


class Decision(NamedTuple):
    verdict: Verdict
    events: tuple[Event, ...] = ()
    # With ACCEPT: the netfilter mark the adapter sets first (a forwarded door's
    # target, nfknock.door); 0: none.
    mark: int = 0


def addr_text(packed: bytes) -> str:
    """A packed IPv4 (4 bytes) or IPv6 (16 bytes) address as text ("?" otherwise)."""
    if len(packed) not in (4, 16):
        return "?"
    return str(ipaddress.ip_address(packed))


DROP_SILENT = Decision(Verdict.DROP)
