"""Real-kernel fixtures: network namespaces, the real daemon, real iptables.

As root with namespaces these run; elsewhere they skip -- except under CI=true,
where a missing capability is a failure, not a skip.
"""

from __future__ import annotations

import json
import os
import subprocess
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


@pytest.fixture(scope="session")
def synflood(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """bench/synflood.c compiled once per run: the bounded, paced SYN sender."""
    _require_lab()
    out = tmp_path_factory.mktemp("synflood") / "synflood"
    source = Path(__file__).parents[2] / "bench" / "synflood.c"
    subprocess.run(["gcc", "-O2", "-Wall", "-o", str(out), str(source)], check=True, timeout=120)
    return out


def start_flood(
    lab: Lab,
    flooder: Path,
    rate: int,
    seconds: float,
    count: int,
    dst: str = "198.51.100.1",
    ports: str = "1024-33791",
    cpu: str | None = None,
) -> subprocess.Popen[str]:
    """A spoofed SYN flood from the client namespace (documentation sources only),
    bounded by ``count`` packets and ``seconds``."""
    mac = json.loads(lab.sh(lab.server, "ip", "-j", "link", "show", "s0").stdout)[0]["address"]
    lab.sh(
        lab.server,
        "sysctl",
        "-qw",
        "net.ipv4.conf.all.rp_filter=0",
        "net.ipv4.conf.default.rp_filter=0",
        "net.ipv4.conf.s0.rp_filter=0",
    )
    pin = ["taskset", "-c", cpu] if cpu is not None else []
    argv = ["ip", "netns", "exec", lab.client, *pin, str(flooder), "-i", "c0", "-m", mac, "-d", dst]
    argv += ["-s", "doc4", "-p", ports, "-r", str(rate), "-t", str(seconds), "-n", str(count)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lab.procs.append(proc)
    return proc
