"""``nfknock status --health``: one yes/no for supervisors (keepalived, monitoring).

Healthy means all of:

* the daemon answers on its control socket (within ``timeout`` seconds: a stuck
  loop is unhealthy too);
* every queue of its configuration has a process bound, as this namespace's
  ``/proc/net/netfilter/nfnetlink_queue`` shows -- read here, not taken from the
  daemon, so a daemon bound in another network namespace (a sandbox with a
  private network) is caught: the rules here would feed queues nobody reads;
* its last rules check found nothing wrong (``status["rules"]["ok"]``; not yet
  checked counts as not healthy);
* its state store records claims (``status["state"]["ok"]``; else nothing opens).

Exit 0 with one line on stdout, or 1 with one line on stderr naming every reason.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from nfknock.config import Config
from nfknock.procnet import NFQUEUE_PROC, QueueLine, read_queues

TIMEOUT = 5.0


def problems(cfg: Config, status: dict[str, Any], bound: dict[int, QueueLine]) -> list[str]:
    """Why the daemon that sent ``status`` is not healthy (empty: it is)."""
    out = []
    unbound = [
        q
        for q in (*cfg.queue.priority_queues(), *cfg.queue.knock_queues())
        if q not in bound or bound[q].portid == 0
    ]
    if unbound:
        out.append(
            f"no process bound to queue(s) {', '.join(map(str, unbound))} in this network "
            "namespace (the kernel drops what the rules send there)"
        )
    rules = status.get("rules") or {}
    if rules.get("ok") is None:
        out.append("the daemon has not checked its rules yet")
    elif not rules["ok"]:
        codes = sorted({str(p.get("code")) for p in rules.get("problems") or []})
        out.append(f"rules not in place ({', '.join(codes) or 'unknown problem'})")
    state = status.get("state") or {}
    if not state.get("ok"):
        out.append(f"state store not writable: {state.get('error') or 'unknown error'}")
    return out


def check(cfg: Config, timeout: float = TIMEOUT, proc: Path = NFQUEUE_PROC) -> tuple[bool, str]:
    """(healthy, the one line saying so or why not)."""
    from nfknock.control import control_request

    try:
        reply = control_request(cfg.control_socket, "status", timeout=timeout)
    except TimeoutError:
        return False, f"unhealthy: the daemon at {cfg.control_socket} did not answer in {timeout} s"
    except (OSError, ValueError) as exc:
        return False, f"unhealthy: no daemon answers at {cfg.control_socket} ({exc})"
    status = reply.get("status")
    if not reply.get("ok") or not isinstance(status, dict):
        return False, f"unhealthy: the daemon refused the status request: {reply.get('error')}"
    found = problems(cfg, status, read_queues(proc))
    if found:
        return False, f"unhealthy: {'; '.join(found)}"
    queues = ", ".join(map(str, (*cfg.queue.priority_queues(), *cfg.queue.knock_queues())))
    return True, (
        f"healthy: pid {status.get('pid')} answers, queue(s) {queues} bound, rules in place, "
        "state writable"
    )


def main(cfg: Config) -> int:
    ok, line = check(cfg)
    print(line, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1
