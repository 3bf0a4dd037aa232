"""What the kernel says about this network namespace: NFQUEUE bindings and TCP sockets.

Read from ``/proc/net/...``, which shows the namespace of the reading process -- so
``nfknock doctor`` and ``nfknock status --health`` see the queues and listeners of
the namespace they run in, which is the one whose rules they check.

* ``/proc/net/netfilter/nfnetlink_queue`` (``nfnetlink_queue.c``,
  ``seq_show``): one line per *bound* queue -- queue number, peer portid (the
  netlink socket bound to it), packets waiting, copy mode, copy range, queue
  dropped (the queue was full), user dropped (the netlink socket's buffer was
  full), last packet id, 1.  No line: no process is bound, and the kernel drops
  what the rules send there (nfknock never uses ``--queue-bypass``).
* ``/proc/net/tcp`` and ``tcp6`` (``tcp4_seq_show`` / ``tcp6_seq_show``):
  ``sl local rem st ...`` with each address as the hex of its 32-bit words *as
  they lie in memory* (so byte-swapped on little-endian hosts) and the port as a
  plain hex number.
"""

from __future__ import annotations

import ipaddress
import sys
from dataclasses import dataclass
from pathlib import Path

NFQUEUE_PROC = Path("/proc/net/netfilter/nfnetlink_queue")
TCP_PROC = (Path("/proc/net/tcp"), Path("/proc/net/tcp6"))

TCP_ESTABLISHED = 0x01  # include/net/tcp_states.h
TCP_LISTEN = 0x0A

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class QueueLine:
    queue: int
    portid: int  # the bound netlink socket; 0 would mean none
    waiting: int
    queue_dropped: int  # the queue was full
    user_dropped: int  # the netlink socket buffer was full
    last_id: int


def parse_queues(text: str) -> dict[int, QueueLine]:
    """Bound queues by number; malformed lines are skipped."""
    out = {}
    for line in text.splitlines():
        f = line.split()
        if len(f) < 8 or not all(x.isdigit() for x in f[:8]):
            continue
        q = QueueLine(int(f[0]), int(f[1]), int(f[2]), int(f[5]), int(f[6]), int(f[7]))
        out[q.queue] = q
    return out


def read_queues(path: Path = NFQUEUE_PROC) -> dict[int, QueueLine]:
    """Bound queues of this namespace ({} when the file is missing: the module is not
    loaded, so nothing is bound)."""
    try:
        return parse_queues(path.read_text())
    except FileNotFoundError:
        return {}


@dataclass(frozen=True)
class TcpSocket:
    state: int
    local: IPAddress
    local_port: int
    remote: IPAddress
    remote_port: int

    @property
    def loopback_only(self) -> bool:
        """Bound to a loopback address (also an IPv4-mapped one): unreachable from
        the network, and ``lo`` is never queued."""
        addr = self.local
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        return addr.is_loopback

    @property
    def remote_is_loopback(self) -> bool:
        addr = self.remote
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        return addr.is_loopback


def _address(hex_text: str) -> IPAddress:
    raw = bytes.fromhex(hex_text)
    if len(raw) not in (4, 16):
        raise ValueError(f"address of {len(raw)} bytes")
    if sys.byteorder == "little":  # each 32-bit word was printed from host order
        raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return ipaddress.ip_address(raw)


def _endpoint(text: str) -> tuple[IPAddress, int]:
    addr, _, port = text.partition(":")
    return _address(addr), int(port, 16)


def parse_tcp(text: str) -> list[TcpSocket]:
    """The sockets of one ``/proc/net/tcp``-style table (header and bad lines skipped)."""
    out = []
    for line in text.splitlines():
        f = line.split()
        if len(f) < 4 or not f[0].endswith(":"):
            continue
        try:
            local, lport = _endpoint(f[1])
            remote, rport = _endpoint(f[2])
            state = int(f[3], 16)
        except ValueError:
            continue
        out.append(TcpSocket(state, local, lport, remote, rport))
    return out


def read_tcp(paths: tuple[Path, ...] = TCP_PROC) -> list[TcpSocket]:
    out: list[TcpSocket] = []
    for path in paths:
        try:
            out += parse_tcp(path.read_text())
        except FileNotFoundError:  # no IPv6 in this kernel
            continue
    return out
