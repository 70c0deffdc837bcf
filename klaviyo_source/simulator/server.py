"""The HTTP side: a threaded HTTP/1.1 keep-alive server on 127.0.0.1 that feeds requests to
``Api``, applies injected faults, and keeps counters and a request log.

``KlaviyoSimulator`` is the public entry point (a context manager). The standard library's
``ThreadingHTTPServer`` does the socket work; each response is written with a single
``send`` so keep-alive clients never wait on Nagle/delayed-ACK interplay.
"""

from __future__ import annotations

import contextlib
import secrets
import socket
import struct
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, NamedTuple
from urllib.parse import parse_qsl

from .account import Account
from .api import JSON_API, Api, Request, Response
from .errors import error_body, error_object, throttled
from .faults import Fault, FaultInjector, on_origin
from .rate_limits import RateLimiter
from .segment_reports import ReportSettings
from .spec_tables import ALL_SCOPES

_REASONS = {
    200: "OK",
    201: "Created",
    204: "No Content",
    307: "Temporary Redirect",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    406: "Not Acceptable",
    409: "Conflict",
    413: "Payload Too Large",
    431: "Request Header Fields Too Large",
    415: "Unsupported Media Type",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}
MAX_BODY = 5 * 1024 * 1024


class RequestRecord(NamedTuple):
    """One served request, as kept in ``KlaviyoSimulator.request_log``."""

    method: str
    path: str
    query: dict[str, str]
    status: int
    operation: str | None
    api_key: str | None
    timestamp: float  # time.time() when the response was produced


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, sim: KlaviyoSimulator, port: int) -> None:
        self.sim = sim
        self.open_sockets: set[socket.socket] = set()
        self.sockets_lock = threading.Lock()
        super().__init__(("127.0.0.1", port), _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Clients hanging up (timeouts, resets) are normal here; report anything else."""
        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "klaviyo-simulator"
    sys_version = ""
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.server.sockets_lock:
            self.server.open_sockets.add(self.connection)

    def finish(self) -> None:
        with contextlib.suppress(OSError):
            super().finish()
        with self.server.sockets_lock:
            self.server.open_sockets.discard(self.connection)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        """Silence the default stderr access log."""

    def handle_one_request(self) -> None:
        """Read one request (request line + headers) without the ``email`` parser that
        ``BaseHTTPRequestHandler.parse_request`` uses, then serve it. Keep-alive follows
        HTTP/1.1 rules (``Connection: close`` or HTTP/1.0 without keep-alive ends it)."""
        self.command, self.path, self.request_version = "", "", "HTTP/1.1"
        try:
            line = self.rfile.readline(65537)
        except (TimeoutError, OSError):
            self.close_connection = True
            return
        if not line:
            self.close_connection = True
            return
        parts = line.decode("latin-1").split()
        if len(line) > 65536 or len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            self._write(Response(400), close=True)
            return
        self.command, self.path, self.request_version = parts
        headers: dict[str, str] = {}
        for _ in range(101):
            raw = self.rfile.readline(65537)
            if raw in (b"\r\n", b"\n", b""):
                break
            name, sep, value = raw.decode("latin-1").partition(":")
            if not sep or len(raw) > 65536:
                self._write(Response(400), close=True)
                return
            headers[name.strip().lower()] = value.strip()
        else:
            self._write(Response(431), close=True)
            return
        connection = headers.get("connection", "").lower()
        self.close_connection = connection == "close" or (
            self.request_version == "HTTP/1.0" and connection != "keep-alive"
        )
        if headers.get("expect", "").lower() == "100-continue":
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self._serve(headers)

    def _serve(self, headers: dict[str, str]) -> None:
        sim = self.server.sim
        raw_path, _, query_string = self.path.partition("?")
        length = headers.get("content-length")
        body = b""
        if length:
            try:
                size = int(length)
            except ValueError:
                size = -1
            if size < 0 or size > MAX_BODY:
                self._write(Response(413 if size > MAX_BODY else 400), close=True)
                return
            body = self.rfile.read(size)
        req = Request(self.command, raw_path, query_string, headers, body)
        fault = sim.faults.take(self.path)
        if fault is not None and fault.kind == "slow":
            time.sleep(float(fault.opts.get("delay", 1.0)))
        if fault is not None and fault.kind == "delete_segment":
            sim.account.delete_segment(fault.opts["segment_id"])
        if fault is not None and fault.kind in ("status", "throttle", "redirect"):
            resp = sim.api.identify(req)
            if fault.kind == "redirect":
                resp.status, resp.body = 307, b""
                resp.headers = {"Location": on_origin(self.path, fault.opts["origin"])}
            elif fault.kind == "status":
                status, ctype, fbody = fault.status_response()
                resp.status, resp.body, resp.headers = status, fbody, {"Content-Type": ctype}
            else:
                retry = fault.opts.get("retry_after", 1)
                err = throttled(None if retry is None else int(retry))
                resp.status, resp.body = 429, err.body()
                resp.headers = {"Content-Type": JSON_API, **err.headers}
        else:
            try:
                resp = sim.api.handle(req)
            except Exception:  # a simulator bug: answer like Klaviyo's 500, keep serving
                traceback.print_exc()
                resp = sim.api.identify(req)
                resp.status = 500
                resp.headers = {"Content-Type": JSON_API}
                resp.body = error_body(
                    error_object(
                        500,
                        "error",
                        "A server error occurred.",
                        "A server error occurred.",
                        pointer="/data/",
                    )
                )
        sim.record(req, resp, fault)
        if fault is not None and fault.kind == "reset":
            self._reset(resp)
            return
        if fault is not None and fault.kind == "truncate":
            resp.body = resp.body[: len(resp.body) // 2]
        if fault is not None and fault.kind == "omit" and resp.status == 200:
            resp.body = fault.without_field(resp.body)
        if fault is not None and fault.kind == "relink" and resp.status == 200:
            resp.body = fault.relinked(resp.body)
        self._write(resp)

    def _write(self, resp: Response, close: bool = False) -> None:
        lines = [f"HTTP/1.1 {resp.status} {_REASONS.get(resp.status, 'Unknown')}"]
        lines.extend(f"{k}: {v}" for k, v in resp.headers.items())
        if resp.status != 204:
            lines.append(f"Content-Length: {len(resp.body)}")
        if close or self.close_connection:
            lines.append("Connection: close")
            self.close_connection = True
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        send_body = resp.status != 204 and self.command != "HEAD"
        self.wfile.write(head + resp.body if send_body else head)

    def _reset(self, resp: Response) -> None:
        """Send headers with the full Content-Length and part of the body, then RST."""
        lines = [f"HTTP/1.1 {resp.status} {_REASONS.get(resp.status, 'Unknown')}"]
        lines.extend(f"{k}: {v}" for k, v in resp.headers.items())
        lines.append(f"Content-Length: {len(resp.body)}")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        try:
            self.wfile.write(head + resp.body[: max(1, len(resp.body) // 3)])
            self.wfile.flush()
            time.sleep(0.05)  # let the client read the partial body before the RST lands
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.close()


class KlaviyoSimulator:
    """Serve an ``Account`` as the Klaviyo API on 127.0.0.1.

    ``api_keys`` maps key -> scopes; ``None`` creates one private key with ``ALL_SCOPES``
    (``api_key``). ``rate_limits`` enables Klaviyo's limits; ``time_scale`` shortens their
    windows, and ``windows`` is ``"fixed"`` (Klaviyo's, the default) or ``"sliding"`` (see
    ``rate_limits``). Use as a context manager or call ``start()``/``stop()``.
    Extras beyond the public contract: ``fault_seed`` (seeds probabilistic faults),
    ``rate_limit_clock`` (a monotonic-seconds callable, for deterministic limit tests) and
    ``reports`` (the segment reports' lag and daily cap, ``segment_reports.ReportSettings``).
    """

    def __init__(
        self,
        account: Account,
        api_keys: dict[str, set[str]] | None = None,
        rate_limits: bool = True,
        time_scale: float = 1.0,
        port: int = 0,
        *,
        windows: str = "fixed",
        fault_seed: int | None = None,
        rate_limit_clock: Callable[[], float] | None = None,
        reports: ReportSettings | None = None,
    ) -> None:
        self.account = account
        if api_keys is None:
            self.api_key = "pk_sim_" + secrets.token_hex(16)
            self.api_keys: dict[str, set[str]] = {self.api_key: set(ALL_SCOPES)}
        else:
            self.api_keys = {k: set(v) for k, v in api_keys.items()}
            self.api_key = next(iter(self.api_keys), "")
        self.limiter = RateLimiter(
            time_scale=time_scale,
            enabled=rate_limits,
            clock=rate_limit_clock or time.monotonic,
            windows=windows,
        )
        self.faults = FaultInjector(fault_seed)
        # The segment reports' lag and daily cap; change them while serving if need be.
        self.reports = reports or ReportSettings()
        self.counters: Counter[str] = Counter()
        self.request_log: list[RequestRecord] = []
        # (record, fault kind) for every request a fault fired on
        self.fault_log: list[tuple[RequestRecord, str]] = []
        self._log_lock = threading.Lock()
        self._port = port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.base_url = ""
        self.api: Api

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> KlaviyoSimulator:
        """Bind and serve in a background thread."""
        if self._server is not None:
            return self
        server = _Server(self, self._port)
        port = server.server_address[1]
        self.base_url = f"http://127.0.0.1:{port}"
        self.api = Api(self.account, self.api_keys, self.limiter, self.base_url, self.reports)
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"klaviyo-simulator-{port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and drop open keep-alive connections."""
        server = self._server
        if server is None:
            return
        server.shutdown()
        with server.sockets_lock:
            for sock in list(server.open_sockets):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None
        self._thread = None

    def __enter__(self) -> KlaviyoSimulator:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------ switches
    @property
    def rate_limits_enabled(self) -> bool:
        """Whether rate limits are enforced (can be switched at run time)."""
        return self.limiter.enabled

    @rate_limits_enabled.setter
    def rate_limits_enabled(self, value: bool) -> None:
        self.limiter.enabled = bool(value)

    @property
    def time_scale(self) -> float:
        """Divisor applied to every rate-limit window."""
        return self.limiter.time_scale

    def reset_rate_limits(self) -> None:
        """Forget all rate-limit counts."""
        self.limiter.reset()

    def inject_fault(
        self,
        kind: str,
        *,
        times: int = 1,
        path_contains: str | None = None,
        probability: float = 1.0,
        skip: int = 0,
        **opts: Any,
    ) -> Fault:
        """Arm a fault for the next ``times`` matching requests after ``skip`` of them; see
        ``faults`` for kinds."""
        return self.faults.inject(
            kind,
            times=times,
            path_contains=path_contains,
            probability=probability,
            skip=skip,
            **opts,
        )

    def clear_faults(self) -> None:
        """Disarm all faults."""
        self.faults.clear()

    # ------------------------------------------------------------------ bookkeeping
    def record(self, req: Request, resp: Response, fault: Fault | None) -> None:
        """Count the request and append it to the log."""
        query = (
            resp.query if resp.query else dict(parse_qsl(req.query_string, keep_blank_values=True))
        )
        rec = RequestRecord(
            req.method,
            req.path,
            query,
            resp.status,
            resp.operation,
            resp.api_key,
            time.time(),
        )
        with self._log_lock:
            if resp.operation:
                self.counters[resp.operation] += 1
            self.request_log.append(rec)
            if fault is not None:
                self.fault_log.append((rec, fault.kind))

    def reset_counters(self) -> None:
        """Clear counters, the request log and the fault log."""
        with self._log_lock:
            self.counters.clear()
            self.request_log.clear()
            self.fault_log.clear()
