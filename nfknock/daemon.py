"""``nfknock run``: the NFQUEUE adapter.  With nfknock.nfq, the only code that touches
netfilterqueue.

One packet thread.  It polls the priority queue (protected ports, SPA), the knock
queue, the state store's outcomes, the change feed (what other gateways or worker
processes claimed, granted and spent: nfknock.store.changes) and the control
mailbox, and always serves the priority queue first: the knock queue is pumped a
bounded number of packets, for a bounded time, before the loop looks again -- so a
flood on the knock range cannot delay a granted connection, and SIGTERM is seen
within a second under any flood.

Overtaking has one catch: a client's last knocks enter the kernel before the SYN
that relies on them, but sit in the other queue.  So a protected SYN that finds no
grant is not dropped at once: it is *deferred* (held) until the knock queue has been
read in this turn, then decided again -- now finding the grant, or the "behind" mark
of a stale sequence, or nothing (DROP).  A SYN that finds its grant is never held.

Every packet gets exactly one verdict, given in a ``finally`` (an exception in the
callback would otherwise leave the packet queued and jam the queue).  A SYN whose
grant is still pending (its claim not yet durable) is HELD: kept, with a bounded
table and a deadline, and decided again when the store answers; whatever is held
too long, or finds no room, is dropped (fail closed).

Other threads never touch the verdict core: the store thread records claims, the
control threads read and write the control socket, a reload thread reads the new
configuration, re-applies the rules it renders (refusing the reload if iptables
refuses them) and builds the new tables, and a rules thread checks every 30 s that
nfknock's rules are in place and first in line (``rules.check``: missing, moved or
changed rules are logged as errors and shown by ``status``); each hands its result
to this loop.
"""

from __future__ import annotations

import contextlib
import gc
import select
import signal
import socket
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from nfknock import rules
from nfknock.applied import DEFAULT_APPLIED
from nfknock.config import Config, ConfigError
from nfknock.control import ControlError, ControlServer, Mailbox
from nfknock.events import Verdict
from nfknock.logs import EventLogger
from nfknock.nfq import VerdictQueue
from nfknock.packet import COPY_RANGE
from nfknock.sdnotify import notify, watchdog_interval
from nfknock.service import (
    PreparedReload,
    Restored,
    Service,
    WorkerRole,
    open_state,
    queue_stats,
)

if TYPE_CHECKING:
    from nfknock.metrics_http import MetricsServer

HOUSEKEEPING = 0.25
# Kernel memory one queued packet takes in the netlink socket (message + skb overhead).
SOCKET_BYTES_PER_PACKET = 2048
# The priority queue carries SPA packets: copy them whole.
PRIORITY_COPY_RANGE = 4096
# Knock-queue packets handled before the loop looks at the priority queue again.
KNOCK_SLICE = 256
HOLD_SECONDS = 2.0  # a held SYN is dropped if its claim takes longer
MAX_HELD = 256
RULES_CHECK_SECONDS = 30.0

log = structlog.get_logger("nfknock")


class _Yield(Exception):
    """Raised from the callback (after the verdict) to leave ``run()``."""


class _Queue:
    """The priority queue: one bound NFQUEUE pumped in bounded slices, every verdict
    given at once -- or later, for a SYN held until its grant's claim resolves (so it
    is never batched: see nfknock.nfq on why a batched queue must not hold packets)."""

    def __init__(self, number: int, handler: Any, max_len: int, copy_range: int) -> None:
        from netfilterqueue import NetfilterQueue

        self.number = number
        self._handler = handler
        self._nfq = NetfilterQueue()
        self._nfq.bind(
            number,
            self._callback,
            max_len=max_len,
            range=copy_range,
            # The netlink socket must hold a full queue, or the kernel drops
            # messages before the queue is full ("user_dropped").
            sock_len=max_len * SOCKET_BYTES_PER_PACKET,
        )
        self._left = 0
        self._deadline = 0.0

    def fileno(self) -> int:
        return int(self._nfq.get_fd())

    def pump(self, max_packets: int, deadline: float) -> None:
        self._left = max_packets
        self._deadline = deadline
        with contextlib.suppress(_Yield):
            self._nfq.run(block=False)

    def _callback(self, pkt: Any) -> None:
        self._handler(pkt)
        self._left -= 1
        if self._left <= 0 or time.monotonic() >= self._deadline:
            raise _Yield

    def unbind(self) -> None:
        # Unbinding hands queued packets back to the kernel, which drops them (no
        # --queue-bypass): fail closed.
        with contextlib.suppress(Exception):
            self._nfq.unbind()


