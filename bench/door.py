"""Forwarded doors and ISN knocks (issue 14), beside the plain door and the
32-knock default, in the benchmark's own lab (``python -m bench door``).

* ``door_to_open``: knock to an established connection, ms -- the plain door (32
  knocks, connect to the protected port) and the forwarded door (the same knocks,
  connect to the door the sequence names: queued in mangle PREROUTING, accepted
  with a mark, translated to port 22), in one session.
* ``door_latency``: connect() to an open grant, µs -- through the door (a verdict
  with a mark, DNAT, the filter's accept of the marked SYN), through the protected
  port (a verdict), both through one daemon in alternating rounds, and with no
  queue at all; ``max_connections`` raised so that one grant serves every
  connection.
* ``isn_to_open``: knock to open with 8 ISN knocks (raw SYNs) beside the 32-knock
  default.
* ``isn_flood``: the daemon under a spoofed SYN flood of the knock range with an
  ISN user (every knock's ISN read and looked up) beside the default (no ISN
  user): flat-out SYN/s handled and SYN per CPU-second at a fixed rate.
* ``isn_under_attack``: legitimate knock-and-connect during a spoofed flood of the
  knock range at a fraction of the default's flat-out rate: 32 knocks beside 8 ISN
  knocks (fewer packets to lose in the flood).
* ``isn_engine``: the sans-IO engine alone, random-flood decisions per second with
  and without an ISN user (no kernel, no root).

Every phase starts a fresh daemon; the door's chains are removed at the end.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import time
from typing import Any

from bench import engine as engine_bench
from bench.kernel import (
    FILTER_CPU,
    HERE,
    Bench,
    _close,
    _run_once,
    _timed_runs,
    paced,
    saturate,
    summary,
)
from nfknock.config import User
from nfknock.core import Core
from nfknock.engine import EngineSettings
from nfknock.netlab import PY, SERVER4
from nfknock.sequence import SequenceParams, format_base32

DOORS = "40000-40999"
FORWARD = {"name": "ssh", "doors": DOORS, "port": 22}
DOOR_USER = {"door": "random", "forward": ["ssh"]}
ISN_LENGTH = 8
BOB = bytes(range(60, 92))


def start(
    b: Bench,
    user_keys: dict[str, Any] | None = None,
    extra_users: dict[str, bytes] | None = None,
    **sections: Any,
) -> None:
    """A fresh daemon for alice (her ``user_keys``; ``extra_users``: plain users
    beside her) with ``sections`` of config."""
    b.stop_filter()
    b.reset_firewall()
    for name in ("state.db", "state.db-wal", "state.db-shm"):
        (b.workdir / name).unlink(missing_ok=True)
    cfg = b.lab.write_config(
        {"alice": b.secret, **(extra_users or {})},
        user_keys={"alice": user_keys or {}},
        log={"level": "info", "format": "json"},
        **sections,
    )
    b.lab.install_rules(cfg)
    b.filter = b.lab.start_daemon(cfg, wait=120, cpu=FILTER_CPU)


def cleanup(b: Bench) -> None:
    b.stop_filter()
    b.lab.nfknock("rules", "--remove")  # the door's mangle and nat chains too


def _door_sections(**door: Any) -> dict[str, Any]:
    return {"door": door, "door.forward": [FORWARD]}


def door_to_open(b: Bench, runs: int) -> dict[str, Any]:
    secret = ("--secret-base32", format_base32(b.secret))
    out: dict[str, Any] = {}
    start(b)
    out["plain"] = _timed_runs(b, b.driver("nfknock", *secret), None, runs)
    start(b, DOOR_USER, **_door_sections())
    out["door"] = _timed_runs(b, b.driver("nfknock", *secret, "--doors", DOORS), None, runs)
    cleanup(b)
    if out["plain"].get("median") and out["door"].get("median"):
        out["door_vs_plain"] = round(out["door"]["median"] / out["plain"]["median"], 3)
    return out


def _connects(b: Bench, port: int, n: int) -> dict[str, Any]:
    res = b.lab.sh(
        b.lab.client,
        PY,
        str(HERE / "connect_latency.py"),
        SERVER4,
        str(port),
        "-n",
        str(n),
        timeout=600,
    )
    data = json.loads(res.stdout)
    return {**summary(data["us"]), "failures": data["failures"]}


def _knock(b: Bench, *extra: str) -> dict[str, Any]:
    secret = () if "--secret-file" in extra else ("--secret-file", str(b.secret_file))
    done = b.lab.client_cmd(
        "knock",
        SERVER4,
        *secret,
        "--json",
        *extra,
        env={"XDG_STATE_HOME": str(b.workdir / f"door-state-{time.monotonic_ns()}")},
    )
    if done.returncode != 0:
        raise RuntimeError(f"knock failed: {done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def door_latency(b: Bench, n: int, rounds: int = 3) -> dict[str, Any]:
    """One daemon, two grants of one client: alice's door and bob's protected port
    22; connects to each in alternating rounds (the machine is shared: a round can
    fall on a busy moment), then with no queue at all.  Per path, the round with
    the lowest median."""
    many = {"open_seconds": 3600, "max_connections": 1_000_000}
    bob = b.workdir / "bob.secret"
    bob.write_text(format_base32(BOB))
    bob.chmod(0o600)
    start(b, DOOR_USER, door=many, **{"door.forward": [FORWARD]}, extra_users={"bob": BOB})
    door = _knock(b, "--doors", DOORS)["door"]
    _knock(b, "--secret-file", str(bob))
    time.sleep(1.5)  # the daemon's first rules check
    plain: list[dict[str, Any]] = []
    forwarded: list[dict[str, Any]] = []
    for _ in range(rounds):
        forwarded.append(_connects(b, int(door), n))
        plain.append(_connects(b, 22, n))
    cleanup(b)
    b.reset_firewall()
    none = _connects(b, 22, n)
    best = {
        "door_us": min(forwarded, key=lambda r: r["median"]),
        "protected_us": min(plain, key=lambda r: r["median"]),
    }
    return {
        **best,
        "without_queue_us": none,
        "rounds": rounds,
        "door_medians_us": [r["median"] for r in forwarded],
        "protected_medians_us": [r["median"] for r in plain],
        "door_overhead_median_us": round(best["door_us"]["median"] - none["median"], 1),
        "protected_overhead_median_us": round(best["protected_us"]["median"] - none["median"], 1),
        "door_vs_protected_median_us": round(
            best["door_us"]["median"] - best["protected_us"]["median"], 1
        ),
    }


def isn_to_open(b: Bench, runs: int) -> dict[str, Any]:
    secret = ("--secret-base32", format_base32(b.secret))
    out: dict[str, Any] = {}
    start(b)
    out["knocks_32"] = _timed_runs(b, b.driver("nfknock", *secret), None, runs)
    start(b, {"isn": True}, knock={"length": ISN_LENGTH})
    drv = b.driver("nfknock", *secret, "--isn", "--length", str(ISN_LENGTH))
    out[f"isn_knocks_{ISN_LENGTH}"] = _timed_runs(b, drv, None, runs)
    cleanup(b)
    base = out["knocks_32"].get("median")
    if base and out[f"isn_knocks_{ISN_LENGTH}"].get("median"):
        out["isn_vs_32"] = round(out[f"isn_knocks_{ISN_LENGTH}"]["median"] / base, 3)
    return out


def isn_flood(b: Bench, seconds: float, rate: float, rounds: int = 2) -> dict[str, Any]:
    """Alternating rounds of each configuration (the sender's rate moves from one
    minute to the next on a shared machine); per configuration the round that
    handled the most, and every round's figures."""
    phases: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
        ("knocks_32", {}, {}),
        (f"isn_knocks_{ISN_LENGTH}", {"isn": True}, {"length": ISN_LENGTH}),
    ]
    seen: dict[str, list[dict[str, Any]]] = {label: [] for label, _, _ in phases}
    for _ in range(rounds):
        for label, keys, knock in phases:
            start(b, keys, knock=knock)
            row = saturate(b, seconds)
            row["at_fixed_rate"] = paced(b, rate, seconds)
            seen[label].append(row)
    cleanup(b)
    out: dict[str, Any] = {
        label: {**max(rows, key=lambda r: r["handled_pps"]), "rounds": rows}
        for label, rows in seen.items()
    }
    base = out["knocks_32"]["at_fixed_rate"]["per_cpu_second"]
    isn = out[f"isn_knocks_{ISN_LENGTH}"]["at_fixed_rate"]["per_cpu_second"]
    out["isn_vs_32_per_cpu_second"] = round(isn / base, 3) if base else None
    return out


