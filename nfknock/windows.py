"""The counter windows one engine knows, by step.  Sans-IO.

One :class:`~nfknock.counters.CounterWindow` per (user, step) that has spent a counter
(or was told of one).  Kept by step, then user: pruning -- the windows of steps long
gone, or the oldest when there are too many -- takes whole steps, and costs the
number of distinct steps held, not of windows (there may be a hundred thousand).
"""

from __future__ import annotations

from nfknock.counters import CounterWindow


class WindowStore:
    def __init__(self) -> None:
        self._by_step: dict[int, dict[str, CounterWindow]] = {}
        self.count = 0

    def get(self, user: str, step: int) -> CounterWindow | None:
        by_user = self._by_step.get(step)
        return by_user.get(user) if by_user is not None else None

    def window(self, user: str, step: int) -> CounterWindow:
        """The window of (user, step), created empty if there is none."""
        by_user = self._by_step.get(step)
        if by_user is None:
            by_user = self._by_step[step] = {}
        window = by_user.get(user)
        if window is None:
            window = by_user[user] = CounterWindow()
            self.count += 1
        return window

    def forget_user(self, user: str) -> None:
        for by_user in self._by_step.values():
            if by_user.pop(user, None) is not None:
                self.count -= 1

    def prune(self, below: int, most: int, keep: int) -> int:
        """Forget every step below ``below``, then the oldest steps while more than
        ``most`` windows are left; never step ``keep`` (the HOTP pseudo-step).  The
        highest step forgotten, or -1."""
        pruned = -1
        for step in sorted(t for t in self._by_step if t != keep):
            if step >= below and self.count <= most:
                break
            self.count -= len(self._by_step.pop(step))
            pruned = step
        return pruned

    def floors(self) -> dict[str, dict[int, int]]:
        """user -> step -> floor (the lowest counter not spent)."""
        out: dict[str, dict[int, int]] = {}
        for step, by_user in self._by_step.items():
            for user, window in by_user.items():
                out.setdefault(user, {})[step] = window.floor
        return out

    def spent(self) -> list[tuple[str, int, CounterWindow]]:
        """(user, step, window) of every window with a spent counter, sorted."""
        return sorted(
            (u, t, w) for t, by_user in self._by_step.items() for u, w in by_user.items() if w.floor
        )
