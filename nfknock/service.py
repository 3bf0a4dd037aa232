"""The daemon's logic between the queue and the engine, without netfilterqueue.

:class:`Service` owns the engine, the configuration, the state file and the event
log.  The NFQUEUE adapter (:mod:`nfknock.daemon`) hands it each packet through
:meth:`Service.decide_packet`, applies the answer, then calls :meth:`Service.settle`;
:meth:`Service.verdict_for` does both at once (for callers without a verdict to give
in between, such as the tests).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from nfknock.config import Config, ConfigError, load_config
from nfknock.engine import Engine, EngineSettings
from nfknock.events import Event, EventKind, Verdict
from nfknock.fileio import StateError, load_json, save_json
from nfknock.logs import EventLogger
from nfknock.packet import MalformedPacket, parse_key

# Events after which the persisted state is out of date.  A used counter is saved
# before the knock that used it is answered (replay protection across kill -9); a
# spent connection of a grant is saved at the next housekeeping (at most a quarter
# of a second later: a crash in between can leave one connection more in a grant).
SAVE_NOW = frozenset({EventKind.SEQUENCE_COMPLETED, EventKind.GRANT_REVOKED})
SAVE_SOON = frozenset({EventKind.PROTECTED_ACCEPT})


class Service:
    def __init__(
        self,
        cfg: Config,
        events: EventLogger,
        wall: Callable[[], float] = time.time,
        mono: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.events = events
        self.wall = wall
        self.mono = mono
        self.engine = Engine(EngineSettings.from_config(cfg), cfg.users, wall())
        self.verdicts = [0, 0, 0]  # indexed by Verdict
        self.dirty = False  # state to save at the next tick
        self.pending: tuple[Event, ...] = ()  # events of the latest decision
        self.now = mono()  # the monotonic time of the latest packet
        self.wall_offset = wall() - self.now
        self.malformed = 0
        self.errors = 0
        self.started = wall()

    # --- state ---------------------------------------------------------------

    def restore(self) -> tuple[int, bool]:
        """Load the state file: (entries restored, whether the last run ended
        cleanly).  Counters always come back.  Grants come back only after a clean
        exit: their spent connections are saved lazily, so after a crash a grant
        could hold one connection too many -- it is dropped instead (fail closed;
        established connections are not affected, the client knocks again).  A
        corrupt file is fatal (StateError): without the counters a sniffed sequence
        could be replayed."""
        data = load_json(self.cfg.state_path)
        if data is None:
            return 0, True
        if not isinstance(data, dict):
            raise StateError(f"{self.cfg.state_path}: not a JSON object")
        clean = data.get("clean") is True
        if not clean:
            data = {**data, "grants": []}
        try:
            return self.engine.restore_state(data, self.wall(), self.mono()), clean
        except (KeyError, TypeError, ValueError) as exc:
            raise StateError(f"{self.cfg.state_path}: unusable state ({exc})") from None

    def save(self, clean: bool = False) -> None:
        """Write counters and grants; ``clean`` only at an orderly exit."""
        state = self.engine.export_state(self.wall(), self.mono())
        save_json(self.cfg.state_path, {**state, "clean": clean})
        self.dirty = False

    # --- packets -------------------------------------------------------------

    def verdict_for(self, payload: bytes) -> Verdict:
        """The verdict for one queued packet, its events handled.  Never raises."""
        verdict = self.decide_packet(payload)
        self.settle()
        return verdict

    def decide_packet(self, payload: bytes) -> Verdict:
        """The verdict for one queued packet; its events wait for :meth:`settle`,
        which the daemon calls right after giving the verdict (logging and saving
        stay off the verdict's latency; a used counter is still on disk before the
        next packet -- and so before any grant it opened is used).  Never raises:
        anything unexpected is DROP plus an event (fail closed)."""
        try:
            # One clock read a packet: wall time follows the monotonic clock, the
            # offset re-read at every tick (a clock step shows within 0.25 s).
            mono = self.now = self.mono()
            key, port = parse_key(payload)
            decision = self.engine.decide_key(key, port, mono + self.wall_offset, mono)
            if decision.events:
                self.pending = decision.events
            self.verdicts[decision.verdict] += 1
            return decision.verdict
        except MalformedPacket as exc:
            self.malformed += 1
            self._log(Event(EventKind.MALFORMED_PACKET, _src_of(payload), reason=exc.reason))
        except Exception as exc:  # a bug: still a verdict, still running
            self.internal_error(exc, payload)
        self.verdicts[Verdict.DROP] += 1
        return Verdict.DROP

    def settle(self) -> None:
        """Log (and, where needed, save) the events of the latest decision."""
        if self.pending:
            events, self.pending = self.pending, ()
            self._handle_events(events)

    def verdict_counts(self) -> dict[str, int]:
        return {v.name.lower(): self.verdicts[v] for v in Verdict}

    def internal_error(self, exc: Exception, payload: bytes) -> None:
        self.errors += 1
        reason = f"{type(exc).__name__}: {exc}"
        self._log(Event(EventKind.INTERNAL_ERROR, _src_of(payload), reason=reason))

    def _handle_events(self, events: Iterable[Event]) -> None:
        now = False
        for event in events:
            self._log(event)
            now = now or event.kind in SAVE_NOW
            self.dirty = self.dirty or event.kind in SAVE_SOON
        if now:
            # Synchronously, before the verdict: a counter that was used must be on
            # disk before anyone can rely on the grant (kill -9 safe).
            self.save()

    def _log(self, event: Event) -> None:
        try:
            self.events.emit(event, self.wall())
        except Exception:  # logging must never cost a verdict
            self.errors += 1

    # --- housekeeping ----------------------------------------------------------

    def tick(self) -> None:
        self.wall_offset = self.wall() - self.mono()
        events = self.engine.tick(self.wall(), self.mono())
        if events:
            self._handle_events(events)
        if self.dirty:
            self.save()
        self.events.flush_suppressed()

    def reload(self) -> str:
        """Re-read configuration and users; keep progress, grants and counters.

        A bad configuration keeps the running one (raises ConfigError, nothing
        applied)."""
        new = load_config(self.cfg.path)
        old_settings = EngineSettings.from_config(self.cfg)
        new_settings = EngineSettings.from_config(new)
        if new.queue.number != self.cfg.queue.number:
            raise ConfigError(new.path, "queue.number", "changing the queue needs a restart")
        if new_settings == old_settings:
            events = self.engine.set_users(new.users, self.mono())
            how = "users reloaded"
        else:
            # Knock parameters changed: the sequences in flight are void; carry
            # counters and grants over.
            state = self.engine.export_state(self.wall(), self.mono())
            engine = Engine(new_settings, new.users, self.wall())
            engine.restore_state(state, self.wall(), self.mono())
            events = []
            self.engine = engine
            how = "configuration reloaded (knock parameters changed: progress reset)"
        self.cfg = new
        self._handle_events(events)
        self.save()
        return how

    def status(self, queue_stats: dict[str, Any] | None = None) -> dict[str, Any]:
        wall, mono = self.wall(), self.mono()
        step = self.engine.step
        counters = {user: steps.get(step, 0) for user, steps in self.engine.counters().items()}
        return {
            "pid": os.getpid(),
            "uptime": round(wall - self.started, 1),
            "step": step,
            "users": {
                u.name: {"enabled": u.enabled, "counter": counters.get(u.name, 0)}
                for u in self.cfg.users
            },
            "grants": self.engine.grants(wall, mono),
            "tracked_sources": self.engine.tracked_sources(),
            "verdicts": self.verdict_counts(),
            "malformed": self.malformed,
            "internal_errors": self.errors,
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