def isn_under_attack(
    b: Bench, top: float, attempts: int, fractions: tuple[float, ...] = (0.5, 1.0, 1.5)
) -> dict[str, Any]:
    """Knock-and-connect successes during a spoofed flood at ``fraction x top``
    SYN/s (``top``: the default's flat-out rate, from isn_flood)."""
    secret = ("--secret-base32", format_base32(b.secret), "--timeout", "2")
    phases: list[tuple[str, dict[str, Any], dict[str, Any], tuple[str, ...]]] = [
        ("knocks_32", {}, {}, ()),
        (
            f"isn_knocks_{ISN_LENGTH}",
            {"isn": True},
            {"length": ISN_LENGTH},
            ("--isn", "--length", str(ISN_LENGTH)),
        ),
    ]
    out: dict[str, Any] = {}
    for fraction in fractions:
        rate = fraction * top
        for label, keys, knock, extra in phases:
            start(b, keys, knock=knock)
            drv = b.driver("nfknock", *secret, *extra)
            flood = subprocess.Popen(
                b.flood_argv(rate, attempts * 2.5 + 10, 10**9), stdout=subprocess.PIPE, text=True
            )
            ok = 0
            try:
                time.sleep(0.5)
                for _ in range(attempts):
                    ok += bool(_run_once(drv)["ok"])
            finally:
                _close(drv)
                flood.send_signal(signal.SIGTERM)
                flood.wait(10)
            out[f"{label}_{round(fraction * 100)}pct"] = {
                "rate_pps": round(rate),
                "attempts": attempts,
                "success_rate": round(ok / attempts, 3),
            }
    cleanup(b)
    return out


