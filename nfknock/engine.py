"""The knock engine: knock SYNs in, verdicts and events out.  Sans-IO.

Theory of operation
-------------------
The engine sees the first SYN of each new TCP connection to the knock range.  It
never reads a clock: every call gets ``wall`` (Unix time, for TOTP steps) and
``mono`` (monotonic time, for expiry).  It never logs: it returns
:class:`~nfknock.events.Event` values.  Knocks are always DROPped, the completing
one too; protected ports are decided by :mod:`nfknock.core` and
:mod:`nfknock.grants`.

*Candidates.*  For every enabled user, every step ``T-s .. T+s`` (``skew_steps``
s; HOTP schemes have one pseudo-step, :data:`HOTP_STEP`) and every counter
``floor - stale_counters .. floor + lookahead`` of that (user, step), the engine
holds a candidate: the sequence that user knocks with that counter.  They are
stored compactly in :mod:`nfknock.candidates` (prefixes only; full sequences on
first use) with a start index per step.  A step change costs the packet path
almost nothing: :meth:`Engine.tick` builds the next step's candidates ahead of
time (*staged*: indexed but not live until the step enters the window), a share
per call that grows with the users left and shrinks with the time left before
the boundary; the step that leaves the window drops its whole index at once (a
tick() empties it later, for the next step to reuse).

*Sources.*  Progress is tracked per (source address, destination address) -- a
"source" below; with grant prefixes, per (source prefix, destination): see
*Prefixes* -- in two tiers, so that random traffic creates no per-source
objects and a flood packet costs one dictionary lookup and one store:

* tier 0 (``_seen``): key -> a source's first knock (its port), or its first
  :data:`SEEN_KNOCKS` while none of them can begin a candidate with another.  It
  is renewed by generations: when it holds more than ``max_sources / 2`` entries,
  or after ``sequence_timeout`` (a deadline folded into the packet path's one clock
  check).  The previous generation is read when a source is promoted, so a first
  knock survives one turn (a two-port sequence whose knocks straddle a turn does
  not: it is retried).  When few ports can begin a candidate, knocks at the others
  are not even stored (``near``).
* tier 1: a :class:`Source` record, created when a knock can begin a candidate with
  an earlier one (checked against the start index in C, no allocation) or when a
  source sends more knocks than tier 0 keeps.  It is kept in ``_seen`` too, so one
  lookup finds either.  It remembers the source's recent knocks that advanced
  nothing (up to :data:`MEMORY`, each for ``sequence_timeout``) and its progress.

*Starting* (the start rule of :mod:`nfknock.candidates`): a candidate starts when
its first port and one of its next ``W + 1`` ports (``W`` = ``reorder_window``)
are among a source's remembered knocks and the knock at hand; every prefix
port remembered is credited at once.  Several sequences knocked from one
address at once (parallel sessions, users behind one NAT address) interleave
freely: each starts from its own knocks however many others lie between.

*Progress.*  Each source has, per candidate it has started, ``next`` (the first
position not yet received) and a bitmask of received positions.  The
transitions of a knock at position ``p`` of a candidate the source has started:

    ===========================  ====================================================
    condition                    effect
    ===========================  ====================================================
    p < next or bit p set        duplicate (a SYN retransmission): no stray
    next <= p <= next + W        bit p set; next advances over received positions
    p > next + W                 not this candidate
    next == L                    completed: a claimable counter -> an Access for
                                 the gate (grants.py, gate.py); a spent one -> the
                                 source is marked "behind" (REJECT on protected
                                 ports)
    older than sequence_timeout  progress discarded
    ===========================  ====================================================

A knock that advances no candidate is remembered (it may begin one later,
possibly together with others still to come).  One that neither advances nor
duplicates nor starts anything is *stray*; past ``stray_budget`` strays the source's progress
and memory are dropped and its knocks ignored for ``sequence_timeout``: a flood
from one address costs a dictionary lookup per packet.  Sequences may repeat a
port (compatibility schemes): a knock takes the first position holding its port
that is not received yet.  Anything the tables do not cover ends in DROP.

*Counters.*  Which counters of a (user, step) may still open follows the window
rule of :mod:`nfknock.counters`: a completion claims its counter locally at once (a
replay right behind it is stale here already) and hands an :class:`~nfknock.gate.Access`
to the gate, which makes it exactly-once across processes and gateways.  Windows
(:mod:`nfknock.windows`) outlive their step (bounded), so a clock stepped forward and
back finds the counters it spent; a step whose window was pruned never goes live
again (``replay_state_gap``).

*Prefixes.*  Before the engine knows whose sequence a knock belongs to it cannot
use that user's grant prefix (:mod:`nfknock.prefixes`), so it keys progress by the
widest prefix any enabled user has, per family: a phone whose address rotates
mid-sequence keeps its progress -- and everyone in that prefix shares its progress,
stray budget and memory.  The grant is still for the completing user's own prefix of
the *real* source (the gate masks it; the engine hands it the unmasked address).
With no prefix configured (/32 and /128) nothing is masked: :meth:`decide_key` is the
class's own method; with one, an instance attribute puts :meth:`_decide_masked` in
front of it (one mask of the key per knock).  Events about a knock name its real
source; those about the progress table (``progress_reset``, ``source_evicted``) name
the prefix's first address.

*ISN knocks.*  Users with ``isn = true`` have no candidates in the table above: a
port-only match would let any ISN advance them.  :mod:`nfknock.isnknock` holds
theirs, by exact (port, ISN) pair, and the service hands every knock's ISN to
:meth:`Engine.decide_isn` -- only while such a user exists (``isn_mode``), so the
knock path of everyone else is unchanged.  Their counters, claims and completions
are the engine's, as for any user.

*Doors.*  A completion of a ``door = "random"`` user earns the door that follows
the sequence in its bit stream (nfknock.door), not the protected ports.

*Bounds.*  Sources (LRU), memory and progress per source, counter windows and
stale candidates all have limits from the configuration.  A clock step (or a step
change the ticks did not prepare) builds at most :data:`SYNC_BUILD` user-steps on
the packet path; the rest follows in :meth:`Engine.tick`, current step first.
"""

