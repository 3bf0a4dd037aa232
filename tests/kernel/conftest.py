"""Real-kernel fixtures: network namespaces, the real daemon, real iptables.

As root with namespaces these run; elsewhere they skip -- except under CI=true,
where a missing capability is a failure, not a skip.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from nfknock.netlab import Lab, can_run
from nfknock.sequence import format_base32

SECRET = bytes(range(32))
OTHER_SECRET = bytes(range(50, 82))


def _require_lab() -> None:
    why = can_run()
    if why is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"real-kernel tests cannot run under CI: {why}")
    pytest.skip(f"real-kernel tests need root and namespaces: {why}")


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    _require_lab()
    with Lab(tmp_path) as lab:
        yield lab


@pytest.fixture
def gateway_lab(tmp_path: Path) -> Iterator[Lab]:
    _require_lab()
    with Lab(tmp_path, gateway=True) as lab:
        yield lab


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "alice.secret"
    path.write_text(format_base32(SECRET) + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def client_env(tmp_path: Path) -> dict[str, str]:
    """Client state and config under the test's own directory."""
    (tmp_path / "xdg-config").mkdir()
    (tmp_path / "xdg-state").mkdir()
    return {
        "XDG_CONFIG_HOME": str(tmp_path / "xdg-config"),
        "XDG_STATE_HOME": str(tmp_path / "xdg-state"),
    }
