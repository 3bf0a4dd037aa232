"""``nfknock run``: the NFQUEUE adapter.  The only module that imports netfilterqueue.

One thread.  The kernel's packets are handled in netfilterqueue's callback; every
packet gets exactly one verdict, given in a ``finally`` (an exception in the
callback would otherwise leave the packet queued and jam the queue).  Housekeeping
(engine ticks, signals, the control socket, the systemd watchdog) runs between
batches and, under a flood that never lets the batch end, from inside the callback
at most every ``HOUSEKEEPING`` seconds.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import stat
import time
from pathlib import Path
from typing import Any

import structlog

from nfknock.config import Config, ConfigError
from nfknock.events import Verdict
from nfknock.logs import EventLogger
from nfknock.packet import COPY_RANGE
from nfknock.paths import make_dirs
from nfknock.sdnotify import notify, watchdog_interval
from nfknock.service import Service, queue_stats

HOUSEKEEPING = 0.25
# Kernel memory one queued SYN takes in the netlink socket (message + skb overhead).
SOCKET_BYTES_PER_PACKET = 2048
CONTROL_TIMEOUT = 1.0

log = structlog.get_logger("nfknock")


class Daemon:
    def __init__(self, cfg: Config) -> None:
        self.service = Service(cfg, EventLogger())
        self.mark = cfg.queue.reject_mark
        self._stop = False
        self._reload = False
        self._next_housekeeping = 0.0
        self._watchdog = watchdog_interval()
        self._next_watchdog = 0.0
        self._control: socket.socket | None = None

    # --- the packet path ------------------------------------------------------

    def handle(self, pkt: Any) -> None:
        verdict = Verdict.DROP
        try:
            verdict = self.service.decide_packet(pkt.get_payload())
        except Exception as exc:  # decide_packet never raises; get_payload might
            self.service.internal_error(exc, b"")
        finally:
            try:
                if verdict is Verdict.ACCEPT:
                    pkt.accept()
                elif verdict is Verdict.REJECT:
                    pkt.set_mark(self.mark)
                    pkt.repeat()  # re-runs the hook; the reject-mark rule answers
                else:
                    pkt.drop()
            except Exception:  # e.g. the verdict call failed: last resort is DROP
                with contextlib.suppress(Exception):
                    pkt.drop()
            try:
                self.service.settle()  # after the verdict: logging costs it no latency
            except Exception as exc:  # e.g. the state file could not be written
                self.service.internal_error(exc, b"")
            if self.service.now >= self._next_housekeeping:
                self.housekeeping()

    # --- between packets ------------------------------------------------------

    def housekeeping(self) -> None:
        now = time.monotonic()
        self._next_housekeeping = now + HOUSEKEEPING
        try:
            if self._reload:
                self._reload = False
                self._do_reload()
            self.service.tick()
            self._serve_control()
            if self._watchdog and now >= self._next_watchdog:
                notify("WATCHDOG=1")
                self._next_watchdog = now + self._watchdog
        except Exception as exc:
            log.error("housekeeping_failed", error=f"{type(exc).__name__}: {exc}")

    def _do_reload(self) -> None:
        try:
            how = self.service.reload()
        except ConfigError as exc:
            log.error("reload_failed", error=str(exc), reason="keeping the running configuration")
            return
        self._log_reloaded(how)

    def _log_reloaded(self, how: str) -> None:
        log.info("reloaded", detail=how, users=len(self.service.cfg.users))
        for warning in self.service.cfg.warnings:
            log.warning("config_warning", detail=warning)

    # --- control socket ---------------------------------------------------------

    def _open_control(self) -> socket.socket:
        path = self.service.cfg.control_socket
        make_dirs(path.parent, 0o700)  # every missing level, whatever the umask
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(path.lstat().st_mode):
                path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)  # root-only: the socket is created 0600
        try:
            sock.bind(str(path))
        finally:
            os.umask(old)
        sock.listen(4)
        sock.setblocking(False)
        self._control = sock
        return sock

    def _serve_control(self) -> None:
        if self._control is None:
            return
        for _ in range(4):
            try:
                conn, _addr = self._control.accept()
            except BlockingIOError:
                return
            with conn:
                conn.settimeout(CONTROL_TIMEOUT)
                try:
                    request = json.loads(_read_line(conn))
                    reply = self._control_reply(request)
                except (OSError, ValueError) as exc:
                    reply = {"ok": False, "error": str(exc)}
                with contextlib.suppress(OSError):
                    conn.sendall((json.dumps(reply) + "\n").encode())

    def _control_reply(self, request: Any) -> dict[str, Any]:
        command = request.get("command") if isinstance(request, dict) else None
        if command == "status":
            stats = queue_stats(self.service.cfg.queue.number)
            return {"ok": True, "status": self.service.status(stats)}
        if command == "reload":
            try:
                how = self.service.reload()
            except ConfigError as exc:
                log.error(
                    "reload_failed", error=str(exc), reason="keeping the running configuration"
                )
                return {"ok": False, "error": str(exc)}
            self._log_reloaded(how)
            return {"ok": True, "detail": how}
        return {"ok": False, "error": f"unknown command {command!r}"}

    # --- main loop --------------------------------------------------------------

    def run(self) -> int:
        from netfilterqueue import NetfilterQueue

        cfg = self.service.cfg
        restored, clean = self.service.restore()
        nfq = NetfilterQueue()
        try:
            nfq.bind(
                cfg.queue.number,
                self.handle,
                max_len=cfg.queue.max_len,
                range=COPY_RANGE,
                # The netlink socket must hold a full queue, or the kernel drops
                # messages before the queue is full ("user_dropped").
                sock_len=cfg.queue.max_len * SOCKET_BYTES_PER_PACKET,
            )
        except OSError as exc:
            log.error(
                "queue_bind_failed",
                queue=cfg.queue.number,
                error=str(exc),
                reason="another process may hold the queue, or CAP_NET_ADMIN is missing",
            )
            return 1
        control = self._open_control()
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
        signal.signal(signal.SIGHUP, lambda *_: setattr(self, "_reload", True))
        signal.signal(signal.SIGTERM, lambda *_: setattr(self, "_stop", True))
        signal.signal(signal.SIGINT, lambda *_: setattr(self, "_stop", True))
        log.info(
            "started",
            queue=cfg.queue.number,
            max_len=cfg.queue.max_len,
            users=len(cfg.users),
            protected=sorted(cfg.protected_ports),
            knock_range=f"{cfg.knock.port_min}-{cfg.knock.port_max}",
            restored=restored,
            previous_exit="clean" if clean else "unclean: live grants were not restored",
        )
        for warning in cfg.warnings:
            log.warning("config_warning", detail=warning)
        notify(f"READY=1\nSTATUS=verdicts on queue {cfg.queue.number}")
        fd = nfq.get_fd()
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        poller.register(wake_r.fileno(), select.POLLIN)
        poller.register(control.fileno(), select.POLLIN)
        try:
            while not self._stop:
                ready = {f for f, _ in poller.poll(int(HOUSEKEEPING * 1000))}
                if fd in ready:
                    nfq.run(block=False)
                if wake_r.fileno() in ready:
                    with contextlib.suppress(BlockingIOError):
                        wake_r.recv(64)
                if time.monotonic() >= self._next_housekeeping or self._reload or ready - {fd}:
                    self.housekeeping()
        finally:
            notify("STOPPING=1")
            # Unbinding hands queued packets back to the kernel, which drops them
            # (no --queue-bypass): fail closed.
            nfq.unbind()
            with contextlib.suppress(OSError):
                self.service.save(clean=True)
            if self._control is not None:
                self._control.close()
                with contextlib.suppress(OSError):
                    cfg.control_socket.unlink()
            signal.set_wakeup_fd(-1)
            log.info("stopped", verdicts=self.service.verdict_counts())
        return 0


def _read_line(conn: socket.socket, limit: int = 4096) -> bytes:
    buf = b""
    while b"\n" not in buf and len(buf) < limit:
        chunk = conn.recv(1024)
        if not chunk:
            break
        buf += chunk
    return buf


def control_request(path: Path, command: str, timeout: float = 5.0) -> dict[str, Any]:
    """Ask a running daemon over its control socket (used by the CLI)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall((json.dumps({"command": command}) + "\n").encode())
        reply = json.loads(_read_line(s, 1 << 20) or b"{}")
    if not isinstance(reply, dict):
        raise ValueError("the daemon's reply is not a JSON object")
    return reply
