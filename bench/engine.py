"""Engine alone: decisions per second of the sans-IO engine, no kernel.

Workloads (each a pre-generated list of SYNs, replayed through ``decide``):

* ``random``: knocks to random ports from random IPv4 sources (a flood);
* ``one-source``: random knocks from a single source (a sweep);
* ``protected``: SYNs to the protected port from random sources (a scan).

Each also with grant prefixes on (every user ``grant_prefix_v4 = 24``,
``grant_prefix_v6 = 64``): knock progress keyed by the masked source, and -- for
``protected`` -- one /24 grant in the table, so that a SYN without a grant looks its
/24 up too (``*-prefix`` rows, with their ratio to the same workload without).

And the longest pauses around a step change: the engine driven as the daemon
drives it -- ``tick()`` four times a second, random knocks between ticks -- from
22 s before a step boundary to 13 s after it (long-lived objects frozen out of the
garbage collector, see frozen_pauses); the longest ``tick()`` and the
longest ``decide()`` (the first knock after the boundary moves the window), against
what one step's candidates cost built at once (the engine's construction builds
the three live steps).

The baseline, measured in the same run, is a call of a Python function with the
same five arguments that returns a constant: the floor of any Python engine.

``scale()`` (``python -m bench engine-scale``, not part of the default run): the
same at 100,000 users, with the construction time and the resident memory the
engine adds per 1,000 users.
"""

from __future__ import annotations

import gc
import random
import time
from collections.abc import Callable
from typing import Any

from nfknock.config import User
from nfknock.core import Core
from nfknock.engine import EngineSettings
from nfknock.events import DROP_SILENT, Decision
from nfknock.grants import Grant
from nfknock.prefixes import mask_key
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


def engine_for(users: int, wall: float, prefixes: bool = False) -> Core:
    settings = EngineSettings(params=SequenceParams(exclude=frozenset({22})), protect={22: None})
    rng = random.Random(users)
    v4, v6 = (24, 64) if prefixes else (32, 128)
    people = [
        User(f"u{i}", rng.randbytes(32), grant_prefix_v4=v4, grant_prefix_v6=v6)
        for i in range(users)
    ]
    core = Core(settings, people, wall)
    if prefixes:  # one /24 grant: prefix lookups on the protected path
        key = mask_key(bytes([203, 0, 113, 7]) + DST, 24)
        core.grants.add(key, Grant(0, "u0", frozenset({22}), 1, 1e12, True, prefix=24))
    return core


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


def step_change_pause(
    engine: Core, wall: float, seconds: float = 35.0, per_tick: int = 100
) -> dict[str, float]:
    """Drive ``engine`` (built at ``wall``) as the daemon does for ``seconds``: a
    tick() every 0.25 s, ``per_tick`` random knocks in between.  The longest tick()
    and the longest decide(), in ms."""
    rng = random.Random(5)
    syns = workload("random", per_tick, rng)
    mono0 = 1000.0
    worst_tick = worst_decide = 0.0
    for i in range(int(seconds * 4)):
        for j, (src, dst, port) in enumerate(syns):
            t = (i + j / per_tick) / 4
            t0 = time.perf_counter()
            engine.decide(src, dst, port, wall + t, mono0 + t)
            worst_decide = max(worst_decide, time.perf_counter() - t0)
        t = (i + 1) / 4
        t0 = time.perf_counter()
        engine.tick(wall + t, mono0 + t)
        worst_tick = max(worst_tick, time.perf_counter() - t0)
    return {
        "worst_tick_ms": round(worst_tick * 1000, 2),
        "worst_decide_ms": round(worst_decide * 1000, 2),
    }


def frozen_pauses(engine: Core, wall: float) -> dict[str, float]:
    """step_change_pause() with the objects alive so far frozen out of the garbage
    collector (what a daemon does after loading its configuration: gc.freeze()), so
    that a full collection over this benchmark's own workloads -- or over 100,000
    users' configuration -- does not land in a tick and count as the engine's."""
    gc.collect()
    gc.freeze()
    try:
        return step_change_pause(engine, wall)
    finally:
        gc.unfreeze()


