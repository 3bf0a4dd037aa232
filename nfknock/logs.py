"""structlog set-up: JSON lines to stdout (journald) or a console format on a TTY.

The core emits :class:`~nfknock.events.Event` values; this edge logs them, one rich
line each, with ``src``, ``user`` and ``port`` keys a fail2ban filter can match.
Noisy kinds (drops on protected ports, malformed packets) are rate-limited so a
flood cannot turn the daemon into a log writer.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
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
        logger_factory=_factory(LineLogger(stream)),
        cache_logger_on_first_use=False,
    )


class LineLogger:
    """A structlog logger that writes each line -- message and newline -- in one
    ``write(2)`` on the stream's file descriptor.

    Why: worker processes share the supervisor's stdout (the journal's stream
    socket, or a file opened with O_APPEND).  structlog's ``PrintLogger`` calls
    ``print``, which writes the message and the newline separately; with an
    unbuffered stdout (``PYTHONUNBUFFERED=1``, common in unit files and containers)
    those are two system calls, and another process's line can land between them:
    two JSON objects on one line and an empty one, which fail2ban and jq cannot
    parse -- the events are lost.  One write per line is atomic for a file opened
    with O_APPEND and, up to PIPE_BUF bytes, for a pipe.  A stream without a file
    descriptor (a test's StringIO) gets one ``write`` call and a flush."""

    _lock = threading.Lock()  # the threads of one process: partial writes stay whole

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        try:
            self._fd: int | None = stream.fileno()
        except (OSError, ValueError, AttributeError):  # io.UnsupportedOperation
            self._fd = None
        self._encoding = getattr(stream, "encoding", None) or "utf-8"

    def msg(self, message: str) -> None:
        line = message + "\n"
        with self._lock:
            if self._fd is None:
                self._stream.write(line)
                self._stream.flush()
                return
            self._stream.flush()  # whatever was printed before goes first
            data = memoryview(line.encode(self._encoding, "backslashreplace"))
            while data:
                data = data[os.write(self._fd, data) :]

    log = debug = info = warn = warning = error = err = critical = exception = msg
    fatal = failure = msg


def _factory(logger: LineLogger) -> Any:
    return lambda *_args: logger


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
