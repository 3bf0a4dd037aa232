"""Concurrent invocations of one profile: the per-profile lock and the atomic state
update, with real processes racing (bounded in count and time)."""

from __future__ import annotations

import contextlib
import io
import json
import multiprocessing
import os
import socket
import stat
import time
from collections.abc import Sequence
from multiprocessing.queues import Queue
from pathlib import Path

import pytest

from nfknock.sequence import format_base32
from nfknock_client import cli
from nfknock_client.knock import DoorState
from nfknock_client.state import StateStore

SECRET = bytes(range(32))
WALL = 1_000_000 * 30 + 5.0  # a fixed clock: no step change during the race
STEP = 1_000_000
CTX = multiprocessing.get_context("fork")


@pytest.fixture
def secret_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    path = tmp_path / "secret"
    path.write_text(format_base32(SECRET))
    path.chmod(0o600)
    return path


def _slow_send(family: int, address: str, ports: Sequence[int], pace: float) -> None:
    time.sleep(0.003)  # long enough for the others to pile up on the lock


def _open_probe(
    family: int, address: str, port: int, timeout: float
) -> tuple[DoorState, socket.socket | None]:
    a, b = socket.socketpair()
    b.close()
    return DoorState.OPEN, a


def _worker(secret: str, rounds: int, check: bool, out: Queue[object]) -> None:
    io_ = cli.KnockIO(clock=lambda: WALL, send=_slow_send, probe=_open_probe)
    args = ["knock", "127.0.0.1", "--secret-file", secret, "--json", "--lock-wait", "30"]
    for _ in range(rounds):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            code = cli.main([*args, *(["--check"] if check else [])], io=io_)
        out.put((code, json.loads(buf.getvalue())["counter"]))


def race(secret_file: Path, procs: int, rounds: int, check: bool) -> list[tuple[int, int]]:
    out: Queue[object] = CTX.Queue()
    workers = [
        CTX.Process(target=_worker, args=(str(secret_file), rounds, check, out))
        for _ in range(procs)
    ]
    for w in workers:
        w.start()
    results = [out.get(timeout=60) for _ in range(procs * rounds)]
    for w in workers:
        w.join(30)
        assert w.exitcode == 0
    return results  # type: ignore[return-value]


@pytest.mark.parametrize("check", [False, True], ids=["plain", "check"])
def test_eight_racing_processes_get_distinct_counters_and_lose_no_update(
    secret_file: Path, check: bool
) -> None:
    results = race(secret_file, procs=8, rounds=4, check=check)
    counters = sorted(c for _, c in results)
    assert {code for code, _ in results} == {0}
    assert counters == list(range(32))  # distinct, and none skipped
    rec = StateStore(cli.state_dir()).record("127.0.0.1", STEP)
    if check:
        assert (rec.used, rec.sent) == (frozenset(range(32)), frozenset())
    else:
        assert (rec.sent, rec.used) == (frozenset(range(32)), frozenset())


def _mark(directory: str, first: int, n: int) -> None:
    store = StateStore(Path(directory))
    for c in range(first, first + n):
        store.mark_sent(f"p{c % 3}", STEP, c)


def test_state_updates_from_racing_processes_are_all_kept(tmp_path: Path) -> None:
    """No profile lock here: the state file's own lock makes each update atomic."""
    workers = [CTX.Process(target=_mark, args=(str(tmp_path), i * 20, 20)) for i in range(6)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
        assert w.exitcode == 0
    store = StateStore(tmp_path)
    kept = set().union(*(store.record(f"p{k}", STEP).sent for k in range(3)))
    assert kept == set(range(120))


def test_a_held_lock_times_out_with_exit_1_and_nothing_knocked(
    secret_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lock = StateStore(cli.state_dir()).profile_lock("127.0.0.1", 0)
    lock.acquire()
    sent: list[Sequence[int]] = []
    try:
        io_ = cli.KnockIO(
            clock=lambda: WALL, send=lambda f, a, ports, p: sent.append(ports), probe=_open_probe
        )
        start = time.monotonic()
        code = cli.main(
            ["knock", "127.0.0.1", "--secret-file", str(secret_file), "--lock-wait", "0.3"],
            io=io_,
        )
        elapsed = time.monotonic() - start
    finally:
        lock.close()
    assert code == 1 and sent == []
    assert 0.3 <= elapsed < 3
    assert "held its lock for 0.3s" in capsys.readouterr().err


def test_lock_and_state_files_are_private_even_under_umask_0(secret_file: Path) -> None:
    old = os.umask(0)
    try:
        cli.main(
            ["knock", "127.0.0.1", "--secret-file", str(secret_file)],
            io=cli.KnockIO(clock=lambda: WALL, send=_slow_send),
        )
    finally:
        os.umask(old)
    d = cli.state_dir()
    modes = {
        p.name: stat.S_IMODE(p.stat().st_mode)
        for p in [d, d / "locks", *d.iterdir(), *(d / "locks").iterdir()]
    }
    assert modes == {
        "nfknock": 0o700,
        "locks": 0o700,
        "client-state.json": 0o600,
        "client-state.lock": 0o600,
        "127.0.0.1.lock": 0o600,
    }
