"""``nfknock status --health``'s verdict on a daemon's status and this namespace's
queues (the real daemons are in tests/kernel/test_health_kernel.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from nfknock import health
from nfknock.cli import main
from nfknock.config import load_config
from nfknock.procnet import QueueLine

from .test_service import write_config

BOUND = {0: QueueLine(0, 11, 0, 0, 0, 0), 1: QueueLine(1, 12, 0, 0, 0, 0)}
GOOD: dict[str, Any] = {"rules": {"ok": True, "problems": []}, "state": {"ok": True}}


def test_a_bound_daemon_with_its_rules_and_a_writable_state_is_healthy(tmp_path: Path) -> None:
    cfg = load_config(write_config(tmp_path))
    assert health.problems(cfg, GOOD, BOUND) == []


@pytest.mark.parametrize(
    ("status", "bound", "why"),
    [
        (GOOD, {0: BOUND[0]}, "no process bound to queue(s) 1"),
        (GOOD, {}, "no process bound to queue(s) 0, 1"),
        ({**GOOD, "rules": {"ok": None}}, BOUND, "has not checked its rules yet"),
        (
            {**GOOD, "rules": {"ok": False, "problems": [{"code": "jump_not_first"}]}},
            BOUND,
            "rules not in place (jump_not_first)",
        ),
        (
            {**GOOD, "state": {"ok": False, "error": "disk full"}},
            BOUND,
            "state store not writable: disk full",
        ),
    ],
)
def test_each_failing_condition_is_named(
    tmp_path: Path, status: dict[str, Any], bound: dict[int, QueueLine], why: str
) -> None:
    cfg = load_config(write_config(tmp_path))
    assert [why in p for p in health.problems(cfg, status, bound)] == [True]


def test_no_daemon_is_unhealthy_with_one_line_on_stderr(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["status", "--health", "--config", str(write_config(tmp_path))]) == 1
    out = capsys.readouterr()
    assert out.out == "" and out.err.count("\n") == 1
    assert out.err.startswith("unhealthy: no daemon answers at ")