def step_change(users: int) -> dict[str, float]:
    wall = 1_700_000_018.0  # 22 s before a step boundary
    t0 = time.perf_counter()
    engine = engine_for(users, wall)
    one_step = (time.perf_counter() - t0) / (2 * engine.s.skew_steps + 1)
    out = frozen_pauses(engine, wall)
    out["one_step_at_once_ms"] = round(one_step * 1000, 2)
    return out


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def scale(users: int = 100_000, n: int = 200_000) -> dict[str, Any]:
    """Construction time, resident memory per 1,000 users, the pauses around a step
    change and the random-flood rate with ``users`` users."""
    wall = 1_700_000_018.0
    gc.collect()
    before = rss_mib()
    rng = random.Random(users)
    people = [User(f"u{i}", rng.randbytes(32)) for i in range(users)]
    with_users = rss_mib()
    settings = EngineSettings(params=SequenceParams(exclude=frozenset({22})), protect={22: None})
    t0 = time.perf_counter()
    engine = Core(settings, people, wall)
    build = time.perf_counter() - t0
    built = rss_mib()
    t0 = time.perf_counter()
    gc.collect()
    full_gc = time.perf_counter() - t0
    pauses = frozen_pauses(engine, wall)  # stages and swaps a whole step
    cycled = rss_mib()
    syns = workload("random", n, random.Random(42))
    flood = rate(engine.decide, syns, wall + 40)
    return {
        "users": users,
        "build_s": round(build, 3),
        "rss_users_mib": round(with_users - before, 1),
        "rss_engine_built_mib": round(built - with_users, 1),
        "rss_engine_after_step_change_mib": round(cycled - with_users, 1),
        "engine_mib_per_1000_users": round((cycled - with_users) / users * 1000, 3),
        "step_change": pauses,
        "full_gc_collection_ms": round(full_gc * 1000, 1),
        "random_flood_decisions_per_s": round(flood),
        "slots": engine.knocks._table.slots_in_use(),
    }


def scale_table(r: dict[str, Any]) -> str:
    sc = r["step_change"]
    return "\n".join(
        [
            f"{r['users']:,} users: engine built in {r['build_s']} s; resident memory: "
            f"{r['rss_engine_built_mib']} MiB after construction, "
            f"{r['rss_engine_after_step_change_mib']} MiB after a step change "
            f"({r['engine_mib_per_1000_users']} MiB per 1,000 users; the User objects "
            f"themselves: {r['rss_users_mib']} MiB)",
            f"around a step change: longest tick() {sc['worst_tick_ms']} ms, "
            f"longest decide() {sc['worst_decide_ms']} ms (long-lived objects frozen; "
            f"one full garbage collection of the process: {r['full_gc_collection_ms']} ms); "
            f"random flood {r['random_flood_decisions_per_s']:,} decisions/s",
        ]
    )


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
        masked = engine_for(users, wall, prefixes=True)
        for kind in kinds:
            best = max(rate(masked.decide, loads[kind], wall) for _ in range(repeats))
            row[f"{kind}-prefix"] = {
                "decisions_per_s": round(best),
                "ratio_to_baseline": round(best / base, 3),
                "ratio_to_no_prefix": round(best / row[kind]["decisions_per_s"], 3),
            }
        row["tracked_sources_after"] = engine.knocks.tracked_sources()
        row["step_change"] = step_change(users)
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
        for kind in ("random", "one-source", "protected"):
            r = row.get(f"{kind}-prefix")
            if r is not None:
                lines.append(
                    f"| {users} | {kind}, /24 and /64 grant prefixes | {r['decisions_per_s']:,} "
                    f"| {r['ratio_to_baseline']:.2f} ({r['ratio_to_no_prefix']:.2f} of "
                    "the same without) |"
                )
    lines.append(
        f"\nbare Python call (baseline): {results['baseline_calls_per_s']:,}/s; "
        f"random-flood rate at the most users / at 1 user: {results['flatness_random']}"
    )
    lines += [
        "",
        "| users | longest tick() around a step change (ms) | longest decide() (ms) "
        "| one step built at once (ms) |",
        "|---:|---:|---:|---:|",
    ]
    for users, row in results["users"].items():
        sc = row["step_change"]
        lines.append(
            f"| {users} | {sc['worst_tick_ms']} | {sc['worst_decide_ms']} "
            f"| {sc['one_step_at_once_ms']} |"
        )
    return "\n".join(lines)
