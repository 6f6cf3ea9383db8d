"""A real HTTP(S) proxy that injects faults on request: in front of an S3 server, or in front of
the real kube-apiserver (TLS upstream, streamed watch responses).

It forwards every request unchanged (the Host header too, so SigV4 signatures still verify
upstream) and relays the response as it arrives (a watch streams event by event), unless a
fault applies. Two ways to ask for faults:

`inject(*faults)` queues faults for the next requests, whatever they are (the S3 tests):
  "503" / "500"  an S3 error response with that status (ServiceUnavailable / InternalError)
  "reset"        closes the connection without answering (a connection reset)
  "stall"        waits `stall_s` before forwarding (the client's read timeout fires)

`add(Rule(...))` applies a fault to the requests a rule matches (method, a pattern of the
path with its query, a User-Agent prefix), `times` times (None: always) after letting `skip`
matching requests through. Actions:
  "error"          answers `status` (a Kubernetes Status body; `Retry-After` when retry_after
                   is set) without forwarding
  "reset"          closes the connection without answering, without forwarding
  "delay"          forwards after `seconds`
  "hang"           neither forwards nor answers (a server or network gone silent) until
                   `seconds` pass or `release()`, then closes the connection
  "lose_response"  forwards (the server acts on it), withholds the answer for `seconds` (or
                   until `release()`), then resets the connection: the client never learns
  "stall"          for a streamed response (a watch): the headers go through, then nothing
                   (what the server sends is discarded) for `seconds`, then the connection is
                   cut
`stall_streams(pattern, seconds)` does the same to streams already open (a live watch); a
stalled stream's `cut()` cuts it at once.

Every request is recorded in `log` (time, method, path, User-Agent, status, fault, body).
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade"}
S3_ERRORS = {"500": "InternalError", "503": "ServiceUnavailable"}
K8S_REASONS = {
    409: "AlreadyExists",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
}
ACTIONS = {"error", "reset", "delay", "hang", "lose_response", "stall"}
_RST = b"\x01\x00\x00\x00\x00\x00\x00\x00"  # SO_LINGER on, 0 s: close() sends a reset


@dataclass
class Rule:
    action: str
    method: str | None = None
    path: str = ""
    """A regular expression searched in the request's path and query."""
    agent: str = ""
    """A User-Agent prefix (kopf: "kopf/", the operator's own client: "psft-operator")."""
    status: int = 500
    retry_after: float | None = None
    seconds: float = 3.0
    times: int | None = 1
    skip: int = 0
    seen: int = 0
    """Matching requests so far (those let through by `skip`, or taken by an earlier rule,
    included)."""
    hits: int = 0
    """Requests the fault was applied to."""
    released: threading.Event = field(default_factory=threading.Event, repr=False)

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"unknown action {self.action!r}; one of {sorted(ACTIONS)}")

    def matches(self, method: str, path: str, agent: str) -> bool:
        return (
            (self.method is None or method == self.method)
            and re.search(self.path, path) is not None
            and agent.startswith(self.agent)
        )

    def release(self) -> None:
        """End the hangs and withheld responses of this rule now."""
        self.released.set()

    def _wait(self) -> None:
        self.released.wait(self.seconds)


@dataclass
class Seen:
    at: float
    """time.monotonic() when the request arrived."""
    method: str
    path: str
    agent: str
    status: int | None = None
    """What the client got: the server's status, the injected one, or None (no answer)."""
    fault: str | None = None
    body: bytes = b""
    """The request's body (its first 64 KiB)."""


@dataclass
class Stream:
    path: str
    cut: Callable[[], None]
    stalled: bool = False
    discarded: int = 0
    """Bytes of the server's response withheld from the client while stalled."""


