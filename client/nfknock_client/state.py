"""The client's counter state file and the per-profile lock.  Standard library only.

``$XDG_STATE_HOME/nfknock/`` (default ``~/.local/state/nfknock/``, mode 0700) holds

* ``client-state.json`` -- per profile, the :class:`~nfknock_client.counters.StepRecord`
  of its latest step: ``{"version": 2, "profiles": {NAME: {"step": T, "sent": [..],
  "used": [..]}}}``.  The file of earlier versions (``{NAME: {"step": T, "counter":
  C}}``) is read as C sent.  Anything else is refused with a message (exit 2): a
  silently reset counter would reuse sequences.
* ``client-state.lock`` -- held (``flock``) for each read-modify-write of that file,
  a few milliseconds: concurrent clients never lose each other's update.
* ``locks/<profile>.lock`` (mode 0600) -- :class:`ProfileLock`, held by one
  invocation from choosing a counter until its outcome is known, so concurrent
  invocations of one profile knock one at a time with distinct counters.

Lock order: a profile lock, then the state lock; the state lock is never held while
waiting for a profile lock.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import random
import re
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeGuard

from nfknock_client.counters import MAX_HOTP_COUNTER, StepRecord

VERSION = 2
MAX_STATE_BYTES = 1 << 20  # a state file larger than this is not ours
MAX_LIST = 256  # counters kept per list and step (see counters.MAX_KEPT)
STATE_LOCK_WAIT = 10.0  # seconds; the state lock is only ever held for milliseconds
_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}")


class StateError(Exception):
    """The state directory or file cannot be used: exit 2."""


class LockTimeout(Exception):
    """Another invocation held the lock past the wait: exit 1."""


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_state(text: str, where: str) -> dict[str, StepRecord]:
    """The records of a state file's text; :class:`StateError` naming the problem."""
    try:
        data = json.loads(text)
    except RecursionError:
        raise StateError(f"{where}: nested too deeply") from None
    except ValueError as exc:
        raise StateError(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise StateError(f"{where}: expected a JSON object, got {type(data).__name__}")
    if "version" not in data:  # version 1: {NAME: {"step": T, "counter": C}}
        out = {}
        for name, entry in data.items():
            if not (isinstance(entry, dict) and set(entry) == {"step", "counter"}):
                raise StateError(f"{where}: {name!r}: expected {{step, counter}}")
            step, counter = entry["step"], entry["counter"]
            _check_step(step, f"{where}: {name!r}.step")
            _check_counter(counter, f"{where}: {name!r}.counter")
            out[name] = StepRecord(step, sent=frozenset({counter}))
        return out
    if data.get("version") != VERSION or set(data) != {"version", "profiles"}:
        raise StateError(
            f"{where}: expected {{version: {VERSION}, profiles}}, got keys {sorted(data)}"
        )
    profiles = data["profiles"]
    if not isinstance(profiles, dict):
        raise StateError(f"{where}: profiles: expected an object")
    out = {}
    for name, entry in profiles.items():
        at = f"{where}: profiles.{name}"
        if not (isinstance(entry, dict) and set(entry) == {"step", "sent", "used"}):
            raise StateError(f"{at}: expected {{step, sent, used}}")
        _check_step(entry["step"], f"{at}.step")
        lists = []
        for key in ("sent", "used"):
            items = entry[key]
            if not isinstance(items, list) or len(items) > MAX_LIST:
                raise StateError(f"{at}.{key}: expected a list of at most {MAX_LIST} counters")
            for item in items:
                _check_counter(item, f"{at}.{key}")
            lists.append(frozenset(items))
        sent, used = lists
        out[name] = StepRecord(entry["step"], sent - used, used)
    return out


def _check_step(value: object, at: str) -> None:
    if not (_is_int(value) and -1 <= value < 1 << 62):
        raise StateError(f"{at}: expected a step number, got {value!r:.40}")


def _check_counter(value: object, at: str) -> None:
    if not (_is_int(value) and 0 <= value <= MAX_HOTP_COUNTER):
        raise StateError(f"{at}: expected a counter (an integer >= 0), got {value!r:.40}")


def render_state(records: dict[str, StepRecord]) -> str:
    profiles = {
        name: {"step": r.step, "sent": sorted(r.sent), "used": sorted(r.used)}
        for name, r in sorted(records.items())
    }
    return json.dumps({"version": VERSION, "profiles": profiles}, indent=1) + "\n"


def _flock(fd: int, deadline: float, what: Callable[[], str]) -> None:
    """Exclusive flock, polled until ``deadline`` (monotonic): flock has no timeout."""
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        if time.monotonic() >= deadline:
            raise LockTimeout(what())
        time.sleep(random.uniform(0.005, 0.02))  # noqa: S311 - jitter, not a secret


class StateStore:
    """The state directory: counter records and locks."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.path = directory / "client-state.json"
        self.lock_path = directory / "client-state.lock"

    # --- files -------------------------------------------------------------------

    def ensure_dir(self) -> None:
        for d in (self.dir, self.dir / "locks"):
            try:
                d.mkdir(parents=True, exist_ok=True, mode=0o700)
            except OSError as exc:
                raise StateError(f"cannot create the state directory {d}: {_why(exc)}") from None
            if not d.is_dir():
                raise StateError(f"state directory {d} is not a directory")

    def _open_lock(self, path: Path) -> int:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StateError(f"cannot open the lock file {path}: {_why(exc)}") from None
        with contextlib.suppress(OSError):  # an older, wider file: narrow it
            if stat.S_IMODE(os.fstat(fd).st_mode) != 0o600:
                os.fchmod(fd, 0o600)
        return fd

    def read_all(self) -> dict[str, StepRecord]:
        try:
            with self.path.open("rb") as f:
                raw = f.read(MAX_STATE_BYTES + 1)
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise StateError(f"cannot read the client state {self.path}: {_why(exc)}") from None
        hint = " (it only holds knock counters: remove it and the client resyncs)"
        if len(raw) > MAX_STATE_BYTES:
            raise StateError(f"{self.path}: larger than {MAX_STATE_BYTES} bytes{hint}")
        try:
            text = raw.decode()
        except UnicodeDecodeError:
            raise StateError(f"{self.path}: not UTF-8 text{hint}") from None
        try:
            return parse_state(text, str(self.path))
        except StateError as exc:
            raise StateError(f"{exc}{hint}") from None

    def _write_all(self, records: dict[str, StepRecord]) -> None:
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            try:
                os.write(fd, render_state(records).encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise StateError(f"cannot write the client state {self.path}: {_why(exc)}") from None

    # --- records -----------------------------------------------------------------

    def record(self, key: str, step: int) -> StepRecord:
        """The record of ``key`` for ``step`` (empty when the file holds another step)."""
        rec = self.read_all().get(key)
        return rec if rec is not None and rec.step == step else StepRecord(step)

    def update(self, key: str, step: int, change: Callable[[StepRecord], StepRecord]) -> None:
        """Read-modify-write one record under the state lock (atomic between
        processes).  A record of a later step is kept as it is."""
        self.ensure_dir()
        fd = self._open_lock(self.lock_path)
        try:
            _flock(
                fd,
                time.monotonic() + STATE_LOCK_WAIT,
                lambda: f"the client state lock {self.lock_path} was held for {STATE_LOCK_WAIT:g}s",
            )
            records = self.read_all()
            old = records.get(key)
            if old is not None and old.step > step:
                return
            base = old if old is not None and old.step == step else StepRecord(step)
            records[key] = change(base)
            self._write_all(records)
        finally:
            os.close(fd)  # closing releases the flock

    def mark_sent(self, key: str, step: int, counter: int) -> None:
        self.update(key, step, lambda r: r.with_sent(counter))

    def mark_used(self, key: str, step: int, counter: int) -> None:
        self.update(key, step, lambda r: r.with_used(counter))

    # --- the profile lock ---------------------------------------------------------

    def profile_lock(self, key: str, wait: float) -> ProfileLock:
        self.ensure_dir()
        return ProfileLock(self._open_lock(self.dir / "locks" / lock_name(key)), key, wait)


def lock_name(key: str) -> str:
    """A file name for a profile (or host) name: itself when plain, else a hash."""
    if _SAFE_NAME.fullmatch(key):
        return f"{key}.lock"
    digest = hashlib.sha256(key.encode(errors="surrogateescape")).hexdigest()[:32]
    return f"h-{digest}.lock"


class ProfileLock:
    """An exclusive flock on a profile's lock file; acquire/release may repeat (the
    lock is let go while waiting for the next step)."""

    def __init__(self, fd: int, key: str, wait: float) -> None:
        self.fd, self.key, self.wait = fd, key, wait
        self.held = False

    def acquire(self) -> None:
        _flock(
            self.fd,
            time.monotonic() + self.wait,
            lambda: (
                f"another nfknock-client for {self.key!r} held its lock for "
                f"{self.wait:g}s (raise --lock-wait, or try again)"
            ),
        )
        self.held = True

    def release(self) -> None:
        if self.held:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            self.held = False

    def close(self) -> None:
        self.release()
        os.close(self.fd)

    @contextlib.contextmanager
    def holding(self) -> Iterator[ProfileLock]:
        self.acquire()
        try:
            yield self
        finally:
            self.close()


def _why(exc: OSError) -> str:
    return exc.strerror or errno.errorcode.get(exc.errno or 0, str(exc))
