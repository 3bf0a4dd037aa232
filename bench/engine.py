"""Engine alone: decisions per second of the sans-IO engine, no kernel.

Workloads (each a pre-generated list of SYNs, replayed through ``decide``):

* ``random``: knocks to random ports from random IPv4 sources (a flood);
* ``one-source``: random knocks from a single source (a sweep);
* ``protected``: SYNs to the protected port from random sources (a scan).

And the longest pause of the packet loop around a step change: ``tick()`` called four
times a second from 12 s before a step boundary to 5 s after it (what the daemon
does), against a full rebuild of the candidate index in the same run (what a step
change cost before it was spread over ticks).

The baseline, measured in the same run, is a call of a Python function with the
same five arguments that returns a constant: the floor of any Python engine.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

from nfknock.config import User
from nfknock.core import Core
from nfknock.engine import EngineSettings
from nfknock.events import DROP_SILENT, Decision
from nfknock.sequence import SequenceParams

Syn = tuple[bytes, bytes, int]
DST = bytes([198, 51, 100, 1])


def workload(kind: str, n: int, rng: random.Random) -> list[Syn]:
    if kind == "random":
        return [(rng.randbytes(4), DST, rng.randint(1024, 33791)) for _ in range(n)]
    if kind == "one-source":
        src = bytes([198, 51, 100, 10])
        return [(src, DST, rng.randint(1024, 33791)) for _ in range(n)]
    if kind == "protected":
        return [(rng.randbytes(4), DST, 22) for _ in range(n)]
    raise ValueError(kind)


def engine_for(users: int, wall: float) -> Core:
    settings = EngineSettings(params=SequenceParams(exclude=frozenset({22})), protect={22: None})
    rng = random.Random(users)
    return Core(settings, [User(f"u{i}", rng.randbytes(32)) for i in range(users)], wall)


def rate(
    decide: Callable[[bytes, bytes, int, float, float], Any], syns: list[Syn], wall: float
) -> float:
    mono = 1000.0
    start = time.perf_counter()
    for src, dst, port in syns:
        decide(src, dst, port, wall, mono)
    return len(syns) / (time.perf_counter() - start)


def baseline(src: bytes, dst: bytes, port: int, wall: float, mono: float) -> Decision:
    return DROP_SILENT


def step_change_pause(users: int) -> dict[str, float]:
    """Longest single tick() across a step change, and a full rebuild, in ms."""
    wall = 1_700_000_018.0  # 12 s before a step boundary
    engine = engine_for(users, wall)
    mono = 1000.0
    worst = 0.0
    for i in range(4 * 17):
        t0 = time.perf_counter()
        engine.tick(wall + i / 4, mono + i / 4)
        worst = max(worst, time.perf_counter() - t0)
    t0 = time.perf_counter()
    engine.knocks._rebuild()  # the baseline: the whole index at once
    rebuild = time.perf_counter() - t0
    return {"worst_tick_ms": round(worst * 1000, 2), "full_rebuild_ms": round(rebuild * 1000, 2)}


def run(
    user_counts: tuple[int, ...] = (1, 1000, 10000), n: int = 200_000, repeats: int = 3
) -> dict[str, Any]:
    wall = 1_700_000_010.0
    rng = random.Random(42)
    kinds = ("random", "one-source", "protected")
    loads = {k: workload(k, n, rng) for k in kinds}
    base = max(rate(baseline, loads["random"], wall) for _ in range(repeats))
    results: dict[str, Any] = {"baseline_calls_per_s": round(base), "users": {}}
    for users in user_counts:
        t0 = time.perf_counter()
        engine = engine_for(users, wall)
        build = time.perf_counter() - t0
        row: dict[str, Any] = {"build_s": round(build, 3)}
        for kind in kinds:
            best = max(rate(engine.decide, loads[kind], wall) for _ in range(repeats))
            row[kind] = {"decisions_per_s": round(best), "ratio_to_baseline": round(best / base, 3)}
        row["tracked_sources_after"] = engine.knocks.tracked_sources()
        row["step_change"] = step_change_pause(users)
        results["users"][str(users)] = row
    first, last = str(user_counts[0]), str(user_counts[-1])
    results["flatness_random"] = round(
        results["users"][last]["random"]["decisions_per_s"]
        / results["users"][first]["random"]["decisions_per_s"],
        3,
    )
    return results


def table(results: dict[str, Any]) -> str:
    lines = [
        "| users | workload | decisions/s | ratio to bare call |",
        "|---:|---|---:|---:|",
    ]
    for users, row in results["users"].items():
        for kind in ("random", "one-source", "protected"):
            r = row[kind]
            lines.append(
                f"| {users} | {kind} | {r['decisions_per_s']:,} | {r['ratio_to_baseline']:.2f} |"
            )
    lines.append(
        f"\nbare Python call (baseline): {results['baseline_calls_per_s']:,}/s; "
        f"random-flood rate at the most users / at 1 user: {results['flatness_random']}"
    )
    lines += [
        "",
        "| users | longest tick() around a step change (ms) | full index rebuild (ms) |",
        "|---:|---:|---:|",
    ]
    for users, row in results["users"].items():
        sc = row["step_change"]
        lines.append(f"| {users} | {sc['worst_tick_ms']} | {sc['full_rebuild_ms']} |")
    return "\n".join(lines)