class FaultyProxy:
    def __init__(
        self,
        upstream: str,
        *,
        stall_s: float = 3.0,
        upstream_ca: Path | None = None,
        certificate: tuple[Path, Path] | None = None,
    ) -> None:
        """`upstream`: "host:port" (plain HTTP) or "https://host:port" (TLS, verified with
        `upstream_ca`). `certificate`: (cert, key) to serve HTTPS with, else plain HTTP."""
        self.tls_upstream = upstream.startswith("https://")
        self.upstream = upstream.removeprefix("https://").removeprefix("http://")
        self.stall_s = stall_s
        self.faults: deque[str] = deque()
        self.served: list[str] = []
        """Faults delivered so far, in order (both `inject` faults and rule actions)."""
        self.requests = 0
        self.rules: list[Rule] = []
        self.log: list[Seen] = []
        self.streams: list[Stream] = []
        """Streamed responses in flight."""
        self._lock = threading.Lock()
        self._upstream_ssl = (
            ssl.create_default_context(cafile=str(upstream_ca) if upstream_ca else None)
            if self.tls_upstream
            else None
        )
        server_ssl = None
        if certificate:
            server_ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            server_ssl.load_cert_chain(str(certificate[0]), str(certificate[1]))
        self.scheme = "https" if server_ssl else "http"
        self._server = _Server(("127.0.0.1", 0), self._handler(), server_ssl)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self._server.server_address[1]}"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.endpoint}"

    def start(self) -> FaultyProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._lock:
            rules, streams = list(self.rules), list(self.streams)
            self.rules.clear()
        for rule in rules:
            rule.release()
        for stream in streams:
            stream.cut()
        self._server.shutdown()
        self._server.server_close()

    # ---- faults ----
    def inject(self, *faults: str) -> None:
        with self._lock:
            self.faults.extend(faults)

    def add(self, rule: Rule) -> Rule:
        with self._lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        """No more faults: queued ones dropped, rules removed (and their holds released)."""
        with self._lock:
            rules = list(self.rules)
            self.rules.clear()
            self.faults.clear()
        for rule in rules:
            rule.release()

    def stall_streams(self, pattern: str, seconds: float) -> list[Stream]:
        """Streams in flight whose path matches: nothing more reaches the client; after
        `seconds` the connection is cut (as a load balancer or a dying node would)."""
        with self._lock:
            chosen = [s for s in self.streams if re.search(pattern, s.path) and not s.stalled]
            for stream in chosen:
                stream.stalled = True
        for stream in chosen:
            timer = threading.Timer(seconds, stream.cut)
            timer.daemon = True
            timer.start()
        return chosen

    def requests_where(
        self, method: str | None = None, path: str = "", agent: str = ""
    ) -> list[Seen]:
        with self._lock:
            log = list(self.log)
        return [
            r
            for r in log
            if (method is None or r.method == method)
            and re.search(path, r.path)
            and r.agent.startswith(agent)
        ]

    def _next_fault(self, seen: Seen) -> tuple[str | None, Rule | None]:
        with self._lock:
            self.requests += 1
            self.log.append(seen)
            chosen = None
            for rule in self.rules:  # every matching rule counts the request; the first due acts
                if not rule.matches(seen.method, seen.path, seen.agent):
                    continue
                rule.seen += 1
                due = rule.seen > rule.skip and (rule.times is None or rule.hits < rule.times)
                if due and chosen is None:
                    chosen = rule
            if chosen is not None:
                chosen.hits += 1
                seen.fault = chosen.action
                self.served.append(chosen.action)
                return chosen.action, chosen
            if not self.faults:
                return None, None
            fault = self.faults.popleft()
            seen.fault = fault
            self.served.append(fault)
            return fault, None

    def _connect(self) -> http.client.HTTPConnection:
        if self._upstream_ssl is not None:
            return http.client.HTTPSConnection(
                self.upstream, timeout=600, context=self._upstream_ssl
            )
        return http.client.HTTPConnection(self.upstream, timeout=60)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # quiet
                pass

            def _reset(self) -> None:
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RST)
                self.close_connection = True
                self.connection.close()

            def _answer(self, status: int, body: bytes, content_type: str, **headers: str):  # type: ignore[no-untyped-def]
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def _relay(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                seen = Seen(
                    time.monotonic(),
                    self.command,
                    self.path,
                    self.headers.get("User-Agent", ""),
                    body=(body or b"")[:65536],
                )
                fault, rule = proxy._next_fault(seen)
                if fault == "reset":
                    return self._reset()
                if fault in S3_ERRORS and rule is None:
                    xml = (
                        '<?xml version="1.0" encoding="UTF-8"?><Error>'
                        f"<Code>{S3_ERRORS[fault]}</Code><Message>injected</Message>"
                        f"<Resource>{self.path}</Resource><RequestId>x</RequestId></Error>"
                    ).encode()
                    seen.status = int(fault)
                    return self._answer(int(fault), xml, "application/xml")
                if fault == "error" and rule is not None:
                    status = {
                        "kind": "Status",
                        "apiVersion": "v1",
                        "status": "Failure",
                        "message": f"injected by the test proxy: HTTP {rule.status}",
                        "reason": K8S_REASONS.get(rule.status, "InternalError"),
                        "code": rule.status,
                    }
                    extra = {}
                    if rule.retry_after is not None:
                        extra["Retry-After"] = f"{rule.retry_after:g}"
                    seen.status = rule.status
                    return self._answer(
                        rule.status, json.dumps(status).encode(), "application/json", **extra
                    )
                if fault == "hang" and rule is not None:
                    rule._wait()
                    self.close_connection = True
                    return None
                if fault == "stall" and rule is None:
                    time.sleep(proxy.stall_s)
                if fault == "delay" and rule is not None:
                    rule._wait()
                conn = proxy._connect()
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    seen.status = resp.status
                    if fault == "lose_response" and rule is not None:
                        seen.status = None
                        rule._wait()
                        return self._reset()
                    stream = None
                    if fault == "stall" and rule is not None:
                        stream = self._stream_record(conn, stalled=True)
                        timer = threading.Timer(rule.seconds, stream.cut)
                        timer.daemon = True
                        timer.start()
                    self._copy(conn, resp, stream)
                finally:
                    conn.close()
                return None

            def _stream_record(self, conn: http.client.HTTPConnection, stalled: bool) -> Stream:
                client = self.connection

                def cut() -> None:
                    for sock in (client, conn.sock):
                        try:
                            if sock is not None:
                                sock.shutdown(socket.SHUT_RDWR)
                        except OSError:
                            pass

                stream = Stream(self.path, cut, stalled=stalled)
                with proxy._lock:
                    proxy.streams.append(stream)
                return stream

            def _copy(
                self,
                conn: http.client.HTTPConnection,
                resp: http.client.HTTPResponse,
                stream: Stream | None,
            ) -> None:
                head = self.command == "HEAD"  # keeps the object's Content-Length
                bodiless = head or resp.status in (204, 304)
                length = resp.getheader("Content-Length")
                chunked = not bodiless and (length is None or stream is not None)
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in HOP_BY_HOP and (
                        head or k.lower() != "content-length" or not chunked
                    ):
                        self.send_header(k, v)
                if chunked:
                    self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                if bodiless:
                    return
                if not chunked:
                    try:
                        self.wfile.write(resp.read())
                    except OSError:  # the client went away (a killed operator)
                        self.close_connection = True
                    return
                if stream is None:
                    stream = self._stream_record(conn, stalled=False)
                try:
                    while True:
                        try:
                            data = resp.read1(65536)
                        except (OSError, http.client.HTTPException):
                            data = b""
                        if not data:
                            break
                        if stream.stalled:
                            stream.discarded += len(data)
                            continue
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                    if stream.stalled:  # cut: the client sees the connection drop
                        self.close_connection = True
                        return
                    self.wfile.write(b"0\r\n\r\n")
                except OSError:  # the client went away
                    self.close_connection = True
                finally:
                    with proxy._lock:
                        if stream in proxy.streams:
                            proxy.streams.remove(stream)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = _relay

        return Handler


class _Server(ThreadingHTTPServer):
    """Serves HTTPS when given a context; the handshake runs in the request's own thread."""

    def __init__(self, address, handler, context: ssl.SSLContext | None) -> None:  # type: ignore[no-untyped-def]
        self._context = context
        super().__init__(address, handler)

    def handle_error(self, request, client_address) -> None:  # type: ignore[no-untyped-def]
        """Quiet about clients that went away (killed on purpose); loud about the rest."""
        import sys

        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)

    def finish_request(self, request, client_address) -> None:  # type: ignore[no-untyped-def]
        if self._context is not None:
            try:
                request = self._context.wrap_socket(request, server_side=True)
            except OSError:
                return
            try:
                super().finish_request(request, client_address)
            finally:
                request.close()
            return
        super().finish_request(request, client_address)
