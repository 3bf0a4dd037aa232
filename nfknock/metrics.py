"""Prometheus metrics, through ``prometheus_client``, without slowing the packet path.

Theory of operation.  The numbers live in the daemon's loop thread, which must
never wait for an HTTP client, and which no other thread may touch.  So:

1. The loop builds a *snapshot* -- a plain dict of numbers, :func:`snapshot` --
   between packets, once a second (``Daemon.housekeeping``), and publishes it
   with one attribute assignment (atomic under the GIL).  The dict is never
   changed after that: a reader holds either the old one or the new one.
2. The HTTP server (:mod:`nfknock.metrics_http`, a thread of its own, ``[metrics]
   listen``) serves :class:`SnapshotCollector`, which turns the latest snapshot
   into metric families, rendered once per snapshot.  A scrape never touches the
   loop's objects; the loop pays for the snapshot once a second whatever the
   scrape rate, and the server bounds what scrapes may cost the interpreter.
3. ``nfknock status --format prometheus`` asks the daemon for a fresh snapshot
   over the control socket (command ``metrics``) and prints it through the same
   collector -- the same text, for node_exporter's textfile collector where no
   listener is wanted (only the ``process_*`` metrics of the HTTP endpoint are
   missing: they would describe the CLI process).

``nfknock_snapshot_timestamp_seconds`` says when the loop last published: a
stuck loop shows as a timestamp that stops moving.  Counters restart from zero
with the daemon (the kernel's queue counters with the queue binding), which
Prometheus' ``rate()`` handles.
"""

from __future__ import annotations

import platform
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from nfknock import __version__
from nfknock.events import EventKind, Verdict
from nfknock.procnet import read_queues
from nfknock.spa.reasons import PROSE as SPA_CODES
from nfknock.store.worker import CLAIM_BUCKETS

if TYPE_CHECKING:
    from nfknock.config import Config
    from nfknock.service import Service

SNAPSHOT_SECONDS = 1.0  # how often the loop publishes a snapshot
_users_of: list[tuple[object, dict[str, int]]] = []  # [(config, counts)]: one entry


def _user_counts(cfg: Config) -> dict[str, int]:
    """Users by state; computed once per configuration (``all_users`` sorts)."""
    if not _users_of or _users_of[0][0] is not cfg:
        users = cfg.all_users
        enabled = sum(1 for u in users if u.enabled)
        _users_of[:] = [(cfg, {"enabled": enabled, "disabled": len(users) - enabled})]
    return _users_of[0][1]


def snapshot(service: Service, rules: dict[str, Any], held: int) -> dict[str, Any]:
    """The numbers of one moment, as JSON-safe plain data.  Call it in the loop
    thread only (between packets): it reads the core's counters."""
    cfg = service.cfg
    worker = service.store
    bound = read_queues()
    queues: dict[str, dict[str, Any]] = {}
    for role, numbers in (
        ("priority", cfg.queue.priority_queues()),
        ("knock", cfg.queue.knock_queues()),
    ):
        for number in numbers:
            line = bound.get(number)
            queues[str(number)] = {
                "role": role,
                "bound": line is not None and line.portid != 0,
                "waiting": line.waiting if line else 0,
                "queue_dropped": line.queue_dropped if line else 0,
                "user_dropped": line.user_dropped if line else 0,
            }
    problems = rules.get("problems") or []
    return {
        "version": __version__,
        "time": round(service.wall(), 3),
        "started": round(service.started, 3),
        "verdicts": service.verdict_counts(),
        "malformed": service.malformed,
        "internal_errors": service.errors,
        "events": dict(service.events.counts),
        "spa_results": dict(service.spa_results),
        "grants": len(service.core.grants),
        "tracked_sources": service.core.knocks.tracked_sources(),
        "held_packets": held,
        "users": dict(_user_counts(cfg)),
        "state": {
            "ok": not service.state_error,
            "claims": worker.claims,
            "claim_failures": service.claim_failures,
            "pending_claims": service.core.gate.pending_count(),
            "claim_buckets": list(worker.claim_buckets),
            "claim_seconds_sum": worker.claim_seconds_sum,
        },
        "rules": {
            "ok": rules.get("ok"),
            "checked": rules.get("checked"),
            "problems": len(problems),
        },
        "queue": queues,
    }


def _num(value: Any) -> float:
    """A number from the snapshot (a daemon of another version may lack a key)."""
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


