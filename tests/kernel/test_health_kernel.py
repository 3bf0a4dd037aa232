"""``nfknock status --health`` against real daemons: healthy, and each way of not
being healthy built for real (no daemon, a stuck one, queues bound in another network
namespace, rules removed, a state store on a read-only filesystem)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nfknock.netlab import Lab

from .conftest import SECRET

pytestmark = pytest.mark.kernel


def health(lab: Lab, cfg: Path, ns: str | None = None) -> subprocess.CompletedProcess[str]:
    return lab.nfknock("status", "--health", "--config", str(cfg), ns=ns, check=False)


def unhealthy(lab: Lab, cfg: Path, ns: str | None = None) -> str:
    done = health(lab, cfg, ns)
    assert done.returncode == 1 and done.stdout == "", done.stdout
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("unhealthy: ")
    return done.stderr


def setup(lab: Lab, **sections: dict[str, object]) -> Path:
    lab.start_service()
    cfg = lab.write_config({"alice": SECRET}, **sections)
    lab.install_rules(cfg)
    lab.start_daemon(cfg, extra=("--rules-check-seconds", "0.5"))
    deadline = time.monotonic() + 5  # the daemon's first rules check
    while health(lab, cfg).returncode and time.monotonic() < deadline:
        time.sleep(0.1)
    return cfg


def test_a_running_daemon_with_its_rules_is_healthy(lab: Lab) -> None:
    cfg = setup(lab)
    done = health(lab, cfg)
    assert done.returncode == 0, done.stderr
    assert lab.daemon is not None
    assert done.stdout == (
        f"healthy: pid {lab.daemon.pid} answers, queue(s) 0, 1 bound, rules in place, "
        "state writable\n"
    )


def test_no_daemon_is_unhealthy(lab: Lab) -> None:
    cfg = setup(lab)
    lab.stop_daemon()
    assert "no daemon answers at" in unhealthy(lab, cfg)


def test_a_stuck_daemon_is_unhealthy(lab: Lab) -> None:
    cfg = setup(lab)
    assert lab.daemon is not None
    os.kill(lab.daemon.pid, signal.SIGSTOP)
    try:
        assert "did not answer in 5.0 s" in unhealthy(lab, cfg)
    finally:
        os.kill(lab.daemon.pid, signal.SIGCONT)


def test_queues_bound_in_another_network_namespace_are_unhealthy(lab: Lab) -> None:
    """The daemon answers (its socket is a file), but from the client namespace's
    point of view -- as from a host whose daemon runs in a private network -- no
    process takes the queues there."""
    cfg = setup(lab)
    why = unhealthy(lab, cfg, ns=lab.client)
    assert "no process bound to queue(s) 0, 1 in this network namespace" in why


def test_removed_rules_are_unhealthy(lab: Lab) -> None:
    cfg = setup(lab)
    lab.nfknock("rules", "--remove")
    deadline = time.monotonic() + 5
    while health(lab, cfg).returncode == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "rules not in place (" in unhealthy(lab, cfg)
    assert "chain_missing" in unhealthy(lab, cfg)


@pytest.fixture
def readonly_state(lab: Lab) -> Iterator[Path]:
    mnt = lab.workdir / "statefs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        lab.stop_daemon(signal.SIGKILL)
        for _ in range(2):
            subprocess.run(["umount", "-l", str(mnt)], check=False, capture_output=True)


def test_a_state_store_that_cannot_be_written_is_unhealthy(lab: Lab, readonly_state: Path) -> None:
    cfg = setup(lab, state={"path": str(readonly_state / "state.db")})
    assert lab.stop_daemon(signal.SIGTERM) == 0
    subprocess.run(["mount", "--bind", str(readonly_state), str(readonly_state)], check=True)
    subprocess.run(["mount", "-o", "remount,bind,ro", str(readonly_state)], check=True)
    lab.start_daemon(cfg, extra=("--rules-check-seconds", "0.5"))
    assert "state store not writable: " in unhealthy(lab, cfg)