@dataclass
class _Held:
    pkt: Any
    payload: bytes
    since: float


def flag_signals(owner: Any, wake_r: socket.socket, wake_w: socket.socket) -> None:
    """SIGHUP sets ``owner._reload_requested``, SIGTERM and SIGINT ``owner._stop``; each
    also wakes the loop's ``poll`` through ``wake_r`` (the handlers only set flags:
    nothing that could interrupt a verdict half given, see nfknock.nfq)."""
    wake_r.setblocking(False)
    wake_w.setblocking(False)
    signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
    signal.signal(signal.SIGHUP, lambda *_: setattr(owner, "_reload_requested", True))
    signal.signal(signal.SIGTERM, lambda *_: setattr(owner, "_stop", True))
    signal.signal(signal.SIGINT, lambda *_: setattr(owner, "_stop", True))


class RulesWatch:
    """``rules.check`` in a thread of its own: at start, every ``interval`` seconds
    and on request.  The latest result is one attribute, replaced at once."""

    def __init__(self, cfg: Config, applied: Path, interval: float = RULES_CHECK_SECONDS) -> None:
        self.cfg = cfg
        self.applied = applied
        self.interval = interval
        self.result: tuple[float, list[rules.Problem]] | None = None
        self._wake = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="nfknock-rules", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def recheck(self, cfg: Config | None = None) -> None:
        if cfg is not None:
            self.cfg = cfg
        self._wake.set()

    def stop(self) -> None:
        self._stop = True
        self._wake.set()

    def report(self, seen: tuple[str, ...] | None) -> tuple[str, ...] | None:
        """Log the findings when they differ from ``seen`` (errors: every protected
        port may be open, or bypassed, while they last); returns what was seen."""
        result = self.result
        if result is None:
            return seen
        _, problems = result
        now = tuple(sorted(f"{p.code}:{p.family}:{p.detail}" for p in problems))
        if now == seen:
            return seen
        for p in problems:
            log.error("rules_problem", code=p.code, family=p.family, error=p.detail, fix=p.fix)
        if not problems:
            log.info("rules_ok", detail="nfknock's rules are installed, complete and first")
        return now

    def status(self) -> dict[str, Any]:
        result = self.result
        if result is None:
            return {"ok": None, "checked": None, "problems": []}
        when, problems = result
        return {
            "ok": not problems,
            "checked": round(when, 3),
            "problems": [
                {"code": p.code, "family": p.family, "detail": p.detail, "fix": p.fix}
                for p in problems
            ],
        }

    def _run(self) -> None:
        while not self._stop:
            try:
                problems = rules.check(self.cfg, self.applied)
            except Exception as exc:  # check() never raises by contract; be sure
                problems = [rules.Problem("check_failed", "", f"{type(exc).__name__}: {exc}", "")]
            self.result = (time.time(), problems)
            self._wake.wait(self.interval)
            self._wake.clear()