from __future__ import annotations

import math
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from nfknock.candidates import HOTP_STEP, CandidateTable, Mac, StepIndex
from nfknock.config import Config, Forward, User
from nfknock.counters import MAX_COUNTER, CounterWindow
from nfknock.events import DROP_SILENT, Decision, Event, EventKind, Verdict
from nfknock.gate import Access, CounterClaim, Gate
from nfknock.grants import split_key
from nfknock.isnknock import IsnTracker
from nfknock.prefixes import key_masks
from nfknock.schemes import V1, Scheme, merge_ranges
from nfknock.sequence import SequenceParams, step_of
from nfknock.windows import WindowStore

__all__ = ["HOTP_STEP", "Engine", "EngineSettings", "Progress", "Source"]

# Counter windows kept (per user and step) after their step left the live window,
# so a clock stepped back finds what was spent: steps this far below the highest
# step ever live (a day of 30 s steps), and at most this many windows in all.
RETAIN_STEPS = 2880
MAX_WINDOWS = 1 << 17
# Knocks a tracked source remembers for starting candidates: room for the first
# knocks of eight interleaved sequences, reordered, with duplicates.
MEMORY = 32
# User-steps (one user's candidates of one step: a few HMACs, 15-20 us) built in
# one call: on the packet path when the live window finds steps unbuilt (a clock
# step, or ticks that did not come); in one tick(), at least (a small user set is
# staged at once) and at most (a tick stays well under 50 ms; 100,000 users take
# about 100 ticks, 25 s of a 30 s step).
SYNC_BUILD = 512
MIN_SHARE = 256
MAX_SHARE = 1024
# Tier 0 holds up to max_sources / 2 sources, within these bounds (~120 bytes each,
# twice: the current and the previous generation; a generation lasts at least this
# many new sources, so a flood of 300,000 SYN/s leaves a client >= 100 ms between its
# first two knocks).
SEEN_MIN = 1 << 15
SEEN_MAX = 1 << 20
SEEN_KNOCKS = 4  # knocks a source may leave in tier 0 before it gets a record
_ALL = [1] * 65536  # the near gate when most ports are near


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
    forwards: tuple[Forward, ...] = ()  # [[door.forward]] (nfknock.door)

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
            forwards=cfg.door.forward,
        )


@dataclass(slots=True)
class Progress:
    started: float
    group: int  # the candidate: its slot's group, step and counter (see _continue)
    step: int
    counter: int
    ports: tuple[int, ...]
    next: int = 0
    mask: int = 0


class Source:
    """A tracked source (tier 1).  ``ports``/``times`` are its remembered knocks,
    oldest first; ``memory`` counts them by port (the start check needs a hashed
    set of them); ``progress`` maps slot -> progress of the candidates it started."""

    __slots__ = ("ignored_until", "last", "memory", "ports", "progress", "strays", "times")

    def __init__(self, last: float, ports: tuple[int, ...] = ()) -> None:
        self.last = last
        self.strays = 0
        self.ignored_until = -math.inf
        self.progress: dict[int, Progress] = {}
        self.ports = array("H", ports)
        self.times = array("d", [last]) * len(ports)
        memory: dict[int, int] = {}
        for p in ports:
            memory[p] = memory.get(p, 0) + 1
        self.memory = memory


