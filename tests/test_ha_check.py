"""contrib/ha/nfknock-check: the keepalived track_script, against status JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

CHECK = Path(__file__).parents[1] / "contrib" / "ha" / "nfknock-check"

HEALTHY: dict[str, Any] = {
    "rules": {"ok": True, "problems": []},
    "state": {"ok": True, "reachable": True, "error": ""},
    "workers": [{"index": 0, "alive": True, "answered": True}],
}


def check(tmp_path: Path, status: object, *args: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "status.json"
    path.write_text(json.dumps(status))
    argv = [sys.executable, str(CHECK), "--status-file", str(path), *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)


def test_a_healthy_gateway_passes(tmp_path: Path) -> None:
    assert check(tmp_path, HEALTHY).returncode == 0
    assert check(tmp_path, {**HEALTHY, "rules": {"ok": None}}).returncode == 0  # not checked yet


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"rules": {"ok": False, "problems": [{"code": "jump_not_first"}]}}, "jump_not_first"),
        (
            {"workers": [{"index": 1, "alive": False, "last_exit": "killed by signal 9"}]},
            "signal 9",
        ),
        ({"workers": [{"index": 1, "alive": True, "answered": False}]}, "no answer"),
        ({"state": {"ok": False, "reachable": False, "error": "redis unreachable"}}, "unreachable"),
    ],
)
def test_a_gateway_that_cannot_serve_fails_with_the_reason(
    tmp_path: Path, change: dict[str, Any], says: str
) -> None:
    done = check(tmp_path, {**HEALTHY, **change})
    assert done.returncode == 1 and says in done.stdout


def test_a_shared_store_that_is_down_may_be_tolerated(tmp_path: Path) -> None:
    down = {**HEALTHY, "state": {"ok": False, "reachable": False, "error": "redis unreachable"}}
    assert check(tmp_path, down, "--allow-store-down").returncode == 0


def test_no_answer_is_a_failure(tmp_path: Path) -> None:
    done = check(tmp_path, [1, 2])
    assert done.returncode == 1 and "does not answer" in done.stdout
    argv = [sys.executable, str(CHECK), "--nfknock", "/nonexistent/nfknock"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 1 and "does not answer" in done.stdout
