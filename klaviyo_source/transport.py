"""The way to Klaviyo: per-thread sessions that retry, keep to the origin rule and spend budgets.

Every request goes through a retrying session whose bounds come from dlt's `[runtime]`
settings (`request_max_attempts`, `request_backoff_factor`, `request_max_retry_delay`,
`request_timeout`):

- 5xx, dropped connections, timeouts and 200s whose body is not complete JSON are retried with
  exponential backoff and jitter, at most `request_max_attempts` attempts, each wait at most
  `request_max_retry_delay`;
- a 429 waits as long as Klaviyo says (`Retry-After`, up to a minute: resuming earlier only
  earns another 429), else a shared exponential backoff, for every thread at once (see
  `quota`). It is not a failure, but one request stops waiting once its 429 pauses add
  up to more than `(request_max_attempts - 1) * request_max_retry_delay`, the longest dlt's
  own retry would wait;
- a base_url that never answered (refused, unknown host, no connect) fails at once: retrying
  a typo for minutes helps no one; so does whole JSON without what the revision documents
  (`UnexpectedDocument`): asked again, Klaviyo would send the same;
- a POST that may have reached Klaviyo is not sent again, so a create never happens twice.

A request that gives up raises one of the typed errors of `errors`, naming the request, what
went wrong, how often it was tried and what to do. The key travels only through an auth object,
so no log line at any level shows it, and only to base_url's origin (`origins`): the session
refuses any request bound elsewhere, redirects included. The budgets a request spends travel
with it as an argument of `send` down to the adapter, never on the wire.
"""

import logging
import os
import random
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterator, List, Mapping, Optional, Sequence, Tuple, Union
from urllib.parse import urlsplit

import urllib3.exceptions
from dlt.common import logger as dlt_logger
from dlt.common.configuration.specs import RuntimeConfiguration
from dlt.common.time import to_seconds
from dlt.sources.helpers.requests.session import Session
from dlt.sources.helpers.rest_client.auth import APIKeyAuth
from dlt.sources.helpers.rest_client.redaction import sanitize_url
from requests import (
    ConnectionError,
    ConnectTimeout,
    PreparedRequest,
    Request,
    Response,
    Timeout,
)
from requests.adapters import HTTPAdapter
from requests.exceptions import ChunkedEncodingError
from requests.utils import get_environ_proxies

from . import settings
from .documents import Decoder, Document, decode_json, read_document
from .endpoints import Budget
from .errors import (
    InvalidResponseBody,
    KlaviyoConnectionError,
    KlaviyoDailyQuotaSpent,
    KlaviyoRateLimited,
    KlaviyoServerError,
    KlaviyoTimeout,
    KlaviyoUnreachable,
    error_for_response,
    without_password,
)
from .origins import origin_of, refuse_other_origins
from .quota import RateLimiter, retry_after_seconds

Timeouts = Union[float, Tuple[float, float]]

logger = logging.getLogger(__name__)

# Failures worth asking again for: the next attempt may well work.
_TRANSIENT = (
    KlaviyoServerError,
    InvalidResponseBody,
    ConnectionError,
    Timeout,
    ChunkedEncodingError,
)


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long one request is tried, from dlt's `[runtime]` settings."""

    max_attempts: int = 5
    backoff_factor: float = 1.0
    max_delay: float = 300.0
    timeout: Timeouts = 60.0

    @classmethod
    def from_runtime(cls, runtime: RuntimeConfiguration) -> "RetryPolicy":
        timeout = runtime.request_timeout
        return cls(
            max_attempts=max(1, int(runtime.request_max_attempts)),
            backoff_factor=max(0.0, float(runtime.request_backoff_factor)),
            max_delay=max(0.0, float(to_seconds(runtime.request_max_retry_delay))),
            timeout=(
                (float(to_seconds(timeout[0])), float(to_seconds(timeout[1])))
                if isinstance(timeout, tuple)
                else float(to_seconds(timeout))
            ),
        )

    @property
    def max_throttled_wait(self) -> float:
        """Longest one request waits out 429s in total: what dlt's own retry could wait."""
        return (self.max_attempts - 1) * self.max_delay

    def backoff(self, failures: int) -> float:
        """Wait before the next attempt after `failures` failed ones: exponential, jittered.

        Half the wait is random so that parallel segment walks that failed together do not
        all come back in the same instant.
        """
        ceiling = min(self.max_delay, self.backoff_factor * 2 ** (failures - 1))
        return ceiling / 2 + random.uniform(0, ceiling / 2)