def _first_free(ports: tuple[int, ...], port: int, prog: Progress) -> int:
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
        self._v1 = V1(settings.params)
        self._timeout = settings.sequence_timeout
        self._windows = WindowStore()
        # Replay state for steps at or below this was pruned (or lost): they never go
        # live again, whatever the clock says (see _set_step).
        self._pruned_through = -1
        self._high_step = -1  # the highest step ever live
        self._gap_reported = False
        self._pruned_at: int | None = None
        # Tier 0 (module docstring): key -> first knock's port, or -> Source.
        self._seen: dict[bytes, int | tuple[int, ...] | Source] = {}
        self._prev_seen: dict[bytes, int | tuple[int, ...] | Source] = {}
        # New sources per generation; the records carried over do not count.
        self._seen_limit = min(max(settings.max_sources // 2, SEEN_MIN), SEEN_MAX)
        self._seen_cap = self._seen_limit
        self._gen_start = math.inf  # the current generation of tier 0 (mono)
        self._gen_end = math.inf
        self._t_lo = self._t_hi = 0.0  # wall-clock bounds of "nothing to do" (_on_time)
        self._sources: OrderedDict[bytes, Source] = OrderedDict()
        # Builds under way: step -> the next user to build; steps fully built.
        self._cursor: dict[int, int] = {}
        self._built: set[int] = set()
        self._tick_wall: float | None = None
        self._tick_gap = 0.25  # seconds between ticks, as observed
        self._set_step(wall)
        self._set_users_quiet(users)
        self._build_live()

    # --- configuration ----------------------------------------------------------

    @property
    def step(self) -> int:
        return self._step

    @property
    def users(self) -> Mapping[str, User]:
        return self._users

    def set_users(self, users: Iterable[User]) -> None:
        """Replace the user set.  A rekeyed user's counters and sequences are void
        (the grant table is re-checked by the caller: ``GrantTable.retain``); knock
        progress in flight is discarded."""
        old = self._users
        users = list(users)
        for u in users:
            before = old.get(u.name)
            if before is not None and (before.secret, before.scheme) != (u.secret, u.scheme):
                self._windows.forget_user(u.name)
        self._set_users_quiet(users)
        self._build_live()

    def _set_users_quiet(self, users: Iterable[User]) -> None:
        self._users = {u.name: u for u in users}
        self._ulist = list(self._users.values())
        self._uidx = {u.name: i for i, u in enumerate(self._ulist)}
        s = self.s
        self._isn = (
            IsnTracker(
                s.params,
                timeout=s.sequence_timeout,
                stray_budget=s.stray_budget,
                max_sources=s.max_sources,
                max_progress=s.max_progress_per_source,
            )
            if any(u.isn and u.enabled for u in self._ulist)
            else None
        )
        self.isn_mode = self._isn is not None
        self._set_masking()
        # Which destination ports are knocks: the union of the schemes' ranges,
        # never a protected port.  A byte per port: one index on the packet path.
        ranges = self._v1.knock_ranges()
        for scheme in {u.scheme for u in self._ulist if u.enabled and u.scheme is not None}:
            ranges += scheme.knock_ranges()
        is_knock = bytearray(65536)
        for lo, hi in merge_ranges(ranges):
            is_knock[lo : hi + 1] = b"\x01" * (hi - lo + 1)
        for port in self.s.protect:
            is_knock[port] = 0
        self._is_knock = bytes(is_knock)
        self._knock_ports = sum(is_knock)
        self._seed_hotp_counters()
        # With many users nearly every knock port is near some candidate: then the
        # table keeps no near counts (a tenth of the cost of building it).
        residues, prefix = 2 * self.s.skew_steps + 2, self.s.reorder_window + 2
        entries = len(self._ulist) * residues * (1 + self.s.lookahead) * prefix
        self._table = CandidateTable(
            self._ulist,
            self._scheme,
            prefix_len=prefix,
            residues=residues,
            ring=1 + self.s.lookahead,
            track_near=entries < 2 * self._knock_ports,
        )
        self._residues = self._table.residues
        self._live: list[StepIndex] = []
        self._live_version = -1
        self._near_gate = self._table.near
        self._cursor = {}
        self._built = set()
        for source in self._sources.values():
            source.progress.clear()  # its slots mean other candidates now
        self._update_gate()

    def _set_masking(self) -> None:
        """Key knock progress by the widest grant prefix of the enabled users (module
        docstring, *Prefixes*); with none, leave the packet path unmasked."""
        enabled = [u for u in self._ulist if u.enabled]
        v4 = min((u.grant_prefix_v4 for u in enabled), default=32)
        v6 = min((u.grant_prefix_v6 for u in enabled), default=128)
        self._key_masks = key_masks(v4, v6)  # key size -> mask (nfknock.prefixes)
        self._real: bytes | None = None  # the unmasked key of the knock at hand
        if not self._key_masks:
            self.__dict__.pop("decide_key", None)
        else:
            self.__dict__["decide_key"] = self._decide_masked

    def _seed_hotp_counters(self) -> None:
        """HOTP users start at their configured counter (never below one used)."""
        for u in self._ulist:
            if not self._scheme(u).time_based:
                window = self._window(u.name, HOTP_STEP)
                if window.floor < u.initial_counter:
                    window.merge(CounterWindow(u.initial_counter))

    def _window(self, user: str, step: int) -> CounterWindow:
        return self._windows.window(user, step)

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
        window = self._windows.get(user.name, step)
        floor = window.floor if window is not None else 0
        top = min(floor + self._lookahead(user), MAX_COUNTER)
        return range(max(0, floor - self.s.stale_counters), top + 1)

    def _build(self, uidx: int, step: int, mac: Mac | None = None) -> None:
        """Make one user's candidates of one step exactly the wanted ones."""
        user = self._ulist[uidx]
        if user.isn and self._isn is not None:  # by (port, ISN) pair: isnknock.py
            self._isn.sync(uidx, user, step, self._wanted_counters(user, step))
            return
        self._table.build(uidx, step, self._wanted_counters(user, step), mac)

    def _build_live(self) -> None:
        """Build every live step for every user now (construction, new users): user
        by user, so one keyed HMAC serves all of a user's steps."""
        table = self._table
        live = range(self._live_lo, self._live_hi + 1)
        for uidx, user in enumerate(self._ulist):
            if not user.enabled:
                continue
            if self._scheme(user).time_based:
                mac = table.deriver(user).mac(user.secret)
                for step in live:
                    self._build(uidx, step, mac)
            else:
                self._build(uidx, HOTP_STEP)
        self._built = set(live)
        self._cursor = {}
        self._ensure(self._live_hi + 1)
        self._update_gate()

    def _ensure(self, step: int) -> None:
        """Schedule ``step`` to be built (if it is not, and not under way)."""
        if step not in self._built and step not in self._cursor:
            self._cursor[step] = 0

    def _work(self, steps: Iterable[int], budget: int | None) -> int:
        """Build the users of ``steps`` (in that order) from their cursors: at most
        ``budget`` user-steps (None: all).  Returns how many were built."""
        done = 0
        users = self._ulist
        for step in steps:
            cur = self._cursor.get(step)
            if cur is None:
                continue
            n = len(users)
            while cur < n and (budget is None or done < budget):
                user = users[cur]
                if user.enabled and self._scheme(user).time_based:
                    self._build(cur, step)
                    done += 1
                cur += 1
            if cur < n:
                self._cursor[step] = cur
                break
            del self._cursor[step]
            self._built.add(step)
        if done:
            self._update_gate()
        return done

    def _live_order(self) -> list[int]:
        """The live steps, the current one first (what to build first after a jump)."""
        order = [self._step] if self._live_lo <= self._step <= self._live_hi else []
        for d in range(1, self.s.skew_steps + 1):
            order += [t for t in (self._step - d, self._step + d) if self._live_lo <= t]
        return order

    def _drop_outside(self) -> None:
        """Forget every time step outside the live window and the staged step: its
        builds, and its start index (retired: emptied by a later tick(); the slots
        are freed when their groups are rebuilt)."""
        lo, hi = self._live_lo, self._live_hi + 1
        for step in [t for t in self._table.steps if t != HOTP_STEP and not lo <= t <= hi]:
            self._table.retire(step)
            self._live, self._live_version = [], -1
        for step in [t for t in self._cursor if not lo <= t <= hi]:
            del self._cursor[step]
        self._built = {t for t in self._built if lo <= t <= hi}
        if self._isn is not None:
            self._isn.keep_steps(lo, hi)

    def _live_indexes(self) -> list[StepIndex]:
        """The start indexes of the live steps (cached until indexes or the window
        change)."""
        table = self._table
        if self._live_version != table.version:
            steps = table.steps
            live = [steps[t] for t in range(self._live_lo, self._live_hi + 1) if t in steps]
            hotp = steps.get(HOTP_STEP)
            if hotp is not None:
                live.append(hotp)
            self._live, self._live_version = live, table.version
        return self._live

    def _update_gate(self) -> None:
        """Tier 0 stores only knocks at near ports -- unless most are near, when the
        test would cost more than it saves."""
        table = self._table
        dense = not table.track_near or 2 * table.near_ports() > self._knock_ports
        self._near_gate = _ALL if dense else table.near

    # --- time ------------------------------------------------------------------

    def _set_step(self, wall: float) -> None:
        length = self.s.params.step_seconds
        self._step = step_of(wall, length)
        # floats: the packet path compares them with the (float) wall time, and an
        # int-float comparison costs a conversion on every packet
        self._step_start = float(self._step * length)
        self._step_end = self._step_start + length
        self._live_lo = max(0, self._step - self.s.skew_steps, self._pruned_through + 1)
        self._live_hi = self._step + self.s.skew_steps
        self._high_step = max(self._high_step, self._live_hi)
        self._live_version = -1  # recompute _live_indexes

    def _on_time(self, wall: float, mono: float) -> None:
        """The packet path's one clock check failed: a new step, or time to renew
        tier 0 (its deadline is folded into the same wall-clock bounds)."""
        if not self._step_start <= wall < self._step_end:
            self._roll(wall)
        self._renew(wall, mono)

    def _renew(self, wall: float, mono: float) -> None:
        """A new generation of tier 0 when the old one is old (its size is checked
        where it grows); the next check folded into the packet path's clock bounds."""
        if not self._gen_start <= mono < self._gen_end:
            self._turn(mono)
        self._t_lo = self._step_start
        self._t_hi = min(self._step_end, wall + (self._gen_end - mono))

    def _turn(self, mono: float) -> None:
        self._prev_seen = self._seen
        self._seen = dict(self._sources)
        self._seen_cap = len(self._seen) + self._seen_limit
        self._gen_start, self._gen_end = mono, mono + self._timeout

    def _roll(self, wall: float) -> int:
        """The window moved (one step, or a clock step): the step that left drops its
        index (emptied later, in tick()); the live steps must be built
        (normally staged by tick() already -- else up to SYNC_BUILD user-steps now,
        current step first, the rest in tick()); the next step is scheduled for
        staging."""
        self._set_step(wall)
        self._drop_outside()
        for step in self._live_order():
            self._ensure(step)
        self._ensure(self._live_hi + 1)
        return self._work(self._live_order(), SYNC_BUILD)

    def tick(self, wall: float, mono: float, budget: int | None = None) -> list[Event]:
        """Housekeeping between packets: step change, expiry, building the live
        steps after a clock step and staging the next step's candidates.

        Staging takes a share of the users left per call that finishes them before
        the step boundary at the rate tick() is called (observed); ``budget``, if
        given, caps the user-steps built in this call.  Call it a few times a
        second."""
        cap = MAX_SHARE if budget is None else budget
        if not self._step_start <= wall < self._step_end:
            cap -= self._roll(wall)
        self._renew(wall, mono)
        self._drop_outside()
        self._table.bury()
        events: list[Event] = []
        if self._pruned_at != self._step:
            self._pruned_at = self._step
            events += self._prune_windows()
        self._expire(mono)
        if self._isn is not None:
            self._isn.expire(mono)
        if self._tick_wall is not None and 0 < wall - self._tick_wall < 5:
            self._tick_gap = 0.75 * self._tick_gap + 0.25 * (wall - self._tick_wall)
        self._tick_wall = wall
        live = self._live_order()
        if cap > 0 and any(t in self._cursor for t in live):  # catching up after a clock step
            cap -= self._work(live, cap)
        staged = self._live_hi + 1
        self._ensure(staged)
        cur = self._cursor.get(staged)
        if cur is not None and cap > 0:
            step_len = self.s.params.step_seconds
            left = self._step_end - wall - min(2.0, step_len / 4)
            ticks = max(1.0, left / max(self._tick_gap, 0.01))
            share = max(MIN_SHARE, math.ceil((len(self._ulist) - cur) / ticks))
            self._work([staged], min(share, cap))
        return events

    def _prune_windows(self) -> list[Event]:
        """Forget the counter windows of steps long gone (RETAIN_STEPS below the
        highest step ever live; and the oldest steps while there are more than
        MAX_WINDOWS windows); every step at or below a pruned one is dead for good
        (see _set_step).  And say so, once, when the clock stands in such a step.
        Costs the number of distinct steps held, not of windows."""
        events: list[Event] = []
        cutoff = self._high_step - RETAIN_STEPS
        pruned = max(self._pruned_through, self._windows.prune(cutoff, MAX_WINDOWS, HOTP_STEP))
        if pruned != self._pruned_through:
            self._pruned_through = pruned
            self._live_lo = max(self._live_lo, pruned + 1)
            self._live_version = -1
            self._drop_outside()
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

    def _expire(self, mono: float) -> None:
        """Forget sources idle for longer than the timeout (oldest first: the LRU
        order is the order of their last knocks)."""
        sources, timeout = self._sources, self._timeout
        while sources:
            key = next(iter(sources))
            source = sources[key]
            if not mono - source.last > timeout:
                break
            del sources[key]
            self._seen.pop(key, None)

    # --- the packet path -------------------------------------------------------

    def decide(self, src: bytes, dst: bytes, port: int, wall: float, mono: float) -> Decision:
        """The verdict for one new TCP SYN from ``src`` to ``dst``:``port``.

        ``src`` and ``dst`` are packed addresses (4 or 16 bytes, same family).
        """
        return self.decide_key(src + dst, port, wall, mono)

    def decide_key(self, key: bytes, port: int, wall: float, mono: float) -> Decision:
        """:meth:`decide` with source and destination already joined (the parser
        slices them out of the IP header in one piece)."""
        if not self._t_lo <= wall < self._t_hi:
            self._on_time(wall, mono)
        if not self._is_knock[port]:
            return DROP_SILENT
        seen = self._seen
        known = seen.get(key)
        if known is None:
            # The fast path: a source's first knock waits in tier 0 -- if it can begin
            # something (nearly always true with many users: then not even tested).
            if self._near_gate[port]:
                seen[key] = port
                if len(seen) > self._seen_cap:
                    self._turn(mono)
            return DROP_SILENT
        if isinstance(known, Source):
            if known.ignored_until > mono or not (known.progress or self._near_gate[port]):
                return DROP_SILENT  # ignored, or a knock that can neither advance nor begin
            return self._knock(key, known, port, wall, mono, [])
        if not self._near_gate[port]:
            return DROP_SILENT  # begins nothing: the earlier knocks stay
        return self._again(key, known, port, wall, mono)

    def _decide_masked(self, key: bytes, port: int, wall: float, mono: float) -> Decision:
        """:meth:`decide_key` with progress keyed by the masked source; the real key is
        kept for the completion (module docstring, *Prefixes*)."""
        self._real = key
        mask = self._key_masks.get(len(key))
        if mask is not None:
            key = (int.from_bytes(key, "big") & mask).to_bytes(len(key), "big")
        return Engine.decide_key(self, key, port, wall, mono)

    def decide_isn(self, key: bytes, port: int, isn: int, wall: float, mono: float) -> Decision:
        """:meth:`decide_key` for a knock whose ISN is known (``isn_mode``): decided
        for the port-only users as always, then for the ISN users by its exact
        (port, ISN) pair (isnknock.py)."""
        decision = self.decide_key(key, port, wall, mono)
        tracker = self._isn
        # The usual case, two lookups: no candidate has this pair, no ISN progress here.
        if tracker is None or (
            port << 32 | isn not in tracker.pairs and key not in tracker.sources
        ):
            return decision
        done, events = tracker.knock(key, port, isn, self._live_lo, self._live_hi, mono)
        for cand in done:
            events += self._completed(key, cand.uidx, cand.step, cand.counter, wall, mono)
        if not events:
            return decision
        return Decision(Verdict.DROP, decision.events + tuple(events))

    def _again(
        self, key: bytes, known: int | tuple[int, ...], port: int, wall: float, mono: float
    ) -> Decision:
        """A knock from a source whose few earlier knocks wait in tier 0: it becomes a
        record when this knock can begin a candidate with one of them (checked in C,
        without allocating) or when it is one too many to keep there."""
        earlier: tuple[int, ...] = (known,) if isinstance(known, int) else known
        before = self._prev_seen.get(key)  # knocks of the previous generation count too
        if isinstance(before, int):
            candidates: tuple[int, ...] = (before, *earlier)
        elif isinstance(before, tuple):
            candidates = before + earlier
        else:
            candidates = earlier
        if len(candidates) == 1:
            first = candidates[0]
            for idx in self._live_indexes():
                partners = idx.partners.get(port)
                if partners is not None and first in partners:
                    return self._promote(key, earlier, port, wall, mono, 0)
        else:
            ports = set(candidates)
            for idx in self._live_indexes():
                partners = idx.partners.get(port)
                if partners is not None and not ports.isdisjoint(partners):
                    return self._promote(key, earlier, port, wall, mono, 0)
        if len(earlier) >= SEEN_KNOCKS:
            return self._promote(key, earlier, port, wall, mono, len(earlier))
        self._seen[key] = (*earlier, port)
        return DROP_SILENT

    def _promote(
        self,
        key: bytes,
        earlier: tuple[int, ...],
        port: int,
        wall: float,
        mono: float,
        strays: int,
    ) -> Decision:
        """Track a source: its earlier knocks (and any in the previous generation of
        tier 0) become its memory.  ``strays``: how many of them began nothing --
        then so does this knock (it was just checked), which is a stray too."""
        events: list[Event] = []
        before = self._prev_seen.get(key)
        if isinstance(before, int):
            earlier, checked = (before, *earlier), False
        elif isinstance(before, tuple):
            earlier, checked = before + earlier, False
        else:
            checked = True
        source = self._new_source(key, Source(mono, earlier[-MEMORY:]), events)
        source.strays = strays
        if not strays or not checked:
            return self._knock(key, source, port, wall, mono, events)
        self._remember(source, port, mono)
        self._stray(key, source, port, mono, events)
        return Decision(Verdict.DROP, tuple(events)) if events else DROP_SILENT

    def _knock(
        self,
        key: bytes,
        source: Source,
        port: int,
        wall: float,
        mono: float,
        events: list[Event],
    ) -> Decision:
        if source.ignored_until > mono:
            return DROP_SILENT  # spent its stray budget: ignored for a while (see _stray)
        self._sources.move_to_end(key)
        source.last = mono
        advanced = duplicate = False
        if source.progress:
            advanced, duplicate = self._continue(key, source, port, wall, mono, events)
        # A knock that advanced nothing may begin candidates -- unless it duplicates
        # one remembered already (the start rule is symmetric: nothing new).
        if not advanced and (
            (duplicate and port in source.memory)
            or not self._start(key, source, port, wall, mono, events)
        ):
            self._remember(source, port, mono)
            if not duplicate:
                self._stray(key, source, port, mono, events)
        return Decision(Verdict.DROP, tuple(events)) if events else DROP_SILENT

    def _stray(
        self, key: bytes, source: Source, port: int, mono: float, events: list[Event]
    ) -> None:
        source.strays += 1
        if source.strays <= self.s.stray_budget:
            return
        if source.progress:
            events.append(
                Event(
                    EventKind.PROGRESS_RESET,
                    *_split(key),
                    None,
                    port,
                    "stray budget spent",
                    "stray_budget_spent",
                )
            )
        source.progress.clear()
        source.memory.clear()
        del source.ports[:]
        del source.times[:]
        source.strays = 0
        source.ignored_until = mono + self._timeout

    def _continue(
        self,
        key: bytes,
        source: Source,
        port: int,
        wall: float,
        mono: float,
        events: list[Event],
    ) -> tuple[bool, bool]:
        """Advance the source's started candidates: (did the knock advance one, was
        it a duplicate for one)."""
        advanced = duplicate = False
        window, timeout = self.s.reorder_window, self._timeout
        holds, lo, hi = self._table.holds, self._live_lo, self._live_hi
        for slot, prog in list(source.progress.items()):
            step = prog.step
            if (
                mono - prog.started > timeout
                or not (lo <= step <= hi or step == HOTP_STEP)
                or not holds(slot, prog.group, step, prog.counter)
            ):
                del source.progress[slot]  # too slow, step rolled past it, or dropped
                continue
            ports = prog.ports
            if port not in ports:
                continue
            pos = _first_free(ports, port, prog)
            if pos < 0:
                duplicate = True  # a retransmitted SYN
                continue
            if pos > prog.next + window:
                continue
            advanced = True
            prog.mask |= 1 << pos
            while (prog.mask >> prog.next) & 1:
                prog.next += 1
            if prog.next == len(ports):
                del source.progress[slot]
                events.extend(self._complete(key, source, prog, wall, mono))
            else:
                events.append(self._progress_event(key, prog, port))
        return advanced, duplicate

    def _start(
        self,
        key: bytes,
        source: Source,
        port: int,
        wall: float,
        mono: float,
        events: list[Event],
    ) -> bool:
        """Start every live candidate this knock begins with the remembered ones."""
        times = source.times
        if times and mono - times[0] > self._timeout:
            self._purge(source, mono)
        if not times:
            return False
        started = False
        for slot, mask in self._table.starts(port, source.memory, self._live_indexes()):
            if slot not in source.progress:
                self._begin(key, source, slot, mask, wall, mono, events)
                started = True
        return started

    def _begin(
        self,
        key: bytes,
        source: Source,
        slot: int,
        mask: int,
        wall: float,
        mono: float,
        events: list[Event],
    ) -> None:
        progress = source.progress
        if len(progress) >= self.s.max_progress_per_source:
            # Evict the least advanced (then oldest) progress: a real client's
            # sequence advances, random starts do not.
            victim = min(progress, key=lambda c: (progress[c].next, progress[c].started))
            del progress[victim]
        g, step, counter = self._table.identity(slot)
        prog = Progress(mono, g, step, counter, self._table.sequence(slot), mask=mask)
        while (prog.mask >> prog.next) & 1:
            prog.next += 1
        if prog.next == len(prog.ports):  # a two-port sequence
            events.extend(self._complete(key, source, prog, wall, mono))
        else:
            progress[slot] = prog

    def _remember(self, source: Source, port: int, mono: float) -> None:
        """Add a knock to the source's memory (the oldest goes beyond MEMORY)."""
        times = source.times
        if times and (mono - times[0] > self._timeout or len(times) >= MEMORY):
            self._purge(source, mono)
            if len(times) >= MEMORY:
                self._forget_oldest(source)
        source.ports.append(port)
        times.append(mono)
        memory = source.memory
        memory[port] = memory.get(port, 0) + 1

    def _purge(self, source: Source, mono: float) -> None:
        """Forget remembered knocks older than the sequence timeout."""
        times, timeout = source.times, self._timeout
        while times and mono - times[0] > timeout:
            self._forget_oldest(source)

    @staticmethod
    def _forget_oldest(source: Source) -> None:
        old = source.ports.pop(0)
        source.times.pop(0)
        left = source.memory[old] - 1
        if left:
            source.memory[old] = left
        else:
            del source.memory[old]

    def _progress_event(self, key: bytes, prog: Progress, port: int) -> Event:
        return Event(
            EventKind.KNOCK_PROGRESS,
            *_split(self._real or key),
            self._ulist[prog.group // self._residues].name,
            port,
            f"{prog.next}/{len(prog.ports)}",
            "knock_progress",
        )

    def _new_source(self, key: bytes, source: Source, events: list[Event]) -> Source:
        self._sources[key] = source
        self._seen[key] = source
        if len(self._sources) > self.s.max_sources:
            old_key, old = self._sources.popitem(last=False)
            self._seen.pop(old_key, None)
            if old.progress:
                events.append(
                    Event(
                        EventKind.SOURCE_EVICTED,
                        *_split(old_key),
                        None,
                        None,
                        "source table full",
                        "source_table_full",
                    )
                )
        return source

    def _complete(
        self, key: bytes, source: Source, prog: Progress, wall: float, mono: float
    ) -> list[Event]:
        """A source completed a candidate: claim its counter here (a replay right
        behind it is stale already) and hand the access to the gate, or -- counter
        spent -- mark the source behind.  ``key`` may be masked (*Prefixes*): the gate
        gets the real one."""
        key = self._real or key
        source.strays = 0
        return self._completed(
            key, prog.group // self._residues, prog.step, prog.counter, wall, mono
        )

    def _completed(
        self, key: bytes, uidx: int, step: int, counter: int, wall: float, mono: float
    ) -> list[Event]:
        user = self._ulist[uidx]
        if not user.enabled:
            return []
        window = self._window(user.name, step)
        lookahead = self._lookahead(user)
        if not window.claimable(counter, lookahead):
            return self.gate.stale(
                key,
                user.name,
                mono,
                f"counter {counter} of step {step} already used "
                f"(next {window.floor}): replay or a client behind",
                "counter_spent",
            )
        window.claim(counter, lookahead)
        self._build(uidx, step)
        src, dst = _split(key)
        events = [
            Event(
                EventKind.SEQUENCE_COMPLETED,
                src,
                dst,
                user.name,
                None,
                f"step {step} counter {counter}",
                "sequence_completed",
            )
        ]
        claim = CounterClaim(user.name, step, counter, lookahead)
        ports, door = None, None
        if user.door:  # a forwarded door instead of the protected ports (nfknock.door)
            door = self.gate.policy.doors.knock_door(user, step, counter, self.s.params)
            ports = frozenset({door[1]}) if door else frozenset()
        access = Access(
            user.name, src, dst, claim, "knock", origin=src, ports=ports, door=user.door
        )
        events += self.gate.earn(access, wall, mono)
        return events

    # --- counters from elsewhere -------------------------------------------------

    def note_spent(self, user: str, step: int, counter: int) -> None:
        """A counter was spent elsewhere (another worker or gateway, as the state
        store reports): this copy agrees from now on."""
        if user in self._users:
            window = self._window(user, step)
            floor = window.floor
            window.mark_spent(counter)
            if window.floor != floor:
                self._refresh_if_indexed(user, step)

    def merge_window(self, user: str, step: int, window: CounterWindow) -> None:
        """Merge what another copy knows was spent in (user, step)."""
        if user in self._users:
            mine = self._window(user, step)
            floor = mine.floor
            mine.merge(window)
            if mine.floor != floor:
                self._refresh_if_indexed(user, step)

    def _refresh_if_indexed(self, name: str, step: int) -> None:
        """Rebuild the candidates of (user, step) if that step has candidates at all
        (live, or staged for the next step); other steps are just counters."""
        uidx = self._uidx[name]
        in_window = step == HOTP_STEP or self._live_lo <= step <= self._live_hi + 1
        user = self._ulist[uidx]
        if in_window and user.enabled and (step in self._table.steps or user.isn):
            self._build(uidx, step)

    # --- introspection and persistence ----------------------------------------

    def counters(self) -> dict[str, dict[int, int]]:
        """user -> step -> floor (the lowest counter not spent)."""
        return self._windows.floors()

    def windows(self) -> list[tuple[str, int, CounterWindow]]:
        return self._windows.spent()

    def replay_horizon(self) -> tuple[int, int]:
        """(highest step ever live, highest step whose replay state was pruned)."""
        return self._high_step, self._pruned_through

    def tracked_sources(self) -> int:
        """Sources with state beyond a single knock."""
        return len(self._sources)

    def restore_counters(
        self, windows: Iterable[tuple[str, int, CounterWindow]], high_step: int, pruned: int
    ) -> int:
        """Merge stored counter windows (validated by the store) into this copy; windows
        of users unknown here are dropped.  Returns how many were taken."""
        taken = 0
        moved: list[tuple[str, int]] = []
        for user, step, window in windows:
            if user in self._users:
                mine = self._window(user, step)
                floor = mine.floor
                mine.merge(window)
                taken += 1
                if mine.floor != floor:
                    moved.append((user, step))
        self._pruned_through = max(self._pruned_through, pruned)
        self._high_step = max(self._high_step, high_step)
        self._live_lo = max(self._live_lo, self._pruned_through + 1)
        self._live_version = -1
        self._drop_outside()
        for user, step in moved:
            self._refresh_if_indexed(user, step)
        self._update_gate()
        return taken
