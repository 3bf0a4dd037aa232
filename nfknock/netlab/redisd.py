"""A real ``redis-server`` (the Debian package) for the tests, the lab and the benchmarks.

Started on a Unix socket in a directory of the caller's, or on an address inside a
namespace; never on the host's own network.  Its lifetime is bounded (``timeout``
ends it even if nobody does), and :meth:`RedisServer.stop` ends exactly the process
it started, by PID.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

LIFETIME = 1800  # seconds: the server ends by itself after this, whatever happens


class RedisServer:
    def __init__(
        self,
        workdir: Path,
        *,
        address: str = "",
        port: int = 6379,
        netns: str = "",
        password: str = "",
        persistent: bool = False,
        lifetime: int = LIFETIME,
        tls: tuple[Path, Path, Path] | None = None,
    ) -> None:
        """``address`` empty: listen on ``workdir/redis.sock`` only (no TCP).
        ``persistent``: an append-only file fsynced at every write (the setting the
        README recommends), so a restart keeps every claim; else ``--save ''``."""
        self.workdir = workdir
        self.address = address
        self.port = port
        self.netns = netns
        self.password = password
        self.persistent = persistent
        self.lifetime = lifetime
        self.tls = tls  # (certificate, key, CA): TLS only on ``port``, no plain TCP
        self.socket_path = workdir / "redis.sock"
        self.log = workdir / "redis.log"
        self.pidfile = workdir / "redis.pid"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        if not self.address:
            return f"unix://{self.socket_path}"
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://{self.address}:{self.port}/0"

    def argv(self) -> list[str]:
        exe = shutil.which("redis-server")
        if exe is None:
            raise FileNotFoundError("redis-server is not installed (Debian package redis-server)")
        argv = ["timeout", str(self.lifetime), exe, "--save", "", "--dir", str(self.workdir)]
        argv += ["--daemonize", "no", "--logfile", str(self.log), "--databases", "1"]
        argv += ["--pidfile", str(self.pidfile)]
        if self.address and self.tls:
            cert, key, ca = self.tls
            argv += ["--bind", self.address, "--port", "0", "--tls-port", str(self.port)]
            argv += ["--tls-cert-file", str(cert), "--tls-key-file", str(key)]
            argv += ["--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no"]
            argv += ["--protected-mode", "no"]
        elif self.address:
            argv += ["--bind", self.address, "--port", str(self.port), "--protected-mode", "no"]
        else:
            argv += ["--port", "0", "--unixsocket", str(self.socket_path)]
            argv += ["--unixsocketperm", "700"]
        if self.persistent:
            argv += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            argv += ["--appendonly", "no"]
        if self.password:
            argv += ["--requirepass", self.password]
        if self.netns:
            argv = ["ip", "netns", "exec", self.netns, *argv]
        return argv

    def start(self, wait: float = 15.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            self.argv(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited {self.proc.returncode}: {self._tail()}")
            if self.ping():
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not answer: {self._tail()}")

    def ping(self) -> bool:
        """True when the server answers PING (from inside its namespace)."""
        if not self.address:
            return self._ping_unix()
        argv = ["ip", "netns", "exec", self.netns] if self.netns else []
        argv += ["redis-cli", "-h", self.address, "-p", str(self.port)]
        if self.tls:
            argv += ["--tls", "--cacert", str(self.tls[2]), "--sni", "localhost"]
        if self.password:
            argv += ["--no-auth-warning", "-a", self.password]
        done = subprocess.run(
            [*argv, "PING"], capture_output=True, text=True, timeout=10, check=False
        )
        return done.stdout.strip() == "PONG"

    def _ping_unix(self) -> bool:
        if not self.socket_path.exists():
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(1)
                s.connect(str(self.socket_path))
                if self.password:
                    s.sendall(f"AUTH {self.password}\r\n".encode())
                    s.recv(64)
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """End the server this object started (by PID: ``timeout`` passes the signal
        on to redis-server) and wait for it."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            # redis-server itself, by the PID it wrote, then its ``timeout`` parent
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(self.pidfile.read_text().split()[0]), signal.SIGKILL)
            proc.kill()
            proc.wait(5)

    def _tail(self) -> str:
        try:
            return self.log.read_text()[-1500:]
        except OSError:
            return ""

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
