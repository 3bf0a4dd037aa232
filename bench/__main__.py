"""``python -m bench``: nfknock's benchmarks, one command, results in bench/results/.

    sudo .venv/bin/python -m bench            # everything (about 15 minutes)
    sudo .venv/bin/python -m bench --smoke    # tiny sizes: proves the harness runs (CI)
    sudo .venv/bin/python -m bench engine     # the sans-IO engine and SPA verifier (no root)
    sudo .venv/bin/python -m bench metrics    # throughput with Prometheus metrics on/off
    sudo .venv/bin/python -m bench door       # forwarded doors and ISN knocks (issue 14)
    .venv/bin/python -m bench engine-scale     # the engine at 100,000 users (not in "all")

Writes bench/results/bench.json and bench/results/bench.md.  Every figure is
measured in the same run as its baseline; see bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench import engine, spa_verify


class _Done(Exception):
    """Only the part asked for was run."""


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "full": {
        "engine": {"user_counts": (1, 1000, 10000), "n": 200_000, "repeats": 3},
        "throughput": {"user_counts": (1, 1000, 10000), "seconds": 3.0},
        "drain": {"user_counts": (1, 1000, 10000), "n": 60_000, "rounds": 8},
        "latency": {"n": 2000},
        "spa_verify": {"user_counts": (1, 100, 1000), "seconds": 0.5},
        "knock": {"runs": 100, "systems": ("nfknock", "knockd", "fwknop")},
        "spa": {"runs": 100, "systems": ("nfknock_spa", "fwknop_nfknock", "fwknop_fwknopd")},
        "attack": {
            "attempts": 50,
            # multiples of the bare Python loop's flat-out rate (issue 11)
            "fractions": {"1x_bare": 1.0, "2x_bare": 2.0},
            "systems": (
                "nfknock_granted",
                "nfknock",
                "knockd",
                "fwknop",
                "nfknock_spa",
                "fwknop_nfknock",
            ),
        },
        "memory": {"sources": 1_000_000},
        "metrics": {"rounds": 3, "seconds": 3.0, "rate": 50_000, "scrape_every": 1.0},
        "shared": {"claims": 2000, "knock_runs": 50, "seconds": 3.0},
        "door": {"runs": 50, "n": 2000, "seconds": 3.0, "rate": 50_000, "attempts": 30},
        "isn_engine": {"n": 200_000, "repeats": 3},
    },
    "smoke": {
        "engine": {"user_counts": (1, 100), "n": 5_000, "repeats": 1},
        "throughput": {"user_counts": (1,), "seconds": 1.0},
        "drain": {"user_counts": (1,), "n": 5_000, "rounds": 1},
        "latency": {"n": 50},
        "spa_verify": {"user_counts": (1, 10), "seconds": 0.05},
        "knock": {"runs": 3, "systems": ("nfknock", "knockd")},
        "spa": {"runs": 3, "systems": ("nfknock_spa", "fwknop_nfknock")},
        "attack": {
            "attempts": 3,
            "fractions": {"1x_bare": 1.0},
            "systems": ("nfknock_granted", "nfknock", "nfknock_spa"),
        },
        "memory": {"sources": 20_000},
        "metrics": {"rounds": 1, "seconds": 1.0, "rate": 20_000, "scrape_every": 0.5},
        "shared": {"claims": 50, "knock_runs": 3, "seconds": 1.0},
        "door": {
            "runs": 3,
            "n": 50,
            "seconds": 1.0,
            "rate": 20_000,
            "attempts": 2,
            "rounds": 1,
            "fractions": (0.5,),
        },
        "isn_engine": {"n": 5_000, "repeats": 1},
    },
}


def markdown(res: dict[str, Any]) -> str:
    m = res["machine"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, Linux {m['kernel']}, "
        f"Python {m['python']}{' (smoke sizes)' if res['smoke'] else ''}."
    ]
    if "engine" in res:
        lines += ["", "#### Engine alone (sans-IO, no kernel)", "", engine.table(res["engine"])]
    if "spa_verify" in res:
        lines += [
            "",
            "#### SPA verification alone (in process, one thread): payloads per second",
            "",
            spa_verify.table(res["spa_verify"]),
        ]
    if "throughput" in res:
        t = res["throughput"]
        bare = t["bare_python"]
        fixed = bare["at_fixed_rate"]["rate"]
        lines += [
            "",
            "#### Verdict throughput (SYN flood to the knock range, spoofed sources)",
            "",
            f"Kernel DROP rule, no queue (the sender's ceiling): "
            f"{t['kernel_drop']['handled_pps']:,} SYN/s.",
            "",
            "| consumer | zero-loss SYN/s | ratio | CPU per SYN at "
            f"{fixed:,}/s: SYN per CPU-s | ratio | flat out: handled (lost) | "
            "loss at 80% of flat-out |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]

        def row_text(name: str, r: dict[str, Any], ratios: tuple[str, str]) -> str:
            a80 = r["at_80pct_of_saturated"]
            return (
                f"| {name} | {r['zero_loss_pps']:,} | {ratios[0]} | "
                f"{r['at_fixed_rate']['per_cpu_second']:,} | {ratios[1]} | "
                f"{r['handled_pps']:,} ({r['lost']:,}) | {a80['lost']:,} of {a80['sent']:,} |"
            )

        lines.append(row_text("bare Python NFQUEUE loop, drop only", bare, ("1.00", "1.00")))
        for key, r in t.items():
            if key.startswith("nfknock_"):
                users = key.split("_")[1]
                lines.append(
                    row_text(
                        f"nfknock run, {users} user(s)",
                        r,
                        (f"{r['ratio_zero_loss']:.2f}", f"{r['ratio_cpu_per_packet']:.2f}"),
                    )
                )
    if "drain" in res:
        d = res["drain"]
        bare = d["bare_python"]
        lines += [
            "",
            "#### The consumers' own ceilings: draining a pre-filled queue",
            "",
            "Each consumer is stopped (SIGSTOP), its queue filled with "
            f"{bare['queued']:,} SYNs, then let go; by wall clock the best of the rounds, "
            "by CPU time their sum.",
            "",
            "| consumer | SYN/s drained | ratio | SYN per CPU-s | ratio |",
            "|---|---:|---:|---:|---:|",
            f"| bare Python NFQUEUE loop, drop only | {bare['pps']:,} | 1.00 | "
            f"{bare['per_cpu_second']:,} | 1.00 |",
        ]
        for key, r in d.items():
            if key.startswith("nfknock_"):
                lines.append(
                    f"| nfknock run, {key.split('_')[1]} user(s) | {r['pps']:,} | "
                    f"{r['ratio']:.2f} | {r['per_cpu_second']:,} | {r['ratio_cpu']:.2f} |"
                )
    if "latency" in res:
        lat = res["latency"]
        w, wo = lat["with_nfknock_us"], lat["without_queue_us"]
        lines += [
            "",
            "#### connect() to the protected port (µs)",
            "",
            "| | median | p99 |",
            "|---|---:|---:|",
            f"| through nfknock (queued, ACCEPT) | {w['median']} | {w['p99']} |",
            f"| no queue at all | {wo['median']} | {wo['p99']} |",
            f"| overhead | {lat['median_overhead_us']} | {lat['p99_overhead_us']} |",
        ]
    if "knock_to_open" in res:
        k = res["knock_to_open"]
        lines += [
            "",
            "#### Knock to open: first knock to established connection (ms)",
            "",
            "| system | runs | median | p95 | failures |",
            "|---|---:|---:|---:|---:|",
        ]
        for system in ("nfknock", "knockd", "fwknop"):
            r = k.get(system)
            if r and "median" in r:
                lines.append(
                    f"| {system} | {r['n']} | {r['median']} | {r['p95']} | {r['failures']} |"
                )
            elif r:
                lines.append(f"| {system} | {r.get('skipped')} | | | |")
    if "spa_to_open" in res:
        sp = res["spa_to_open"]
        lines += [
            "",
            "#### SPA to open: one packet to established connection (ms)",
            "",
            "| client -> server | runs | median | p95 | failures |",
            "|---|---:|---:|---:|---:|",
        ]
        names = {
            "nfknock_spa": "nfknock-client spa (in-process) -> nfknock",
            "fwknop_nfknock": "fwknop -> nfknock",
            "fwknop_fwknopd": "fwknop -> fwknopd",
        }
        for system, label in names.items():
            r = sp.get(system)
            if r and "median" in r:
                lines.append(
                    f"| {label} | {r['n']} | {r['median']} | {r['p95']} | {r['failures']} |"
                )
            elif r:
                lines.append(f"| {label} | {r.get('skipped')} | | | |")
    if "attack" in res:
        lines += [
            "",
            "#### During a spoofed SYN flood to the knock range at 1x and 2x the bare "
            "loop's flat-out rate",
            "",
            "nfknock_granted: connections of a client that already holds a grant (1 s "
            "timeout each); the others: knock-and-connect or SPA-and-connect, 2 s each.",
            "",
            "| system, flood rate | SYN/s | success |",
            "|---|---:|---:|",
        ]
        for key, r in res["attack"].items():
            lines.append(
                f"| {key} | {r['rate_pps']:,} | {r['success_rate']:.0%} of {r['attempts']} |"
            )
    if "memory" in res:
        mem = res["memory"]
        lines += [
            "",
            "#### Daemon memory",
            "",
            f"RSS {mem['rss_before_mib']} MiB before, {mem['rss_after_mib']} MiB after "
            f"{mem['packets_sent']:,} SYNs from {mem['distinct_sources_sent']:,} distinct "
            f"spoofed sources; tracked sources afterwards: {mem['tracked_sources_after']}.",
        ]
    if "metrics_overhead" in res:
        from bench import metrics_overhead

        lines += [
            "",
            "#### Prometheus metrics on and off (same run)",
            "",
            metrics_overhead.table(res["metrics_overhead"]),
        ]
    if "shared" in res:
        from bench import shared

        lines.append(shared.table(res["shared"]))
    if "door" in res or "isn_engine" in res:
        from bench import door

        lines += ["", door.table({**res.get("door", {}), **res.get("isn_engine", {})})]
    return "\n".join(lines) + "\n"


def run_shared(b: Any, sizes: dict[str, Any]) -> dict[str, Any]:
    """Issue 12's figures: claim latency by store, knock-to-open by backend, workers."""
    from bench import shared

    out: dict[str, Any] = {}
    print("== claim latency (embedded, Redis)", flush=True)
    out["claims"] = shared.claim_latency(b, sizes["claims"])
    print(json.dumps(out["claims"]), flush=True)
    print("== knock to open by backend", flush=True)
    out["backends"] = shared.knock_to_open_backends(b, sizes["knock_runs"])
    print(json.dumps(out["backends"]), flush=True)
    print("== workers", flush=True)
    out["workers"] = shared.workers_throughput(b, sizes["seconds"])
    print(json.dumps(out["workers"]), flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench")
    ap.add_argument(
        "what",
        nargs="?",
        default="all",
        choices=["all", "engine", "engine-scale", "kernel", "drain", "metrics", "shared", "door"],
    )
    ap.add_argument("--users", type=int, default=100_000, help="engine-scale: how many users")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: checks the harness runs")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args(argv)
    sizes = SIZES["smoke" if args.smoke else "full"]
    res: dict[str, Any] = {"machine": machine(), "smoke": args.smoke}
    if args.what == "engine-scale":
        res["engine_scale"] = engine.scale(args.users)
        print(json.dumps(res, indent=1))
        print(engine.scale_table(res["engine_scale"]))
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "engine-scale.json").write_text(json.dumps(res, indent=1) + "\n")
        return 0
    if args.what in ("all", "engine"):
        res["engine"] = engine.run(**sizes["engine"])
        print(engine.table(res["engine"]), flush=True)
        res["spa_verify"] = spa_verify.run(**sizes["spa_verify"])
        print(spa_verify.table(res["spa_verify"]), flush=True)
    if args.what in ("all", "engine", "door"):
        from bench import door

        res["isn_engine"] = {"isn_engine": door.isn_engine(**sizes["isn_engine"])}
        print(door.table(res["isn_engine"]), flush=True)
    if args.what in ("all", "kernel", "drain", "metrics", "shared", "door"):
        from bench import kernel, metrics_overhead
        from nfknock.netlab import can_run

        why = can_run()
        if why is not None:
            print(f"bench: the kernel benchmarks cannot run here: {why}", file=sys.stderr)
            return 1
        with tempfile.TemporaryDirectory(prefix="nfknock-bench-") as tmp:
            b = kernel.Bench(Path(tmp))
            try:
                if args.what == "metrics":
                    res["metrics_overhead"] = metrics_overhead.run(b, **sizes["metrics"])
                    print(metrics_overhead.table(res["metrics_overhead"]), flush=True)
                    return _write(args.out, res)
                if args.what == "shared":
                    res["shared"] = run_shared(b, sizes["shared"])
                    raise _Done
                if args.what == "drain":
                    res["drain"] = kernel.drain(b, **sizes["drain"])
                    raise _Done
                if args.what == "door":
                    from bench import door

                    res["door"] = door.run(b, **sizes["door"])
                    raise _Done
                print("== throughput", flush=True)
                res["throughput"] = kernel.throughput(b, **sizes["throughput"])
                print(json.dumps(res["throughput"]), flush=True)
                print("== drain a pre-filled queue", flush=True)
                res["drain"] = kernel.drain(b, **sizes["drain"])
                print(json.dumps(res["drain"]), flush=True)
                print("== latency", flush=True)
                res["latency"] = kernel.latency(b, **sizes["latency"])
                print("== knock to open", flush=True)
                res["knock_to_open"] = kernel.knock_to_open(b, **sizes["knock"])
                print(json.dumps(res["knock_to_open"]), flush=True)
                print("== SPA to open", flush=True)
                res["spa_to_open"] = kernel.spa_to_open(b, **sizes["spa"])
                print(json.dumps(res["spa_to_open"]), flush=True)
                print("== under attack", flush=True)
                top = res["throughput"]["bare_python"]["handled_pps"]
                atk = sizes["attack"]
                rates = {label: f * top for label, f in atk["fractions"].items()}
                res["attack"] = kernel.under_attack(b, rates, atk["attempts"], atk["systems"])
                print("== memory", flush=True)
                res["memory"] = kernel.memory(b, **sizes["memory"])
                print("== metrics on and off", flush=True)
                res["metrics_overhead"] = metrics_overhead.run(b, **sizes["metrics"])
                res["shared"] = run_shared(b, sizes["shared"])
                from bench import door

                res["door"] = door.run(b, **sizes["door"])
            except _Done:
                pass
            finally:
                b.close()
    return _write(args.out, res)


def _write(out: Path, res: dict[str, Any]) -> int:
    out.mkdir(parents=True, exist_ok=True)
    name = "bench" if "engine" in res or "throughput" in res else "metrics"
    if "door" in res and "throughput" not in res:
        name = "door"
    if "drain" in res and "throughput" not in res:
        name = "drain"
    (out / f"{name}.json").write_text(json.dumps(res, indent=1) + "\n")
    text = markdown(res)
    (out / f"{name}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