def isn_engine(n: int, repeats: int, users: int = 1) -> dict[str, Any]:
    """Random-flood decisions/s of the engine: ``users`` plain users, then the same
    with one more user knocking with ISNs (every knock then also looked up by pair)."""
    wall = 1_700_000_010.0
    rng = random.Random(7)
    syns = engine_bench.workload("random", n, rng)
    isn_values = [rng.getrandbits(32) for _ in range(n)]
    settings = EngineSettings(
        params=SequenceParams(exclude=frozenset({22}), length=ISN_LENGTH), protect={22: None}
    )
    people = [User(f"u{i}", rng.randbytes(32)) for i in range(users)]
    plain = Core(settings, people, wall)
    with_isn = Core(settings, [*people, User("isn", rng.randbytes(32), isn=True)], wall)

    def isn_rate() -> float:
        decide, mono = with_isn.knocks.decide_isn, 1000.0
        t0 = time.perf_counter()
        for (src, dst, port), isn in zip(syns, isn_values, strict=True):
            decide(src + dst, port, isn, wall, mono)
        return n / (time.perf_counter() - t0)

    def plain_rate() -> float:
        decide, mono = plain.knocks.decide_key, 1000.0
        t0 = time.perf_counter()
        for src, dst, port in syns:
            decide(src + dst, port, wall, mono)
        return n / (time.perf_counter() - t0)

    best_plain = max(plain_rate() for _ in range(repeats))
    best_isn = max(isn_rate() for _ in range(repeats))
    return {
        "users": users,
        "plain_decisions_per_s": round(best_plain),
        "isn_mode_decisions_per_s": round(best_isn),
        "ratio": round(best_isn / best_plain, 3),
        "isn_candidates": len(with_isn.knocks._isn or ()),
    }


