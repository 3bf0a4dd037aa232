"""Forwarded doors: a port of this host, granted to one source, leading to a target.  Sans-IO.

Seed 002's idea: the service port is never what a client connects to.  Each
``[[door.forward]]`` entry names a range of *door* ports on this host and a
*target* -- a host behind this gateway (``address``) or this host itself -- and
its port.  The service port stays closed to everyone; what opens is one door, for
one source.

Theory of operation (all rules static, :mod:`nfknock.render`)::

    SYN to a door port (any local address)
      mangle PREROUTING  NFKNOCK-DOOR: new SYN to a door range -> priority queue
          daemon: a confirmed grant for (source, destination) covering that door
                  -> ACCEPT with the entry's mark (set_mark, then accept);
                  no grant -> DROP (silently, like a knock); "behind" -> REJECT
      nat PREROUTING     NFKNOCK-DNAT: mark M and a door port -> DNAT to the target
      filter INPUT / FORWARD (local target / a host behind)
                         mark M, conntrack says DNAT from a door port, SYN to the
                         target -> ACCEPT; anything else to the target: as before
                         (a protected port stays protected, an unprotected target
                         port is closed to new connections)
    conntrack carries the rest of the connection (replies un-NATed, the reply
    direction accepted as ESTABLISHED).

The mark is the daemon's only say: it is set on one packet (the granted SYN), never
on the connection, and the rules that act on it are the entry's own.  A door port
belongs to at most one entry (config.py), so the port names the target; a grant is
an ordinary grant (grants.py) whose port is a door port, and it binds (source,
destination, door port) -- hence the target -- with the connection budget.  A reload
that moves an entry's target or range revokes the grants of its doors
(:meth:`DoorMap.moved`).

Which door:

* knock users with ``door = "random"``: the door that follows the sequence in its
  HMAC bit stream (sequence.py step 7), in the range of the user's one entry --
  client and server agree on it without a reply;
* SPA (fwknop's NAT messages, ``-N host:port``, ``--nat-local``,
  ``--nat-rand-port``): the port of the access request (``-A tcp/PORT``, or the
  random one), served when the requested target is an entry the user may use and
  the port lies in its range (:meth:`DoorMap.match_nat`).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field

from nfknock.config import Forward, User
from nfknock.sequence import SequenceParams, door_port
from nfknock.spa import reasons as R


class NatRefused(Exception):
    """An SPA NAT request this configuration does not serve; ``code`` is one of the
    refusal codes of :mod:`nfknock.spa.reasons`."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


@dataclass(frozen=True)
class DoorMap:
    """The configured forward entries, indexed by door port."""

    forwards: tuple[Forward, ...] = ()
    _by_port: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        index = bytearray(65536)  # 0: no door; i + 1: forwards[i] (at most 255 entries)
        for i, f in enumerate(self.forwards):
            index[f.door_min : f.door_max + 1] = bytes([i + 1]) * (f.door_max - f.door_min + 1)
        object.__setattr__(self, "_by_port", bytes(index))

    def __bool__(self) -> bool:
        return bool(self.forwards)

    @property
    def index(self) -> bytes:
        """A byte per port, non-zero at door ports (the packet path's test)."""
        return self._by_port

    def entry(self, port: int) -> Forward | None:
        i = self._by_port[port]
        return self.forwards[i - 1] if i else None

    def usable(self, user: User | None) -> list[Forward]:
        """The entries ``user`` may use (none for a missing or disabled user)."""
        if user is None or not user.enabled:
            return []
        return [f for f in self.forwards if user.forward is None or f.name in user.forward]

    def serves(self, f: Forward, dst: bytes) -> bool:
        """Can a door of ``f`` be reached at ``dst``?  A target address is of one
        family: a door knocked over the other could not be translated."""
        return f.address is None or len(dst) == (4 if f.address.version == 4 else 16)

    def doors_for(self, user: User | None, dst: bytes, ports: Iterable[int]) -> frozenset[int]:
        """Those of ``ports`` that are doors ``user`` may use at ``dst``."""
        usable = {f.name for f in self.usable(user)}
        out = set()
        for port in ports:
            f = self.entry(port)
            if f is not None and f.name in usable and self.serves(f, dst):
                out.add(port)
        return frozenset(out)

    def knock_door(
        self, user: User, step: int, counter: int, params: SequenceParams
    ) -> tuple[Forward, int] | None:
        """The entry and door port a ``door = "random"`` user's completed sequence
        (step, counter) opens; None if the user has no door (any more)."""
        usable = self.usable(user)
        if not user.door or len(usable) != 1:
            return None
        f = usable[0]
        return f, door_port(user.secret, step, counter, params, f.door_min, f.door_max)

    def match_nat(self, user: User | None, host: str | None, port: int, door: int) -> Forward:
        """The entry an SPA NAT request names: target ``host`` (None: this host, a
        local-NAT message) port ``port``, door ``door``.  NatRefused otherwise."""
        if not self.forwards:
            raise NatRefused(R.NAT_REFUSED, "no [[door.forward]] entry is configured")
        address = None
        if host is not None:
            try:
                address = ipaddress.ip_address(host)
            except ValueError:
                raise NatRefused(
                    R.NAT_REFUSED, f"NAT target {host!r} is not an address (names are not resolved)"
                ) from None
        matches = [f for f in self.usable(user) if f.address == address and f.port == port]
        if not matches:
            where = "this host" if host is None else str(address)
            raise NatRefused(
                R.NAT_TARGET_REFUSED,
                f"no [[door.forward]] entry this user may use leads to {where} port {port}",
            )
        for f in matches:
            if f.door_min <= door <= f.door_max:
                return f
        ranges = ", ".join(f"{f.door_min}-{f.door_max}" for f in matches)
        raise NatRefused(R.NAT_DOOR_REFUSED, f"door {door} is outside {ranges}")

    def moved(self, old: DoorMap) -> frozenset[int]:
        """Door ports of ``old`` that no longer lead where they did (another target,
        another entry, or no door at all): grants on them must go."""
        out: set[int] = set()
        for f in old.forwards:
            if f in self.forwards:
                continue  # unchanged
            for port in f.doors:
                g = self.entry(port)
                if g is None or (g.address, g.port) != (f.address, f.port):
                    out.add(port)
        return frozenset(out)
