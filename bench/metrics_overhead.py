"""Throughput with Prometheus metrics on and off, in the same run (issue 13 item 2).

The daemon (one user) is started alternately without and with ``[metrics] listen``.
Each time, a flood paced at a fixed rate to the knock range measures its CPU per SYN
(``paced``: SYN handled per CPU-second of the daemon), and a flat-out flood what it
handles per second (``saturate``).  With metrics on, a scraper fetches ``/metrics``
every ``scrape_every`` seconds during the floods -- far more often than Prometheus'
usual 15 s, so the figure includes the cost of serving scrapes, not only of the
loop's once-a-second snapshot.  Rounds alternate off/on so that the machine's drift
spreads over both; each round's on/off ratio is reported, with their median, min and
max (the noise).  On a shared 2-core machine that noise is larger than the effect, so
the cost is also measured directly, in-process (:func:`snapshot_cost`): what one
snapshot costs the loop, and what rendering its text costs the HTTP thread.
``scrape_every = 0`` measures a client scraping in a tight loop (the bound of
:mod:`nfknock.metrics_http`).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from bench.kernel import FILTER_CPU, SENDER_CPU, Bench, paced, saturate
from nfknock.netlab import PY

LISTEN = "127.0.0.1:9610"
SCRAPER = """
import sys, time, urllib.request
every, until = float(sys.argv[1]), time.monotonic() + float(sys.argv[2])
n = 0
while time.monotonic() < until:
    urllib.request.urlopen("http://127.0.0.1:9610/metrics", timeout=5).read()
    n += 1
    time.sleep(every)
print(n, flush=True)
"""


def start(b: Bench, metrics_on: bool) -> None:
    """A fresh daemon (as ``Bench.start_nfknock``), with or without the endpoint."""
    b.stop_filter()
    b.reset_firewall()
    for name in ("state.db", "state.db-wal", "state.db-shm"):
        (b.workdir / name).unlink(missing_ok=True)
    sections: dict[str, Any] = {"log": {"level": "info", "format": "json"}}
    if metrics_on:
        sections["metrics"] = {"listen": LISTEN}
    cfg = b.lab.write_config({"alice": b.secret}, **sections)
    b.lab.install_rules(cfg)
    b.filter = b.lab.start_daemon(cfg, wait=120, cpu=FILTER_CPU)


def measure(
    b: Bench, metrics_on: bool, seconds: float, rate: float, every: float
) -> dict[str, Any]:
    start(b, metrics_on)
    scraper = None
    if metrics_on:
        span = str(2 * seconds + 5)
        argv = ["taskset", "-c", SENDER_CPU, PY, "-c", SCRAPER, str(every), span]
        scraper = b.lab.spawn(b.lab.server, *argv)
    fixed = paced(b, rate, seconds)
    flat = saturate(b, seconds)
    if scraper is not None:
        scraper.terminate()
        scraper.wait(10)
    return {
        "per_cpu_second": fixed["per_cpu_second"],
        "lost_at_fixed_rate": fixed["lost"],
        "handled_pps": flat["handled_pps"],
    }


def run(b: Bench, rounds: int, seconds: float, rate: float, scrape_every: float) -> dict[str, Any]:
    out: dict[str, Any] = {"rate": rate, "seconds": seconds, "scrape_every": scrape_every}
    rows = []
    for _ in range(rounds):
        off = measure(b, False, seconds, rate, scrape_every)
        on = measure(b, True, seconds, rate, scrape_every)
        rows.append(
            {
                "off": off,
                "on": on,
                "ratio_cpu": round(on["per_cpu_second"] / max(off["per_cpu_second"], 1), 3),
                "ratio_handled": round(on["handled_pps"] / max(off["handled_pps"], 1), 3),
            }
        )
        time.sleep(0.5)
    b.stop_filter()
    out["snapshot_cost"] = snapshot_cost()
    out["rounds"] = rows
    for key in ("ratio_cpu", "ratio_handled"):
        values = [r[key] for r in rows]
        out[key] = {
            "median": round(statistics.median(values), 3),
            "min": min(values),
            "max": max(values),
        }
    return out


def table(res: dict[str, Any]) -> str:
    lines = [
        f"Scrape every {res['scrape_every']} s with metrics on; {len(res['rounds'])} "
        "round(s), off then on.",
        "",
        f"| round | SYN per CPU-s at {res['rate']:,.0f}/s, off | on | ratio | flat out "
        "SYN/s, off | on | ratio |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for i, r in enumerate(res["rounds"], 1):
        lines.append(
            f"| {i} | {r['off']['per_cpu_second']:,} | {r['on']['per_cpu_second']:,} | "
            f"{r['ratio_cpu']:.3f} | {r['off']['handled_pps']:,} | {r['on']['handled_pps']:,} | "
            f"{r['ratio_handled']:.3f} |"
        )
    c, h = res["ratio_cpu"], res["ratio_handled"]
    lines += [
        "",
        f"on/off, median (min-max): CPU per SYN {c['median']:.3f} ({c['min']:.3f}-{c['max']:.3f}),"
        f" flat out {h['median']:.3f} ({h['min']:.3f}-{h['max']:.3f}).",
    ]
    for users, cost in res.get("snapshot_cost", {}).items():
        lines.append(
            f"With {users} user(s): a snapshot costs the loop {cost['snapshot_us']} µs, "
            f"rendering its text {cost['render_us']} µs in the HTTP thread (each once a second)."
        )
    return "\n".join(lines)


def snapshot_cost(user_counts: tuple[int, ...] = (1, 10_000), repeats: int = 200) -> dict[str, Any]:
    """What the loop pays per snapshot and the HTTP thread per rendering of its text
    (each at most once a second), in microseconds: in-process, free of the floods'
    noise."""
    import os
    import tempfile
    from pathlib import Path

    from nfknock import metrics
    from nfknock.config import load_config
    from nfknock.logs import EventLogger
    from nfknock.sequence import format_base32
    from nfknock.service import Service

    out: dict[str, Any] = {}
    for users in user_counts:
        with tempfile.TemporaryDirectory(prefix="nfknock-metrics-") as tmp:
            d = Path(tmp)
            (d / "users.toml").write_text(
                "".join(
                    f'[users.u{i}]\nsecret = "{format_base32(os.urandom(32))}"\n'
                    for i in range(users)
                )
            )
            (d / "users.toml").chmod(0o600)
            (d / "nfknock.toml").write_text(
                f'[[protect]]\nport = 22\n[state]\npath = "{d}/state.db"\n'
                f'[users]\nfile = "{d}/users.toml"\n[control]\nsocket = "{d}/ctl.sock"\n'
            )
            svc = Service(load_config(d / "nfknock.toml"), EventLogger())
            try:
                rules = {"ok": True, "checked": 1.0, "problems": []}
                metrics.snapshot(svc, rules, 0)  # the per-config user count, cached
                t0 = time.perf_counter()
                for _ in range(repeats):
                    snap = metrics.snapshot(svc, rules, 0)
                t1 = time.perf_counter()
                for _ in range(repeats):
                    metrics.render(snap)
                t2 = time.perf_counter()
            finally:
                svc.store.close()
        out[str(users)] = {
            "snapshot_us": round((t1 - t0) / repeats * 1e6, 1),
            "render_us": round((t2 - t1) / repeats * 1e6, 1),
        }
    return out