def _causes(error: BaseException) -> Iterator[BaseException]:
    """The error and everything it wraps: `requests` hides urllib3's reason in `args`."""
    seen: List[BaseException] = []
    pending: List[BaseException] = [error]
    while pending:
        current = pending.pop(0)
        if any(current is known for known in seen):
            continue
        seen.append(current)
        yield current
        pending.extend(arg for arg in current.args if isinstance(arg, BaseException))
        for linked in (getattr(current, "reason", None), current.__cause__, current.__context__):
            if isinstance(linked, BaseException):
                pending.append(linked)


def _network_reason(error: BaseException) -> str:
    """A short reason for a network failure, without urllib3's long nested repr.

    Checked from the most to the least specific across the whole chain: urllib3's
    `NewConnectionError` is also a `ConnectTimeoutError`, and wraps the refusal itself.
    """
    causes = list(_causes(error))
    reasons: List[Tuple[Tuple[type, ...], str]] = [
        ((urllib3.exceptions.NameResolutionError,), "the host name does not resolve"),
        ((ConnectionRefusedError,), "connection refused"),
        ((ConnectionResetError,), "connection reset by the server"),
        ((urllib3.exceptions.IncompleteRead,), "the connection closed in the middle of the body"),
        ((urllib3.exceptions.ProxyError,), "the proxy failed"),
        ((urllib3.exceptions.NewConnectionError,), "no connection could be opened"),
        (
            (urllib3.exceptions.ConnectTimeoutError, ConnectTimeout),
            "no connection within the request timeout",
        ),
        ((urllib3.exceptions.ReadTimeoutError, Timeout), "no answer within the request timeout"),
    ]
    for kinds, reason in reasons:
        if any(isinstance(cause, kinds) for cause in causes):
            return reason
    innermost = causes[-1]
    return f"{type(innermost).__name__}: {innermost}"[:200]


def _never_connected(error: BaseException) -> bool:
    """Whether the failure happened before a connection existed (nothing was sent)."""
    if isinstance(error, ConnectTimeout):
        return True
    return any(
        isinstance(cause, (urllib3.exceptions.NewConnectionError, urllib3.exceptions.ProxyError))
        for cause in _causes(error)
    )


def _log_request(method: str, url: str) -> None:
    """Each attempt in dlt's log at INFO, as dlt's `RESTClient` logs it, sensitive values hidden."""
    if dlt_logger.LOGGER is not None and dlt_logger.LOGGER.isEnabledFor(logging.INFO):
        dlt_logger.info(f"Making {method} request to {sanitize_url(url)}")


