"""A gateway pair for the shared-state tests: two gateways, a client, and Redis.

    client  <p>c  198.51.100.10 (+ more)  ┐
    gateway <p>a  198.51.100.1            ├── bridge br0 in <p>h, which holds
    gateway <p>b  198.51.100.2            ┘   198.51.100.50 (redis-server's address)

``198.51.100.100`` is the pair's virtual address: on A or on B (:meth:`Pair.move_vip`,
as keepalived moves it), so a grant made through one gateway can be used through
the other.  Each gateway protects itself (INPUT) and runs the test service on port
22; each :class:`Gateway` has the :class:`~nfknock.netlab.Lab` helpers (config,
rules, daemon, probes from the client) for its own namespace and directory.  Only
documentation addresses, only inside namespaces this object creates, all deleted by
:meth:`Pair.close`.
"""

from __future__ import annotations

import os
import secrets
import subprocess
from pathlib import Path
from typing import Any

from nfknock.netlab import Lab, run
from nfknock.netlab.redisd import RedisServer

CLIENT = "198.51.100.10"
ADDRESS = {"a": "198.51.100.1", "b": "198.51.100.2"}
REDIS = "198.51.100.50"
VIP = "198.51.100.100"


class Gateway(Lab):
    """Lab's daemon and traffic helpers, for one gateway of a :class:`Pair` (the pair
    owns the namespaces; closing this stops only its daemon and processes)."""

    def __init__(self, pair: Pair, name: str, workdir: Path) -> None:  # no Lab topology
        workdir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.address = ADDRESS[name]
        self.prefix = pair.prefix
        self.workdir = workdir
        self.gateway = False
        self.client = pair.client
        self.server = self.gw = self.daemon_ns = f"{pair.prefix}{name}"
        self.namespaces: list[str] = []
        self.procs: list[subprocess.Popen[Any]] = []
        self.daemon: subprocess.Popen[bytes] | None = None
        self.daemon_log = workdir / "daemon.log"


class Pair:
    def __init__(self, workdir: Path) -> None:
        self.prefix = f"nfp{os.getpid() % 100000}{secrets.token_hex(2)}"
        self.workdir = workdir
        self.hub = f"{self.prefix}h"
        self.client = f"{self.prefix}c"
        self.namespaces: list[str] = []
        self.redis: RedisServer | None = None
        self.vip_on = ""
        try:
            self._build()
            self.a = Gateway(self, "a", workdir / "a")
            self.b = Gateway(self, "b", workdir / "b")
        except BaseException:
            self.close()
            raise

    def sh(self, ns: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run(["ip", "netns", "exec", ns, *argv], check=check)

    def _build(self) -> None:
        for ns in (self.hub, self.client, f"{self.prefix}a", f"{self.prefix}b"):
            run(["ip", "netns", "add", ns])
            self.namespaces.append(ns)
            self.sh(ns, "ip", "link", "set", "lo", "up")
        self.sh(self.hub, "ip", "link", "add", "br0", "type", "bridge")
        self.sh(self.hub, "ip", "addr", "add", f"{REDIS}/24", "dev", "br0")
        self.sh(self.hub, "ip", "link", "set", "br0", "up")
        for ns, ifname, address in (
            (self.client, "c0", CLIENT),
            (f"{self.prefix}a", "a0", ADDRESS["a"]),
            (f"{self.prefix}b", "b0", ADDRESS["b"]),
        ):
            port = f"h{ifname}"
            run(["ip", "link", "add", ifname, "netns", ns, "type", "veth", "peer", "name", port,
                 "netns", self.hub])  # fmt: skip
            self.sh(self.hub, "ip", "link", "set", port, "master", "br0")
            self.sh(self.hub, "ip", "link", "set", port, "up")
            self.sh(ns, "ip", "addr", "add", f"{address}/24", "dev", ifname)
            self.sh(ns, "ip", "link", "set", ifname, "up")

    def gateways(self) -> tuple[Gateway, Gateway]:
        return self.a, self.b

    def add_client_address(self, address: str) -> None:
        self.sh(self.client, "ip", "addr", "add", f"{address}/24", "dev", "c0")

    def move_vip(self, to: Gateway) -> None:
        """Put the virtual address on ``to`` (off the other one) and make the client
        forget where it was, as a gratuitous ARP from keepalived would."""
        for gw in self.gateways():
            if gw is not to:
                self.sh(gw.server, "ip", "addr", "del", f"{VIP}/24", "dev", f"{gw.name}0",
                        check=False)  # fmt: skip
        if self.vip_on != to.name:
            self.sh(to.server, "ip", "addr", "add", f"{VIP}/24", "dev", f"{to.name}0")
        self.sh(self.client, "ip", "neigh", "flush", "dev", "c0")
        self.vip_on = to.name

    def start_redis(self, **kw: Any) -> RedisServer:
        """redis-server on 198.51.100.50 in the hub namespace (persistent, by
        default: what the README recommends), reachable from both gateways."""
        kw.setdefault("persistent", True)
        self.redis = RedisServer(self.workdir / "redis", address=REDIS, netns=self.hub, **kw)
        self.redis.start()
        return self.redis

    def close(self) -> None:
        for gw in (getattr(self, "a", None), getattr(self, "b", None)):
            if gw is not None:
                gw.close()
        if self.redis is not None:
            self.redis.stop()
        for ns in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False, timeout=30)
        self.namespaces.clear()

    def __enter__(self) -> Pair:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