def run(
    b: Bench,
    runs: int,
    n: int,
    seconds: float,
    rate: float,
    attempts: int,
    rounds: int = 2,
    fractions: tuple[float, ...] = (0.5, 1.0, 1.5),
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    print("== door: knock to open", flush=True)
    out["door_to_open"] = door_to_open(b, runs)
    print(json.dumps(out["door_to_open"]), flush=True)
    print("== door: connect latency", flush=True)
    out["door_latency"] = door_latency(b, n, rounds + 1)
    print(json.dumps(out["door_latency"]), flush=True)
    print("== ISN knocks: knock to open", flush=True)
    out["isn_to_open"] = isn_to_open(b, runs)
    print(json.dumps(out["isn_to_open"]), flush=True)
    print("== ISN knocks: flood", flush=True)
    out["isn_flood"] = isn_flood(b, seconds, rate, rounds)
    print(json.dumps(out["isn_flood"]), flush=True)
    print("== ISN knocks: knock-and-connect under a flood", flush=True)
    top = out["isn_flood"]["knocks_32"]["handled_pps"]
    out["isn_under_attack"] = isn_under_attack(b, top, attempts, fractions)
    print(json.dumps(out["isn_under_attack"]), flush=True)
    return out


def table(r: dict[str, Any]) -> str:
    lines = ["##### Forwarded door and ISN knocks", ""]
    if "door_to_open" in r:
        d = r["door_to_open"]
        lines += [
            "| knock to open (ms) | runs | median | p95 | failures |",
            "|---|---:|---:|---:|---:|",
        ]
        for label, key in (("plain door (port 22)", "plain"), ("forwarded door", "door")):
            x = d[key]
            lines.append(f"| {label} | {x['n']} | {x['median']} | {x['p95']} | {x['failures']} |")
        i = r.get("isn_to_open", {})
        for label, key in (
            ("32 knocks", "knocks_32"),
            (f"{ISN_LENGTH} ISN knocks", f"isn_knocks_{ISN_LENGTH}"),
        ):
            if key in i:
                x = i[key]
                lines.append(
                    f"| {label} | {x['n']} | {x['median']} | {x['p95']} | {x['failures']} |"
                )
        lines.append("")
    if "door_latency" in r:
        lat = r["door_latency"]
        lines += ["| connect() (µs) | median | p99 |", "|---|---:|---:|"]
        for label, key in (
            ("through the forwarded door", "door_us"),
            ("through the protected port", "protected_us"),
            ("no queue at all", "without_queue_us"),
        ):
            lines.append(f"| {label} | {lat[key]['median']} | {lat[key]['p99']} |")
        lines.append("")
    if "isn_flood" in r:
        f = r["isn_flood"]
        lines += [
            "| knock-range flood | flat out: handled SYN/s (lost) | SYN per CPU-s at fixed rate |",
            "|---|---:|---:|",
        ]
        for label, key in (
            ("no ISN user", "knocks_32"),
            ("an ISN user", f"isn_knocks_{ISN_LENGTH}"),
        ):
            x = f[key]
            lines.append(
                f"| {label} | {x['handled_pps']:,} ({x['lost']:,}) | "
                f"{x['at_fixed_rate']['per_cpu_second']:,} |"
            )
        lines.append("")
    if "isn_under_attack" in r:
        lines += ["| knock-and-connect under a flood | SYN/s | success |", "|---|---:|---:|"]
        for key, x in r["isn_under_attack"].items():
            lines.append(
                f"| {key} | {x['rate_pps']:,} | {x['success_rate']:.0%} of {x['attempts']} |"
            )
        lines.append("")
    if "isn_engine" in r:
        e = r["isn_engine"]
        lines.append(
            f"engine alone, random flood: {e['plain_decisions_per_s']:,}/s without an ISN "
            f"user, {e['isn_mode_decisions_per_s']:,}/s with one ({e['ratio']})"
        )
    return "\n".join(lines)