class RateLimitedAdapter(HTTPAdapter):
    """Transport adapter that spends the budgets of every attempt, retries included.

    It also hands Klaviyo's answer to the limiter, which follows its `RateLimit-*` headers and
    pauses the budgets of a 429 for every thread. `answered` turns true once any HTTP response
    came back, which tells an unreachable base_url (fail at once) from a dropped connection.
    """

    def __init__(
        self,
        limiter: Optional[RateLimiter],
        backoff_factor: float = 1.0,
        max_delay: float = 300.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.limiter = limiter if limiter is not None else RateLimiter(pace=False)
        self.backoff_factor = backoff_factor
        self.max_delay = max_delay
        self.answered = False

    def send(  # type: ignore[override]
        self, request: PreparedRequest, *args: Any, budgets: Sequence[Budget] = (), **kwargs: Any
    ) -> Response:
        ticket = self.limiter.acquire(budgets)
        try:
            response = super().send(request, *args, **kwargs)
        except BaseException:
            self.limiter.release(ticket, None)
            raise
        self.answered = True
        if response.status_code == 429:
            self.limiter.release_throttled(ticket, response, self.backoff_factor, self.max_delay)
        else:
            self.limiter.release(ticket, response)
        return response


class RetryingSession(Session):
    """dlt's `Session` (default timeout, User-Agent) with Klaviyo's retry rules.

    One per thread; they share the rate-limited adapter, which paces and pauses every attempt.
    It sends nothing to any origin but base_url's.
    """

    def __init__(
        self,
        policy: RetryPolicy,
        adapter: RateLimitedAdapter,
        base_url: str,
        headers: Mapping[str, str],
        auth: APIKeyAuth,
    ) -> None:
        super().__init__(timeout=policy.timeout, raise_for_status=False)
        self.policy = policy
        self.adapter = adapter
        self.base_url = base_url
        self.home = origin_of(base_url)
        self.headers.update(headers)
        self.auth = auth
        self._read_environment_once(base_url)
        self.mount("http://", adapter)
        self.mount("https://", adapter)

    def _read_environment_once(self, base_url: str) -> None:
        """Take proxies and a CA bundle from the environment now, not again for every request.

        `requests` reads proxy variables, no_proxy rules and ~/.netrc anew for each request
        (about 1 ms); over a 10,000-page export that is seconds of CPU for settings that do
        not change. Auth is ours, so ~/.netrc is never needed.
        """
        self.proxies.update(get_environ_proxies(base_url))
        ca_bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
        if ca_bundle:
            self.verify = ca_bundle
        self.trust_env = False

    def send(self, request: PreparedRequest, **kwargs: Any) -> Response:  # type: ignore[override]
        """Send one attempt; every hop of a redirect comes through here too."""
        method, url = request.method or "GET", request.url or ""
        refuse_other_origins(method, url, self.home)
        _log_request(method, url)
        return super().send(request, **kwargs)  # type: ignore[no-untyped-call]

    def fetch(
        self,
        method: str,
        url: str,
        budgets: Sequence[Budget],
        scopes: Sequence[str] = (),
        params: Optional[Mapping[str, Any]] = None,
        body: Optional[Document] = None,
        decode: Decoder = decode_json,
        *,
        resend_post: bool = False,
        daily_capped: bool = False,
    ) -> Document:
        """The decoded document Klaviyo answers a request with, after retries as above.

        `budgets` are what each attempt spends; `scopes` what a key needs for the endpoint,
        named if Klaviyo answers 403. `resend_post`: the POST changes nothing (a report), so
        an attempt that failed is sent again like a GET. `daily_capped`: a 429 asking to wait
        past the steady window means the endpoint's day is spent (`KlaviyoDailyQuotaSpent`).
        """
        headers = {"Content-Type": settings.MEDIA_TYPE} if body is not None else None
        request = self.prepare_request(
            Request(method, url, params=dict(params or {}), json=body, headers=headers)
        )
        path = urlsplit(url).path
        started = time.monotonic()
        attempts = failures = 0
        throttled_wait = 0.0
        while True:
            attempts += 1
            try:
                return self._attempt(request, budgets, scopes, decode, daily_capped)
            except KlaviyoRateLimited as error:
                # No sleep here: the adapter holds the next attempt, like every other
                # thread's, until the budget's pause ends.
                wait = self.adapter.limiter.paused_for(budgets)
                throttled_wait += wait
                if throttled_wait > self.policy.max_throttled_wait:
                    raise error.after_retries(attempts, time.monotonic() - started) from None
                logger.info(f"{method} {path}: throttled (429), next attempt in {wait:.1f} s")
            except _TRANSIENT as error:
                first_contact = not self.adapter.answered and isinstance(error, ConnectionError)
                if first_contact and _never_connected(error):
                    raise self._unreachable(error) from None
                failures += 1
                # A POST may have been carried out although its answer was lost.
                resend = (
                    method != "POST"
                    or resend_post
                    or (isinstance(error, ConnectionError) and _never_connected(error))
                )
                if failures >= self.policy.max_attempts or not resend:
                    raise self._gave_up(error, method, path, attempts, started) from None
                wait = self.policy.backoff(failures)
                logger.info(
                    f"{method} {path}: {self._short(error)}; attempt {failures + 1} of "
                    f"{self.policy.max_attempts} in {wait:.1f} s"
                )
                time.sleep(wait)

    def _attempt(
        self,
        request: PreparedRequest,
        budgets: Sequence[Budget],
        scopes: Sequence[str],
        decode: Decoder,
        daily_capped: bool = False,
    ) -> Document:
        """One attempt: an error status raises its typed error, a success is read and decoded."""
        response = self.send(request, stream=True, budgets=budgets)
        try:
            if daily_capped and response.status_code == 429:
                wait = retry_after_seconds(response)
                if wait is not None and wait > settings.STEADY_WINDOW_SECONDS:
                    throttled = error_for_response(response, scopes)
                    raise KlaviyoDailyQuotaSpent(
                        response, {"code": throttled.code, "detail": throttled.detail}, scopes
                    )
            if response.status_code >= 400:
                raise error_for_response(response, scopes)
            return read_document(response, decode)
        finally:
            response.close()

    @staticmethod
    def _short(error: BaseException) -> str:
        if isinstance(error, KlaviyoServerError):
            return f"{error.status} {error.code or error.reason}"
        if isinstance(error, InvalidResponseBody):
            return str(error)
        return _network_reason(error)

    def _unreachable(self, error: BaseException) -> KlaviyoUnreachable:
        return KlaviyoUnreachable(
            f"Cannot connect to Klaviyo at {without_password(self.base_url)}: "
            f"{_network_reason(error)}. Check "
            f"[sources.klaviyo] base_url (Klaviyo's is {settings.DEFAULT_BASE_URL}), the "
            "network and any proxy settings."
        )

    def _gave_up(
        self, error: BaseException, method: str, path: str, attempts: int, started: float
    ) -> BaseException:
        seconds = time.monotonic() - started
        tried = f"({attempts} attempts over {seconds:.1f} s)"
        if isinstance(error, KlaviyoServerError):
            return error.after_retries(attempts, seconds)
        if isinstance(error, InvalidResponseBody):
            return InvalidResponseBody(
                f"{error} {tried}. Klaviyo kept sending bodies that are not JSON; run again "
                "later, and check [sources.klaviyo] base_url if it is not Klaviyo's.",
                response=error.response,
            )
        if isinstance(error, Timeout) and not isinstance(error, ConnectTimeout):
            return KlaviyoTimeout(
                f"Klaviyo did not answer {method} {path} within {self.policy.timeout} s "
                f"{tried}. Run again later, or raise [runtime] request_timeout."
            )
        return KlaviyoConnectionError(
            f"Klaviyo failed {method} {path}: {_network_reason(error)} {tried}. Run again later."
        )


class Transport:
    """How one client reaches Klaviyo from any thread.

    `requests` sessions must not be shared across threads, so each thread gets its own; all of
    them share one adapter, which holds the budgets and the connection pool (sized for the
    extract workers, which would otherwise discard connections).
    """

    def __init__(
        self,
        base_url: str,
        revision: str,
        api_key: str,
        policy: RetryPolicy,
        limiter: Optional[RateLimiter],
    ) -> None:
        self.base_url = base_url
        self.policy = policy
        self._headers = {"revision": revision, "Accept": settings.MEDIA_TYPE}
        self._auth = APIKeyAuth(
            name="Authorization", api_key=f"Klaviyo-API-Key {api_key}", location="header"
        )
        self._adapter = RateLimitedAdapter(
            limiter,
            backoff_factor=policy.backoff_factor,
            max_delay=policy.max_delay,
            pool_maxsize=50,
        )
        self._local = threading.local()

    def session(self) -> RetryingSession:
        """This thread's session."""
        session: Optional[RetryingSession] = getattr(self._local, "session", None)
        if session is None:
            session = RetryingSession(
                self.policy, self._adapter, self.base_url, self._headers, self._auth
            )
            self._local.session = session
        return session
