"""The embedded state store: one SQLite database file (``[state] path``).

Why SQLite (the standard library's): every write is an atomic, durable transaction
(WAL, ``synchronous=FULL``: committed means fsynced, so kill -9 or a power cut never
tears it), and several processes on one host can claim from the same file safely
(``BEGIN IMMEDIATE`` serialises them) -- what worker processes need.

Guarantees, each tested:

* A claim and the grant it backs are one transaction; the counter rule is evaluated
  inside it with :class:`nfknock.counters.CounterWindow`, so the store implements
  exactly the engine's rule.  A failed write is FAILED: nothing opens.
* Loading is strict (:func:`_validate`): types, ranges and sizes of every row; an
  unknown schema, a file that is not a database, or corruption is a StateError
  naming the file -- the daemon refuses to start rather than forget a counter.
* One daemon per state: an exclusive ``flock`` on ``<path>.lock`` (holding the
  owner's pid); a second instance is refused and told who holds it.
* The path is resolved once: a symlink is followed to its target (the target is
  what is written), a dangling one is refused.  Files are created 0600, a missing
  directory 0700, whatever the umask.
* Grants are restored only after a clean exit: :meth:`begin` durably marks the
  state unclean before the first verdict.
* A prefix grant (:mod:`nfknock.prefixes`) keeps its length in the grants table's
  ``prefix`` column (NULL: the exact address).  The column came after schema 1 was
  settled and is added to an older file on first open; the schema number stays, as
  an older nfknock reading the file ignores the column and restores such a grant for
  the prefix's first address only -- narrower, never wider.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nfknock.config import USER_NAME
from nfknock.core import MAX_DIGEST_SECONDS, GrantRecord
from nfknock.counters import MAX_COUNTER, CounterWindow
from nfknock.gate import ClaimOutcome, ClaimRequest, CounterClaim, DigestClaim, Outcome
from nfknock.prefixes import BOUNDS as PREFIX_BOUNDS
from nfknock.prefixes import is_masked
from nfknock.store import Snapshot, StateError

SCHEMA = 1
SQLITE_MAGIC = b"SQLite format 3\x00"
BUSY_TIMEOUT_MS = 2000
MAX_STEP = 1 << 40
MAX_ROWS = 1 << 24
MAX_GRANT_SECONDS = 2 * 86400  # [door] open_seconds and [spa] max_open_seconds <= 86400

_TABLES = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value);
CREATE TABLE IF NOT EXISTS windows (
    user TEXT NOT NULL, step INTEGER NOT NULL, floor INTEGER NOT NULL,
    PRIMARY KEY (user, step));
CREATE TABLE IF NOT EXISTS digests (digest BLOB PRIMARY KEY, until REAL NOT NULL);
CREATE TABLE IF NOT EXISTS grants (
    id INTEGER PRIMARY KEY, src BLOB NOT NULL, dst BLOB NOT NULL, user TEXT NOT NULL,
    ports TEXT NOT NULL, remaining INTEGER NOT NULL, expires REAL NOT NULL,
    method TEXT NOT NULL, prefix INTEGER);
"""
GRANT_COLUMNS = "src, dst, user, ports, remaining, expires, method, prefix"


def resolve_state_path(path: Path) -> Path:
    """The file to use: symlinks followed, a dangling one refused; the directory
    created 0700 if missing."""
    if path.is_symlink():
        target = Path(os.path.realpath(path))
        if not target.exists():
            raise StateError(
                f"{path}: a symlink to {target}, which does not exist (refusing to start "
                "fresh: point it at the state file, or remove the link)"
            )
        path = target
    path = Path(os.path.abspath(path))
    parent = path.parent
    if not parent.exists():
        try:
            parent.mkdir(parents=True, mode=0o700)
            os.chmod(parent, 0o700)
        except OSError as exc:
            raise StateError(
                f"{parent}: cannot create the state directory: {exc.strerror}"
            ) from None
    elif not parent.is_dir():
        raise StateError(f"{path}: {parent} is not a directory")
    if path.exists() and not path.is_file():
        raise StateError(f"{path}: not a regular file")
    return path


