"""[queue] workers = 2 against the real kernel: one supervisor, two worker processes on
their own queues (--queue-balance), sharing the embedded state file."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nfknock.netlab import PY, SERVER4, Lab
from nfknock.netlab.redisd import RedisServer
from nfknock.sequence import SequenceParams, sequence_at, step_of

from ..conftest import require_redis
from .conftest import SECRET, _require_lab
from .test_daemon_kernel import events

pytestmark = [pytest.mark.kernel, pytest.mark.serial]

PARAMS = SequenceParams(exclude=frozenset({22}))
SOURCES = [f"198.51.100.{i}" for i in range(11, 31)]
CHECK = Path(__file__).parents[2] / "contrib" / "ha" / "nfknock-check"


@pytest.fixture(scope="module", params=["embedded", "redis"])
def lab(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """One lab and one supervised daemon per backend (the module's tests share it and
    use fresh counters and sources).  Redis: on a Unix socket in the lab's directory."""
    _require_lab()
    backend: str = request.param
    with Lab(tmp_path_factory.mktemp("workers")) as lab:
        sections: dict[str, Any] = {"queue": {"workers": 2}}
        server = None
        if backend == "redis":
            require_redis()
            server = RedisServer(lab.workdir / "redis")
            server.start()
            sections["state"] = {"backend": "redis", "url": server.url, "prefix": "w"}
        try:
            lab.start_service()
            for src in SOURCES:
                lab.add_client_address(f"{src}/24")
            cfg = lab.write_config({"alice": SECRET}, **sections)
            lab.install_rules(cfg)
            lab.start_daemon(cfg, wait=60)
            yield lab
        finally:
            lab.stop_daemon()
            if server is not None:
                server.stop()


def status(lab: Lab) -> dict[str, Any]:
    out = lab.nfknock("status", "--config", str(lab.workdir / "nfknock.toml"), "--json")
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def health_check(lab: Lab) -> subprocess.CompletedProcess[str]:
    """contrib/ha/nfknock-check against this daemon's real status."""
    argv = [PY, str(CHECK), "--config", str(lab.workdir / "nfknock.toml")]
    argv += ["--nfknock", str(Path(PY).parent / "nfknock")]
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)


def accepts(lab: Lab) -> list[int]:
    return [(w.get("verdicts") or {}).get("accept", 0) for w in status(lab)["workers"]]


def fresh_sequence(lab: Lab) -> tuple[int, ...]:
    """The next unused counter of this step (as the daemon reports it)."""
    while time.time() % 30 > 28.5:  # keep knock and probe inside one step
        time.sleep(0.2)
    st = status(lab)
    now = time.time()  # one reading: the counter and the sequence of the same step
    counter = st["users"]["alice"]["counter"] if st["step"] == step_of(now, 30) else 0
    return sequence_at(SECRET, now, counter, PARAMS)


def open_from(lab: Lab, src: str) -> tuple[str, int | None]:
    """Knock and connect from ``src``: the probe's result and the worker that
    accepted it (the one whose accept count rose)."""
    before = accepts(lab)
    lab.send_knocks(SERVER4, fresh_sequence(lab), source=src)
    result = lab.probe(SERVER4, source=src)["result"]
    after = accepts(lab)
    rose = [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if b > a]
    return result, (rose[0] if len(rose) == 1 else None)


@pytest.fixture(scope="module")
def spread(lab: Lab) -> dict[int, list[str]]:
    """Sources that opened, by the worker that served them: until both have some."""
    by_worker: dict[int, list[str]] = {0: [], 1: []}
    results = []
    for src in SOURCES:
        result, worker = open_from(lab, src)
        results.append((src, result, worker))
        if worker is not None:
            by_worker[worker].append(src)
        if by_worker[0] and by_worker[1] and len(results) >= 4:
            break
    assert all(r == "open" for _, r, _ in results), results
    return by_worker


def test_two_workers_open_for_clients_spread_over_both_queues(
    lab: Lab, spread: dict[int, list[str]]
) -> None:
    assert spread[0] and spread[1]  # the kernel's hash sent clients to both workers
    st = status(lab)
    assert [w["alive"] for w in st["workers"]] == [True, True]
    assert [w["queues"] for w in st["workers"]] == [[0, 2], [1, 3]]
    assert all(w["verdicts"]["accept"] >= 1 for w in st["workers"])
    assert st["verdicts"]["accept"] == sum(w["verdicts"]["accept"] for w in st["workers"])
    assert all(q["queue_dropped"] == 0 for q in st["queue"].values())
    # No wait: a worker logs worker_started before it answers the supervisor, which
    # logs "started" only when both have answered.  Each line is one write to the
    # shared log (nfknock.logs.LineLogger), so neither can be torn by the other's.
    started = [e for e in lab.log_events() if e.get("event") == "worker_started"]
    assert sorted(e["worker"] for e in started) == [0, 1]
    assert health_check(lab).returncode == 0  # keepalived's track_script agrees


def test_a_sequence_replayed_through_the_other_worker_is_refused(
    lab: Lab, spread: dict[int, list[str]]
) -> None:
    for first, other in ((0, 1), (1, 0)):
        src, thief = spread[first][0], spread[other][0]
        ports = fresh_sequence(lab)
        lab.send_knocks(SERVER4, ports, source=src)
        assert lab.probe(SERVER4, source=src)["result"] == "open"
        lab.send_knocks(SERVER4, ports, source=thief)  # the replay, on the other worker
        assert lab.probe(SERVER4, source=thief)["result"] == "reset"
    stale = [e for e in events(lab, "sequence_stale") if e["src"] in (spread[0][0], spread[1][0])]
    assert {e["worker"] for e in stale} == {0, 1}


def test_a_reload_reaches_every_worker(lab: Lab) -> None:
    cfg = lab.workdir / "nfknock.toml"
    before = len(events(lab, "reloaded"))
    out = lab.nfknock("reload", "--config", str(cfg), "--applied", str(lab.applied))
    assert "the running daemon reloaded" in out.stdout
    reloaded = events(lab, "reloaded")[before:]
    assert sorted(str(e["worker"]) for e in reloaded if "worker" in e) == ["0", "1"]


def test_a_worker_killed_with_sigkill_is_noticed_and_restarted(
    lab: Lab, spread: dict[int, list[str]]
) -> None:
    old = status(lab)["workers"][1]
    os.kill(old["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        now = status(lab)["workers"][1]
        if now["alive"] and now["pid"] != old["pid"] and now["answered"]:
            break
        time.sleep(0.2)
    assert now["restarts"] == old["restarts"] + 1 and now["last_exit"] == "killed by signal 9"
    exited = events(lab, "worker_exited")
    assert exited and exited[-1]["worker"] == 1 and exited[-1]["pid"] == old["pid"]
    assert events(lab, "worker_restarted")[-1]["pid"] == now["pid"]
    result, worker = open_from(lab, spread[1][0])  # its clients get in again
    assert (result, worker) == ("open", 1)


def test_sigterm_stops_every_worker_and_leaves_the_state_clean(lab: Lab) -> None:
    pids = [w["pid"] for w in status(lab)["workers"]]
    assert lab.stop_daemon(signal.SIGTERM) == 0
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists()  # reaped by the supervisor
    if "redis" not in (lab.workdir / "nfknock.toml").read_text():
        with sqlite3.connect(lab.workdir / "state.db") as db:
            assert db.execute("SELECT value FROM meta WHERE key = 'clean'").fetchone() == (1,)
    assert len(events(lab, "stopped")) == 3  # two workers and the supervisor
