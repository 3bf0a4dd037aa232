"""A lab of network namespaces for the demo, the real-kernel tests and the benchmarks.

Only the documentation/test ranges 198.51.100.0/24 and 2001:db8::/64, only inside
namespaces this lab creates, always deleted by :meth:`Lab.close`.  Every command it
runs has a timeout.

Topologies:

* ``Lab(...)``: client ``<p>c`` (198.51.100.10, 2001:db8::10) -- veth -- server
  ``<p>s`` (198.51.100.1, 2001:db8::1).  The daemon protects the server itself.
* ``Lab(..., gateway=True)``: client 198.51.100.10 -- (198.51.100.1) gateway
  ``<p>g`` (198.51.100.129) -- server 198.51.100.130.  The client side is
  198.51.100.0/25, the server side 198.51.100.128/25; the daemon runs on the
  gateway and protects the server in FORWARD mode.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from nfknock.sequence import format_base32

PY = sys.executable
CLIENT4, SERVER4 = "198.51.100.10", "198.51.100.1"
CLIENT6, SERVER6 = "2001:db8::10", "2001:db8::1"
GW_CLIENT_SIDE, GW_SERVER_SIDE, BEHIND4 = "198.51.100.1", "198.51.100.129", "198.51.100.130"


class LabError(RuntimeError):
    pass


def run(
    argv: list[str], timeout: float = 30, check: bool = True, **kw: Any
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False, **kw)
    if check and proc.returncode != 0:
        raise LabError(f"{' '.join(argv)} -> {proc.returncode}: {proc.stderr.strip()}")
    return proc


def can_run() -> str | None:
    """None when this machine can run the lab, else why not."""
    if os.geteuid() != 0:
        return "needs root"
    for tool in ("ip", "iptables", "ip6tables", "iptables-restore"):
        if shutil.which(tool) is None:
            return f"{tool} not installed"
    name = f"nfkprobe{os.getpid()}"
    proc = subprocess.run(["ip", "netns", "add", name], capture_output=True, check=False)
    if proc.returncode != 0:
        return f"cannot create network namespaces: {proc.stderr.decode().strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
    return None


class Lab:
    def __init__(self, workdir: Path, gateway: bool = False) -> None:
        self.prefix = f"nfk{os.getpid() % 100000}{secrets.token_hex(2)}"
        self.workdir = workdir
        self.gateway = gateway
        self.client = f"{self.prefix}c"
        self.server = f"{self.prefix}s"
        self.gw = f"{self.prefix}g"
        self.namespaces: list[str] = []
        self.procs: list[subprocess.Popen[Any]] = []
        self.daemon: subprocess.Popen[bytes] | None = None
        self.daemon_log = workdir / "daemon.log"
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    # --- topology --------------------------------------------------------------

    def _ns(self, name: str) -> None:
        run(["ip", "netns", "add", name])
        self.namespaces.append(name)
        self.sh(name, "ip", "link", "set", "lo", "up")

    def _veth(self, a: str, a_if: str, b: str, b_if: str) -> None:
        run(
            [
                "ip",
                "link",
                "add",
                a_if,
                "netns",
                a,
                "type",
                "veth",
                "peer",
                "name",
                b_if,
                "netns",
                b,
            ]
        )
        self.sh(a, "ip", "link", "set", a_if, "up")
        self.sh(b, "ip", "link", "set", b_if, "up")

    def _addr(self, ns: str, ifname: str, *cidrs: str) -> None:
        for cidr in cidrs:
            extra = ["nodad"] if ":" in cidr else []
            self.sh(ns, "ip", "addr", "add", cidr, "dev", ifname, *extra)

    def _build(self) -> None:
        self._ns(self.client)
        self._ns(self.server)
        if not self.gateway:
            self._veth(self.client, "c0", self.server, "s0")
            self._addr(self.client, "c0", f"{CLIENT4}/24", f"{CLIENT6}/64")
            self._addr(self.server, "s0", f"{SERVER4}/24", f"{SERVER6}/64")
            self.daemon_ns = self.server
            return
        self._ns(self.gw)
        self._veth(self.client, "c0", self.gw, "g0")
        self._veth(self.gw, "g1", self.server, "s0")
        self._addr(self.client, "c0", f"{CLIENT4}/25")
        self._addr(self.gw, "g0", f"{GW_CLIENT_SIDE}/25")
        self._addr(self.gw, "g1", f"{GW_SERVER_SIDE}/25")
        self._addr(self.server, "s0", f"{BEHIND4}/25")
        self.sh(self.client, "ip", "route", "add", "198.51.100.128/25", "via", GW_CLIENT_SIDE)
        self.sh(self.server, "ip", "route", "add", "198.51.100.0/25", "via", GW_SERVER_SIDE)
        self.sh(self.gw, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        self.daemon_ns = self.gw

    def sh(
        self, ns: str, *argv: str, timeout: float = 30, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return run(["ip", "netns", "exec", ns, *argv], timeout=timeout, check=check)

    def spawn(self, ns: str, *argv: str, log: Path | None = None) -> subprocess.Popen[bytes]:
        out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, *argv], stdout=out, stderr=subprocess.STDOUT
        )
        self.procs.append(proc)
        return proc

    # --- the protected service and the daemon -----------------------------------

    def start_service(self, port: int = 22, ns: str | None = None) -> None:
        ns = ns or self.server
        self.spawn(
            ns, PY, "-m", "nfknock.netlab.echo_server", "--port", str(port), "--lifetime", "1800"
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            out = self.sh(ns, "ss", "-Htln", f"sport = :{port}", check=False).stdout
            if out.strip():
                return
            time.sleep(0.05)
        raise LabError("the test service did not start")

    def write_config(self, users: dict[str, bytes], **sections: Any) -> Path:
        """A config + users file in the workdir.  ``sections``: a dict overrides keys
        of that table; a list of dicts is an array of tables ([[protect]], [[allow]],
        ``**{"door.forward": [...]}``); ``user_keys`` is no table but more keys of
        some users (``user_keys={"alice": {"door": "random"}}``)."""
        user_keys: dict[str, dict[str, Any]] = sections.pop("user_keys", None) or {}
        cfg_dir = self.workdir
        users_file = cfg_dir / "users.toml"
        lines = []
        for name, secret in users.items():
            lines += [f"[users.{name}]", f'secret = "{format_base32(secret)}"']
            lines += [f"{k} = {json.dumps(v)}" for k, v in user_keys.get(name, {}).items()]
            lines.append("")
        users_file.write_text("\n".join(lines))
        users_file.chmod(0o600)
        sections.setdefault("protect", [{"port": 22}])
        base: dict[str, Any] = {
            "state": {"path": str(cfg_dir / "state.db")},
            "users": {"file": str(users_file)},
            "control": {"socket": str(cfg_dir / "control.sock")},
            "log": {"level": "debug", "format": "json"},
        }
        for key, value in sections.items():
            if isinstance(value, list):
                base[key] = value
            else:
                base.setdefault(key, {}).update(value)
        text = []
        for key, value in base.items():
            for table in value if isinstance(value, list) else [value]:
                text.append(f"[[{key}]]" if isinstance(value, list) else f"[{key}]")
                text += [f"{k} = {json.dumps(v)}" for k, v in table.items()]
        path = cfg_dir / "nfknock.toml"
        path.write_text("\n".join(text) + "\n")
        path.chmod(0o600)
        return path

    def nfknock(
        self, *args: str, ns: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return self.sh(ns or self.daemon_ns, PY, "-m", "nfknock.cli", *args, check=check)

    @property
    def applied(self) -> Path:
        """The lab's record of the last good rules install (never the host's)."""
        return self.workdir / "rules.applied"

    def install_rules(self, config: Path) -> None:
        self.nfknock("rules", "--install", "--config", str(config), "--applied", str(self.applied))

    def start_daemon(
        self,
        config: Path,
        wait: float = 15,
        cpu: str | None = None,
        extra: tuple[str, ...] = (),
    ) -> subprocess.Popen[bytes]:
        """Start ``nfknock run`` (pinned to ``cpu`` if given) and wait for "started"."""
        start = self.daemon_log.stat().st_size if self.daemon_log.exists() else 0
        pin = ["taskset", "-c", cpu] if cpu is not None else []
        argv = [*pin, PY, "-m", "nfknock.cli", "run", "--config", str(config)]
        argv += ["--applied", str(self.applied), *extra]
        proc = self.spawn(self.daemon_ns, *argv, log=self.daemon_log)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise LabError(f"daemon exited {proc.returncode}: {self.log_text(start)[-2000:]}")
            if '"event": "started"' in self.log_text(start):
                self.daemon = proc
                return proc
            time.sleep(0.05)
        raise LabError("daemon did not start: " + self.log_text(start)[-2000:])

    def stop_daemon(self, sig: int = signal.SIGTERM, wait: float = 10) -> int | None:
        proc, self.daemon = self.daemon, None
        if proc is None or proc.poll() is not None:
            return None if proc is None else proc.returncode
        proc.send_signal(sig)
        try:
            return proc.wait(wait)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait(5)

    def log_text(self, start: int = 0) -> str:
        try:
            with self.daemon_log.open("rb") as f:
                f.seek(start)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def log_events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_text().splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    # --- traffic from the client --------------------------------------------------

    def probe(
        self,
        address: str,
        port: int = 22,
        timeout: float = 1.5,
        hold: float = 0.0,
        source: str | None = None,
    ) -> dict[str, Any]:
        out = self.sh(
            self.client,
            PY,
            "-m",
            "nfknock.netlab.probe",
            address,
            str(port),
            "--timeout",
            str(timeout),
            "--hold",
            str(hold),
            *(["--source", source] if source else []),
            timeout=timeout + hold + 30,
        )
        result: dict[str, Any] = json.loads(out.stdout)
        return result

    def send_knocks(
        self,
        address: str,
        ports: list[int] | tuple[int, ...],
        raw: bool = False,
        source: str | None = None,
        isns: list[int] | tuple[int, ...] | None = None,
    ) -> None:
        """Knocks from the client (``isns``: raw SYNs carrying these ISNs)."""
        self.sh(
            self.client,
            PY,
            "-m",
            "nfknock.netlab.sendknocks",
            address,
            *map(str, ports),
            *(["--raw"] if raw else []),
            *(["--source", source] if source else []),
            *(["--isns", ",".join(map(str, isns))] if isns is not None else []),
        )

    def add_client_address(self, cidr: str) -> None:
        extra = ["nodad"] if ":" in cidr else []
        self.sh(self.client, "ip", "addr", "add", cidr, "dev", "c0", *extra)

    def client_cmd(
        self,
        *args: str,
        timeout: float = 120,
        env: dict[str, str] | None = None,
        check: bool = False,
    ) -> subprocess.CompletedProcess[str]:
        argv = ["ip", "netns", "exec", self.client, PY, "-m", "nfknock_client.cli", *args]
        return run(argv, timeout=timeout, check=check, env={**os.environ, **(env or {})})

    # --- cleanup --------------------------------------------------------------------

    def close(self) -> None:
        self.stop_daemon()
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        for ns in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False, timeout=30)
        self.namespaces.clear()

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
