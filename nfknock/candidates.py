"""The candidate knock sequences and the start index, stored compactly.  Sans-IO.

A *candidate* is the sequence one (user, step, counter) knocks.  The knock engine
(:mod:`nfknock.engine`) decides which candidates must exist; this module stores
them and answers the only question the packet path asks of all of them at once:
which candidates do these knocks of one source begin?

Theory of operation
-------------------
*Prefixes, not sequences.*  Starting a candidate needs only its first ``K = W + 2``
ports (``W`` = reorder window): the *prefix*.  A candidate's full sequence is
derived only when some source starts it (and cached while the candidate exists),
so a user costs a few prefixes, not a few sequences.  For scheme v1 the prefixes
of consecutive counters come from one HMAC chain (sequence.py steps 2-3) and the
first ``K`` words of each block (steps 4-6), read straight from the block when the
port span is a power of two and no word is rejected (else the scheme's own reader,
``ports_from_block``).

*Slots.*  Candidates live in flat arrays indexed by a slot number: ``K`` prefix
ports, the counter, and the *group* -- one (user, step residue) pair, ``g = user x
R + step mod R``.  ``R = 2 x skew + 2`` residues hold the live steps and the one
being staged; the step that leaves the window shares its residue with the step
staged next, whose build frees the old slots.  A group keeps the slots of its
newest ``A = 1 + lookahead`` counters in a ring (``counter mod A``) and the older
(spent, kept to answer replays with "behind") in a small dict that exists only
for groups that have spent counters.  No per-candidate Python object exists.

*The start rule.*  A candidate starts when its first port (the *anchor*) and at
least one of its next ``W + 1`` ports (its *followers*) have arrived from one
source, in any order, the newest of them being the knock at hand.  Every prefix
port among the source's remembered knocks is then credited at once (a port
counts as many times as it was received).  Since a knock arrives at most ``W``
places late, the anchor arrives among the first ``W + 1`` knocks of a sequence,
before every position past ``W``; so the rule starts every sequence the reorder
window lets complete, as soon as its anchor and one more knock are in.

*The start index* has one part per step (dropped whole when the step leaves the
window, so retiring a step costs nothing per candidate):

    anchors[port]   slots whose anchor is ``port`` (in buckets: ``anchored()``)
    partners[port]  the ports that begin a candidate together with ``port``: the
                    followers of candidates anchored at it, and the anchors of
                    candidates it follows

So "can this knock begin anything with what this source sent before?" is one
C-level ``isdisjoint`` per live step between the source's remembered ports and
``partners[port]``, whatever the number of remembered knocks; only a hit is
resolved exactly (:meth:`CandidateTable.starts`).  A candidate dropped while its
step is indexed (its counter moved out of the window) leaves the index at once;
a step's whole index goes when the step leaves the window (emptied in place and
reused for the next step: its arrays are not reallocated every step).

*Near.*  ``near[port]`` counts partner entries at a port (live and staged
steps): zero means no candidate can begin with it.  The packet path uses it to
skip remembering knocks that can begin nothing -- when few ports are near.  With
many users every port is near: then it is not kept at all (``track_near``).
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from array import array
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from functools import partial
from typing import Protocol

from nfknock.config import User
from nfknock.schemes import V1, Scheme
from nfknock.sequence import SequenceParams, ports_from_block

# The "step" of schemes that count HOTP counters instead of time (kommen).
HOTP_STEP = -1
NO_STEP = -(1 << 62)  # a group that holds no step


class Mac(Protocol):
    """A keyed HMAC-SHA-512 (hmac.HMAC, or OpenSSL's own object)."""

    def copy(self) -> Mac: ...
    def update(self, msg: bytes, /) -> None: ...
    def digest(self) -> bytes: ...


try:  # OpenSSL's HMAC object copies in C: a block costs a quarter less
    import _hashlib

    new_mac: Callable[[bytes], Mac] = partial(_hashlib.hmac_new, digestmod="sha512")
except ImportError:  # pragma: no cover - a CPython built without OpenSSL
    new_mac = partial(hmac.new, digestmod=hashlib.sha512)


def _port_list() -> array[int]:
    return array("H")


# Anchors are kept in this many buckets (port mod buckets) of parallel port and slot
# arrays, not one array per port: arrays are objects the garbage collector tracks,
# and a full collection costs ~150 ns for each (see CandidateTable.bury).
ANCHOR_BUCKETS = 1024


class StepIndex:
    """The start index of one step (see the module docstring)."""

    __slots__ = ("anchor_ports", "anchor_slots", "gen", "partners", "step")

    def __init__(self, step: int, gen: int) -> None:
        self.step = step
        self.gen = gen  # distinguishes this index from an earlier one of the same step
        self.anchor_ports: list[array[int] | None] = [None] * ANCHOR_BUCKETS
        self.anchor_slots: list[array[int] | None] = [None] * ANCHOR_BUCKETS
        self.partners: defaultdict[int, array[int]] = defaultdict(_port_list)

    def add_anchor(self, port: int, slot: int) -> None:
        b = port % ANCHOR_BUCKETS
        ports, slots = self.anchor_ports[b], self.anchor_slots[b]
        if ports is None or slots is None:
            ports = self.anchor_ports[b] = array("H")
            slots = self.anchor_slots[b] = array("I")
        ports.append(port)
        slots.append(slot)

    def anchored(self, port: int) -> list[int]:
        """The slots whose anchor is ``port`` (found in C: array.index)."""
        b = port % ANCHOR_BUCKETS
        ports, slots = self.anchor_ports[b], self.anchor_slots[b]
        out: list[int] = []
        if ports is None or slots is None:
            return out
        i = -1
        try:
            while True:
                i = ports.index(port, i + 1)
                out.append(slots[i])
        except ValueError:
            return out

    def remove_anchor(self, port: int, slot: int) -> None:
        b = port % ANCHOR_BUCKETS
        ports, slots = self.anchor_ports[b], self.anchor_slots[b]
        if ports is not None and slots is not None:
            i = slots.index(slot)
            del ports[i]
            del slots[i]

    def anchors(self) -> list[tuple[int, int]]:
        """Every (anchor port, slot) (tests)."""
        return [
            (p, s)
            for ports, slots in zip(self.anchor_ports, self.anchor_slots, strict=True)
            if ports is not None and slots is not None
            for p, s in zip(ports, slots, strict=True)
        ]

    def empty(self) -> None:
        """Empty every array in place (for reuse, see CandidateTable.bury)."""
        for arr in (*self.anchor_ports, *self.anchor_slots, *self.partners.values()):
            if arr is not None:
                del arr[:]


class PrefixDeriver:
    """The first ``k`` ports of a scheme's sequences, several counters at a time."""

    def __init__(self, scheme: Scheme, k: int) -> None:
        self.scheme = scheme
        self.k = k
        self.v1: SequenceParams | None = None
        if isinstance(scheme, V1):
            p = scheme.params
            self.v1 = p
            self.k = min(k, p.length)
            self.short = replace(p, length=self.k)
            self.lo = p.port_min
            # only exclusions inside the range can reject a word
            self.excluded = frozenset(x for x in p.exclude if p.port_min <= x <= p.port_max)
            width = p.width
            # The fast reader: the first k words of the first block, when no word can
            # be rejected for its size (span a power of two) and they fit in one block.
            self.fast = width > 0 and p.span == 1 << width and width * self.k <= 512
            nbits = width * self.k
            self.nbytes = (nbits + 7) // 8
            self.drop = 8 * self.nbytes - nbits
            self.word = (1 << width) - 1
            self.shifts = [width * (self.k - 1 - i) for i in range(self.k)]

    def mac(self, secret: bytes) -> Mac | None:
        """A keyed HMAC to copy for each block (saves the key schedule); v1 only."""
        return new_mac(secret) if self.v1 is not None else None

    def prefixes(
        self, secret: bytes, step: int, counters: range, mac: Mac | None = None
    ) -> list[tuple[int, ...]]:
        if self.v1 is None:
            k = self.k
            return [tuple(self.scheme.derive(secret, step, c)[:k]) for c in counters]
        if not counters:
            return []
        if mac is None:
            mac = new_mac(secret)
        # sequence.py step 2: H_0 over BE64(T) [|| 0x00 || realm]; step 3: H_c = HMAC(H_{c-1}).
        message = struct.pack(">Q", step)
        if self.v1.realm:
            message += b"\x00" + self.v1.realm
        h = mac.copy()
        h.update(message)
        block = h.digest()
        for _ in range(counters.start):
            h = mac.copy()
            h.update(block)
            block = h.digest()
        out = []
        last = counters.stop - 1
        fast, short = self.fast, self.short
        if fast:  # _read, inlined: this loop is most of the cost of building a step
            nbytes, drop, lo, word = self.nbytes, self.drop, self.lo, self.word
            shifts, k, excluded = self.shifts, self.k, self.excluded
        for c in counters:
            if fast:
                x = int.from_bytes(block[:nbytes], "big") >> drop
                ports = tuple([lo + (x >> s & word) for s in shifts])
                if len(set(ports)) != k or (excluded and not excluded.isdisjoint(ports)):
                    ports = ports_from_block(secret, block, short)
            else:
                ports = ports_from_block(secret, block, short)
            out.append(ports)
            if c != last:
                h = mac.copy()
                h.update(block)
                block = h.digest()
        return out


class CandidateTable:
    """Slots, groups and per-step start indexes (see the module docstring).

    ``users`` is indexed by user number; ``scheme_of`` gives a user's scheme.  The
    table never decides which counters are wanted: :meth:`build` is told."""

    def __init__(
        self,
        users: Sequence[User],
        scheme_of: Callable[[User], Scheme],
        *,
        prefix_len: int,
        residues: int,
        ring: int,
        track_near: bool = True,
    ) -> None:
        self.k = prefix_len
        self.residues = residues
        self.ring = ring
        self.users = users
        self.scheme_of = scheme_of
        self._derivers: dict[Scheme, PrefixDeriver] = {}
        self._default: PrefixDeriver | None = None  # for users without a scheme of their own
        groups = len(users) * residues
        self.gstep = array("q", [NO_STEP]) * groups
        self.ggen = array("I", [0]) * groups  # the StepIndex.gen the group is indexed in
        self.gring = array("i", [-1]) * (groups * ring)
        self.gstale: dict[int, dict[int, int]] = {}  # group -> counter -> slot
        self.prefix: array[int] = array("H")
        self.counter: array[int] = array("H")
        self.group: array[int] = array("i")  # -1: free
        self._free: list[int] = []
        self._full: dict[int, tuple[int, ...]] = {}
        self.steps: dict[int, StepIndex] = {}
        self._graveyard: list[StepIndex] = []  # retired, not yet emptied
        self._spare: list[StepIndex] = []  # emptied, for the next step
        self._gen = 0
        self.track_near = track_near
        self.near = [0] * 65536 if track_near else [1] * 65536

    # --- groups -----------------------------------------------------------------

    def group_of(self, uidx: int, step: int) -> int:
        return uidx * self.residues + (0 if step == HOTP_STEP else step % self.residues)

    def deriver(self, user: User) -> PrefixDeriver:
        if user.scheme is None and self._default is not None:
            return self._default  # no hashing of the scheme value per call
        scheme = self.scheme_of(user)
        d = self._derivers.get(scheme)
        if d is None:
            d = self._derivers[scheme] = PrefixDeriver(scheme, self.k)
        if user.scheme is None:
            self._default = d
        return d

    def index(self, step: int) -> StepIndex:
        idx = self.steps.get(step)
        if idx is None:
            self._gen += 1
            if self._spare:  # an emptied one (see bury)
                idx = self._spare.pop()
                idx.step, idx.gen = step, self._gen
            else:
                idx = StepIndex(step, self._gen)
            self.steps[step] = idx
        return idx

    @property
    def version(self) -> int:
        """Changes whenever a step's index is created or dropped."""
        return self._gen

    def held(self, g: int) -> dict[int, int]:
        """counter -> slot of every candidate group ``g`` holds."""
        out: dict[int, int] = {}
        ring, base = self.ring, g * self.ring
        for j in range(base, base + ring):
            s = self.gring[j]
            if s >= 0:
                out[self.counter[s]] = s
        stale = self.gstale.get(g)
        if stale:
            out.update(stale)
        return out

    def build(self, uidx: int, step: int, counters: range, mac: Mac | None = None) -> int:
        """Make group (uidx, step) hold exactly ``counters``, derived and indexed in
        ``step``'s index.  Returns how many candidates were derived."""
        g = self.group_of(uidx, step)
        idx = self.index(step)
        if self.gstep[g] != step:
            if self.gstep[g] != NO_STEP:
                # Cheap when the old step's index was retired first (the engine does:
                # a residue comes back only after its step left the window); else
                # the old slots leave that index one by one.
                self.clear(g)
            self.gstep[g] = step
            self.ggen[g] = idx.gen
            self._fresh(g, uidx, step, counters, idx, mac)
            return len(counters)
        have = self.held(g)
        if self.ggen[g] != idx.gen:  # held from before the index was dropped
            self.ggen[g] = idx.gen
            for s in have.values():
                self._index_slot(idx, s)
        for c, s in list(have.items()):
            if c not in counters:
                self._release(g, s)
                del have[c]
        missing = [c for c in counters if c not in have]
        if missing:
            user = self.users[uidx]
            span = range(missing[0], missing[-1] + 1)
            found = self.deriver(user).prefixes(user.secret, step, span, mac)
            for c, ports in zip(span, found, strict=True):
                if c not in have:
                    have[c] = self._add(g, c, ports, idx)
        self._place(g, have, counters)
        return len(missing)

    def _fresh(
        self,
        g: int,
        uidx: int,
        step: int,
        counters: range,
        idx: StepIndex,
        mac: Mac | None,
    ) -> None:
        """:meth:`build` for an empty group: the path of construction and staging,
        so _add, _index_slot and _place are inlined."""
        if not counters:
            return
        user = self.users[uidx]
        found = self.deriver(user).prefixes(user.secret, step, counters, mac)
        k, ring, top = self.k, self.ring, counters.stop - 1
        base = g * ring
        prefix, counter, group, free, gring = (
            self.prefix,
            self.counter,
            self.group,
            self._free,
            self.gring,
        )
        add_anchor, partners, near, track_near = (
            idx.add_anchor,
            idx.partners,
            self.near,
            self.track_near,
        )
        stale: dict[int, int] = {}
        for c, ports in zip(counters, found, strict=True):
            padded = ports if len(ports) == k else ports + (0,) * (k - len(ports))
            if free:
                s = free.pop()
                prefix[s * k : s * k + k] = array("H", padded)
                counter[s] = c
                group[s] = g
            else:
                s = len(counter)
                prefix.extend(padded)
                counter.append(c)
                group.append(g)
            if len(ports) >= 2:  # see _index_slot
                anchor, followers = ports[0], ports[1:]
                add_anchor(anchor, s)
                partners[anchor].extend(followers)
                if track_near:
                    near[anchor] += len(followers)
                    for f in followers:
                        partners[f].append(anchor)
                        near[f] += 1
                else:
                    for f in followers:
                        partners[f].append(anchor)
            if c > top - ring:
                gring[base + c % ring] = s
            else:
                stale[c] = s
        if stale:
            self.gstale[g] = stale

    def _place(self, g: int, have: dict[int, int], counters: range) -> None:
        """The newest ``ring`` counters in the ring, older ones in gstale."""
        ring, base = self.ring, g * self.ring
        gring = self.gring
        for j in range(base, base + ring):
            gring[j] = -1
        self.gstale.pop(g, None)
        top = counters.stop - 1
        stale: dict[int, int] = {}
        for c, s in have.items():
            if c > top - ring:
                gring[base + c % ring] = s
            else:
                stale[c] = s
        if stale:
            self.gstale[g] = stale

    def clear(self, g: int) -> None:
        """Free every slot of group ``g`` (it is about to hold another step)."""
        for s in self.held(g).values():
            self._release(g, s)
        base = g * self.ring
        for j in range(base, base + self.ring):
            self.gring[j] = -1
        self.gstale.pop(g, None)
        self.gstep[g] = NO_STEP

    def _add(self, g: int, counter: int, ports: tuple[int, ...], idx: StepIndex) -> int:
        k = self.k
        padded = ports if len(ports) == k else ports + (0,) * (k - len(ports))
        if self._free:
            s = self._free.pop()
            self.prefix[s * k : s * k + k] = array("H", padded)
            self.counter[s] = counter
            self.group[s] = g
        else:
            s = len(self.counter)
            self.prefix.extend(padded)
            self.counter.append(counter)
            self.group.append(g)
        self._index_slot(idx, s, ports)
        return s

    def _release(self, g: int, s: int) -> None:
        idx = self.steps.get(self.gstep[g])
        if idx is not None and self.ggen[g] == idx.gen:
            self._unindex_slot(idx, s)
        self.group[s] = -1
        self._full.pop(s, None)
        self._free.append(s)

    # --- the start index --------------------------------------------------------

    def _ports(self, s: int) -> tuple[int, ...]:
        k = self.k
        return tuple(p for p in self.prefix[s * k : s * k + k] if p)

    def _index_slot(self, idx: StepIndex, s: int, ports: tuple[int, ...] | None = None) -> None:
        if ports is None:
            ports = self._ports(s)
        if len(ports) < 2:
            return  # a one-port sequence never starts: starting takes two knocks
        anchor, followers = ports[0], ports[1:]
        idx.add_anchor(anchor, s)
        partners, near = idx.partners, self.near
        partners[anchor].extend(followers)
        for f in followers:
            partners[f].append(anchor)
        if self.track_near:
            near[anchor] += len(followers)
            for f in followers:
                near[f] += 1

    def _unindex_slot(self, idx: StepIndex, s: int) -> None:
        """The exact inverse of _index_slot (a candidate dropped from a live step:
        rare, after a claim; array.remove is C-level)."""
        ports = self._ports(s)
        if len(ports) < 2:
            return
        anchor, followers = ports[0], ports[1:]
        near, partners = self.near, idx.partners
        idx.remove_anchor(anchor, s)
        mine = partners[anchor]
        for f in followers:
            mine.remove(f)
            partners[f].remove(anchor)
        if self.track_near:
            near[anchor] -= len(followers)
            for f in followers:
                near[f] -= 1

    def retire(self, step: int) -> None:
        """Forget a step's index (its slots are freed when their groups are rebuilt).
        Emptying it takes milliseconds with many users: it waits for :meth:`bury`."""
        idx = self.steps.pop(step, None)
        if idx is None:
            return
        self._gen += 1
        if self.track_near:
            near = self.near
            for port, partners in idx.partners.items():
                near[port] -= len(partners)
        self._graveyard.append(idx)

    def bury(self) -> None:
        """Empty one retired index for reuse (call between packets, a few times a
        second).  Its arrays serve the next step staged: arrays are objects the
        garbage collector tracks, and tens of thousands of new ones every step would
        bring a full collection (tens of ms with many users) about as often."""
        if self._graveyard:
            idx = self._graveyard.pop()
            idx.empty()
            self._spare.append(idx)

    def starts(
        self, port: int, remembered: dict[int, int], live: Iterable[StepIndex]
    ) -> list[tuple[int, int]]:
        """(slot, mask of credited prefix positions) of every live candidate that the
        knock ``port`` begins together with ``remembered`` (port -> copies), the
        source's earlier knocks (see the start rule in the module docstring)."""
        out: list[tuple[int, int]] = []
        known = remembered.keys()
        for idx in live:
            partners = idx.partners.get(port)
            if partners is None or known.isdisjoint(partners):
                continue  # the usual case, decided in C
            slots = set(idx.anchored(port))
            for q in known & set(partners):
                slots.update(idx.anchored(q))
            k, step = self.k, idx.step
            for s in slots:
                g = self.group[s]
                if g < 0 or self.gstep[g] != step:
                    continue  # freed, or reused for another step
                prefix = self.prefix[s * k : s * k + k]
                if port not in prefix:
                    continue  # the knock at hand must take part
                avail = dict(remembered)
                avail[port] = avail.get(port, 0) + 1
                mask = 0
                for pos, p in enumerate(prefix):
                    n = avail.get(p, 0)
                    if n:
                        mask |= 1 << pos
                        avail[p] = n - 1
                if mask & 1 and mask & (mask - 1):  # the anchor and a follower
                    out.append((s, mask))
        return out

    # --- one candidate ----------------------------------------------------------

    def identity(self, s: int) -> tuple[int, int, int]:
        """(group, step, counter) of slot ``s``."""
        g = self.group[s]
        return g, self.gstep[g], self.counter[s]

    def holds(self, s: int, g: int, step: int, counter: int) -> bool:
        """Does slot ``s`` still hold that candidate?"""
        return self.group[s] == g and self.gstep[g] == step and self.counter[s] == counter

    def slot_of(self, uidx: int, step: int, counter: int) -> int:
        g = self.group_of(uidx, step)
        if self.gstep[g] != step:
            return -1
        s = self.gring[g * self.ring + counter % self.ring]
        if s >= 0 and self.counter[s] == counter:
            return s
        stale = self.gstale.get(g)
        return stale.get(counter, -1) if stale else -1

    def sequence(self, s: int) -> tuple[int, ...]:
        """The full sequence of slot ``s``, derived on first use."""
        ports = self._full.get(s)
        if ports is None:
            g, step, counter = self.identity(s)
            user = self.users[g // self.residues]
            ports = tuple(self.scheme_of(user).derive(user.secret, step, counter))
            self._full[s] = ports
        return ports

    def near_ports(self) -> int:
        """How many ports can begin some indexed candidate."""
        return len(self.near) - self.near.count(0)

    def slots_in_use(self) -> int:
        return len(self.counter) - len(self._free)
