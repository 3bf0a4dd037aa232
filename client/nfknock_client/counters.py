"""Which counter to knock next: the client's counter bookkeeping.  Sans-IO.

Theory of operation
-------------------
The server accepts, per (user, step), a *window* of counters, each usable once in any
order: counter c opens iff ``floor <= c <= floor + lookahead`` and c is unused; the
floor moves over used counters (README "Counter rule"; ``[knock] lookahead``, 2 by
default).  A server without the window (before it, ``lookahead`` 0 for v1) accepts
only ``c == floor``.  A completed sequence whose counter is used or below the floor
is *stale*: the server resets the next connection to the protected port ("behind").

The client cannot see the floor.  Per profile it keeps, for the latest step only
(:class:`StepRecord`):

* ``sent`` -- counters knocked but never confirmed (their knocks may have been lost);
* ``used`` -- counters confirmed used: the door opened after them, or the server
  reset the probe after them.

``fresh = 1 + max(sent | used)`` (0 in a new step; for HOTP schemes never below the
profile's ``counter``).  A knock without a probe (plain ``knock``, ``--exec``) uses
``fresh`` and records it as sent: nothing confirms it, so the next knock takes the
next counter -- within the server's window that still opens when this one was lost.

With a probe (``--check``, ``--pipe``) the :class:`Planner` runs *rounds*, one per
step.  A round starts with ``p = fresh`` (or ``--counter``) and reacts to each
probe outcome:

    ========  =============================================================
    outcome   next action
    ========  =============================================================
    open      done (p is used)
    reset     p is used; knock the new ``fresh`` at once (at most
              ``max_resync`` resets per invocation, then exit 3)
    timeout   retry at once, the first of these not tried yet this round:
              1. p again -- its knocks may simply have been lost;
              2. the lowest counter below p sent in this step and never
                 confirmed -- a server without the window accepts nothing
                 above its floor, and that counter may be the floor;
              3. p + 1 -- within a window server's look-ahead when an
                 earlier counter never arrived (first round only);
              none left: wait for the next step and run one more round
              (time-based schemes; the last round ends in exit 1)
    ========  =============================================================

A counter already confirmed used is never knocked again.  When the wall clock
crosses into another step during a round, the next knock starts the next round at
once (the derived sequences follow the step).  Schemes without counters
(livingstone) have one sequence a step: a reset means it was used, so the next
round is the next step.  HOTP schemes (kommen) have no steps: their round ends in
exit 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import Enum

MAX_RESYNC = 8  # resets answered per invocation before giving up (exit 3)
# Counters beyond these are refused: v1 derives counter c with c chained HMACs, so
# a huge saved or given counter would hang the client (HOTP counters cost nothing).
MAX_STEP_COUNTER = 65535
MAX_HOTP_COUNTER = (1 << 63) - 1
# The record keeps at most this many counters of a step (the highest ones).
MAX_KEPT = 256
# How far into the next step a fallback round starts (clock jitter).
STEP_MARGIN = 0.05


class Outcome(Enum):
    OPEN = "open"  # the probe connected
    BEHIND = "behind"  # the probe was reset: that counter is used
    TIMEOUT = "timeout"  # no answer


@dataclass(frozen=True)
class StepRecord:
    """What this client knows about one profile's counters in one step."""

    step: int
    sent: frozenset[int] = frozenset()  # knocked, never confirmed
    used: frozenset[int] = frozenset()  # confirmed used (opened, or reset after)

    def fresh(self, floor: int = 0) -> int:
        known = self.sent | self.used
        return max(max(known) + 1, floor) if known else floor

    def with_sent(self, counter: int) -> StepRecord:
        if counter in self.used:
            return self
        return replace(self, sent=_bounded(self.sent | {counter}))

    def with_used(self, counter: int) -> StepRecord:
        return replace(self, sent=self.sent - {counter}, used=_bounded(self.used | {counter}))

    def unconfirmed_below(self, counter: int) -> list[int]:
        return sorted(c for c in self.sent if c < counter)


def _bounded(counters: frozenset[int]) -> frozenset[int]:
    if len(counters) <= MAX_KEPT:
        return counters
    return frozenset(sorted(counters)[-MAX_KEPT:])


@dataclass(frozen=True)
class Knock:
    """Send the sequence of (step, counter), then probe (if the mode probes)."""

    step: int
    counter: int
    why: str  # "fresh", "given", "resend", "unconfirmed", "ahead", "resync", "next step"


@dataclass(frozen=True)
class Wait:
    """Nothing opened in this step: sleep until ``until`` (Unix time), then resume."""

    until: float


