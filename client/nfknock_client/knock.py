"""Sending knocks, checking the door, relaying ``--pipe``.  Standard library only.

Knocks are ordinary non-blocking ``connect()`` calls closed right after the SYN
left (no root, no kernel retransmission), or with ``raw=True`` single SYNs
hand-built on a raw socket (root) -- which can also carry each knock's ISN (users
with ``isn = true``).  :func:`probe` connects to the protected port, or to the
forwarded door (open / reset = behind / timeout); :func:`pipe_problem` says,
before anything is knocked, why stdin/stdout cannot carry :func:`relay`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import random
import selectors
import socket
import stat
import struct
import time
from collections.abc import Sequence
from enum import Enum


class DoorState(Enum):
    OPEN = "open"  # connected
    BEHIND = "behind"  # TCP reset: a stale sequence, advance the counter
    CLOSED = "closed"  # timeout: wrong secret, realm, clock, or a firewall between


def resolve(host: str, family: int = 0) -> tuple[int, str]:
    """Resolve once; returns (address family, address text)."""
    if not host:
        raise LookupError("no host given")
    try:
        infos = socket.getaddrinfo(host, None, family, socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise LookupError(f"cannot resolve {host!r}: {exc.strerror}") from None
    except (UnicodeError, ValueError) as exc:  # a NUL byte, a label over 63 bytes
        raise LookupError(f"cannot resolve {host!r}: {exc}") from None
    fam, _, _, _, sockaddr = infos[0]
    return int(fam), str(sockaddr[0])


def send_connect_knocks(family: int, address: str, ports: Sequence[int], pace: float) -> None:
    for i, port in enumerate(ports):
        s = socket.socket(family, socket.SOCK_STREAM)
        try:
            s.setblocking(False)
            err = s.connect_ex((address, port))
            if err not in (0, errno.EINPROGRESS, errno.ECONNREFUSED, errno.EAGAIN):
                raise OSError(err, f"knock to port {port}: {os.strerror(err)}")
        finally:
            # Closing a socket in SYN-SENT sends nothing: exactly one SYN per knock.
            s.close()
        if pace and i + 1 < len(ports):
            time.sleep(pace)


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def syn_segment(
    src: bytes, dst: bytes, sport: int, dport: int, seq: int, payload: bytes = b""
) -> bytes:
    """A TCP SYN (20-byte header, then ``payload``: the SPA form of ``-P tcpraw``)
    with a correct checksum over the pseudo-header, header and data (RFC 9293
    section 3.1)."""
    header = struct.pack("!HHIIBBHHH", sport, dport, seq, 0, 5 << 4, 0x02, 64240, 0, 0)
    length = len(header) + len(payload)
    if len(src) == 4:
        pseudo = src + dst + struct.pack("!BBH", 0, socket.IPPROTO_TCP, length)
    else:
        pseudo = src + dst + struct.pack("!I3xB", length, socket.IPPROTO_TCP)
    csum = _checksum(pseudo + header + payload)
    return header[:16] + struct.pack("!H", csum) + header[18:] + payload


def source_for(family: int, address: str) -> str:
    """The local address the kernel would send from to reach ``address``."""
    with socket.socket(family, socket.SOCK_DGRAM) as u:
        u.connect((address, 9))
        return str(u.getsockname()[0])


def send_raw_knocks(
    family: int,
    address: str,
    ports: Sequence[int],
    pace: float,
    isns: Sequence[int] | None = None,
) -> None:
    """One SYN per knock from a raw socket (needs CAP_NET_RAW).  ``isns``: the
    initial sequence number of each knock (ISN knocks); random otherwise."""
    src_text = source_for(family, address)
    src = socket.inet_pton(family, src_text)
    dst = socket.inet_pton(family, address)
    rng = random.SystemRandom()
    with socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_TCP) as s:
        for i, port in enumerate(ports):
            seq = isns[i] if isns is not None else rng.getrandbits(32)
            seg = syn_segment(src, dst, rng.randint(32768, 60999), port, seq)
            s.sendto(seg, (address, 0))
            if pace and i + 1 < len(ports):
                time.sleep(pace)


def probe(
    family: int, address: str, port: int, timeout: float
) -> tuple[DoorState, socket.socket | None]:
    """Connect to the protected port.  OPEN returns the connected socket (the
    caller owns it); a reset means BEHIND; a timeout CLOSED."""
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect((address, port))
    except ConnectionRefusedError:
        s.close()
        return DoorState.BEHIND, None
    except (TimeoutError, OSError):
        s.close()
        return DoorState.CLOSED, None
    return DoorState.OPEN, s


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return "not a pipe or socket"


def pipe_problem(stdin_fd: int = 0, stdout_fd: int = 1) -> str | None:
    """Why stdin/stdout cannot carry a ``--pipe`` relay, or None.  Checked before
    knocking: a relay that fails after the door opened has spent the connection.
    Both must be pipes or sockets (ssh's ProxyCommand gives pipes): a terminal, a
    regular file or /dev/null cannot be polled alongside the connection, and
    relaying a terminal to an SSH server is never what was meant."""
    for fd, name, flag in ((stdin_fd, "stdin", os.O_RDONLY), (stdout_fd, "stdout", os.O_WRONLY)):
        try:
            st = os.fstat(fd)
            access = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
        except OSError:
            return f"{name} is closed"
        if os.isatty(fd):
            return f"{name} is a terminal"
        if not (stat.S_ISFIFO(st.st_mode) or stat.S_ISSOCK(st.st_mode)):
            return f"{name} is {_kind(st.st_mode)}"
        if access not in (flag, os.O_RDWR):
            return f"{name} is not open for {'reading' if flag == os.O_RDONLY else 'writing'}"
    return None


def relay(conn: socket.socket, stdin_fd: int = 0, stdout_fd: int = 1) -> tuple[int, str | None]:
    """Copy stdin -> conn and conn -> stdout until the session ends (ProxyCommand).

    Returns (exit code, message or None).  The server closing the connection, or
    whoever reads stdout going away (EPIPE), is a normal end: 0.  A reset or any
    other network error: 1 with a message.  stdin's end half-closes the connection
    and keeps copying the server's answer until it closes too."""
    conn.settimeout(None)
    sel = selectors.DefaultSelector()
    try:
        sel.register(stdin_fd, selectors.EVENT_READ, "in")
        sel.register(conn, selectors.EVENT_READ, "net")
    except (OSError, ValueError) as exc:  # pipe_problem() should have caught this
        sel.close()
        conn.close()
        return 1, f"cannot relay stdin: {exc}"
    try:
        while True:
            for key, _ in sel.select():
                if key.data == "in":
                    try:
                        data = os.read(stdin_fd, 65536)
                    except OSError:
                        data = b""  # an unreadable stdin ends like EOF
                    if not data:
                        sel.unregister(stdin_fd)
                        with contextlib.suppress(OSError):
                            conn.shutdown(socket.SHUT_WR)
                        continue
                    try:
                        conn.sendall(data)
                    except OSError as exc:
                        return 1, f"connection to the server lost: {exc.strerror or exc}"
                    continue
                try:
                    data = conn.recv(65536)
                except OSError as exc:
                    return 1, f"connection to the server lost: {exc.strerror or exc}"
                if not data:
                    return 0, None
                view = memoryview(data)
                try:
                    while view:
                        n = os.write(stdout_fd, view)
                        view = view[n:]
                except BrokenPipeError:
                    return 0, None  # the reader (ssh) is gone: the session is over
                except OSError as exc:
                    return 1, f"cannot write to stdout: {exc.strerror or exc}"
    finally:
        sel.close()
        conn.close()
