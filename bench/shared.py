"""Shared state and worker processes (issue 12), against the real kernel.

* ``claim_latency``: one claim (a won counter and its grant) in the embedded store
  and in Redis across the namespace link, timed from the server namespace (where the
  daemon's store thread runs).
* ``knock_to_open_backends``: knock-to-open with the Redis backend and with the
  embedded default, in the same run, with the same driver.
* ``workers_throughput``: the knock flood with 1 and 2 worker processes.

Redis runs in the client namespace on 198.51.100.10:6379 (the daemon in the server
namespace reaches it over the veth), ``--save ''``, ended by PID afterwards.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from bench.kernel import (
    FILTER_CPU,
    HERE,
    Bench,
    _close,
    _run_once,
    summary,
)
from nfknock.netlab import CLIENT4, PY
from nfknock.netlab.redisd import RedisServer
from nfknock.sequence import format_base32


def _redis(b: Bench, persistent: bool = False) -> RedisServer:
    """``persistent``: append-only file, fsync at every write (the README's advice)."""
    where = b.workdir / ("redis-aof" if persistent else "redis")
    server = RedisServer(where, address=CLIENT4, netns=b.lab.client, persistent=persistent)
    server.start()
    return server


def _start(b: Bench, cpus: str = FILTER_CPU, **sections: Any) -> Path:
    """nfknock (one user) with extra config sections, from a clean state."""
    b.stop_filter()
    b.reset_firewall()
    for name in ("state.db", "state.db-wal", "state.db-shm"):
        (b.workdir / name).unlink(missing_ok=True)
    cfg = b.lab.write_config(
        {"alice": b.secret}, log={"level": "info", "format": "json"}, **sections
    )
    b.lab.install_rules(cfg)
    b.filter = b.lab.start_daemon(cfg, wait=120, cpu=cpus)
    return cfg


# --- 1. claim latency ----------------------------------------------------------------


def claim_latency(b: Bench, n: int) -> dict[str, Any]:
    def probe(*args: str) -> dict[str, Any]:
        out = b.lab.sh(
            b.lab.server, PY, str(HERE / "claim_probe.py"), *args, "-n", str(n), timeout=600
        )
        data = json.loads(out.stdout)
        return {**summary(data["us"]), "failures": data["failures"]}

    state = b.workdir / "claims.db"
    for suffix in ("", "-wal", "-shm", ".lock"):
        Path(f"{state}{suffix}").unlink(missing_ok=True)
    out: dict[str, Any] = {"embedded_us": probe("--state", str(state))}
    for key, persistent in (("redis_us", False), ("redis_aof_us", True)):
        server = _redis(b, persistent)
        try:
            out[key] = probe("--url", server.url)
        finally:
            server.stop()
    base = out["embedded_us"]["median"]
    out["redis_vs_embedded_median"] = round(out["redis_us"]["median"] / base, 3)
    out["redis_aof_vs_embedded_median"] = round(out["redis_aof_us"]["median"] / base, 3)
    return out


# --- 2. knock to open, both backends in one run ---------------------------------------------


def knock_to_open_backends(b: Bench, runs: int) -> dict[str, Any]:
    server = _redis(b)
    out: dict[str, Any] = {}
    try:
        backends: dict[str, dict[str, Any]] = {
            "embedded": {},
            "redis": {"backend": "redis", "url": server.url, "prefix": "bench", "timeout": 1.0},
        }
        for name, state in backends.items():
            _start(b, state=state) if state else _start(b)
            drv = b.driver("nfknock", "--secret-base32", format_base32(b.secret))
            times, failures = [], 0
            try:
                for _ in range(runs):
                    r = _run_once(drv)
                    if r["ok"]:
                        times.append(r["ms"])
                    else:
                        failures += 1
            finally:
                _close(drv)
            out[name] = {**summary(times), "failures": failures}
    finally:
        b.stop_filter()
        server.stop()
    if out["embedded"].get("median") and out["redis"].get("median"):
        out["redis_vs_embedded"] = round(out["redis"]["median"] / out["embedded"]["median"], 3)
    return out


# --- 3. throughput with 1 and 2 workers --------------------------------------------------------


def _knock_queues(b: Bench, numbers: list[int]) -> dict[str, int]:
    text = b.lab.sh(b.lab.server, "cat", "/proc/net/netfilter/nfnetlink_queue").stdout
    total = {"queue_dropped": 0, "user_dropped": 0, "seen": 0}
    for line in text.splitlines():
        f = line.split()
        if f and int(f[0]) in numbers:
            total["queue_dropped"] += int(f[5])
            total["user_dropped"] += int(f[6])
            total["seen"] += int(f[7])
    return total


def _pids(b: Bench, workers: int) -> list[int]:
    """The processes giving verdicts: the daemon, or the supervisor's workers."""
    assert b.filter is not None
    if workers == 1:
        return [b.filter.pid]
    out = b.lab.nfknock("status", "--config", str(b.workdir / "nfknock.toml"), "--json")
    return [w["pid"] for w in json.loads(out.stdout)["workers"]]


def _cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _flood(b: Bench, workers: int, rate: float, seconds: float) -> dict[str, Any]:
    queues = list(range(workers, 2 * workers))  # [queue] knock_number = number + workers
    pids = _pids(b, workers)
    before, cpu0 = _knock_queues(b, queues), _cpu(pids)
    sent = b.flood(rate, seconds)
    time.sleep(0.3)
    after, cpu1 = _knock_queues(b, queues), _cpu(pids)
    ud = after["user_dropped"] - before["user_dropped"]
    lost = after["queue_dropped"] - before["queue_dropped"] + ud
    handled = after["seen"] - before["seen"] - ud
    return {
        "rate": round(rate),
        "sent_pps": round(sent["pps"]),
        "handled_pps": round(handled / sent["seconds"]),
        "lost": lost,
        "cpu_busy": round((cpu1 - cpu0) / sent["seconds"], 3),
        "per_cpu_second": round(handled / max(cpu1 - cpu0, 1e-9)),
    }


def workers_throughput(b: Bench, seconds: float, fixed_rate: float = 50_000.0) -> dict[str, Any]:
    """Flat out and at a fixed rate, for: one worker on CPU 1; two workers sharing
    CPU 1 (the same CPU budget: what the split costs); two workers on both CPUs
    (a second core, but the one the sender and the kernel's receive path use)."""
    out: dict[str, Any] = {}
    for label, workers, cpus in (
        ("1_worker_cpu1", 1, FILTER_CPU),
        ("2_workers_cpu1", 2, FILTER_CPU),
        ("2_workers_cpu0-1", 2, "0,1"),
    ):
        _start(b, cpus=cpus, queue={"workers": workers})
        out[label] = {
            "flat_out": _flood(b, workers, 0, seconds),
            "fixed": _flood(b, workers, fixed_rate, seconds),
        }
    b.stop_filter()
    one = out["1_worker_cpu1"]
    for label in ("2_workers_cpu1", "2_workers_cpu0-1"):
        row = out[label]
        row["ratio_flat_out"] = round(
            row["flat_out"]["handled_pps"] / max(one["flat_out"]["handled_pps"], 1), 3
        )
        row["ratio_per_cpu_second"] = round(
            row["fixed"]["per_cpu_second"] / max(one["fixed"]["per_cpu_second"], 1), 3
        )
    return out


def table(res: dict[str, Any]) -> str:
    lines = []
    if "claims" in res:
        c = res["claims"]
        lines += [
            "",
            "#### Claim latency: one won counter and its grant (µs)",
            "",
            "| store | claims | median | p99 | failures |",
            "|---|---:|---:|---:|---:|",
        ]
        for key, name in (
            ("embedded_us", "embedded (SQLite, fsync per claim)"),
            ("redis_us", "Redis across the namespace link, no persistence"),
            ("redis_aof_us", "Redis across the link, AOF fsync always"),
        ):
            r = c[key]
            lines.append(f"| {name} | {r['n']} | {r['median']} | {r['p99']} | {r['failures']} |")
    if "backends" in res:
        k = res["backends"]
        lines += [
            "",
            "#### Knock to open by state backend, same run (ms)",
            "",
            "| backend | runs | median | p95 | failures |",
            "|---|---:|---:|---:|---:|",
        ]
        for name in ("embedded", "redis"):
            r = k.get(name) or {}
            lines.append(
                f"| {name} | {r.get('n')} | {r.get('median')} | {r.get('p95')} "
                f"| {r.get('failures')} |"
            )
    if "workers" in res:
        w = res["workers"]
        lines += [
            "",
            "#### Knock flood with worker processes (SYN/s; CPU: the workers' own)",
            "",
            "| workers, CPUs | flat out: handled (lost) | at 50,000/s: SYN per CPU-s | lost |",
            "|---|---:|---:|---:|",
        ]
        for label, row in w.items():
            f, x = row["flat_out"], row["fixed"]
            lines.append(
                f"| {label} | {f['handled_pps']:,} ({f['lost']:,}) | {x['per_cpu_second']:,} "
                f"| {x['lost']:,} |"
            )
    return "\n".join(lines)
