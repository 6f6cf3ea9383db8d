"""A real HTTP proxy in front of an S3 server that injects faults on request.

It forwards every request unchanged (the Host header too, so SigV4 signatures still
verify upstream) unless a fault is queued; then it answers that request with the fault:
  "503" / "500"  an S3 error response with that status (ServiceUnavailable / InternalError)
  "reset"        closes the connection without answering (a connection reset)
  "stall"        waits `stall_s` before forwarding (the client's read timeout fires)
"""

from __future__ import annotations

import http.client
import socket
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade"}
S3_ERRORS = {"500": "InternalError", "503": "ServiceUnavailable"}


class FaultyProxy:
    def __init__(self, upstream: str, *, stall_s: float = 3.0) -> None:
        self.upstream = upstream
        self.stall_s = stall_s
        self.faults: deque[str] = deque()
        self.served: list[str] = []
        """Faults delivered so far, in order."""
        self.requests = 0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FaultyProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def inject(self, *faults: str) -> None:
        with self._lock:
            self.faults.extend(faults)

    def _next_fault(self) -> str | None:
        with self._lock:
            self.requests += 1
            if not self.faults:
                return None
            fault = self.faults.popleft()
            self.served.append(fault)
            return fault

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # quiet
                pass

            def _relay(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                fault = proxy._next_fault()
                if fault == "reset":
                    self.connection.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                    )
                    self.close_connection = True
                    self.connection.close()
                    return
                if fault in S3_ERRORS:
                    xml = (
                        '<?xml version="1.0" encoding="UTF-8"?><Error>'
                        f"<Code>{S3_ERRORS[fault]}</Code><Message>injected</Message>"
                        f"<Resource>{self.path}</Resource><RequestId>x</RequestId></Error>"
                    ).encode()
                    self.send_response(int(fault))
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(xml)))
                    self.end_headers()
                    self.wfile.write(xml)
                    return
                if fault == "stall":
                    time.sleep(proxy.stall_s)
                conn = http.client.HTTPConnection(proxy.upstream, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                finally:
                    conn.close()
                head = self.command == "HEAD"  # keeps the object's Content-Length
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in HOP_BY_HOP and (head or k.lower() != "content-length"):
                        self.send_header(k, v)
                if not head:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if not head:
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _relay

        return Handler