class EmbeddedStore:
    def __init__(
        self,
        path: Path,
        *,
        replay_cache: int = 65536,
        max_age: float = 120.0,
        lock: bool = True,
    ) -> None:
        self.path = resolve_state_path(path)
        self.description = f"embedded ({self.path})"
        self.replay_cache = replay_cache
        self.max_age = max_age
        self._lock_fd = _acquire_lock(self.path) if lock else None
        self._db: sqlite3.Connection | None = None

    # --- connection ---------------------------------------------------------------

    def _check_format(self) -> None:
        try:
            with self.path.open("rb") as f:
                head = f.read(len(SQLITE_MAGIC))
        except FileNotFoundError:
            return
        except OSError as exc:
            raise StateError(f"{self.path}: {exc.strerror}") from None
        if head and head != SQLITE_MAGIC:
            hint = " (a JSON state file of nfknock 0.1?)" if head[:1] == b"{" else ""
            raise StateError(
                f"{self.path}: not an nfknock state database{hint}; move it aside to start "
                "fresh (sequences used before may then be replayed within their step)"
            )

    def _connect(self) -> sqlite3.Connection:
        if self._db is not None:
            return self._db
        self._check_format()
        if not self.path.exists():
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                os.close(fd)
                os.chmod(self.path, 0o600)
            except FileExistsError:
                pass
            except OSError as exc:
                raise StateError(f"{self.path}: cannot create: {exc.strerror}") from None
        try:
            db = sqlite3.connect(
                self.path,
                isolation_level=None,
                check_same_thread=False,
                timeout=BUSY_TIMEOUT_MS / 1000,
            )
            db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = FULL")
            db.executescript(_TABLES)
            if db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone() is None:
                db.execute("INSERT INTO meta VALUES ('schema', ?), ('clean', 1)", (SCHEMA,))
            if not _has_prefix_column(db):
                _add_prefix_column(db)
        except sqlite3.DatabaseError as exc:
            raise StateError(f"{self.path}: {_sqlite_problem(exc)}") from None
        self._db = db
        return db

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        db = self._connect()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    # --- the interface --------------------------------------------------------------

    def load(self, wall: float) -> Snapshot:
        fresh = not self.path.exists() or self.path.stat().st_size == 0
        try:
            try:
                db = self._connect()
            except StateError:
                if fresh or (os.access(self.path.parent, os.W_OK) and _writable_fs(self.path)):
                    raise
                # A read-only filesystem: read what is there (claims will fail and
                # say so; begin() reports it).
                self._check_format()
                with contextlib.closing(
                    sqlite3.connect(f"file:{self.path}?mode=ro&immutable=1", uri=True)
                ) as ro:
                    return _validate(ro, self.path, wall, fresh)
            return _validate(db, self.path, wall, fresh)
        except sqlite3.DatabaseError as exc:
            raise StateError(f"{self.path}: {_sqlite_problem(exc)}") from None

    def begin(self) -> None:
        owner = json.dumps({"pid": os.getpid(), "since": time.time()})
        try:
            with self._tx() as db:
                db.execute(
                    "INSERT OR REPLACE INTO meta VALUES ('clean', 0), ('owner', ?)", (owner,)
                )
        except sqlite3.Error as exc:
            raise StateError(
                f"{self.path}: cannot record that the state is in use: {exc}"
            ) from None

    def claim(self, request: ClaimRequest, wall: float) -> ClaimOutcome:
        try:
            with self._tx() as db:
                claim = request.claim
                if isinstance(claim, CounterClaim):
                    lost = _claim_counter(db, claim)
                else:
                    lost = self._claim_digest(db, claim, wall)
                if lost:
                    return ClaimOutcome(request.id, Outcome.LOST, lost)
                if not request.ports:  # a record-only claim (gate.record): no grant
                    return ClaimOutcome(request.id, Outcome.WON)
                src, dst = (
                    request.key[: len(request.key) // 2],
                    request.key[len(request.key) // 2 :],
                )
                db.execute(
                    f"INSERT INTO grants ({GRANT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",  # noqa: S608
                    (
                        src,
                        dst,
                        request.user,
                        json.dumps(sorted(request.ports)),
                        request.remaining,
                        request.expires,
                        request.method,
                        request.prefix,
                    ),
                )
        except (sqlite3.Error, StateError) as exc:
            self.disconnect()  # reopen at the next claim: the disk may recover
            return ClaimOutcome(request.id, Outcome.FAILED, f"{self.path}: {exc}")
        return ClaimOutcome(request.id, Outcome.WON)

    def _claim_digest(self, db: sqlite3.Connection, claim: DigestClaim, wall: float) -> str:
        row = db.execute("SELECT until FROM digests WHERE digest = ?", (claim.digest,)).fetchone()
        if row is not None and row[0] > wall:
            return "SPA payload seen before (replay)"
        (count,) = db.execute("SELECT count(*) FROM digests").fetchone()
        if count >= self.replay_cache:
            db.execute("DELETE FROM digests WHERE until <= ?", (wall,))
            (count,) = db.execute("SELECT count(*) FROM digests").fetchone()
            if count >= self.replay_cache:
                # Every entry is still needed: refusing is the only safe answer.
                raise StateError(f"the SPA replay cache is full ({count} recent digests)")
        db.execute("INSERT OR REPLACE INTO digests VALUES (?, ?)", (claim.digest, claim.until))
        return ""

    def save_horizon(self, high_step: int, pruned_through: int) -> None:
        try:
            with self._tx() as db:
                _save_horizon(db, high_step, pruned_through)
        except sqlite3.Error as exc:
            raise StateError(f"{self.path}: {exc}") from None

    def finish(self, grants: list[GrantRecord], high_step: int, pruned_through: int) -> None:
        try:
            with self._tx() as db:
                db.execute("DELETE FROM grants")
                db.executemany(
                    f"INSERT INTO grants ({GRANT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",  # noqa: S608
                    [
                        (
                            g.src,
                            g.dst,
                            g.user,
                            json.dumps(sorted(g.ports)),
                            g.remaining,
                            g.expires,
                            g.method,
                            g.prefix,
                        )
                        for g in grants
                    ],
                )
                _save_horizon(db, high_step, pruned_through)
                db.execute("INSERT OR REPLACE INTO meta VALUES ('clean', 1)")
                db.execute("DELETE FROM meta WHERE key = 'owner'")
        except sqlite3.Error as exc:
            raise StateError(f"{self.path}: {exc}") from None

    def disconnect(self) -> None:
        """Close the database connection (the lock stays); the next call reopens."""
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
            self._db = None

    def close(self) -> None:
        self.disconnect()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None


def _claim_counter(db: sqlite3.Connection, claim: CounterClaim) -> str:
    """Apply the counter rule inside the transaction; '' when won, else why not."""
    row = db.execute(
        "SELECT floor FROM windows WHERE user = ? AND step = ?", (claim.user, claim.step)
    ).fetchone()
    window = CounterWindow(row[0] if row else 0)
    if not window.claim(claim.counter, claim.lookahead):
        return f"counter {claim.counter} of step {claim.step} already spent (next {window.floor})"
    db.execute(
        "INSERT OR REPLACE INTO windows VALUES (?, ?, ?)", (claim.user, claim.step, window.floor)
    )
    return ""


def _save_horizon(db: sqlite3.Connection, high_step: int, pruned_through: int) -> None:
    db.execute(
        "INSERT OR REPLACE INTO meta VALUES ('high_step', ?), ('pruned_through', ?)",
        (high_step, pruned_through),
    )
    db.execute("DELETE FROM windows WHERE step != -1 AND step <= ?", (pruned_through,))


# --- strict loading ---------------------------------------------------------------------


class _Bad(Exception):
    pass


def _int(value: Any, lo: int, hi: int, what: str) -> int:
    if type(value) is not int or not lo <= value <= hi:
        raise _Bad(f"{what} must be an integer in {lo}..{hi}, not {value!r}")
    return value


def _real(value: Any, lo: float, hi: float, what: str) -> float:
    if type(value) not in (int, float) or not math.isfinite(value) or not lo <= value <= hi:
        raise _Bad(f"{what} must be a finite number in {lo:g}..{hi:g}, not {value!r}")
    return float(value)


def _user(value: Any, what: str) -> str:
    if type(value) is not str or not USER_NAME.fullmatch(value):
        raise _Bad(f"{what} is not a user name: {value!r}")
    return value


def _validate(db: sqlite3.Connection, path: Path, wall: float, fresh: bool) -> Snapshot:
    where = "meta"
    try:
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        schema = meta.get("schema")
        if schema != SCHEMA:
            raise _Bad(f"unsupported schema {schema!r} (this nfknock reads {SCHEMA})")
        clean = _int(meta.get("clean"), 0, 1, "clean") == 1
        high = _int(meta.get("high_step", -1), -1, MAX_STEP, "high_step")
        pruned = _int(meta.get("pruned_through", -1), -1, MAX_STEP, "pruned_through")
        for table in ("windows", "digests", "grants"):
            (n,) = db.execute(f"SELECT count(*) FROM {table}").fetchone()  # noqa: S608
            if n > MAX_ROWS:
                raise _Bad(f"{table} has {n} rows (more than {MAX_ROWS}: not ours)")

        where = "windows"
        windows = []
        for user, step, floor in db.execute("SELECT user, step, floor FROM windows ORDER BY 1, 2"):
            key = (_user(user, "user"), _int(step, -1, MAX_STEP, "step"))
            windows.append(
                (*key, CounterWindow(_int(floor, 0, MAX_COUNTER + 1, f"floor of {key}")))
            )

        where = "digests"
        digests = []
        for digest, until in db.execute("SELECT digest, until FROM digests"):
            if type(digest) is not bytes or len(digest) != 32:
                raise _Bad(f"a digest must be 32 bytes, not {digest!r}")
            digests.append((digest, _real(until, 0, wall + MAX_DIGEST_SECONDS + 86400, "until")))

        where = "grants"
        grants = []
        # A read-only file from before prefix grants has no prefix column: all exact.
        columns = GRANT_COLUMNS
        if not _has_prefix_column(db):
            columns = columns.replace("prefix", "NULL")
        for src, dst, user, ports, remaining, expires, method, prefix in db.execute(
            f"SELECT {columns} FROM grants"  # noqa: S608
        ):
            if type(src) is not bytes or type(dst) is not bytes or len(src) != len(dst):
                raise _Bad(f"addresses {src!r} -> {dst!r}")
            if len(src) not in (4, 16):
                raise _Bad(f"address of {len(src)} bytes")
            try:
                port_list = json.loads(ports) if type(ports) is str else None
            except ValueError:
                port_list = None
            if (
                not isinstance(port_list, list)
                or not port_list
                or not all(type(p) is int and 1 <= p <= 65535 for p in port_list)
            ):
                raise _Bad(f"ports {ports!r}")
            if method not in ("knock", "spa"):
                raise _Bad(f"method {method!r}")
            if prefix is not None:  # a prefix grant: shorter than the address, masked
                lo, hi = PREFIX_BOUNDS[len(src)]
                _int(prefix, lo, hi - 1, "prefix")
                if not is_masked(src, prefix):
                    raise _Bad(f"source {src.hex()} has bits set past its prefix /{prefix}")
            grants.append(
                GrantRecord(
                    src,
                    dst,
                    _user(user, "user"),
                    frozenset(port_list),
                    _int(remaining, 0, 1 << 20, "remaining"),
                    _real(expires, 0, wall + MAX_GRANT_SECONDS, "expires"),
                    method,
                    prefix=prefix,
                )
            )
    except _Bad as exc:
        raise StateError(
            f"{path}: {where}: {exc} (the state file is damaged or not nfknock's)"
        ) from None
    return Snapshot(
        windows=windows,
        high_step=high,
        pruned_through=pruned,
        digests=digests,
        grants=[g for g in grants if g.expires > wall] if clean else [],
        clean=clean,
        fresh=fresh,
    )


def _has_prefix_column(db: sqlite3.Connection) -> bool:
    return any(row[1] == "prefix" for row in db.execute("PRAGMA table_info(grants)"))


def _add_prefix_column(db: sqlite3.Connection) -> None:
    """A file from before prefix grants: add the column (once, however many worker
    processes open the file at the same moment)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        if not _has_prefix_column(db):
            db.execute("ALTER TABLE grants ADD COLUMN prefix INTEGER")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _writable_fs(path: Path) -> bool:
    return not os.statvfs(path.parent).f_flag & os.ST_RDONLY


def _sqlite_problem(exc: sqlite3.DatabaseError) -> str:
    text = str(exc)
    if "not a database" in text or "malformed" in text:
        return f"the state database is corrupt ({text}); move it aside to start fresh"
    if "readonly" in text or "unable to open" in text:
        return f"cannot write the state database ({text})"
    return text


def _acquire_lock(path: Path) -> int | None:
    """An exclusive flock on ``<path>.lock`` (None on a read-only filesystem where the
    lock file does not exist: nothing can be claimed there anyway)."""
    lock = path.with_name(path.name + ".lock")
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        writable = True
    except OSError as exc:
        if exc.errno not in (errno.EROFS, errno.EACCES, errno.ENOSPC):
            raise StateError(f"{lock}: cannot open the lock file: {exc.strerror}") from None
        try:
            fd = os.open(lock, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc2:
            raise StateError(f"{lock}: cannot open the lock file: {exc2.strerror}") from None
        writable = False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise StateError(
            f"{path} is in use by another nfknock ({holder}); one daemon per state file "
            "(give the second instance its own [state] path)"
        ) from None
    if writable:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()}\n".encode(), 0)
            os.fchmod(fd, 0o600)
    return fd