class Done(Enum):
    OPENED = "opened"
    RESYNC_EXHAUSTED = "resync exhausted"  # too many resets (exit 3)
    STEP_USED = "step used"  # no-counter scheme: the sequence was used twice (exit 3)
    NO_ANSWER = "no answer"  # every retry timed out (exit 1)


Action = Knock | Wait | Done


@dataclass
class _Round:
    step: int
    primary: int
    sends: dict[int, int] = field(default_factory=dict)  # counter -> knocks this round
    last: int = 0  # the counter of the last knock


@dataclass
class Planner:
    """One invocation's decisions.  Give it the record of the step it asks about
    (the caller keeps the records, under the profile's lock) and the wall time."""

    time_based: bool = True
    has_counter: bool = True
    step_length: int = 30
    floor: int = 0  # HOTP: the profile's starting counter
    given: int | None = None  # --counter: the first knock's counter
    max_resync: int = MAX_RESYNC
    max_rounds: int = 2
    resyncs: int = 0
    rounds: int = 0
    _round: _Round | None = None

    def step_of(self, wall: float) -> int:
        return int(wall // self.step_length) if self.time_based else -1

    def start(self, wall: float, record: StepRecord) -> Knock:
        """The first knock of a round in the step of ``wall``."""
        step = self.step_of(wall)
        self.rounds += 1
        if not self.has_counter:
            counter, why = 0, "fresh"
        elif self.given is not None:
            counter, why, self.given = self.given, "given", None
        else:
            counter, why = self._fresh(record, step), "fresh"
        self._round = _Round(step, counter)
        return self._knock(counter, "next step" if self.rounds > 1 else why)

    def after(self, outcome: Outcome, wall: float, record: StepRecord) -> Action:
        """The next action after the probe of the last knock answered ``outcome``.
        ``record`` already holds that outcome (the counter sent, or used)."""
        rnd = self._current
        if outcome is Outcome.OPEN:
            return Done.OPENED
        if outcome is Outcome.BEHIND:
            self.resyncs += 1
            if self.resyncs >= self.max_resync:
                return Done.RESYNC_EXHAUSTED
            if not self.has_counter:  # the one sequence of this step is used
                return self._next_step(Done.STEP_USED)
            if self.step_of(wall) != rnd.step:
                return self._next_step(Done.RESYNC_EXHAUSTED, wall, record)
            rnd.primary = self._fresh(record, rnd.step)
            return self._knock(rnd.primary, "resync")
        if self.step_of(wall) != rnd.step:  # crossed into another step meanwhile
            return self._next_step(Done.NO_ANSWER, wall, record)
        for counter, why in self._retries(rnd, record):
            if counter not in record.used and rnd.sends.get(counter, 0) < 2:
                if why != "resend" and counter in rnd.sends:
                    continue  # each counter is knocked at most twice, resent once
                return self._knock(counter, why)
        return self._next_step(Done.NO_ANSWER)

    def resume(self, wall: float, record: StepRecord) -> Knock:
        """After a :class:`Wait`: the next round."""
        return self.start(wall, record)

    # --- internals ---------------------------------------------------------------

    @property
    def _current(self) -> _Round:
        if self._round is None:
            raise RuntimeError("Planner.start() must come first")
        return self._round

    def _retries(self, rnd: _Round, record: StepRecord) -> list[tuple[int, str]]:
        p = rnd.primary
        out = [(p, "resend")]
        if self.has_counter:
            below = [c for c in record.unconfirmed_below(p) if c not in rnd.sends]
            out += [(c, "unconfirmed") for c in below[:1]]
            if self.rounds == 1 and p + 1 <= self._max_counter():
                out.append((p + 1, "ahead"))
        return out

    def _next_step(
        self, final: Done, wall: float | None = None, record: StepRecord | None = None
    ) -> Action:
        rnd = self._current
        if not self.time_based or self.rounds >= self.max_rounds:
            return final
        if wall is not None and record is not None:  # already in a later step
            return self.start(wall, record)
        return Wait((rnd.step + 1) * self.step_length + STEP_MARGIN)

    def _fresh(self, record: StepRecord, step: int) -> int:
        floor = self.floor if not self.time_based else 0
        if record.step != step:
            return floor
        return record.fresh(floor)

    def _max_counter(self) -> int:
        return MAX_STEP_COUNTER if self.time_based else MAX_HOTP_COUNTER

    def _knock(self, counter: int, why: str) -> Knock:
        rnd = self._current
        rnd.sends[counter] = rnd.sends.get(counter, 0) + 1
        rnd.last = counter
        return Knock(rnd.step, counter, why)
