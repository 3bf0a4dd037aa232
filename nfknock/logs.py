"""structlog set-up: JSON lines to stdout (journald) or a console format on a TTY.

The core emits :class:`~nfknock.events.Event` values; this edge logs them, one rich
line each, with ``src``, ``user`` and ``port`` keys a fail2ban filter can match.
Noisy kinds (drops on protected ports, malformed packets) are rate-limited so a
flood cannot turn the daemon into a log writer.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog

from nfknock.events import Event, EventKind

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

EVENT_LEVEL = {
    EventKind.KNOCK_PROGRESS: logging.DEBUG,
    EventKind.SOURCE_EVICTED: logging.DEBUG,
    EventKind.PROGRESS_RESET: logging.INFO,
    EventKind.SEQUENCE_STALE: logging.WARNING,
    EventKind.MALFORMED_PACKET: logging.WARNING,
    EventKind.INTERNAL_ERROR: logging.ERROR,
    EventKind.SPA_REFUSED: logging.WARNING,
    EventKind.CLAIM_FAILED: logging.ERROR,
    EventKind.REPLAY_STATE_GAP: logging.ERROR,
}
RATE_LIMITED = frozenset(
    {
        EventKind.PROTECTED_DROP,
        EventKind.MALFORMED_PACKET,
        EventKind.SOURCE_EVICTED,
        EventKind.PROGRESS_RESET,
        EventKind.SPA_REFUSED,
    }
)


def configure(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    stream = stream or sys.stdout
    console = fmt == "console" or (fmt == "auto" and stream.isatty())
    # Colours only on a terminal: console lines in a file or the journal stay plain
    # text that fail2ban's filter (contrib/fail2ban) can match.
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=stream.isatty())
        if console
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )


class EventLogger:
    """Logs engine events; at most ``burst`` lines per second per noisy kind.
    ``counts``: events by kind name since start, suppressed ones included (metrics)."""

    def __init__(self, burst: int = 50) -> None:
        self.log = structlog.get_logger("nfknock")
        self.burst = burst
        self._window = 0
        self._counts: dict[EventKind, int] = {}
        self.suppressed: dict[EventKind, int] = {}
        self.counts: dict[str, int] = {}

    def emit(self, event: Event, now: float) -> None:
        kind = event.kind.value
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if event.kind in RATE_LIMITED:
            second = int(now)
            if second != self._window:
                self.flush_suppressed()
                self._window = second
                self._counts.clear()
            n = self._counts.get(event.kind, 0) + 1
            self._counts[event.kind] = n
            if n > self.burst:
                self.suppressed[event.kind] = self.suppressed.get(event.kind, 0) + 1
                return
        fields = event.as_dict()
        name = fields.pop("event")
        self.log.log(EVENT_LEVEL.get(event.kind, logging.INFO), name, **fields)

    def flush_suppressed(self) -> None:
        for kind, n in self.suppressed.items():
            self.log.warning("events_suppressed", kind=kind.value, count=n, reason="rate limit")
        self.suppressed.clear()
