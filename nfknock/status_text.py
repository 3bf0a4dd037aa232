"""``nfknock status`` for people: the daemon's status reply as readable lines.

Pure: the reply and the wall time in, lines out.  The reply is the daemon's JSON
(``--json`` prints it unchanged); every field is optional here, so an older or
newer daemon still gets a readable answer rather than a traceback.
"""

from __future__ import annotations

import math
import time
from typing import Any

VERDICTS = ("drop", "accept", "reject")


def format_duration(seconds: float) -> str:
    """23 s, 4 min 10 s, 2 h 3 min, 3 d 4 h: two units at most."""
    s = max(int(seconds), 0)
    days, rest = divmod(s, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes} min"
    if minutes:
        return f"{minutes} min {secs} s"
    return f"{secs} s"


def format_expiry(expires: float, now: float) -> str:
    """Local time of day and how far away: ``2024-05-01 14:03:09 (in 23 s)``."""
    local = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(expires))
    if expires < now:
        return f"{local} ({format_duration(now - expires)} ago)"
    return f"{local} (in {format_duration(expires - now)})"


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if not math.isfinite(value) or abs(value) > 1e11:  # beyond year 5000: not a time
        return None
    return float(value)


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def format_status(st: dict[str, Any], now: float) -> list[str]:
    uptime = _number(st.get("uptime"))
    head = f"nfknock daemon, pid {st.get('pid', '?')}"
    if uptime is not None:
        head += f", up {format_duration(uptime)}"
    if st.get("step") is not None:
        head += f", step {st.get('step')}"
    lines = [head]

    verdicts = _dict(st.get("verdicts"))
    counts = " ".join(f"{v} {verdicts.get(v, 0)}" for v in VERDICTS)
    lines.append(
        f"verdicts: {counts}; malformed packets {st.get('malformed', 0)}, "
        f"internal errors {st.get('internal_errors', 0)}"
    )
    lines += _queue_lines(_dict(st.get("queue")))
    lines.append(f"tracked sources: {st.get('tracked_sources', 0)}")

    users = _dict(st.get("users"))
    for name in sorted(users):
        u = _dict(users[name])
        state = "enabled" if u.get("enabled") else "disabled"
        lines.append(f"user {name}: {state}, counter {u.get('counter', 0)} this step")
    if not users:
        lines.append("users: none")

    grants = [g for g in st.get("grants") or [] if isinstance(g, dict)]
    for g in grants:
        ports = g.get("ports") or []
        ports_text = ",".join(map(str, ports)) if isinstance(ports, list) else str(ports)
        left = g.get("remaining", "?")
        expires = _number(g.get("expires"))
        when = format_expiry(expires, now) if expires is not None else "at an unknown time"
        lines.append(
            f"grant {g.get('user', '?')} {g.get('source', '?')} -> {g.get('destination', '?')} "
            f"port{'s' if isinstance(ports, list) and len(ports) > 1 else ''} {ports_text}: "
            f"{left} connection{'' if left == 1 else 's'} left, expires {when}"
        )
    if not grants:
        lines.append("grants: none open")
    return lines


def _queue_lines(queues: dict[str, Any]) -> list[str]:
    """One line per queue: the daemon reports {number: its /proc line}, every queue it
    serves (priority and knock); an older daemon reported one queue's line itself."""
    if queues and not all(isinstance(v, dict) for v in queues.values()):
        queues = {str(queues.get("queue", "?")): queues}
    if not queues:
        return ["queue: no statistics (/proc/net/netfilter/nfnetlink_queue unreadable)"]
    out = []
    for number in sorted(queues, key=lambda n: (not n.isdigit(), int(n) if n.isdigit() else 0)):
        q = _dict(queues[number])
        if not q:
            out.append(
                f"queue {number}: not bound (no line in /proc/net/netfilter/nfnetlink_queue: "
                "the kernel drops its packets)"
            )
            continue
        out.append(
            f"queue {number}: {q.get('waiting', 0)} waiting; lost "
            f"{q.get('queue_dropped', 0)} (queue full) and {q.get('user_dropped', 0)} "
            "(socket full)"
        )
    return out
