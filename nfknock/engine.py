"""The verdict engine: new TCP SYNs in, verdicts and events out.  Sans-IO.

Theory of operation
-------------------
The engine sees only the first SYN of each new TCP connection that the static rules
queue: SYNs to the knock range and SYNs to the protected ports.  It never reads a
clock: every call gets ``wall`` (Unix time, for TOTP steps) and ``mono`` (monotonic
time, for expiry).  It never logs: it returns :class:`~nfknock.events.Event` values.

*Candidates.*  For every enabled user, every step ``T-s .. T+s`` (``skew_steps`` s;
HOTP schemes have one pseudo-step, :data:`HOTP_STEP`) and every counter
``next(user, step) - stale_counters .. next(user, step) + lookahead``, the engine
holds the expected knock sequence (a :class:`Candidate`) of the user's scheme.
Counters ``>= next`` are *current*; lower ones are *stale*.  A step change costs the
packet path almost nothing: :meth:`Engine.tick` derives and indexes the next step's
candidates ahead of time, a bounded chunk per call (*staged*: indexed but not live
until their step enters the window), and afterwards unindexes those of the step that
left (*retiring*: no longer live) the same way.  Candidates are refreshed when a
counter moves.

*Starting.*  The *near* index maps each port to the candidates that have it among
their first ``W + 2`` positions (``W`` = ``reorder_window``).  One knock never
creates per-source state -- with many users almost every port is near some
candidate.  Instead the last few near knocks of each source sit in a fixed-size,
direct-mapped table of machine words (no allocation per packet), and a candidate
starts when two of its near ports arrive from one source in an order the window
allows.  So random traffic creates no per-source objects, and the per-packet cost
depends on the port density of the candidates, not on a loop over users.

*Sources.*  Progress is tracked per (source address, destination address) -- a
"source" below.  Each source has, per candidate it has started, ``next`` (the first
position not yet received) and a bitmask of received positions.  The transitions of
a knock at position ``p`` of a candidate the source has started:

    ===========================  ====================================================
    condition                    effect
    ===========================  ====================================================
    p < next or bit p set        duplicate (a SYN retransmission): ignored
    next <= p <= next + W        bit p set; next advances over received positions
    p > next + W                 not this candidate (counts as stray if nothing else
                                 matches)
    next == L                    completed: a claimable counter -> an Access for
                                 the gate (grants.py, gate.py); a spent one -> the
                                 source is marked "behind" (REJECT on protected
                                 ports)
    older than sequence_timeout  progress discarded
    ===========================  ====================================================

A knock that advances or duplicates nothing and starts nothing is *stray*; past
``stray_budget`` strays the source is forgotten with its progress (fail closed).
Sequences may repeat a port (compatibility schemes): a knock takes the first
position holding its port that is not received yet.  Anything the tables do not
cover ends in DROP.

*Counters.*  Which counters of a (user, step) may still open follows the window
rule of :mod:`nfknock.counters`: a completion claims its counter locally at once (a
replay right behind it is stale here already) and hands an :class:`~nfknock.gate.Access`
to the gate, which makes it exactly-once across processes and gateways.  Windows
outlive their step (bounded), so a clock stepped forward and back finds the counters
it spent; a step whose window was pruned never goes live again (``replay_state_gap``).

Knocks are always DROPped, the completing one too; protected ports are decided by
:mod:`nfknock.core` and :mod:`nfknock.grants`.

*Bounds.*  Sources (LRU), progress per source, counter windows and stale candidates
all have limits from the configuration.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from nfknock.config import Config, User
from nfknock.counters import MAX_COUNTER, CounterWindow
from nfknock.events import DROP_SILENT, Decision, Event, EventKind, Verdict
from nfknock.gate import Access, CounterClaim, Gate
from nfknock.grants import split_key
from nfknock.schemes import V1, Scheme, merge_ranges
from nfknock.sequence import SequenceParams, step_of

# The "step" of schemes that count HOTP counters instead of time (kommen).
HOTP_STEP = -1
# Unmatched knocks remembered per source for starting a candidate (see _start_pair).
_RECENT = 3  # ports kept per slot: 16 bits each in a signed 64-bit word
_RECENT_MASK = (1 << (16 * _RECENT)) - 1
_TRIES_SHIFT = 16 * _RECENT  # the slot word's top bits count failed start attempts
_TRIES_CAP = (1 << (63 - _TRIES_SHIFT)) - 1
_SLOT = 3  # words per slot of the recent table
# Counter windows kept (per user and step) after their step left the live window,
# so a clock stepped back finds what was spent: steps this far below the highest
# step ever live (a day of 30 s steps), and at most this many windows in all.
RETAIN_STEPS = 2880
MAX_WINDOWS = 1 << 17


@dataclass(frozen=True)
class EngineSettings:
    params: SequenceParams
    protect: Mapping[int, frozenset[bytes] | None]  # port -> destinations (None: any)
    skew_steps: int = 1
    sequence_timeout: float = 10.0
    reorder_window: int = 4
    stray_budget: int = 32
    open_seconds: float = 30.0
    max_connections: int = 1
    max_sources: int = 65536
    max_grants: int = 65536
    max_progress_per_source: int = 16
    stale_counters: int = 8
    lookahead: int = 2  # counters beyond the floor that still open (counters.py)
    max_open_seconds: float = 300.0  # SPA: a client's timeout is honoured up to this

    @classmethod
    def from_config(cls, cfg: Config) -> EngineSettings:
        # port -> the destinations it is protected at; None: at every address.
        protect: dict[int, frozenset[bytes] | None] = {}
        for p in cfg.protect:
            known = protect.get(p.port, frozenset())
            if p.address is None or known is None:
                protect[p.port] = None
            else:
                protect[p.port] = known | {p.address.packed}
        k, d, lim = cfg.knock, cfg.door, cfg.limits
        return cls(
            params=cfg.sequence_params(),
            protect=protect,
            skew_steps=k.skew_steps,
            sequence_timeout=k.sequence_timeout,
            reorder_window=k.reorder_window,
            stray_budget=k.stray_budget,
            open_seconds=d.open_seconds,
            max_connections=d.max_connections,
            max_sources=lim.max_sources,
            max_grants=lim.max_grants,
            max_progress_per_source=lim.max_progress_per_source,
            stale_counters=lim.stale_counters,
            lookahead=k.lookahead,
            max_open_seconds=float(cfg.spa.max_open_seconds),
        )


@dataclass(slots=True)
class Candidate:
    cid: int
    user: str
    step: int
    counter: int
    ports: array[int]


@dataclass(slots=True)
class Progress:
    started: float
    next: int = 0
    mask: int = 0


@dataclass(slots=True)
class Source:
    progress: dict[int, Progress] = field(default_factory=dict)
    strays: int = 0
    last: float = 0.0


def _first_free(ports: array[int], port: int, prog: Progress) -> int:
    """The first position >= next holding ``port`` not received yet; -1 if none (a
    duplicate).  Usually the port occurs once; some schemes repeat ports."""
    start = prog.next
    while True:
        try:
            pos = ports.index(port, start)
        except ValueError:
            return -1
        if not (prog.mask >> pos) & 1:
            return pos
        start = pos + 1


_split = split_key


class Engine:
    """See the module docstring.  Not thread-safe: one caller at a time.

    ``gate`` receives every completion (an Access to admit, or a stale source to
    mark behind); the engine itself holds no grants."""

    def __init__(
        self, settings: EngineSettings, users: Iterable[User], wall: float, gate: Gate
    ) -> None:
        self.s = settings
        self.gate = gate
        self._users: dict[str, User] = {}
        self._counters: dict[tuple[str, int], CounterWindow] = {}
        # Replay state for steps at or below this was pruned (or lost): they never go
        # live again, whatever the clock says (see _steps).
        self._pruned_through = -1
        self._high_step = -1  # the highest step ever live
        self._gap_reported = False
        self._pruned_at: int | None = None
        self._candidates: dict[int, Candidate] = {}
        self._by_key: dict[tuple[str, int, int], int] = {}
        # port -> {candidate id: bitmask of its positions among the first W + 2}:
        # the only knocks that can begin a candidate.
        self._near: dict[int, dict[int, int]] = {}
        size = 1 << max(10, min(18, (settings.max_sources - 1).bit_length()))
        # The recent-knock table (see _start_pair): one flat array of machine words,
        # so a flood of new sources allocates nothing; interleaved per slot -- [hash
        # of the source, time in ms, up to three ports of 16 bits] -- so a packet
        # touches one cache line.
        self._recent_mask = size - 1
        self._recent = array("q", bytes(8 * _SLOT * size))
        self._timeout_ms = int(settings.sequence_timeout * 1000)
        # One byte per port: is it near some candidate?  64 KiB, stays in cache.
        self._near_map = bytearray(65536)
        self._next_cid = 1
        self._sources: OrderedDict[bytes, Source] = OrderedDict()
        # Step changes are spread over tick() calls: the next step's candidates are
        # derived and indexed ahead (staged, not live until their step enters the
        # window), and those of the step that left are unindexed afterwards.
        self._stage_step: int | None = None
        self._stage_todo: list[str] = []
        self._retiring: list[tuple[str, int, int]] = []
        self._set_step(wall)
        self._v1 = V1(settings.params)
        self._set_users_quiet(users)
        self._rebuild()

    # --- configuration ----------------------------------------------------------

    @property
    def step(self) -> int:
        return self._step

    @property
    def users(self) -> Mapping[str, User]:
        return self._users

    def set_users(self, users: Iterable[User]) -> None:
        """Replace the user set.  A rekeyed user's counters and sequences are void
        (the grant table is re-checked by the caller: ``GrantTable.retain``)."""
        old = self._users
        self._set_users_quiet(users)
        for name, u in self._users.items():
            if name in old and (old[name].secret, old[name].scheme) != (u.secret, u.scheme):
                for counter_key in [k for k in self._counters if k[0] == name]:
                    del self._counters[counter_key]
                for cand_key in [k for k in self._by_key if k[0] == name]:
                    del self._candidates[self._by_key.pop(cand_key)]
        self._seed_hotp_counters()
        self._rebuild()

    def _set_users_quiet(self, users: Iterable[User]) -> None:
        self._users = {u.name: u for u in users}
        self._stage_step = None  # restage: users may have come or gone
        # Which destination ports are knocks: the union of the schemes' ranges,
        # never a protected port.  A byte per port: one index on the packet path.
        ranges = self._v1.knock_ranges()
        for u in self._users.values():
            if u.enabled:
                ranges += self._scheme(u).knock_ranges()
        self._seed_hotp_counters()
        is_knock = bytearray(65536)
        for lo, hi in merge_ranges(ranges):
            is_knock[lo : hi + 1] = b"\x01" * (hi - lo + 1)
        for port in self.s.protect:
            is_knock[port] = 0
        self._is_knock = bytes(is_knock)

    def _seed_hotp_counters(self) -> None:
        """HOTP users start at their configured counter (never below one used)."""
        for u in self._users.values():
            if not self._scheme(u).time_based:
                window = self._window(u.name, HOTP_STEP)
                if window.floor < u.initial_counter:
                    window.merge(CounterWindow(u.initial_counter))

    def _window(self, user: str, step: int) -> CounterWindow:
        window = self._counters.get((user, step))
        if window is None:
            window = self._counters[(user, step)] = CounterWindow()
        return window

    # --- candidates ------------------------------------------------------------

    def _scheme(self, user: User) -> Scheme:
        return user.scheme or self._v1

    def _lookahead(self, user: User) -> int:
        scheme = self._scheme(user)
        if not scheme.has_counter:
            return 0
        return scheme.lookahead if not scheme.time_based else self.s.lookahead

    def _wanted_counters(self, user: User, step: int) -> range:
        """Spent counters just below the floor (remembered to answer replays with
        "behind"), the floor and its look-ahead.  A scheme without counters has one
        sequence a step."""
        scheme = self._scheme(user)
        if not scheme.has_counter:
            return range(1)
        window = self._counters.get((user.name, step))
        floor = window.floor if window is not None else 0
        top = min(floor + self._lookahead(user), MAX_COUNTER)
        return range(max(0, floor - self.s.stale_counters), top + 1)

    def _steps(self, user: User) -> range:
        if not self._scheme(user).time_based:
            return range(HOTP_STEP, HOTP_STEP + 1)
        skew = self.s.skew_steps
        return range(max(0, self._step - skew, self._pruned_through + 1), self._step + skew + 1)

    def _derive(self, user: User, step: int, counter: int) -> array[int]:
        return array("H", self._scheme(user).derive(user.secret, step, counter))

    def _rebuild(self) -> None:
        """Make the candidate set exactly the wanted one (keeping what is staged for
        the coming step); rebuild the start index.  Cost: every candidate -- used
        when users or the clock change, not at an ordinary step change (_advance)."""
        wanted = {
            (u.name, t, c)
            for u in self._users.values()
            if u.enabled
            for t in self._steps(u)
            for c in self._wanted_counters(u, t)
        }
        staged = self._live_hi + 1
        for key in [k for k in self._by_key if k not in wanted]:
            user = self._users.get(key[0])
            if (
                key[1] == staged
                and user is not None
                and user.enabled
                and key[2] in self._wanted_counters(user, staged)
            ):
                continue
            del self._candidates[self._by_key.pop(key)]
        self._retiring.clear()
        for key in sorted(wanted - self._by_key.keys()):
            self._add_candidate(*key, index=False)
        self._near = {}
        self._near_map = bytearray(65536)
        for cand in self._candidates.values():
            self._index(cand)

    def _advance(self) -> None:
        """The window moved one step: its new last step goes live (its candidates
        were normally staged by tick() already), its old first step is retired
        (unindexed a chunk at a time by tick(); until then it is not live).  Costs a
        scan of the candidate keys, not a rebuild of the index."""
        hi, lo = self._live_hi, self._live_lo
        for user in self._users.values():
            if user.enabled and self._scheme(user).time_based:
                for counter in self._wanted_counters(user, hi):
                    if (user.name, hi, counter) not in self._by_key:
                        self._add_candidate(user.name, hi, counter)
        self._retiring.extend(k for k in self._by_key if HOTP_STEP < k[1] < lo)

    def _live(self, cand: Candidate) -> bool:
        """Is the candidate's step inside the window (staged and retiring ones
        are indexed but not live)?"""
        step = cand.step
        return step == HOTP_STEP or self._live_lo <= step <= self._live_hi

    def _add_candidate(self, user: str, step: int, counter: int, *, index: bool = True) -> None:
        cand = Candidate(
            self._next_cid, user, step, counter, self._derive(self._users[user], step, counter)
        )
        self._next_cid += 1
        self._candidates[cand.cid] = cand
        self._by_key[(user, step, counter)] = cand.cid
        if index:
            self._index(cand)

    def _refresh(self, user: User, step: int, had: range) -> None:
        """Candidates of one (user, step) after its counter moved: ``had`` is what
        :meth:`_wanted_counters` gave before (the candidates that exist)."""
        wanted = self._wanted_counters(user, step)
        for counter in wanted:
            if counter not in had:
                self._add_candidate(user.name, step, counter)
        for counter in had:
            if counter not in wanted:
                self._remove_candidate(user.name, step, counter)

    def _remove_candidate(self, user: str, step: int, counter: int) -> None:
        cid = self._by_key.pop((user, step, counter), None)
        if cid is None:
            return
        cand = self._candidates.pop(cid)
        for port in cand.ports[: self.s.reorder_window + 2]:
            near = self._near.get(port)
            if near is not None:
                near.pop(cid, None)
                if not near:
                    del self._near[port]
                    self._near_map[port] = 0

    def _index(self, cand: Candidate) -> None:
        # A bitmask of positions: some schemes repeat a port within a sequence.
        for pos, port in enumerate(cand.ports[: self.s.reorder_window + 2]):
            self._near_map[port] = 1
            near = self._near.setdefault(port, {})
            near[cand.cid] = near.get(cand.cid, 0) | (1 << pos)

    def _roll(self, wall: float) -> None:
        old = self._step
        self._set_step(wall)
        if self._step == old + 1:
            self._advance()
        else:  # a clock step (forwards or back): start over
            self._rebuild()

    def _set_step(self, wall: float) -> None:
        length = self.s.params.step_seconds
        self._step = step_of(wall, length)
        self._step_start = self._step * length
        self._step_end = self._step_start + length
        self._live_lo = max(0, self._step - self.s.skew_steps, self._pruned_through + 1)
        self._live_hi = self._step + self.s.skew_steps
        self._high_step = max(self._high_step, self._live_hi)

    def _prune_windows(self) -> list[Event]:
        """Forget counter windows of steps long gone (RETAIN_STEPS below the highest
        step ever live, or the oldest beyond MAX_WINDOWS); every step at or below a
        pruned one is dead for good (see _steps).  And say so, once, when the clock
        stands in such a step."""
        events: list[Event] = []
        cutoff = self._high_step - RETAIN_STEPS
        timed = [k for k in self._counters if k[1] != HOTP_STEP]
        doomed = [k for k in timed if k[1] < cutoff]
        if len(timed) - len(doomed) > MAX_WINDOWS:
            keep = sorted((k for k in timed if k[1] >= cutoff), key=lambda k: k[1])
            doomed += keep[: len(keep) - MAX_WINDOWS]
        if doomed:
            self._pruned_through = max(self._pruned_through, *(k[1] for k in doomed))
            for k in doomed:
                del self._counters[k]
            self._live_lo = max(self._live_lo, self._pruned_through + 1)
        behind = self._step - self.s.skew_steps <= self._pruned_through
        if behind and not self._gap_reported:
            events.append(
                Event(
                    EventKind.REPLAY_STATE_GAP,
                    b"",
                    reason=f"the clock (step {self._step}) stands where replay state was "
                    f"pruned (through step {self._pruned_through}): knocks for those steps "
                    "are refused until the clock passes it -- check the system clock",
                    code="clock_behind_replay_state",
                )
            )
        self._gap_reported = behind
        return events

    # --- time ------------------------------------------------------------------

    def tick(self, wall: float, mono: float, budget: int = 256) -> list[Event]:
        """Housekeeping between packets: step change, expiry, staging the next
        step's candidates and retiring the last one's.

        ``budget`` bounds the candidates staged and the candidates retired in one
        call, so the caller's packet loop never stalls for long.  Call it a few
        times a second.
        """
        if not self._step_start <= wall < self._step_end:
            self._roll(wall)
        events: list[Event] = []
        if self._pruned_at != self._step:
            self._pruned_at = self._step
            events += self._prune_windows()
        self._expire(mono)
        retire = budget
        while retire > 0 and self._retiring:
            self._remove_candidate(*self._retiring.pop())
            retire -= 1
        step_len = self.s.params.step_seconds
        if self._step_end - wall <= max(2.0, step_len / 3):
            self._stage(budget)
        return events

    def _stage(self, budget: int) -> None:
        """Derive and index up to ``budget`` candidates of the step that enters the
        window at the next step change."""
        upcoming = self._live_hi + 1
        if self._stage_step != upcoming:
            self._stage_step = upcoming
            self._stage_todo = [
                u.name for u in self._users.values() if u.enabled and self._scheme(u).time_based
            ]
        todo = self._stage_todo
        while budget > 0 and todo:
            user = self._users.get(todo.pop())
            if user is None or not user.enabled:
                continue
            for counter in self._wanted_counters(user, upcoming):
                if (user.name, upcoming, counter) not in self._by_key:
                    self._add_candidate(user.name, upcoming, counter)
                    budget -= 1

    def _expire(self, mono: float) -> None:
        timeout = self.s.sequence_timeout
        for key in [k for k, src in self._sources.items() if mono - src.last > timeout]:
            del self._sources[key]

    # --- the packet path -------------------------------------------------------

    def decide(self, src: bytes, dst: bytes, port: int, wall: float, mono: float) -> Decision:
        """The verdict for one new TCP SYN from ``src`` to ``dst``:``port``.

        ``src`` and ``dst`` are packed addresses (4 or 16 bytes, same family).
        """
        return self.decide_key(src + dst, port, wall, mono)

    def decide_key(self, key: bytes, port: int, wall: float, mono: float) -> Decision:
        """:meth:`decide` with source and destination already joined (the parser
        slices them out of the IP header in one piece)."""
        if not self._step_start <= wall < self._step_end:
            self._roll(wall)
        if self._is_knock[port]:
            source = self._sources.get(key)
            if source is None:
                # The fast paths.  A knock from an untracked source that begins no
                # candidate changes nothing; one that does is remembered in its
                # source's slot (see _start_pair), unless the slot already holds an
                # earlier knock of that source to pair it with.
                if not self._near_map[port]:
                    return DROP_SILENT
                h = hash(key)
                i = (h & self._recent_mask) * _SLOT
                recent = self._recent
                ms = int(mono * 1000)
                if recent[i] != h or ms - recent[i + 1] > self._timeout_ms:
                    recent[i] = h
                    recent[i + 1] = ms
                    recent[i + 2] = port
                    return DROP_SILENT
                if recent[i + 2] >> _TRIES_SHIFT > self.s.stray_budget:
                    return DROP_SILENT  # this source spent its stray budget: ignored
            return self._knock(key, source, port, wall, mono)
        return DROP_SILENT

    def _knock(
        self, key: bytes, source: Source | None, port: int, wall: float, mono: float
    ) -> Decision:
        events: list[Event] = []
        matched = False
        if source is not None:
            self._sources.move_to_end(key)
            matched = self._continue(key, source, port, wall, mono, events)
        if not matched and self._near_map[port]:
            matched = self._start_pair(key, source, port, wall, mono, events)
            source = self._sources.get(key)
        if source is not None:
            source.last = mono
            if not matched:
                source.strays += 1
                if source.strays > self.s.stray_budget:
                    if source.progress:
                        events.append(
                            Event(
                                EventKind.PROGRESS_RESET,
                                *_split(key),
                                None,
                                port,
                                "stray budget spent",
                            )
                        )
                    # Forget the source entirely: it returns to the fast path, and
                    # only a new pair of fitting knocks can track it again.
                    del self._sources[key]
        return Decision(Verdict.DROP, tuple(events)) if events else DROP_SILENT

    def _continue(
        self,
        key: bytes,
        source: Source,
        port: int,
        wall: float,
        mono: float,
        events: list[Event],
    ) -> bool:
        """Advance the source's started candidates; True when the knock fit one."""
        matched = False
        window = self.s.reorder_window
        for cid, prog in list(source.progress.items()):
            cand = self._candidates.get(cid)
            if (
                cand is None
                or not self._live(cand)
                or mono - prog.started > self.s.sequence_timeout
            ):
                del source.progress[cid]  # step rolled past it, user gone, or too slow
                continue
            ports = cand.ports
            if port not in ports:
                continue
            pos = _first_free(ports, port, prog)
            if pos < 0:
                matched = True  # duplicate: a retransmitted SYN
                continue
            if pos > prog.next + window:
                continue
            matched = True
            prog.mask |= 1 << pos
            while (prog.mask >> prog.next) & 1:
                prog.next += 1
            if prog.next == len(ports):
                del source.progress[cid]
                events.extend(self._complete(key, source, cand, wall, mono))
            else:
                events.append(self._progress_event(key, cand, port, prog.next))
        return matched

    def _start_pair(
        self,
        key: bytes,
        source: Source | None,
        port: int,
        wall: float,
        mono: float,
        events: list[Event],
    ) -> bool:
        """Start candidates that this knock and an earlier unmatched one both begin.

        One knock alone never creates per-source state: with many users almost every
        port begins some candidate.  The last few unmatched knocks of each source
        live in a fixed-size, direct-mapped table instead (``_recent*``, keyed by
        the source's randomised hash: an attacker cannot aim at a client's slot),
        and a candidate starts when two of its first ``W + 2`` ports arrived in an
        order the reorder window allows.  A flood can overwrite a client's slot
        between its first two knocks; the chance is (flood rate x gap) / slots.
        """
        h = hash(key)
        i = (h & self._recent_mask) * _SLOT
        recent = self._recent
        ms = int(mono * 1000)
        here = self._near[port]
        started = False
        if recent[i] == h and ms - recent[i + 1] <= self._timeout_ms:
            word = recent[i + 2]
            packed = word & _RECENT_MASK
            window = self.s.reorder_window
            while packed:
                earlier, packed = packed & 0xFFFF, packed >> 16
                there = self._near.get(earlier)
                if there is None or here.keys().isdisjoint(there):
                    continue  # the usual case, decided without allocating a set
                for cid in there.keys() & here.keys():
                    # Position bitmasks.  The first-arrived knock must lie within the
                    # window of position 0; the second within the window of what the
                    # first advanced to, at another position (a repeated port counts
                    # only where the sequence repeats it).
                    first_mask = there[cid]
                    first = (first_mask & -first_mask).bit_length() - 1
                    rest = here[cid] & ~(1 << first)
                    second = (rest & -rest).bit_length() - 1
                    if first > window or second < 0 or second > (first == 0) + window:
                        continue
                    cand = self._candidates[cid]
                    if not self._live(cand):
                        continue  # staged for the next step, or retiring
                    if source is None:
                        source = self._new_source(key, mono, events)
                    if cid in source.progress:
                        continue
                    self._start(source, cand, first, second, wall, mono, key, events)
                    started = True
            # Keep the newest _RECENT knocks (ports are never 0, so 0 means empty) and
            # count the attempts that started nothing: past the stray budget the
            # source's knocks are ignored until its slot expires, so a flood from a
            # few addresses costs what a flood from new ones does.
            tries = min((word >> _TRIES_SHIFT) + (not started), _TRIES_CAP)
            recent[i + 2] = (tries << _TRIES_SHIFT) | (((word << 16) | port) & _RECENT_MASK)
        else:
            recent[i] = h
            recent[i + 1] = ms
            recent[i + 2] = port
        return started

    def _progress_event(self, key: bytes, cand: Candidate, port: int, nxt: int) -> Event:
        return Event(
            EventKind.KNOCK_PROGRESS,
            *_split(key),
            cand.user,
            port,
            f"{nxt}/{len(cand.ports)}",
        )

    def _new_source(self, key: bytes, mono: float, events: list[Event]) -> Source:
        source = Source(last=mono)
        self._sources[key] = source
        if len(self._sources) > self.s.max_sources:
            old_key, _ = self._sources.popitem(last=False)
            events.append(
                Event(
                    EventKind.SOURCE_EVICTED,
                    *_split(old_key),
                    None,
                    None,
                    "source table full",
                )
            )
        return source

    def _start(
        self,
        source: Source,
        cand: Candidate,
        first: int,
        second: int,
        wall: float,
        mono: float,
        key: bytes,
        events: list[Event],
    ) -> None:
        progress = source.progress
        if len(progress) >= self.s.max_progress_per_source:
            # Evict the least advanced (then oldest) progress: a real client's
            # sequence advances, random starts do not.
            victim = min(progress, key=lambda c: (progress[c].next, progress[c].started))
            del progress[victim]
        prog = Progress(started=mono, mask=(1 << first) | (1 << second))
        while (prog.mask >> prog.next) & 1:
            prog.next += 1
        progress[cand.cid] = prog
        if prog.next == len(cand.ports):  # a two-port sequence
            del progress[cand.cid]
            events.extend(self._complete(key, source, cand, wall, mono))

    def _complete(
        self, key: bytes, source: Source, cand: Candidate, wall: float, mono: float
    ) -> list[Event]:
        """A source completed a candidate: claim its counter here (a replay right
        behind it is stale already) and hand the access to the gate, or -- counter
        spent -- mark the source behind."""
        source.strays = 0
        user = self._users.get(cand.user)
        if user is None or not user.enabled:
            return []
        window = self._window(cand.user, cand.step)
        lookahead = self._lookahead(user)
        if not window.claimable(cand.counter, lookahead):
            return self.gate.stale(
                key,
                cand.user,
                mono,
                f"counter {cand.counter} of step {cand.step} already used "
                f"(next {window.floor}): replay or a client behind",
                "counter_spent",
            )
        had = self._wanted_counters(user, cand.step)
        window.claim(cand.counter, lookahead)
        self._refresh(user, cand.step, had)
        src, dst = _split(key)
        events = [
            Event(
                EventKind.SEQUENCE_COMPLETED,
                src,
                dst,
                cand.user,
                None,
                f"step {cand.step} counter {cand.counter}",
                "sequence_completed",
            )
        ]
        claim = CounterClaim(cand.user, cand.step, cand.counter, lookahead)
        access = Access(cand.user, src, dst, claim, "knock", origin=src)
        events += self.gate.earn(access, wall, mono)
        return events

    def note_spent(self, user: str, step: int, counter: int) -> None:
        """A counter was spent elsewhere (another worker or gateway, as the state
        store reports): this copy agrees from now on."""
        u = self._users.get(user)
        if u is None:
            return
        had = self._wanted_counters(u, step)
        self._window(user, step).mark_spent(counter)
        self._refresh_if_indexed(u, step, had)

    def merge_window(self, user: str, step: int, window: CounterWindow) -> None:
        """Merge what another copy knows was spent in (user, step)."""
        u = self._users.get(user)
        if u is None:
            return
        had = self._wanted_counters(u, step)
        self._window(user, step).merge(window)
        self._refresh_if_indexed(u, step, had)

    def _refresh_if_indexed(self, user: User, step: int, had: range) -> None:
        """Refresh the candidates of (user, step) if that step has candidates at all
        (live, or staged for the next step); other steps are just counters."""
        if step == HOTP_STEP or self._live_lo <= step <= self._live_hi + 1:
            self._refresh(user, step, had)

    # --- introspection and persistence ----------------------------------------

    def counters(self) -> dict[str, dict[int, int]]:
        """user -> step -> floor (the lowest counter not spent)."""
        out: dict[str, dict[int, int]] = {}
        for (user, step), window in self._counters.items():
            out.setdefault(user, {})[step] = window.floor
        return out

    def windows(self) -> list[tuple[str, int, CounterWindow]]:
        return [(u, t, w) for (u, t), w in sorted(self._counters.items()) if w.floor]

    def replay_horizon(self) -> tuple[int, int]:
        """(highest step ever live, highest step whose replay state was pruned)."""
        return self._high_step, self._pruned_through

    def tracked_sources(self) -> int:
        return len(self._sources)

    def restore_counters(
        self, windows: Iterable[tuple[str, int, CounterWindow]], high_step: int, pruned: int
    ) -> int:
        """Merge stored counter windows (validated by the store) into this copy; windows
        of users unknown here are dropped.  Returns how many were taken."""
        taken = 0
        for user, step, window in windows:
            if user in self._users:
                self._window(user, step).merge(window)
                taken += 1
        self._pruned_through = max(self._pruned_through, pruned)
        self._high_step = max(self._high_step, high_step)
        self._live_lo = max(self._live_lo, self._pruned_through + 1)
        self._rebuild()
        return taken
