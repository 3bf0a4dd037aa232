"""Fixtures shared by the unit tiers: a real redis-server on a Unix socket.

Without the Debian redis-server the Redis tests skip -- except under CI=true, where
a missing tool is a failure (as for the real-kernel tests).
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator

import pytest

from nfknock.config import StateConfig
from nfknock.netlab.redisd import RedisServer


def require_redis() -> None:
    missing = shutil.which("redis-server") is None
    try:
        import redis  # noqa: F401
    except ImportError:
        missing = True
    if not missing:
        return
    if os.environ.get("CI") == "true":
        pytest.fail("redis-server (Debian) and the redis package (nfknock[redis]) are needed")
    pytest.skip("needs redis-server and the redis Python package")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One server for the session, on a socket in its own temporary directory, no
    persistence, ended by PID at the end (and by itself after 30 minutes)."""
    require_redis()
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_state(redis_server: RedisServer) -> StateConfig:
    """A [state] section on that server with a prefix of its own (tests never share keys)."""
    return StateConfig("redis", redis_server.url, prefix=f"t{secrets.token_hex(6)}", timeout=2.0)
