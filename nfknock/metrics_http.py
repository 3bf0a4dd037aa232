"""The ``[metrics] listen`` endpoint: the latest snapshot over HTTP, at a bounded cost.

The daemon's packet loop shares the interpreter (and its lock) with this server, so
what a scrape costs, and how often anyone may make the server pay it, is bounded
here -- whoever reaches the port (every local user, on loopback) can scrape in a
loop.  Measured on the development machine, ``prometheus_client``'s own
``start_http_server`` (a thread per request, the text rendered per request) let one
local client in a tight loop triple the daemon's CPU per packet.  Instead:

* one thread serves one request at a time, then pauses ``REQUEST_GAP`` seconds
  (sleeping releases the interpreter): at most ``1 / REQUEST_GAP`` scrapes a
  second, whatever the clients do;
* the text (``prometheus_client.generate_latest``: the snapshot's families and the
  process's own ``process_*`` metrics) is rendered once per published snapshot --
  at most once a second -- and the same bytes served until the next one;
* a client must send its request within ``REQUEST_TIMEOUT`` seconds.

A slow client therefore delays other scrapers, never the packets.
"""

from __future__ import annotations

import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import CollectorRegistry

from nfknock.metrics import SNAPSHOT_SECONDS, SnapshotCollector

REQUEST_GAP = 0.02  # at most 50 requests a second
REQUEST_TIMEOUT = 2.0


class _Handler(WSGIRequestHandler):
    timeout = REQUEST_TIMEOUT

    def log_message(self, format: str, *args: Any) -> None:
        pass  # scrapes are not events


class _Server(WSGIServer):
    """One request at a time (no thread per request), then a pause."""

    def server_bind(self) -> None:
        # HTTPServer.server_bind would look the address up in DNS (getfqdn): a start
        # must not wait for a resolver.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)
        self.setup_environ()

    def process_request(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request(request, client_address)
        finally:
            time.sleep(REQUEST_GAP)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that timed out or went away: not worth a traceback in the log


class MetricsServer:
    """Serves the published snapshot plus the daemon process's ``process_*`` metrics."""

    def __init__(self, listen: tuple[str, int], first: dict[str, Any]) -> None:
        self.listen = listen
        self.collector = SnapshotCollector(first)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.collector)
        ProcessCollector(registry=self.registry)
        self._rendered: tuple[object, bytes] = (None, b"")
        host, port = listen
        server_class = type(
            "_Server6" if ":" in host else "_Server4",
            (_Server,),
            {"address_family": socket.AF_INET6 if ":" in host else socket.AF_INET},
        )
        self._server: WSGIServer = server_class((host, port), _Handler)
        self._server.set_app(self._app)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="nfknock-metrics", daemon=True
        )
        self._thread.start()
        self.next_publish = time.monotonic() + SNAPSHOT_SECONDS

    def publish(self, snap: dict[str, Any]) -> None:
        self.collector.snapshot = snap  # one assignment: readers see old or new
        self.next_publish = time.monotonic() + SNAPSHOT_SECONDS

    def body(self) -> bytes:
        """The text for the current snapshot, rendered once per snapshot."""
        snap = self.collector.snapshot
        if self._rendered[0] is not snap:
            self._rendered = (snap, generate_latest(self.registry))
        return self._rendered[1]

    def _app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            start_response("405 Method Not Allowed", [("Allow", "GET, HEAD")])
            return [b""]
        body = self.body()
        start_response(
            "200 OK", [("Content-Type", CONTENT_TYPE_LATEST), ("Content-Length", str(len(body)))]
        )
        return [b"" if environ["REQUEST_METHOD"] == "HEAD" else body]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