class Daemon:
    def __init__(
        self,
        cfg: Config,
        applied: Path = DEFAULT_APPLIED,
        rules_every: float = RULES_CHECK_SECONDS,
        role: WorkerRole | None = None,
    ) -> None:
        # ``role``: one worker of several under nfknock.supervisor, which holds the
        # state lock, the control socket and the rules (watch and re-apply).
        self.role = role
        if role is None:
            self.service = Service(cfg, EventLogger())
        else:
            store, sharing, instance = open_state(cfg, role)
            self.service = Service(
                cfg, EventLogger(), store=store, sharing=sharing, instance=instance
            )
            embedded = cfg.state.backend == "embedded"
            self.service.finish_on_stop = role.index == 0 or not embedded
            self.service.begin_on_restore = not embedded
        self.applied = applied
        self.rules = RulesWatch(cfg, applied, rules_every)
        self._rules_seen: tuple[str, ...] | None = None
        self.mark = cfg.queue.reject_mark
        self._stop = False
        self._reload_requested = False
        self._next_housekeeping = 0.0
        self._watchdog = watchdog_interval()
        self._next_watchdog = 0.0
        self.mailbox = Mailbox()
        self._held: deque[_Held] = deque()
        self._reloading: tuple[threading.Thread, list[Any]] | None = None
        # Protected SYNs without a grant wait for the knock queue (see the module
        # docstring); only when knocks come on a queue of their own.
        self.defer = cfg.queue.knock_number != cfg.queue.number
        self._reload_waiters: list[Future[dict[str, Any]]] = []
        self.metrics: MetricsServer | None = None  # [metrics] listen (nfknock.metrics_http)
        self._knock_numbers: range = cfg.queue.knock_queues()

    # --- the packet path ------------------------------------------------------

    def handle(self, pkt: Any) -> None:
        """The priority queue's callback."""
        verdict = Verdict.DROP
        mark = 0
        payload = b""
        try:
            payload = pkt.get_payload()
            verdict, mark = self.service.decide_marked(payload, defer=self.defer)
        except Exception as exc:  # decide_marked never raises; get_payload might
            self.service.internal_error(exc, b"")
        finally:
            self._give(pkt, verdict, payload, mark)
            try:
                self.service.settle()  # after the verdict: logging costs it no latency
            except Exception as exc:
                self.service.internal_error(exc, b"")

    def _give(self, pkt: Any, verdict: Verdict, payload: bytes, mark: int = 0) -> None:
        """Give the verdict.  ``mark`` (a forwarded door's target, nfknock.door) is
        set before an ACCEPT: the nat rule that translates the SYN, and the filter
        rule that lets it through, match it."""
        try:
            if verdict is Verdict.HOLD:
                if len(self._held) < MAX_HELD:
                    pkt.retain()
                    self._held.append(_Held(pkt, payload, time.monotonic()))
                    return
                verdict = Verdict.DROP
            if verdict is Verdict.ACCEPT:
                if mark:
                    pkt.set_mark(mark)
                pkt.accept()
            elif verdict is Verdict.REJECT:
                pkt.set_mark(self.mark)
                pkt.repeat()  # re-runs the hook; the reject-mark rule answers
            else:
                pkt.drop()
        except Exception:  # e.g. the verdict call failed: last resort is DROP
            with contextlib.suppress(Exception):
                pkt.drop()

    def _redecide_held(self, expire_only: bool = False) -> None:
        now = time.monotonic()
        for _ in range(len(self._held)):
            held = self._held.popleft()
            if expire_only and now - held.since < HOLD_SECONDS:
                self._held.append(held)
                continue
            verdict, mark = Verdict.DROP, 0
            if not expire_only:
                verdict, mark = self.service.decide_marked(held.payload)
                if verdict is Verdict.HOLD and now - held.since < HOLD_SECONDS:
                    self._held.append(held)
                    continue
                if verdict is Verdict.HOLD:
                    verdict = Verdict.DROP
            self._give(held.pkt, verdict, held.payload, mark)
            self.service.settle()

    # --- between packets ------------------------------------------------------

    def housekeeping(self) -> None:
        now = time.monotonic()
        self._next_housekeeping = now + HOUSEKEEPING
        try:
            if self._reload_requested and self._reloading is None:
                self._reload_requested = False
                self._start_reload()
            self._check_reload()
            self.service.tick()
            self._report_rules()
            if self.metrics is not None and now >= self.metrics.next_publish:
                self.metrics.publish(self.metrics_snapshot())
            if self._held:
                self._redecide_held(expire_only=True)
            if self._watchdog and now >= self._next_watchdog:
                notify("WATCHDOG=1")
                self._next_watchdog = now + self._watchdog
        except Exception as exc:
            log.error("housekeeping_failed", error=f"{type(exc).__name__}: {exc}")

    def _report_rules(self) -> None:
        self._rules_seen = self.rules.report(self._rules_seen)

    def rules_status(self) -> dict[str, Any]:
        return self.rules.status()

    # --- reload: read and build in a thread, swap here ------------------------------

    def _start_reload(self) -> None:
        snapshot = self.service.reload_snapshot()
        result: list[Any] = []

        def work() -> None:
            try:
                prepared = self.service.prepare_reload(snapshot)
                # The new configuration's rules, atomically per family (unless a
                # privileged `nfknock reload` installed them already: the sandbox of
                # the systemd unit need not allow it); refused -> the old rules and
                # the old configuration stay.  (A worker's supervisor applied them
                # before asking it to reload.)
                if self.role is None:
                    rules.ensure(prepared.cfg, self.applied)
                result.append(prepared)
            except Exception as exc:
                result.append(exc)

        thread = threading.Thread(target=work, name="nfknock-reload", daemon=True)
        thread.start()
        self._reloading = (thread, result)

    def _check_reload(self) -> None:
        if self._reloading is None or self._reloading[0].is_alive():
            return
        _, result = self._reloading
        self._reloading = None
        outcome = result[0] if result else RuntimeError("the reload thread ended without a result")
        if isinstance(outcome, PreparedReload):
            how = self.service.finish_reload(outcome)
            # The old tables are garbage now: collect once (a single pause of a few
            # tens of ms at 100,000 users, at a reload only), freeze the new ones.
            gc.unfreeze()
            gc.collect()
            gc.freeze()
            self.rules.recheck(self.service.cfg)
            log.info("reloaded", detail=how, users=len(self.service.cfg.all_users))
            for warning in self.service.cfg.warnings:
                log.warning("config_warning", detail=warning)
            reply: dict[str, Any] = {"ok": True, "detail": how}
        else:
            known = isinstance(outcome, ConfigError | rules.RulesError)
            error = str(outcome) if known else repr(outcome)
            log.error("reload_failed", error=error, reason="keeping the running configuration")
            reply = {"ok": False, "error": error}
        for fut in self._reload_waiters:
            fut.set_result(reply)
        self._reload_waiters.clear()

    # --- control requests (answered between packets) --------------------------------

    def _control(self, request: dict[str, Any], fut: Future[dict[str, Any]]) -> None:
        command = request.get("command")
        if command == "status":
            stats = {
                str(q): queue_stats(q)
                for q in [
                    *self.service.cfg.queue.priority_queues(),
                    *self.service.cfg.queue.knock_queues(),
                ]
            }
            status = self.service.status(stats)
            status["held_packets"] = len(self._held)
            status["reloading"] = self._reloading is not None
            if self.role is None:
                status["rules"] = self.rules_status()
            else:
                status["worker"] = self.role.index
            fut.set_result({"ok": True, "status": status})
        elif command == "metrics":
            fut.set_result({"ok": True, "metrics": self.metrics_snapshot()})
        elif command == "reload":
            self._reload_waiters.append(fut)
            if self._reloading is None:
                self._start_reload()
        else:
            fut.set_result({"ok": False, "error": f"unknown command {command!r}"})

    # --- metrics (nfknock.metrics: a snapshot published between packets) -----------

    def metrics_snapshot(self) -> dict[str, Any]:
        from nfknock import metrics

        return metrics.snapshot(self.service, self.rules_status(), len(self._held))

    def _start_metrics(self, cfg: Config) -> None:
        """Serve ``[metrics] listen``.  A failure is logged, not fatal: the protected
        ports stay guarded, only the metrics are missing."""
        if cfg.metrics.listen is None:
            return
        host, port = cfg.metrics.listen
        try:
            from nfknock.metrics_http import MetricsServer

            self.metrics = MetricsServer(cfg.metrics.listen, self.metrics_snapshot())
        except (OSError, ImportError) as exc:
            log.error(
                "metrics_failed",
                listen=f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
                error=str(exc),
                reason="running without metrics",
            )

    # --- main loop --------------------------------------------------------------

    def run(self) -> int:
        cfg = self.service.cfg
        restored = self.service.restore()
        # The configuration and the knock tables live as long as the daemon: freeze
        # them out of the garbage collector, or a full collection (25-50 ms with
        # 100,000 users) would stall the packet loop now and then.
        gc.freeze()
        queues: list[_Queue] = []
        knock: list[VerdictQueue] = []
        control: ControlServer | None = None
        priority_numbers, knock_numbers = cfg.queue.priority_queues(), cfg.queue.knock_queues()
        if self.role is not None:  # this worker's slice of each --queue-balance range
            priority_numbers = range(cfg.queue.number + self.role.index, priority_numbers.stop)[:1]
            knock_numbers = range(cfg.queue.knock_number + self.role.index, knock_numbers.stop)[:1]
        self._knock_numbers = knock_numbers
        try:
            try:
                for number in priority_numbers:
                    queues.append(
                        _Queue(number, self.handle, cfg.queue.max_len, PRIORITY_COPY_RANGE)
                    )
                priority = list(queues)
                for number in knock_numbers:
                    knock.append(
                        VerdictQueue.bind(
                            number,
                            self.service.decide_knock,
                            max_len=cfg.queue.max_len,
                            copy_range=COPY_RANGE,
                            sock_len=cfg.queue.max_len * SOCKET_BYTES_PER_PACKET,
                            batch=cfg.queue.batch,
                            reject_mark=cfg.queue.reject_mark,
                            on_error=lambda exc: self.service.internal_error(exc, b""),
                        )
                    )
            except OSError as exc:
                log.error(
                    "queue_bind_failed",
                    queues=f"{cfg.queue.number}, {cfg.queue.knock_number}",
                    error=str(exc),
                    reason="another process may hold the queue, or CAP_NET_ADMIN is missing",
                )
                return 1
            socket_path = cfg.control_socket
            if self.role is not None:
                socket_path = self.role.directory / f"worker-{self.role.index}.sock"
            try:
                control = ControlServer(socket_path, self.mailbox)
            except (ControlError, OSError) as exc:
                log.error("control_socket_failed", error=str(exc))
                return 1
            if self.role is None:
                self.rules.start()
            self._start_metrics(cfg)
            return self._loop(cfg, restored, priority, knock)
        finally:
            notify("STOPPING=1")
            self.rules.stop()
            for q in queues:
                q.unbind()
            for k in knock:
                with contextlib.suppress(Exception):
                    k.close()
            for held in self._held:
                with contextlib.suppress(Exception):
                    held.pkt.drop()
            self._held.clear()
            if control is not None:
                control.close()
            if self.metrics is not None:
                self.metrics.close()
            try:
                self.service.stop()
            except Exception as exc:
                log.error("state_save_failed", error=str(exc), reason="grants will not be restored")
            log.info("stopped", verdicts=self.service.verdict_counts())

    def _loop(
        self, cfg: Config, restored: Restored, priority: list[_Queue], knock: list[VerdictQueue]
    ) -> int:
        wake_r, wake_w = socket.socketpair()
        flag_signals(self, wake_r, wake_w)
        log.info(
            "started" if self.role is None else "worker_started",
            queue=priority[0].number if priority else cfg.queue.number,
            knock_queue=self._knock_numbers[0] if self._knock_numbers else cfg.queue.knock_number,
            max_len=cfg.queue.max_len,
            users=len(cfg.users),
            protected=sorted(cfg.protected_ports),
            knock_range=f"{cfg.knock.port_min}-{cfg.knock.port_max}",
            state=self.service.store.store.description,
            restored_counters=restored.counters,
            restored_grants=restored.grants,
            previous_exit="clean" if restored.clean else "unclean: live grants were not restored",
        )
        if not restored.writable:
            log.error(
                "state_not_writable",
                error=self.service.state_error,
                reason="no claim can be recorded: nothing will open until this is fixed",
            )
        for warning in cfg.warnings:
            log.warning("config_warning", detail=warning)
        notify(f"READY=1\nSTATUS=verdicts on queues {cfg.queue.number}/{cfg.queue.knock_number}")
        poller = select.poll()
        for fd in [*(q.fileno() for q in priority), *(k.fd for k in knock)]:
            poller.register(fd, select.POLLIN)
        claims_fd, mail_fd = self.service.claims_fd(), self.mailbox.fileno()
        changes_fd = self.service.changes_fd()  # other gateways or workers (None: alone)
        for extra in (wake_r.fileno(), claims_fd, mail_fd, changes_fd):
            if extra is not None:
                poller.register(extra, select.POLLIN)
        try:
            while not self._stop:
                timeout = max(0, int((self._next_housekeeping - time.monotonic()) * 1000))
                ready = {f for f, _ in poller.poll(timeout)}
                deadline = time.monotonic() + HOUSEKEEPING
                for q in priority:  # first, and until it is empty (bounded by the deadline)
                    if q.fileno() in ready:
                        q.pump(1 << 30, deadline)
                if claims_fd in ready and self.service.on_claims() and self._held:
                    self._redecide_held()
                if changes_fd in ready and self.service.on_changes() and self._held:
                    self._redecide_held()  # e.g. a grant made on another worker
                for k in knock:
                    if k.fd in ready:
                        try:
                            k.pump(KNOCK_SLICE, deadline)
                        except OSError as exc:  # a batch not sent: its packets stay queued
                            self.service.internal_error(exc, b"")
                        self.service.settle()  # the slice's events and claims
                if self._held:  # deferred SYNs: their knocks have been read now
                    self._redecide_held()
                if mail_fd in ready:
                    self.mailbox.serve(self._control)
                if wake_r.fileno() in ready:
                    with contextlib.suppress(BlockingIOError):
                        wake_r.recv(64)
                if time.monotonic() >= self._next_housekeeping or self._reload_requested:
                    self.housekeeping()
        finally:
            signal.set_wakeup_fd(-1)
            wake_r.close()
            wake_w.close()
        return 0
