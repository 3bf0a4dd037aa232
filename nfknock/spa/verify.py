"""SPA verification: a payload, its addresses and the time in, a :class:`SpaResult` out.

Theory of operation (issue 10 item 2; fwknopd's ``incoming_spa.c``).  The checks
run cheapest first and every failure is a refusal with a stable code
(:mod:`nfknock.spa.reasons`); ``verify`` never raises for any input.

1. Shape: length 140..1500, not starting with ``U2FsdGVkX1``, base64 alphabet.
2. Candidates: the fwknop users whose optional ``spa_sources`` contain the source.
3. Per candidate, in user-name order (``Config.spa_users``): HMAC (the user's digest; a keyed state
   precomputed here, ``.copy()``-ed per packet; the tag compared in constant time),
   then AES-256 decryption in the user's mode, the 16-digit check, the inner
   digest and the fields.  A packet that passes those is *authenticated*.
4. Replay: the SHA-256 of the payload is claimed once, at the first
   authentication, through the caller's ``replay`` guard (``ReplayCache`` or the
   lead's claim store); a replay refuses at once.  Like fwknopd, the digest is
   recorded even if a later check refuses the packet.  ``replay=None`` skips the
   step (``nfknock spa inspect``); the result then says ``replay_checked=False``
   and carries the digest for the caller to claim.
5. Admission for that user: enabled, ``|now - timestamp| <= max_age``, the
   required username, message type (COMMAND is refused), the address to open,
   every requested port allowed -- or, for fwknop's NAT messages (``-N``,
   ``--nat-local``, with or without a client timeout), the one door requested
   (``-A tcp/PORT``, ``--nat-rand-port``) of a ``[[door.forward]]`` entry that the
   user may use and that leads to the requested target (nfknock.door).
6. The first candidate to pass everything wins; if none does, the refusal of the
   candidate the packet got furthest with is returned (``reasons.RANK``).

Sans-IO: no clock, no logging, no I/O.  Addresses are packed bytes (4 or 16).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Protocol

from nfknock.config import SpaConfig, User
from nfknock.door import DoorMap, NatRefused
from nfknock.spa import reasons as R
from nfknock.spa.crypto import HMAC_DIGESTS, decrypt, hmac_state
from nfknock.spa.keys import IPNetwork, SpaKeys
from nfknock.spa.message import MessageType, SpaMessage, parse_plaintext
from nfknock.spa.replay import Claim
from nfknock.spa.wire import check_shape, decode_blob, decode_tag, hmac_message

UNSPECIFIED = "0.0.0.0"  # noqa: S104 -- the allow-IP that means "the packet's source"
# The shortest ciphertext text before a tag: a salt block and one AES block.
_MIN_CIPHERTEXT_CHARS = 33


class ReplayGuard(Protocol):
    def claim(self, digest: bytes, wall: float, good_until: float = 0.0) -> Claim: ...


@dataclass(frozen=True, slots=True)
class SpaResult:
    """The outcome for one SPA payload.  ``code`` is stable, ``reason`` is prose."""

    ok: bool
    code: str
    reason: str
    user: str | None = None  # the nfknock user the packet authenticated as (or was tried)
    message: SpaMessage | None = None  # the decrypted fields, once authenticated
    ports: frozenset[int] = frozenset()  # TCP ports requested (all allowed when ok)
    open_address: bytes = b""  # packed address to open; b"" unknown (inspect) or refused
    timeout: int | None = None  # the client's timeout capped by max_open_seconds
    replay_digest: bytes = b""  # SHA-256 of the payload, set once authenticated
    authenticated: bool = False  # HMAC/decryption/fields passed: record the digest
    replay_checked: bool = False  # the verifier claimed the digest itself
    # A NAT message served: the [[door.forward]] entry whose door ``ports`` holds.
    forward: str = ""

    @property
    def allow_ip(self) -> str | None:
        return self.message.allow_ip if self.message else None

    @property
    def timestamp(self) -> int | None:
        return self.message.timestamp if self.message else None

    @property
    def message_type(self) -> MessageType | None:
        return self.message.message_type if self.message else None

    @property
    def client_timeout(self) -> int | None:
        return self.message.client_timeout if self.message else None

    def as_dict(self) -> dict[str, object]:
        m = self.message
        out: dict[str, object] = {
            "ok": self.ok,
            "user": self.user,
            "reason": self.code,
            "detail": self.reason,
            "access": m.access_text() if m else [],
            "allow_ip": m.allow_ip if m else None,
            "open_address": str(ipaddress.ip_address(self.open_address))
            if self.open_address
            else None,
            "timestamp": m.timestamp if m else None,
            "message_type": m.message_type.label if m else None,
            "client_timeout": m.client_timeout if m else None,
            "open_seconds": self.timeout,
            "username": m.username if m else None,
            "version": m.version if m else None,
            "digest_type": m.digest_type if m else None,
            "authenticated": self.authenticated,
            "replay_digest": self.replay_digest.hex() or None,
            "replay_checked": self.replay_checked,
        }
        if m and m.nat_access:
            out["nat_access"] = f"{m.nat_access[0]},{m.nat_access[1]}"
        if m and m.command is not None:
            out["command"] = m.command
        if self.forward:
            out["forward"] = self.forward
        return out


def refusal(exc: R.SpaError, user: str | None = None) -> SpaResult:
    return SpaResult(False, exc.code, exc.detail, user=user)


@dataclass(frozen=True, slots=True)
class _Candidate:
    user: User
    name: str
    enabled: bool
    ports: frozenset[int]
    keys: SpaKeys
    state: hmac.HMAC | None  # keyed once; None: fwknop_hmac = false
    tag_len: int
    sources: tuple[IPNetwork, ...] | None


class _Packet:
    """Per-packet scratch: the payload digest computed and claimed once."""

    __slots__ = ("claimed", "digest")

    def __init__(self) -> None:
        self.claimed = False
        self.digest = b""


class Verifier:
    """Verifies SPA payloads for a fixed user set (rebuild it on reload)."""

    def __init__(
        self,
        users: Iterable[User],
        spa: SpaConfig,
        protected_ports: frozenset[int],
        doors: DoorMap | None = None,
    ) -> None:
        self.doors = doors or DoorMap()
        self.max_age = spa.max_age
        self.max_open_seconds = spa.max_open_seconds
        self._candidates: list[_Candidate] = []
        for u in users:
            keys = u.spa
            if keys is None:
                continue
            state = None
            tag_len = 0
            if keys.hmac_key is not None:
                state = hmac_state(keys.hmac_key, keys.hmac_digest)
                tag_len = HMAC_DIGESTS[keys.hmac_digest][1]
            self._candidates.append(
                _Candidate(
                    user=u,
                    name=u.name,
                    enabled=u.enabled,
                    ports=u.ports if u.ports is not None else protected_ports,
                    keys=keys,
                    state=state,
                    tag_len=tag_len,
                    sources=keys.sources,
                )
            )
        self._any_sources = any(c.sources is not None for c in self._candidates)
        self._tag_lens = {c.tag_len for c in self._candidates if c.state is not None}

    def __len__(self) -> int:
        return len(self._candidates)

    def verify(
        self,
        src: bytes | None,
        dst: bytes,
        payload: bytes,
        wall: float,
        replay: ReplayGuard | None = None,
    ) -> SpaResult:
        """Verify one payload from ``src`` to ``dst`` at Unix time ``wall``.

        ``dst`` does not change the outcome today (fwknopd's per-stanza DESTINATION
        filter is not offered); it is part of the call so the caller's grant and a
        future filter see the same value.

        ``src=None`` (only ``spa inspect`` without ``--source``): the source is
        unknown, so ``spa_sources`` is not applied and an allow-IP is assumed to be
        the packet's source."""
        try:
            check_shape(payload)
        except R.SpaError as exc:
            return refusal(exc)
        if src is not None and len(src) not in (4, 16):
            return refusal(R.SpaError(R.NO_USER_FOR_SOURCE, "not an IPv4/IPv6 source"))
        candidates = self._for_source(src)
        if not candidates:
            return refusal(R.SpaError(R.NO_USER_FOR_SOURCE))
        pkt = _Packet()
        # The hot loop under a flood: one HMAC per candidate; the tag of each
        # length is decoded once per packet, before the loop.
        tags = {n: _split(payload, n) for n in self._tag_lens}
        compare = hmac.compare_digest
        best: SpaResult | None = None
        for c in candidates:
            state = c.state
            if state is not None:
                text, tag = tags[c.tag_len]
                if tag is None:
                    continue
                h = state.copy()
                h.update(text)
                if not compare(h.digest(), tag):
                    continue
                ciphertext = payload[: -c.tag_len]
            else:
                ciphertext = payload
            result = self._authenticated(c, src, ciphertext, payload, wall, replay, pkt)
            if result.ok or result.code in (R.REPLAY, R.REPLAY_CACHE_FULL):
                return result
            if best is None or R.RANK[result.code] > R.RANK[best.code]:
                best = result
        return best or refusal(R.SpaError(R.NO_HMAC_MATCH))

    def _for_source(self, src: bytes | None) -> list[_Candidate]:
        if src is None or not self._any_sources:
            return self._candidates
        try:
            addr = ipaddress.ip_address(src)
        except ValueError:
            return []
        return [
            c
            for c in self._candidates
            if c.sources is None or any(addr in net for net in c.sources)
        ]

    def _authenticated(
        self,
        c: _Candidate,
        src: bytes | None,
        ciphertext: bytes,
        payload: bytes,
        wall: float,
        replay: ReplayGuard | None,
        pkt: _Packet,
    ) -> SpaResult:
        """Everything after the HMAC for one candidate."""
        try:
            plain = decrypt(c.keys.key, decode_blob(ciphertext), c.keys.mode)
            msg = parse_plaintext(plain)
        except R.SpaError as exc:
            return refusal(exc, user=c.name)
        if not pkt.digest:
            pkt.digest = hashlib.sha256(payload).digest()
        done = SpaResult(
            False,
            "",
            "",
            user=c.name,
            message=msg,
            replay_digest=pkt.digest,
            authenticated=True,
            replay_checked=replay is not None,
        )
        try:
            if replay is not None and not pkt.claimed:
                pkt.claimed = True
                # Kept at least until the packet's own window closes (replay.py).
                outcome = replay.claim(pkt.digest, wall, msg.timestamp + self.max_age + 1)
                if outcome is Claim.REPLAY:
                    raise R.SpaError(R.REPLAY)
                if outcome is not Claim.FRESH:
                    raise R.SpaError(R.REPLAY_CACHE_FULL)
            ports, address, timeout, forward = self._admit(c, msg, src, wall)
        except R.SpaError as exc:
            return replace(done, code=exc.code, reason=exc.detail)
        return replace(
            done,
            ok=True,
            code=R.ACCEPTED,
            reason=R.PROSE[R.ACCEPTED],
            ports=ports,
            open_address=address,
            timeout=timeout,
            forward=forward,
        )

    def _admit(
        self, c: _Candidate, msg: SpaMessage, src: bytes | None, wall: float
    ) -> tuple[frozenset[int], bytes, int | None, str]:
        """The checks after authentication (fwknopd order): (ports, address, timeout,
        the forward entry of a NAT message's door or "")."""
        if not c.enabled:
            raise R.SpaError(R.USER_DISABLED)
        age = math.floor(wall) - msg.timestamp
        if age > self.max_age:
            raise R.SpaError(R.TOO_OLD, f"{age} s old (max_age {self.max_age})")
        if -age > self.max_age:
            raise R.SpaError(R.FROM_FUTURE, f"{-age} s ahead (max_age {self.max_age})")
        if c.keys.username is not None and msg.username != c.keys.username:
            raise R.SpaError(R.USERNAME_MISMATCH, f"username {msg.username!r}")
        if msg.message_type == MessageType.COMMAND:
            raise R.SpaError(R.COMMAND_REFUSED)
        forward = ""
        if msg.message_type.has_nat:
            forward = self._nat(c, msg)
        address = self._address(c, msg.allow_ip, src)
        if not forward:
            for proto, port in msg.access:
                if proto != "tcp" or port not in c.ports:
                    raise R.SpaError(R.PORT_NOT_ALLOWED, f"{proto}/{port}")
        ports = frozenset(port for _, port in msg.access)
        timeout = None
        if msg.client_timeout:
            timeout = min(msg.client_timeout, self.max_open_seconds)
        return ports, address, timeout, forward

    def _nat(self, c: _Candidate, msg: SpaMessage) -> str:
        """A NAT message (fwknopd's process_spa_request: the first access port is
        the one translated to the nat_access target): served as the door of the
        forward entry it names.  fwknop sends one proto/port with NAT; a local-NAT
        message's host is only the server's name as the client knew it."""
        if msg.nat_access is None or len(msg.access) != 1 or msg.access[0][0] != "tcp":
            what = ",".join(msg.access_text()) or "nothing"
            raise R.SpaError(R.NAT_DOOR_REFUSED, f"a NAT door is one tcp/PORT, not {what}")
        host, port = msg.nat_access
        local = msg.message_type in _LOCAL_NAT
        try:
            entry = self.doors.match_nat(c.user, None if local else host, port, msg.access[0][1])
        except NatRefused as exc:
            raise R.SpaError(exc.code, exc.detail) from None
        return entry.name

    @staticmethod
    def _address(c: _Candidate, allow_ip: str, src: bytes | None) -> bytes:
        """Issue 10 item 3: the source for ``0.0.0.0`` or an allow-IP equal to it;
        another allow-IP only for ``spa_allow_ip = "any"`` users."""
        allow = ipaddress.IPv4Address(allow_ip)
        if allow_ip == UNSPECIFIED:
            return src or b""
        if src is None or allow.packed == src:
            return allow.packed
        if not c.keys.allow_any_ip:
            raise R.SpaError(
                R.ALLOW_IP_REFUSED, f"allow-IP {allow_ip} is not the source (spa_allow_ip)"
            )
        if allow.is_multicast or allow.is_reserved or allow.is_loopback:
            raise R.SpaError(R.ALLOW_IP_REFUSED, f"allow-IP {allow_ip} is not unicast")
        return allow.packed


_LOCAL_NAT = frozenset({MessageType.LOCAL_NAT_ACCESS, MessageType.CLIENT_TIMEOUT_LOCAL_NAT_ACCESS})


def _split(payload: bytes, tag_len: int) -> tuple[bytes, bytes | None]:
    """(HMAC'd text, raw tag or None) when the last ``tag_len`` characters are the tag."""
    if len(payload) - tag_len < _MIN_CIPHERTEXT_CHARS:
        return b"", None
    return hmac_message(payload, tag_len), decode_tag(payload[-tag_len:])
