"""Fault injection: armed faults that hit the next matching requests.

Kinds: ``status`` (5xx with a Klaviyo JSON or CDN HTML body, or Klaviyo's 404), ``reset``
(headers and part of the body, then an abrupt close), ``truncate`` (200 whose JSON is cut in
half, Content-Length matching the cut body), ``omit`` (200 whose resources lack the attribute
``field``, as from a revision that dropped it), ``slow`` (delay before answering),
``throttle`` (429, with or without ``Retry-After``), ``relink`` (200 whose ``links.next`` leads
to ``origin`` instead, as a rewriting proxy would send), ``redirect`` (307 to the same path and
query on ``origin``) and ``delete_segment`` (segment ``segment_id`` is deleted just before the
request is served, as if someone deleted it in Klaviyo's UI at that moment).

A fault fires for the next ``times`` requests whose path+query contains ``path_contains``,
each with ``probability``; a failed roll does not use up a turn. With ``skip`` it lets that
many matching requests pass first: ``skip=2`` hits the third page of a walk.
"""

from __future__ import annotations

import json
import random
import threading
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from .errors import error_body, error_object

FAULT_KINDS = frozenset(
    {
        "status",
        "reset",
        "truncate",
        "omit",
        "slow",
        "throttle",
        "relink",
        "redirect",
        "delete_segment",
    }
)
# Kinds that need an option to mean anything.
_REQUIRED_OPTION = {"relink": "origin", "redirect": "origin", "delete_segment": "segment_id"}

_STATUS_TEXT = {
    404: ("not_found", "Not found.", "Not found."),
    405: ("method_not_allowed", "Method not allowed.", "Method not allowed."),
    500: ("error", "A server error occurred.", "A server error occurred."),
    502: ("bad_gateway", "Bad gateway.", "The server received an invalid upstream response."),
    503: (
        "service_unavailable",
        "Service temporarily unavailable.",
        "Service temporarily unavailable, try again later.",
    ),
    504: ("gateway_timeout", "Gateway timeout.", "The upstream server did not respond in time."),
    # What a proxy or stand-in answers for an endpoint it does not serve.
    501: ("not_implemented", "Not implemented.", "The server does not support this operation."),
}
_REASONS = {
    404: "Not Found",
    405: "Method Not Allowed",
    501: "Not Implemented",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


@dataclass
class Fault:
    """One armed fault."""

    kind: str
    times: int
    path_contains: str | None
    probability: float
    opts: dict[str, Any] = field(default_factory=dict)
    skip: int = 0

    def without_field(self, body: bytes) -> bytes:
        """An ``omit`` fault's body: every resource in ``data`` without attribute ``field``."""
        document = json.loads(body)
        data = document.get("data")
        for resource in data if isinstance(data, list) else [data]:
            if isinstance(resource, dict):
                (resource.get("attributes") or {}).pop(self.opts["field"], None)
        return json.dumps(document).encode()

    def relinked(self, body: bytes) -> bytes:
        """A ``relink`` fault's body: ``links.next``, if any, moved to ``origin``."""
        document = json.loads(body)
        links = document.get("links") or {}
        if links.get("next"):
            links["next"] = on_origin(links["next"], self.opts["origin"])
        return json.dumps(document).encode()

    def status_response(self) -> tuple[int, str, bytes]:
        """(status, content type, body) for a ``status`` fault."""
        status = int(self.opts.get("status", 500))
        style = self.opts.get("body", "html" if status in (502, 504) else "json")
        code, title, detail = _STATUS_TEXT.get(status, _STATUS_TEXT[500])
        if style == "html":
            reason = _REASONS.get(status, "Error")
            html = (
                f"<html>\r\n<head><title>{status} {reason}</title></head>\r\n<body>\r\n"
                f"<center><h1>{status} {reason}</h1></center>\r\n"
                "<hr><center>cloudflare</center>\r\n</body>\r\n</html>\r\n"
            )
            return status, "text/html", html.encode()
        body = error_body(error_object(status, code, title, detail, pointer="/data/"))
        return status, "application/vnd.api+json", body


class FaultInjector:
    """Thread-safe registry of armed faults."""

    def __init__(self, seed: int | None = None) -> None:
        self._lock = threading.Lock()
        self._faults: list[Fault] = []
        self._rng = random.Random(seed)

    def inject(
        self,
        kind: str,
        *,
        times: int = 1,
        path_contains: str | None = None,
        probability: float = 1.0,
        skip: int = 0,
        **opts: Any,
    ) -> Fault:
        """Arm a fault (see module docstring for kinds and options)."""
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; expected one of {sorted(FAULT_KINDS)}")
        if times < 1:
            raise ValueError("times must be >= 1")
        if not 0.0 < probability <= 1.0:
            raise ValueError("probability must be in (0, 1]")
        if kind == "status" and int(opts.get("status", 500)) not in _STATUS_TEXT:
            raise ValueError(f"status fault supports {sorted(_STATUS_TEXT)}")
        if kind == "slow" and float(opts.get("delay", 1.0)) < 0:
            raise ValueError("delay must be >= 0")
        if kind in _REQUIRED_OPTION and not opts.get(_REQUIRED_OPTION[kind]):
            raise ValueError(f"a {kind} fault needs {_REQUIRED_OPTION[kind]}=")
        if skip < 0:
            raise ValueError("skip must be >= 0")
        fault = Fault(kind, times, path_contains, probability, dict(opts), skip)
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear(self) -> None:
        """Disarm every fault."""
        with self._lock:
            self._faults.clear()

    @property
    def armed(self) -> int:
        """Number of faults still armed."""
        with self._lock:
            return len(self._faults)

    def take(self, target: str) -> Fault | None:
        """The fault that fires for this request (path + query), if any; consumes one turn."""
        with self._lock:
            if not self._faults:
                return None
            for fault in self._faults:
                if fault.path_contains is not None and fault.path_contains not in target:
                    continue
                if fault.skip > 0:
                    fault.skip -= 1
                    continue
                if fault.probability < 1.0 and self._rng.random() >= fault.probability:
                    continue
                fault.times -= 1
                if fault.times <= 0:
                    self._faults.remove(fault)
                return fault
            return None


def on_origin(url: str, origin: str) -> str:
    """The URL with its scheme, host and port replaced by those of ``origin``."""
    target = urlsplit(origin)
    return urlunsplit(urlsplit(url)._replace(scheme=target.scheme, netloc=target.netloc))
