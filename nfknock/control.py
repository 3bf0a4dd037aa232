"""The control socket (root-only Unix socket): status and reload for the CLI.

Served by threads of its own, never by the packet loop: reading a request (with a
deadline), parsing it and writing the reply happen here, so a client that sends one
byte a second, or fifty that send nothing, cost the verdicts nothing.  What needs
the daemon's state is handed to the main loop through :class:`Mailbox` (a queue and
a wake-up fd the loop polls) and answered between packets.

A second daemon is never allowed to take the socket over: if something answers on
the path, binding is refused; on exit the socket is removed only if it is still the
one this daemon created.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import socket
import stat
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from nfknock.paths import make_dirs

READ_TIMEOUT = 2.0  # a request line must arrive within this
REPLY_TIMEOUT = 30.0  # the main loop answers within this (a reload may take a while)
MAX_REQUEST = 4096
MAX_CLIENTS = 8  # connections served at once; more wait in the listen backlog
SUN_PATH_MAX = 107


class ControlError(Exception):
    pass


class Mailbox:
    """Requests for the main loop: ``ask`` (any thread) waits for the answer;
    the loop calls ``serve`` when ``fileno`` is readable."""

    def __init__(self) -> None:
        self._requests: queue.SimpleQueue[tuple[dict[str, Any], Future[dict[str, Any]]]] = (
            queue.SimpleQueue()
        )
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)

    def fileno(self) -> int:
        return self._wake_r.fileno()

    def ask(self, request: dict[str, Any], timeout: float = REPLY_TIMEOUT) -> dict[str, Any]:
        fut: Future[dict[str, Any]] = Future()
        self._requests.put((request, fut))
        with contextlib.suppress(BlockingIOError):
            self._wake_w.send(b"!")
        return fut.result(timeout)

    def serve(self, handler: Callable[[dict[str, Any], Future[dict[str, Any]]], None]) -> None:
        """Hand every waiting request to ``handler(request, future)``; the handler
        sets the future now or later (a reload answers when it is done)."""
        with contextlib.suppress(BlockingIOError):
            while self._wake_r.recv(4096):
                pass
        while True:
            try:
                request, fut = self._requests.get_nowait()
            except queue.Empty:
                return
            try:
                handler(request, fut)
            except Exception as exc:
                if not fut.done():
                    fut.set_result({"ok": False, "error": f"{type(exc).__name__}: {exc}"})

    def close(self) -> None:
        self._wake_r.close()
        self._wake_w.close()


class ControlServer:
    def __init__(self, path: Path, mailbox: Mailbox) -> None:
        self.path = path
        self.mailbox = mailbox
        self._sock = _bind(path)
        st = os.stat(path)
        self._identity = (st.st_dev, st.st_ino)
        self._slots = threading.BoundedSemaphore(MAX_CLIENTS)
        self._closed = False
        self._thread = threading.Thread(
            target=self._accept_loop, name="nfknock-control", daemon=True
        )
        self._thread.start()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                if self._closed:
                    return
                continue
            self._slots.acquire()
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            with conn:
                try:
                    line = read_line(conn, MAX_REQUEST, READ_TIMEOUT)
                    request = json.loads(line)
                    if not isinstance(request, dict):
                        raise ValueError("a request is a JSON object")
                    reply = self.mailbox.ask(request)
                except TimeoutError:
                    reply = {"ok": False, "error": "request not received in time"}
                except (OSError, ValueError) as exc:
                    reply = {"ok": False, "error": str(exc)}
                except Exception as exc:  # e.g. the loop did not answer in time
                    reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
                with contextlib.suppress(OSError):
                    conn.sendall((json.dumps(reply) + "\n").encode())
        finally:
            self._slots.release()

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        with contextlib.suppress(OSError):
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self._identity:
                self.path.unlink()


def _bind(path: Path) -> socket.socket:
    if len(os.fsencode(path)) > SUN_PATH_MAX:
        raise ControlError(f"{path}: longer than {SUN_PATH_MAX} bytes (AF_UNIX limit)")
    make_dirs(path.parent, 0o700)  # every missing level, whatever the umask
    with contextlib.suppress(FileNotFoundError):
        mode = path.lstat().st_mode
        if not stat.S_ISSOCK(mode):
            raise ControlError(f"{path}: exists and is not a socket; refusing to replace it")
        if _answers(path):
            raise ControlError(
                f"{path}: another nfknock daemon answers on this control socket "
                "(give each daemon its own [control] socket)"
            )
        path.unlink()  # a stale socket of a daemon that is gone
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)  # root-only: the socket is created 0600
    try:
        sock.bind(str(path))
    except OSError as exc:
        sock.close()
        raise ControlError(f"{path}: cannot bind the control socket: {exc.strerror}") from None
    finally:
        os.umask(old)
    sock.listen(16)
    return sock


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


def read_line(conn: socket.socket, limit: int, seconds: float) -> bytes:
    """One line, within ``seconds`` in all (a trickling client gets no longer)."""
    deadline = time.monotonic() + seconds
    buf = b""
    while b"\n" not in buf:
        if len(buf) >= limit:
            raise ValueError(f"request longer than {limit} bytes")
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        conn.settimeout(left)
        chunk = conn.recv(1024)
        if not chunk:
            break
        buf += chunk
    return buf


def control_request(path: Path, command: str, timeout: float = 35.0) -> dict[str, Any]:
    """Ask a running daemon over its control socket (used by the CLI)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall((json.dumps({"command": command}) + "\n").encode())
        reply = json.loads(read_line(s, 1 << 26, timeout) or b"{}")
    if not isinstance(reply, dict):
        raise ValueError("the daemon's reply is not a JSON object")
    return reply
