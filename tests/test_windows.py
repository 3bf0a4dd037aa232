"""The counter-window store: pruning takes whole steps, oldest first."""

from __future__ import annotations

from nfknock.windows import WindowStore

HOTP = -1


def _store(steps: dict[int, int]) -> WindowStore:
    store = WindowStore()
    for step, users in steps.items():
        for u in range(users):
            store.window(f"u{u}", step).claim(0, 0)
    return store


def test_prune_forgets_the_steps_below_the_cutoff_and_reports_the_highest() -> None:
    store = _store({HOTP: 2, 10: 1, 11: 2, 20: 1})
    assert store.prune(below=12, most=100, keep=HOTP) == 11
    assert sorted(store.floors()["u0"]) == [HOTP, 20]
    assert store.count == 3


def test_prune_takes_the_oldest_whole_steps_while_there_are_too_many() -> None:
    store = _store({HOTP: 5, 30: 3, 31: 3, 32: 3})
    assert store.prune(below=0, most=8, keep=HOTP) == 31  # 14 -> 11 -> 8 windows
    assert store.count == 5 + 3
    assert sorted(t for _, t, _ in store.spent()) == [HOTP] * 5 + [32] * 3


def test_prune_with_nothing_to_do_reports_none() -> None:
    store = _store({5: 1})
    assert store.prune(below=5, most=10, keep=HOTP) == -1
    assert store.count == 1


def test_forgetting_a_user_forgets_all_its_windows() -> None:
    store = _store({1: 2, 2: 2})
    store.forget_user("u1")
    assert store.count == 2
    assert "u1" not in store.floors()
