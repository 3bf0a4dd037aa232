"""``nfknock run`` with ``[queue] workers = N > 1``: one supervisor, N worker processes.

The rules balance both queue ranges over the workers (``--queue-balance``): the kernel
hashes source and destination address and the protocol, so a client's knocks and
its TCP SYNs reach the same worker ``i`` (priority queue ``number + i``, knock queue
``knock_number + i``), while its UDP SPA packets may reach another.  Each worker is
an ordinary daemon (:class:`nfknock.daemon.Daemon` with a :class:`WorkerRole`) on its
own two queues; the workers share the state store (claims are decided there, once)
and learn each other's spent counters, SPA digests, grants and spent connections
through a feed (the Redis stream, or Unix datagrams on the embedded store:
:mod:`nfknock.store.localfeed`).

The supervisor does what must happen once:

* holds the embedded state's lock (one deployment per state file), and the
  workers' private directory (``[control] socket`` + ``.workers``, 0700: their
  control and feed sockets);
* binds the control socket: ``status`` asks every worker and answers for all of them
  (sums, and a ``workers`` list with each one's pid, liveness, restarts and counts),
  ``reload`` validates the configuration, re-applies the rules once, then asks each
  worker to reload; SIGHUP does the same;
* watches the rules (``rules.check`` every 30 s, as a lone daemon does);
* starts the workers and restarts one that dies (kill -9, a crash): at once the
  first time, after a growing pause (1 s doubling to 30 s) if it keeps dying young.
  While a worker is down its queues have no reader and the kernel drops what they
  hold -- its clients' SYNs go unanswered (fail closed) until it is back;
* SIGTERM: stops workers 1..N-1, then worker 0, which has heard every grant and
  spent connection by then and writes the clean-exit record of the embedded store.

``workers = 1`` runs no supervisor at all: the daemon is exactly the one-process
daemon it always was (a supervisor would add a process and a hop to every status
request, for nothing).  A worker (re)reads the configuration file when it starts,
so a restarted worker runs what the file says now: reload after editing it.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import MutableMapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from nfknock import rules
from nfknock.config import Config, ConfigError, load_config
from nfknock.control import ControlError, ControlServer, Mailbox, control_request
from nfknock.daemon import RULES_CHECK_SECONDS, RulesWatch, flag_signals
from nfknock.sdnotify import notify, watchdog_interval
from nfknock.service import WorkerRole, queue_stats
from nfknock.store import StateError
from nfknock.store.embedded import EmbeddedStore

TICK = 0.25
START_SECONDS = 60.0  # a worker must answer on its control socket within this
STOP_SECONDS = 10.0
YOUNG = 10.0  # a worker that dies younger than this is restarted after a pause
PAUSE_FIRST, PAUSE_MAX = 1.0, 30.0
ASK_SECONDS = 5.0  # a worker's answer to status (reload: the control timeout)

log = structlog.get_logger("nfknock")


def workers_dir(cfg: Config) -> Path:
    return cfg.control_socket.with_name(cfg.control_socket.name + ".workers")


def worker_socket(directory: Path, index: int) -> Path:
    return directory / f"worker-{index}.sock"


@dataclass
class Worker:
    index: int
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0  # monotonic
    restarts: int = 0
    last_exit: str = ""
    restart_at: float = 0.0  # monotonic; 0: not waiting
    pause: float = 0.0
    history: list[str] = field(default_factory=list)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class Supervisor:
    def __init__(self, cfg: Config, applied: Path, rules_every: float = RULES_CHECK_SECONDS):
        self.cfg = cfg
        self.applied = applied
        self.rules_every = rules_every
        self.directory = workers_dir(cfg)
        self.workers = [Worker(i) for i in range(cfg.queue.workers)]
        self.mailbox = Mailbox()
        self.rules = RulesWatch(cfg, applied, rules_every)
        self._rules_seen: tuple[str, ...] | None = None
        self._stop = False
        self._reload_requested = False
        self._reload_lock = threading.Lock()
        self.started = time.time()

    # --- workers ------------------------------------------------------------------

    def _spawn(self, worker: Worker) -> int:
        argv = [sys.executable, "-m", "nfknock.cli", "run", "--config", str(self.cfg.path)]
        argv += ["--applied", str(self.applied), "--worker", str(worker.index)]
        argv += ["--rules-check-seconds", str(self.rules_every)]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_", "WATCHDOG_"))}
        proc = subprocess.Popen(argv, env=env)  # its output: ours (the journal)
        worker.proc = proc
        worker.started = time.monotonic()
        worker.restart_at = 0.0
        return proc.pid

    def _check_workers(self) -> None:
        now = time.monotonic()
        for w in self.workers:
            if w.proc is not None and w.proc.poll() is not None:
                code = w.proc.returncode
                w.last_exit = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
                young = now - w.started < YOUNG
                w.pause = min(max(PAUSE_FIRST, w.pause * 2), PAUSE_MAX) if young else 0.0
                log.error(
                    "worker_exited",
                    worker=w.index,
                    pid=w.proc.pid,
                    reason=w.last_exit,
                    restart_in=round(w.pause, 1),
                )
                w.proc = None
                w.restart_at = now + w.pause
            if w.proc is None and w.restart_at and now >= w.restart_at:
                w.restarts += 1
                pid = self._spawn(w)
                log.warning("worker_restarted", worker=w.index, pid=pid, restarts=w.restarts)

    def _wait_ready(self) -> int:
        """0 when every worker answers; else the exit status to give up with."""
        deadline = time.monotonic() + START_SECONDS
        pending = set(range(len(self.workers)))
        while pending and time.monotonic() < deadline and not self._stop:
            for i in sorted(pending):
                w = self.workers[i]
                if w.proc is not None and w.proc.poll() is not None:
                    code = w.proc.returncode
                    log.error("worker_failed_to_start", worker=i, status=code)
                    return 2 if code == 2 else 1
                with contextlib.suppress(OSError, ValueError):
                    reply = control_request(worker_socket(self.directory, i), "status", 2.0)
                    if reply.get("ok"):
                        pending.discard(i)
            time.sleep(0.05)
        if pending and not self._stop:
            log.error("workers_not_ready", workers=sorted(pending), seconds=START_SECONDS)
            return 1
        return 0

    def _stop_workers(self) -> None:
        # Worker 0 last: it writes the embedded store's clean-exit record, and by
        # then has heard every grant and connection spent on the others.
        order = [w for w in self.workers if w.index != 0] + self.workers[:1]
        for group in (order[:-1], order[-1:]):
            for w in group:
                if w.proc is not None and w.alive:
                    w.proc.send_signal(signal.SIGTERM)
            for w in group:
                if w.proc is None:
                    continue
                try:
                    w.proc.wait(STOP_SECONDS)
                except subprocess.TimeoutExpired:
                    log.error("worker_kill", worker=w.index, pid=w.proc.pid)
                    w.proc.kill()
                    w.proc.wait(5)

    # --- control requests -------------------------------------------------------------

    def _control(self, request: dict[str, Any], fut: Future[dict[str, Any]]) -> None:
        command = request.get("command")
        if command == "status":
            threading.Thread(target=self._status, args=(fut,), daemon=True).start()
        elif command == "reload":
            threading.Thread(target=self._reload, args=(fut,), daemon=True).start()
        else:
            fut.set_result({"ok": False, "error": f"unknown command {command!r}"})

    def _ask(self, index: int, command: str, timeout: float) -> dict[str, Any] | None:
        try:
            reply = control_request(worker_socket(self.directory, index), command, timeout)
        except (OSError, ValueError):
            return None
        return reply

    def _status(self, fut: Future[dict[str, Any]]) -> None:
        replies = [self._ask(w.index, "status", ASK_SECONDS) for w in self.workers]
        statuses = [r.get("status") if r and r.get("ok") else None for r in replies]
        queues = {
            str(q): queue_stats(q)
            for q in [*self.cfg.queue.priority_queues(), *self.cfg.queue.knock_queues()]
        }
        out = aggregate(statuses)
        out["pid"] = os.getpid()
        out["uptime"] = round(time.time() - self.started, 1)
        out["queue"] = queues
        out["rules"] = self.rules.status()
        for w, part in zip(self.workers, out["workers"], strict=True):
            part.update(
                {
                    "pid": w.proc.pid if w.alive and w.proc is not None else None,
                    "alive": w.alive,
                    "restarts": w.restarts,
                    "last_exit": w.last_exit,
                    "queues": [
                        self.cfg.queue.number + w.index,
                        self.cfg.queue.knock_number + w.index,
                    ],
                }
            )
        fut.set_result({"ok": True, "status": out})

    def _reload(self, fut: Future[dict[str, Any]] | None) -> None:
        with self._reload_lock:
            try:
                new = load_config(self.cfg.path)
                old = self.cfg.queue
                if (new.queue.priority_queues(), new.queue.knock_queues()) != (
                    old.priority_queues(),
                    old.knock_queues(),
                ):
                    raise ConfigError(new.path, "queue", "changing the queues needs a restart")
                if (new.state, new.state_path) != (self.cfg.state, self.cfg.state_path):
                    raise ConfigError(new.path, "state", "changing the state store needs a restart")
                rules.ensure(new, self.applied)  # once, for all workers
            except (ConfigError, rules.RulesError) as exc:
                log.error(
                    "reload_failed", error=str(exc), reason="keeping the running configuration"
                )
                if fut is not None:
                    fut.set_result({"ok": False, "error": str(exc)})
                return
            self.cfg = new
            self.rules.recheck(new)
            errors = []
            for w in self.workers:
                reply = self._ask(w.index, "reload", 35.0)
                if not reply or not reply.get("ok"):
                    errors.append(f"worker {w.index}: {(reply or {}).get('error', 'no answer')}")
            if errors:
                log.error("reload_failed", error="; ".join(errors))
                reply_all: dict[str, Any] = {"ok": False, "error": "; ".join(errors)}
            else:
                log.info("reloaded", workers=len(self.workers))
                reply_all = {
                    "ok": True,
                    "detail": f"configuration reloaded by {len(self.workers)} workers",
                }
            if fut is not None:
                fut.set_result(reply_all)

    # --- main -------------------------------------------------------------------------

    def _prepare_directory(self) -> None:
        d = self.directory
        if d.is_symlink() or (d.exists() and not d.is_dir()):
            raise ControlError(f"{d}: exists and is not a directory; refusing to use it")
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(d, 0o700)
        for stale in d.glob("*.sock"):
            stale.unlink()

    def run(self) -> int:
        lock = None
        if self.cfg.state.backend == "embedded":
            # The lock only (no connection): one deployment per state file.  The
            # workers open the file without it.
            lock = EmbeddedStore(
                self.cfg.state_path, replay_cache=self.cfg.spa.replay_cache, lock=True
            )
            # Created and checked here, once: a damaged state refuses to start (exit
            # 2) before any worker runs, and workers never race to create the file.
            try:
                lock.load(time.time())
            except StateError:
                lock.close()
                raise
        control: ControlServer | None = None
        wake_r, wake_w = socket.socketpair()
        try:
            try:
                self._prepare_directory()
                control = ControlServer(self.cfg.control_socket, self.mailbox)
            except (ControlError, OSError) as exc:
                log.error("control_socket_failed", error=str(exc))
                return 1
            flag_signals(self, wake_r, wake_w)
            self.rules.start()
            for w in self.workers:
                self._spawn(w)
            failed = self._wait_ready()
            if failed:
                return failed
            if lock is not None:
                # Every worker has read the grants of the last clean exit: from now
                # on the file is in use (a crash restores none; worker 0 marks it
                # clean again when it stops last).
                try:
                    lock.begin()
                except StateError as exc:
                    log.error(
                        "state_not_writable",
                        error=str(exc),
                        reason="no claim can be recorded: nothing will open until this is fixed",
                    )
            log.info(
                "started",
                workers=len(self.workers),
                pids=[w.proc.pid for w in self.workers if w.proc is not None],
                queues=f"{self.cfg.queue.number}+{len(self.workers)}",
                knock_queues=f"{self.cfg.queue.knock_number}+{len(self.workers)}",
                state=self.cfg.state.describe(),
            )
            notify(f"READY=1\nSTATUS={len(self.workers)} workers")
            self._loop(wake_r)
            return 0
        finally:
            notify("STOPPING=1")
            signal.set_wakeup_fd(-1)
            self.rules.stop()
            self._stop_workers()
            if control is not None:
                control.close()
            wake_r.close()
            wake_w.close()
            if lock is not None:
                lock.close()
            log.info("stopped", workers=[w.last_exit or "stopped" for w in self.workers])

    def _loop(self, wake_r: socket.socket) -> None:
        poller = select.poll()
        poller.register(self.mailbox.fileno(), select.POLLIN)
        poller.register(wake_r.fileno(), select.POLLIN)
        watchdog = watchdog_interval()
        next_watchdog = 0.0
        while not self._stop:
            ready = {fd for fd, _ in poller.poll(int(TICK * 1000))}
            if wake_r.fileno() in ready:
                with contextlib.suppress(BlockingIOError):
                    wake_r.recv(64)
            if self._reload_requested:
                self._reload_requested = False
                threading.Thread(target=self._reload, args=(None,), daemon=True).start()
            if self.mailbox.fileno() in ready:
                self.mailbox.serve(self._control)
            self._check_workers()
            self._rules_seen = self.rules.report(self._rules_seen)
            if watchdog and time.monotonic() >= next_watchdog:
                notify("WATCHDOG=1")
                next_watchdog = time.monotonic() + watchdog


# --- status of all workers as one ---------------------------------------------------


def aggregate(statuses: list[dict[str, Any] | None]) -> dict[str, Any]:
    """One status for N workers: what a lone daemon's status holds (counts summed,
    the highest step any worker is on and each user's counter in that step, grants
    listed once), and ``workers`` (each one's own counts; ``answered`` False when it
    did not).

    A worker moves to a new time step at its next tick, so for a moment after a
    boundary the workers disagree; a worker still on the old step reports the old
    step's counter.  Counters are taken only from the workers on the newest step
    (each learns the counters spent on the others through the feed:
    nfknock.store.changes): the old step's counter labelled with the new step would
    send a client to a counter beyond the lookahead, which no worker accepts."""
    live = [s for s in statuses if s]
    step = max((s.get("step", 0) for s in live), default=0)
    out: dict[str, Any] = {
        "step": step,
        "users": {},
        "grants": [],
        "tracked_sources": 0,
        "verdicts": {},
        "malformed": 0,
        "internal_errors": 0,
        "held_packets": 0,
        "reloading": any(s.get("reloading") for s in live),
        "spa": {"ports": [], "users": 0, "results": {}, "replay_cache": 0},
        "workers": [],
    }
    grants: dict[tuple[Any, ...], dict[str, Any]] = {}
    errors = []
    for s in live:
        current = s.get("step", 0) == step
        for name, u in (s.get("users") or {}).items():
            known = out["users"].setdefault(name, {**u, "counter": 0})
            if current:
                known["counter"] = max(known["counter"], u.get("counter", 0))
        for g in s.get("grants") or []:
            key = (g["source"], g["destination"], g["user"], g["method"], round(g["expires"]))
            have = grants.get(key)
            if have is None or g["remaining"] < have["remaining"]:
                grants[key] = g  # every worker knows a shared grant: list it once
        for name in ("tracked_sources", "malformed", "internal_errors", "held_packets"):
            out[name] += s.get(name) or 0
        for verdict, n in (s.get("verdicts") or {}).items():
            out["verdicts"][verdict] = out["verdicts"].get(verdict, 0) + n
        spa = s.get("spa") or {}
        out["spa"]["ports"] = spa.get("ports", [])
        out["spa"]["users"] = spa.get("users", 0)
        out["spa"]["replay_cache"] = max(out["spa"]["replay_cache"], spa.get("replay_cache", 0))
        for code, n in (spa.get("results") or {}).items():
            out["spa"]["results"][code] = out["spa"]["results"].get(code, 0) + n
        state = s.get("state") or {}
        if state.get("error"):
            errors.append(f"worker {s.get('worker')}: {state['error']}")
    out["grants"] = list(grants.values())
    states = [s.get("state") or {} for s in live]
    first = states[0] if states else {}
    out["state"] = {
        "store": first.get("store"),
        "backend": first.get("backend"),
        "ok": bool(live) and len(live) == len(statuses) and not errors,
        "error": "; ".join(errors)
        if errors
        else ("" if len(live) == len(statuses) else "a worker did not answer"),
        "reachable": all(st.get("reachable", True) for st in states),
        "claims": sum(st.get("claims") or 0 for st in states),
        "claim_failures": sum(st.get("claim_failures") or 0 for st in states),
        "pending_claims": sum(st.get("pending_claims") or 0 for st in states),
        "claim_busy_seconds": max((st.get("claim_busy_seconds") or 0 for st in states), default=0),
        "last_claim_ms": max((st.get("last_claim_ms") or 0 for st in states), default=0),
        "shared_grants": sum(st.get("shared_grants") or 0 for st in states),
    }
    for i, one in enumerate(statuses):
        part: dict[str, Any] = {"index": i, "answered": one is not None}
        if one is not None:
            part["verdicts"] = one.get("verdicts")
            part["tracked_sources"] = one.get("tracked_sources")
            part["held_packets"] = one.get("held_packets")
            part["state"] = {
                k: (one.get("state") or {}).get(k)
                for k in ("ok", "error", "reachable", "claims", "claim_failures", "feed")
            }
        out["workers"].append(part)
    return out


def run_worker(cfg: Config, applied: Path, rules_every: float, index: int) -> int:
    """The ``nfknock run --worker I`` half: one worker under a supervisor."""
    from nfknock.daemon import Daemon

    if not 0 <= index < cfg.queue.workers:
        print(f"nfknock run: error: --worker {index}: [queue] workers is {cfg.queue.workers}",
              file=sys.stderr)  # fmt: skip
        return 2
    _die_with_parent()
    processors = structlog.get_config()["processors"]

    def tag(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        event.setdefault("worker", index)
        return event

    structlog.configure(processors=[tag, *processors])
    role = WorkerRole(index, cfg.queue.workers, workers_dir(cfg))
    return Daemon(cfg, applied, rules_every, role).run()


def _die_with_parent() -> None:
    """SIGTERM this worker when the supervisor dies (even by kill -9): a worker
    without a supervisor would hold its queues with nobody to restart or stop it."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() == 1:  # the supervisor was already gone
        os.kill(os.getpid(), signal.SIGTERM)