def families(snap: dict[str, Any]) -> Iterator[Metric]:
    """The metric families of one snapshot."""
    build = GaugeMetricFamily(
        "nfknock_build_info", "nfknock version and Python (always 1)", labels=["version", "python"]
    )
    build.add_metric([str(snap.get("version", "")), platform.python_version()], 1)
    yield build
    yield GaugeMetricFamily(
        "nfknock_start_time_seconds",
        "when the daemon started (Unix time)",
        _num(snap.get("started")),
    )
    yield GaugeMetricFamily(
        "nfknock_snapshot_timestamp_seconds",
        "when the daemon's loop published these numbers (stops moving if the loop is stuck)",
        _num(snap.get("time")),
    )

    verdicts = CounterMetricFamily(
        "nfknock_verdicts",
        "verdicts given, by kind (hold: kept until a claim resolved)",
        labels=["verdict"],
    )
    given = snap.get("verdicts") or {}
    for v in Verdict:
        verdicts.add_metric([v.name.lower()], _num(given.get(v.name.lower())))
    yield verdicts
    yield CounterMetricFamily(
        "nfknock_malformed_packets",
        "queued packets that did not parse (dropped)",
        _num(snap.get("malformed")),
    )
    yield CounterMetricFamily(
        "nfknock_internal_errors",
        "bugs caught on the packet path (the packet was dropped)",
        _num(snap.get("internal_errors")),
    )

    counts = snap.get("events") or {}
    events = CounterMetricFamily(
        "nfknock_events",
        "events by kind (as logged; rate-limited lines counted too)",
        labels=["event"],
    )
    for kind in EventKind:
        events.add_metric([kind.value], _num(counts.get(kind.value)))
    yield events
    yield CounterMetricFamily(
        "nfknock_sequences_completed",
        "knock sequences completed with a fresh counter",
        _num(counts.get(EventKind.SEQUENCE_COMPLETED.value)),
    )
    yield CounterMetricFamily(
        "nfknock_sequences_stale",
        "knock sequences completed with a spent counter (replays)",
        _num(counts.get(EventKind.SEQUENCE_STALE.value)),
    )

    results = snap.get("spa_results") or {}
    spa = CounterMetricFamily(
        "nfknock_spa_results",
        "SPA packets by result code (spa_accepted or why refused)",
        labels=["code"],
    )
    for code in sorted(set(SPA_CODES) | set(results)):
        spa.add_metric([code], _num(results.get(code)))
    yield spa

    yield GaugeMetricFamily("nfknock_grants_open", "open grants", _num(snap.get("grants")))
    yield GaugeMetricFamily(
        "nfknock_sources_tracked",
        "sources with knock progress tracked",
        _num(snap.get("tracked_sources")),
    )
    yield GaugeMetricFamily(
        "nfknock_held_packets",
        "SYNs held until their grant's claim resolves",
        _num(snap.get("held_packets")),
    )
    users = GaugeMetricFamily("nfknock_users", "configured users by state", labels=["state"])
    for state in ("enabled", "disabled"):
        users.add_metric([state], _num((snap.get("users") or {}).get(state)))
    yield users

    yield from _queue_families(snap.get("queue") or {})
    yield from _state_families(snap.get("state") or {})

    rules = snap.get("rules") or {}
    if rules.get("ok") is not None:  # absent until the first check
        yield GaugeMetricFamily(
            "nfknock_rules_ok",
            "1 when nfknock's rules are installed, complete and first (nfknock rules --verify)",
            1.0 if rules["ok"] else 0.0,
        )
        yield GaugeMetricFamily(
            "nfknock_rules_problems",
            "problems the last rules check found",
            _num(rules.get("problems")),
        )
        yield GaugeMetricFamily(
            "nfknock_rules_checked_timestamp_seconds",
            "when the rules were last checked",
            _num(rules.get("checked")),
        )


def _queue_families(queues: dict[str, Any]) -> Iterator[Metric]:
    labels = ["queue", "role"]
    bound = GaugeMetricFamily(
        "nfknock_queue_bound",
        "1 when a process is bound to the queue (else the kernel drops)",
        labels=labels,
    )
    waiting = GaugeMetricFamily(
        "nfknock_queue_waiting", "packets waiting in the kernel queue", labels=labels
    )
    dropped = CounterMetricFamily(
        "nfknock_queue_dropped",
        "packets the kernel dropped since the queue was bound: queue_full (max_len) or "
        "socket_full (the netlink socket buffer)",
        labels=[*labels, "reason"],
    )
    for number, q in sorted(queues.items(), key=lambda item: int(item[0])):
        key = [str(number), str(q.get("role", ""))]
        bound.add_metric(key, 1.0 if q.get("bound") else 0.0)
        waiting.add_metric(key, _num(q.get("waiting")))
        dropped.add_metric([*key, "queue_full"], _num(q.get("queue_dropped")))
        dropped.add_metric([*key, "socket_full"], _num(q.get("user_dropped")))
    yield bound
    yield waiting
    yield dropped


def _state_families(state: dict[str, Any]) -> Iterator[Metric]:
    yield GaugeMetricFamily(
        "nfknock_state_ok",
        "1 when the state store records claims (else nothing opens)",
        1.0 if state.get("ok") else 0.0,
    )
    yield CounterMetricFamily(
        "nfknock_state_claims",
        "claims the state store recorded (won, lost or failed)",
        _num(state.get("claims")),
    )
    yield CounterMetricFamily(
        "nfknock_state_claim_failures",
        "claims the state store could not record",
        _num(state.get("claim_failures")),
    )
    yield GaugeMetricFamily(
        "nfknock_state_claims_pending",
        "claims submitted and not yet resolved",
        _num(state.get("pending_claims")),
    )
    raw = state.get("claim_buckets")
    if isinstance(raw, list) and len(raw) == len(CLAIM_BUCKETS) + 1:
        buckets, total = [], 0.0
        for bound, count in zip([*map(str, CLAIM_BUCKETS), "+Inf"], raw, strict=True):
            total += _num(count)
            buckets.append((bound, total))
        yield HistogramMetricFamily(
            "nfknock_state_claim_duration_seconds",
            "time the state store took to record one claim",
            buckets=buckets,
            sum_value=_num(state.get("claim_seconds_sum")),
        )


class SnapshotCollector(Collector):
    """Serves whatever snapshot was published last; never touches the daemon."""

    def __init__(self, snap: dict[str, Any] | None = None) -> None:
        self.snapshot: dict[str, Any] = snap or {}

    def collect(self) -> Iterator[Metric]:
        yield from families(self.snapshot)


def render(snap: dict[str, Any]) -> str:
    """The Prometheus text format of one snapshot (``status --format prometheus``)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(snap))
    return generate_latest(registry).decode()


__all__ = [
    "SNAPSHOT_SECONDS",
    "SnapshotCollector",
    "families",
    "render",
    "snapshot",
]
