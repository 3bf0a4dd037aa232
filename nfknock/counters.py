"""The counter rule: which knock sequences of a (user, step) may still open.  Sans-IO.

Every knock sequence is derived from (secret, step, counter).  Per (user, step) there
is a **floor**: every counter below it is spent.  Counter ``c`` is *claimable* iff

    floor <= c <= floor + lookahead        (and c <= MAX_COUNTER)

and claiming it moves the floor to ``c + 1``.  So each counter opens at most once; a
client whose previous attempts never arrived still gets in with a later counter (up
to ``lookahead`` lost attempts in a row); and a sequence that was sniffed but never
used dies as soon as any later counter is used (the strictest choice).  Parallel
sessions of one client profile take distinct counters in order: the client holds a
lock per profile from choosing the counter until the door answers.

A completed sequence whose counter is below the floor is *stale* -- a replay, or a
client behind (it is told so with a TCP reset and resyncs).

This is the only rule: the engine's in-memory copy, the embedded store and the Redis
store implement exactly it (``tests/test_counters.py`` checks them against this
module), so an exactly-once claim means the same everywhere.

Counters are bounded (:data:`MAX_COUNTER`): deriving counter ``c`` of an iterated
scheme costs ``c`` HMACs, and no honest client completes that many sequences in a step.
"""

from __future__ import annotations

from dataclasses import dataclass

# No sequence beyond this counter is derived or accepted, in any step.  10,000
# completions in one 30 s step would be 320,000 SYNs from one user.
MAX_COUNTER = 10_000
# The widest look-ahead a configuration may ask for.
MAX_LOOKAHEAD = 64


@dataclass(slots=True)
class CounterWindow:
    floor: int = 0

    def spent(self, counter: int) -> bool:
        return counter < self.floor

    def claimable(self, counter: int, lookahead: int) -> bool:
        return self.floor <= counter <= min(self.floor + lookahead, MAX_COUNTER)

    def claim(self, counter: int, lookahead: int) -> bool:
        """Spend ``counter`` (and every one below it) if it is claimable."""
        if not self.claimable(counter, lookahead):
            return False
        self.floor = counter + 1
        return True

    def mark_spent(self, counter: int) -> None:
        """A counter was spent elsewhere (another process or gateway won it)."""
        self.floor = max(self.floor, counter + 1)

    def merge(self, other: CounterWindow) -> None:
        """What two copies know to be spent."""
        self.floor = max(self.floor, other.floor)
