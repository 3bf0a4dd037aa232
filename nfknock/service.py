"""The daemon's logic between the queues and the core, without netfilterqueue.

:class:`Service` owns the verdict core (:mod:`nfknock.core`), the configuration, the
state store (through its thread, :mod:`nfknock.store.worker`) and the event log.
The NFQUEUE adapter (:mod:`nfknock.daemon`):

1. hands each packet to :meth:`Service.decide_marked` and gives the verdict --
   ``Verdict.HOLD`` means "keep the packet until its grant's claim resolves"; an
   ACCEPT may come with a mark to set first (a forwarded door, nfknock.door);
2. calls :meth:`Service.settle` after the verdict: events are logged and new claims
   go to the store thread (logging and disk never delay a verdict);
3. calls :meth:`Service.on_claims` when the store thread's fd is readable: outcomes
   confirm or void pending grants (then held packets are decided again);
4. calls :meth:`Service.tick` a few times a second;
5. with a shared store or worker processes, calls :meth:`Service.on_changes` when
   the feed's fd is readable: counters, digests, grants and connections spent
   elsewhere update the core's copy (nfknock.store.changes).

Reloads never stall the packet path: the new configuration is read and the new
knock engine built in a thread (:meth:`Service.prepare_reload`), then swapped in
between packets (:meth:`Service.finish_reload`), with every grant re-checked.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nfknock.config import Config, ConfigError, load_config
from nfknock.core import Core, Tables
from nfknock.engine import Engine, EngineSettings
from nfknock.events import Event, EventKind, Verdict
from nfknock.gate import Outcome
from nfknock.logs import EventLogger
from nfknock.packet import MalformedPacket, parse_isn, parse_key
from nfknock.spa.packet import parse_spa_packet
from nfknock.store import Snapshot, StateError, StateStore
from nfknock.store.changes import (
    Change,
    Granted,
    Hello,
    Link,
    Resync,
    SeenDigest,
    Sharing,
    Spent,
    Used,
)
from nfknock.store.embedded import EmbeddedStore
from nfknock.store.worker import StoreWorker


def open_store(cfg: Config, *, lock: bool = True) -> StateStore:
    return EmbeddedStore(
        cfg.state_path,
        replay_cache=cfg.spa.replay_cache,
        max_age=cfg.spa.max_age,
        lock=lock,
    )


@dataclass(frozen=True)
class WorkerRole:
    """This process is worker ``index`` of ``count`` under a supervisor
    (nfknock.supervisor); ``directory``: their private directory (feed sockets)."""

    index: int
    count: int
    directory: Path


def open_state(
    cfg: Config, role: WorkerRole | None = None
) -> tuple[StateStore, Sharing | None, str]:
    """The store, how this process shares with others (None: it does not), and its
    name among them.  Redis: the stream feed.  Embedded: nothing for a lone daemon
    (exactly as before); the local feed among workers, which share the file (the
    supervisor holds its lock)."""
    origin = secrets.token_hex(6)
    if cfg.state.backend == "redis":
        try:
            from nfknock.store.redis import RedisStore
            from nfknock.store.redisfeed import RedisFeed
        except ImportError as exc:
            raise StateError(
                f'{cfg.path}: state.backend = "redis" needs the redis package '
                f"(pip install 'nfknock[redis]'): {exc}"
            ) from None
        redis_store = RedisStore(
            cfg.state,
            origin=origin,
            replay_cache=cfg.spa.replay_cache,
            max_age=cfg.spa.max_age,
            step_seconds=cfg.knock.step_seconds,
            skew_steps=cfg.knock.skew_steps,
        )
        return redis_store, RedisFeed(redis_store), origin
    if role is None:
        return open_store(cfg), None, ""
    from nfknock.store.localfeed import LocalFeed

    store = open_store(cfg, lock=False)
    return store, LocalFeed(role.directory, role.index, role.count, origin), origin


@dataclass
class Restored:
    counters: int
    grants: int
    clean: bool
    fresh: bool
    writable: bool


@dataclass
class PreparedReload:
    cfg: Config
    tables: Tables
    how: str


class Service:
    def __init__(
        self,
        cfg: Config,
        events: EventLogger,
        wall: Callable[[], float] = time.time,
        mono: Callable[[], float] = time.monotonic,
        store: StateStore | None = None,
        sharing: Sharing | None = None,
        instance: str = "",
    ) -> None:
        self.cfg = cfg
        self.events = events
        self.wall = wall
        self.mono = mono
        if store is None:
            store, sharing, instance = open_state(cfg)
        self.sharing = sharing
        self.core = Core(
            EngineSettings.from_config(cfg),
            cfg.users,
            wall(),
            spa_users=cfg.spa_users,
            spa=cfg.spa,
            instance=instance,
        )
        self.store = StoreWorker(store, wall, on_won=sharing.claimed if sharing else None)
        # A worker other than the first leaves the clean-exit record to worker 0,
        # which stops last and knows every grant (nfknock.supervisor).
        self.finish_on_stop = True
        # Workers on the embedded file leave "in use" to their supervisor, which marks
        # it once all of them have read the grants of the last clean exit.
        self.begin_on_restore = True
        self.reachable = True  # a shared store: its feed is connected
        self.shared_grants = 0  # grants made elsewhere and honoured here
        self.verdicts = [0, 0, 0, 0]  # indexed by Verdict
        self.pending: list[Event] = []  # events of the decisions since the last settle
        self.now = mono()  # the monotonic time of the latest packet
        self.wall_offset = wall() - self.now
        self.malformed = 0
        self.spa_results: dict[str, int] = {}  # SPA outcomes by reason code
        self.errors = 0
        self.claim_failures = 0
        self.started = wall()
        self.state_error = ""  # why claims cannot be recorded, if known
        self._horizon = self.core.knocks.replay_horizon()

    @property
    def engine(self) -> Engine:
        """The knock engine (tests and benchmarks reach into it)."""
        return self.core.knocks

    # --- state ---------------------------------------------------------------

    def restore(self) -> Restored:
        """Load the state (StateError when it cannot be used: the daemon must not
        start and forget counters), then durably mark it in use.  Grants come back
        only after a clean exit.  A state that loads but cannot be written leaves the
        daemon running with every claim failing (nothing opens) and says why."""
        snap: Snapshot = self.store.call(lambda s: s.load(self.wall()))
        wall, mono = self.wall(), self.mono()
        counters = self.core.knocks.restore_counters(
            snap.windows, snap.high_step, snap.pruned_through
        )
        writable = True
        try:
            if self.begin_on_restore:
                self.store.call(lambda s: s.begin())
        except StateError as exc:
            writable = False
            self.state_error = str(exc)
        grants = self.core.restore_grants(snap.grants, wall, mono) if writable else 0
        self.core.restore_digests(snap.digests, wall)
        self._horizon = self.core.knocks.replay_horizon()
        if self.sharing is not None:
            self.sharing.start(snap.position)
        return Restored(counters, grants, snap.clean, snap.fresh, writable)

    def stop(self) -> None:
        """An orderly exit: wait briefly for claims under way, save the live grants
        and mark the state clean."""
        self.flush_claims(timeout=2.0)
        self.settle()  # connections spent on shared grants: tell the others first
        wall, mono = self.wall(), self.mono()
        grants = self.core.grant_records(wall, mono)
        high, pruned = self.core.knocks.replay_horizon()
        try:
            if self.finish_on_stop:
                self.store.call(lambda s: s.finish(grants, high, pruned))
            else:
                self.store.call(lambda s: s.save_horizon(high, pruned))
        finally:
            self.store.call(lambda s: s.close())
            self.store.close()
            if self.sharing is not None:
                self.sharing.close()

    # --- packets -------------------------------------------------------------

    def verdict_for(self, payload: bytes) -> Verdict:
        """The verdict for one queued packet with its events and claims handled, as
        if the store answered at once (tests, and callers without a queue)."""
        verdict = self.decide_packet(payload)
        self.settle()
        if self.flush_claims() and verdict is Verdict.HOLD:
            verdict = self.decide_packet(payload)
            self.settle()
        return verdict

    def decide_packet(self, payload: bytes, defer: bool = False) -> Verdict:
        """The verdict for one packet of the priority queue (or of a single queue):
        protected-port SYNs, SPA packets (UDP, or a TCP SYN with data to an SPA port),
        forwarded doors and knocks.  ``defer``: HOLD a protected SYN that finds no
        grant yet (see ``Core.decide_protected``).  Its events wait for
        :meth:`settle`.  Never raises: anything unexpected is DROP plus an event
        (fail closed)."""
        return self.decide_marked(payload, defer)[0]

    def decide_marked(self, payload: bytes, defer: bool = False) -> tuple[Verdict, int]:
        """:meth:`decide_packet`, and the netfilter mark to set before an ACCEPT (a
        forwarded door's target, nfknock.door; 0: none)."""
        try:
            mono = self.now = self.mono()
            try:
                key, port = parse_key(payload)
            except MalformedPacket as exc:
                if exc.reason != "not-tcp" or not self.core.spa_ports:
                    raise
                return self._spa(payload, mono), 0
            if port in self.core.spa_ports:
                return self._spa(payload, mono), 0
            wall = mono + self.wall_offset
            if self.core.knocks.isn_mode:  # users with isn = true: the ISN counts
                decision = self.core.decide_isn(key, port, parse_isn(payload), wall, mono, defer)
            else:
                decision = self.core.decide_key(key, port, wall, mono, defer)
            if decision.events:
                self.pending += decision.events
            self.verdicts[decision.verdict] += 1
            return decision.verdict, decision.mark
        except MalformedPacket as exc:
            self._malformed(payload, exc)
        except Exception as exc:  # a bug: still a verdict, still running
            self.internal_error(exc, payload)
        self.verdicts[Verdict.DROP] += 1
        return Verdict.DROP, 0

    def decide_knock(self, payload: bytes) -> Verdict:
        """The knock queue's hot path: only TCP SYNs to the knock range come here."""
        try:
            mono = self.now = self.mono()
            key, port = parse_key(payload)
            knocks = self.core.knocks
            if knocks.isn_mode:  # users with isn = true: the ISN is read only then
                decision = knocks.decide_isn(
                    key, port, parse_isn(payload), mono + self.wall_offset, mono
                )
            else:
                decision = knocks.decide_key(key, port, mono + self.wall_offset, mono)
            if decision.events:
                self.pending += decision.events
            self.verdicts[decision.verdict] += 1
            return decision.verdict
        except MalformedPacket as exc:
            self._malformed(payload, exc)
        except Exception as exc:  # a bug: still a verdict, still running
            self.internal_error(exc, payload)
        self.verdicts[Verdict.DROP] += 1
        return Verdict.DROP

    def _spa(self, payload: bytes, mono: float) -> Verdict:
        """An SPA packet: always DROP (silently on the wire), with its result."""
        packet = parse_spa_packet(payload)
        if packet.dport not in self.core.spa_ports:
            raise MalformedPacket("not-an-spa-port")
        decision = self.core.decide_spa(
            packet.src, packet.dst, packet.payload, mono + self.wall_offset, mono
        )
        for event in decision.events:
            if event.kind in (EventKind.SPA_ACCEPTED, EventKind.SPA_REFUSED):
                self.spa_results[event.code] = self.spa_results.get(event.code, 0) + 1
        self.pending += decision.events
        self.verdicts[Verdict.DROP] += 1
        return Verdict.DROP

    def _malformed(self, payload: bytes, exc: MalformedPacket) -> None:
        self.malformed += 1
        self._log(
            Event(EventKind.MALFORMED_PACKET, _src_of(payload), reason=exc.reason, code=exc.reason)
        )

    def settle(self) -> None:
        """Log the events of the decisions since the last call; send new claims to
        the store (after a batch of verdicts: logging and disk never delay one)."""
        if self.pending:
            events, self.pending = self.pending, []
            self._handle_events(events)
        claims = self.core.gate.outbox
        if claims:
            self.store.submit(self.core.take_claims())
        if self.core.used and self.sharing is not None:
            used, sharing = self.core.take_used(), self.sharing

            def tell(_store: StateStore) -> None:
                for key, ref in used:
                    sharing.used(key, ref)

            self.store.submit_call(tell)

    def claims_fd(self) -> int:
        return self.store.fileno()

    def on_claims(self) -> int:
        """Resolve the outcomes the store thread has; returns how many."""
        outcomes = self.store.drain()
        mono = self.mono()
        for outcome in outcomes:
            if outcome.outcome is Outcome.FAILED:
                self.claim_failures += 1
                self.state_error = outcome.detail
            elif outcome.outcome is Outcome.WON:
                self.state_error = ""
            self._handle_events(self.core.resolve(outcome, mono))
        return len(outcomes)

    # --- what other gateways and workers did (the change feed) ---------------------------

    def changes_fd(self) -> int | None:
        return self.sharing.fileno() if self.sharing is not None else None

    def on_changes(self) -> int:
        """Apply what the feed brought (between packets); returns how many changes."""
        if self.sharing is None:
            return 0
        changes = self.sharing.drain()
        for change in changes:
            try:
                self._apply(change)
            except Exception as exc:  # a bug must not stop the feed (the store decides)
                self.internal_error(exc, b"")
        return len(changes)

    def _apply(self, change: Change) -> None:
        wall, mono = self.wall(), self.mono()
        if isinstance(change, Spent):
            self.core.note_spent(change.user, change.step, change.counter)
        elif isinstance(change, SeenDigest):
            self.core.note_digest(change.digest, change.until, wall)
        elif isinstance(change, Granted):
            events = self.core.add_shared_grant(change.record, wall, mono)
            self.shared_grants += bool(events)
            self._handle_events(events)
        elif isinstance(change, Used):
            self.core.spend_shared(change.key, change.ref)
        elif isinstance(change, Hello) and self.sharing is not None:
            records = self.core.grant_records(wall, mono)
            sharing, worker = self.sharing, change.worker
            self.store.submit_call(lambda _s: sharing.welcome(worker, records))
        elif isinstance(change, Resync):
            self._resync(change, wall, mono)
        elif isinstance(change, Link):
            self._link(change)

    def _resync(self, change: Resync, wall: float, mono: float) -> None:
        snap = change.snapshot
        for user, step, window in snap.windows:
            self.core.knocks.merge_window(user, step, window)
        for digest, when in snap.digests:
            self.core.note_digest(digest, when, wall)
        self._handle_events(self.core.resync_grants(snap.grants, wall, mono, change.wiped))

    def _link(self, change: Link) -> None:
        log = self.events.log
        if not change.up:
            self.reachable = False
            self.state_error = change.detail
            log.error(
                "state_unreachable",
                error=change.detail,
                reason="no claim can be won: nothing new opens; known grants keep working",
            )
            return
        was_down = not self.reachable
        self.reachable = True
        self.state_error = ""
        if self.sharing is not None:
            sharing = self.sharing
            self.store.submit_call(lambda _s: sharing.resume())
        if change.wiped:
            # The store came back empty: give it what this process knows (floors
            # only rise), then claims resume.  No grant of ours is lost: they stay.
            windows = self.core.snapshot_windows()
            keep = self.core.replay.keep
            digests = [
                (bytes.fromhex(str(d)), float(expiry) - keep)
                for d, expiry in self.core.replay.export()
            ]
            self.store.submit_call(lambda s: s.reseed(windows, digests))  # type: ignore[attr-defined]
            log.warning("state_reseeded", windows=len(windows), digests=len(digests))
        if was_down:
            log.info("state_reachable", store=self.store.store.description)

    def flush_claims(self, timeout: float = 5.0) -> int:
        """Wait until every submitted claim is resolved (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        resolved = 0
        while self.core.gate.pending_count() and time.monotonic() < deadline:
            got = self.on_claims()
            resolved += got
            if not got:
                time.sleep(0.001)
        return resolved

    def verdict_counts(self) -> dict[str, int]:
        return {v.name.lower(): self.verdicts[v] for v in Verdict}

    def internal_error(self, exc: BaseException, payload: bytes) -> None:
        self.errors += 1
        reason = f"{type(exc).__name__}: {exc}"
        self._log(
            Event(EventKind.INTERNAL_ERROR, _src_of(payload), reason=reason, code="internal_error")
        )

    def _handle_events(self, events: Iterable[Event]) -> None:
        for event in events:
            self._log(event)

    def _log(self, event: Event) -> None:
        try:
            self.events.emit(event, self.wall())
        except Exception:  # logging must never cost a verdict
            self.errors += 1

    # --- housekeeping ----------------------------------------------------------

    def tick(self) -> None:
        self.wall_offset = self.wall() - self.mono()
        events = self.core.tick(self.wall(), self.mono())
        if events:
            self._handle_events(events)
        horizon = self.core.knocks.replay_horizon()
        if horizon != self._horizon:
            self._horizon = horizon
            high, pruned = horizon
            self.store.submit_call(lambda s: s.save_horizon(high, pruned))
        self.events.flush_suppressed()

    # --- reload ------------------------------------------------------------------

    def prepare_reload(self, snapshot: Any) -> PreparedReload:
        """Read and validate the configuration and build the new knock engine (may
        run in a thread: it touches only new objects and ``snapshot``, which the
        caller took with :meth:`reload_snapshot`).  Raises ConfigError."""
        new = load_config(self.cfg.path)
        if list(new.queue.priority_queues()) != list(self.cfg.queue.priority_queues()) or list(
            new.queue.knock_queues()
        ) != list(self.cfg.queue.knock_queues()):
            raise ConfigError(new.path, "queue", "changing the queues needs a restart")
        if new.state_path != self.cfg.state_path:
            raise ConfigError(new.path, "state.path", "changing the state file needs a restart")
        if new.state != self.cfg.state:
            raise ConfigError(new.path, "state", "changing the state store needs a restart")
        settings = EngineSettings.from_config(new)
        changed = settings != self.core.s
        tables = self.core.build(settings, new.users, new.spa_users, new.spa, self.wall(), snapshot)
        how = (
            "configuration reloaded (knock parameters changed)"
            if changed
            else "configuration reloaded"
        )
        return PreparedReload(new, tables, how)

    def reload_snapshot(self) -> Any:
        """What :meth:`prepare_reload` needs from the live core (call between packets)."""
        return self.core.snapshot_windows()

    def finish_reload(self, prepared: PreparedReload) -> str:
        """Swap the prepared engine in (between packets): counters spent meanwhile are
        merged, every grant re-checked against the new configuration (events)."""
        events = self.core.swap(prepared.tables, self.mono())
        self.cfg = prepared.cfg
        self._handle_events(events)
        return prepared.how

    def reload(self) -> str:
        """Prepare and finish at once (tests, and the CLI without a daemon)."""
        return self.finish_reload(self.prepare_reload(self.reload_snapshot()))

    # --- status --------------------------------------------------------------------

    def status(self, queue_stats: dict[str, Any] | None = None) -> dict[str, Any]:
        wall, mono = self.wall(), self.mono()
        step = self.core.step
        counters = {user: steps.get(step, 0) for user, steps in self.core.knocks.counters().items()}
        worker = self.store
        busy = round(time.monotonic() - worker.busy_since, 3) if worker.busy_since else 0.0
        return {
            "pid": os.getpid(),
            "uptime": round(wall - self.started, 1),
            "step": step,
            "users": {
                u.name: {
                    "enabled": u.enabled,
                    "counter": counters.get(u.name, 0),
                    "knock": bool(u.secret),
                    "spa": u.spa is not None,
                }
                for u in self.cfg.all_users
            },
            "grants": self.core.grant_list(wall, mono),
            "tracked_sources": self.core.knocks.tracked_sources(),
            "verdicts": self.verdict_counts(),
            "malformed": self.malformed,
            "spa": {
                "ports": sorted(self.core.spa_ports),
                "users": len(self.cfg.spa_users),
                "results": dict(sorted(self.spa_results.items())),
                "replay_cache": len(self.core.replay),
            },
            "internal_errors": self.errors,
            "state": {
                "store": worker.store.description,
                "backend": self.cfg.state.backend,
                "ok": not self.state_error,
                "error": self.state_error,
                "reachable": self.reachable,
                "claims": worker.claims,
                "claim_failures": self.claim_failures,
                "pending_claims": self.core.gate.pending_count(),
                "claim_busy_seconds": busy,
                "last_claim_ms": round(worker.last_claim_seconds * 1000, 2),
                "shared_grants": self.shared_grants,
                "feed": self.sharing.status() if self.sharing is not None else None,
            },
            "queue": queue_stats or {},
        }


def _src_of(payload: bytes) -> bytes:
    """Best-effort packed source address of a packet we could not parse (for the log)."""
    if payload[:1] and payload[0] >> 4 == 4 and len(payload) >= 20:
        return payload[12:16]
    if payload[:1] and payload[0] >> 4 == 6 and len(payload) >= 40:
        return payload[8:24]
    return b""


def queue_stats(
    number: int, path: Path = Path("/proc/net/netfilter/nfnetlink_queue")
) -> dict[str, int]:
    """This queue's line of /proc/net/netfilter/nfnetlink_queue (see nfnetlink_queue.c:
    queue, peer portid, waiting, copy mode, copy range, queue dropped, user dropped,
    last id, 1)."""
    try:
        text = path.read_text()
    except OSError:
        return {}
    for line in text.splitlines():
        f = line.split()
        if len(f) >= 8 and f[0] == str(number):
            return {
                "queue": int(f[0]),
                "portid": int(f[1]),
                "waiting": int(f[2]),
                "copy_mode": int(f[3]),
                "copy_range": int(f[4]),
                "queue_dropped": int(f[5]),
                "user_dropped": int(f[6]),
                "last_id": int(f[7]),
            }
    return {}
