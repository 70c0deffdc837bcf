"""HTTP client for Klaviyo's segment and tag endpoints, built on dlt's `RESTClient`.

One method per API operation, each taking that operation's documented parameters. Collections
are walked by following `links.next` exactly as Klaviyo gives it, as long as it stays on the
base URL's origin (scheme, host and port); pages of segment members are decoded by
`member_pages`, every other body by dlt's JSON. The key travels only through an auth object, so
no log line at any level shows it, and only to the base URL's origin: the session refuses any
request bound elsewhere (a rewritten next link, a redirect). Plain http is accepted only to
this machine unless `allow_insecure_http` says otherwise, and a password in the base URL's user
info is never shown.

Every request goes through a retrying session whose bounds come from dlt's `[runtime]`
settings (`request_max_attempts`, `request_backoff_factor`, `request_max_retry_delay`,
`request_timeout`):

- 5xx, dropped connections, timeouts and 200s whose body is not complete JSON are retried with
  exponential backoff and jitter, at most `request_max_attempts` attempts, each wait at most
  `request_max_retry_delay`;
- a 429 waits as long as Klaviyo says (`Retry-After`, up to a minute: resuming earlier only
  earns another 429), else a shared exponential backoff, for every thread at once (see
  `rate_limits`). It is not a failure, but one request stops waiting once its 429 pauses add
  up to more than `(request_max_attempts - 1) * request_max_retry_delay`, the longest dlt's
  own retry would wait;
- a base_url that never answered (refused, unknown host, no connect) fails at once: retrying
  a typo for minutes helps no one; so does whole JSON without what the revision documents
  (`UnexpectedDocument`): asked again, Klaviyo would send the same;
- a POST that may have reached Klaviyo is not sent again, so a create never happens twice.

A request that gives up raises one of the typed errors of `errors`, naming the request, what
went wrong, how often it was tried and what to do.
"""

import ipaddress
import logging
import os
import random
import re
import threading
import time
from dataclasses import dataclass
from typing import (
    Any,
    Callable,
    Dict,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    Union,
)
from urllib.parse import urljoin, urlsplit, urlunsplit

import msgspec
import urllib3.exceptions
from dlt.common import json
from dlt.common.configuration import resolve_configuration
from dlt.common.configuration.specs import RuntimeConfiguration
from dlt.common.jsonpath import compile_path
from dlt.common.time import to_seconds
from dlt.sources.helpers.requests.session import Session
from dlt.sources.helpers.rest_client import RESTClient
from dlt.sources.helpers.rest_client.auth import APIKeyAuth
from dlt.sources.helpers.rest_client.paginators import JSONLinkPaginator
from requests import ConnectionError, ConnectTimeout, PreparedRequest, Response, Timeout
from requests.exceptions import ChunkedEncodingError
from requests.utils import get_environ_proxies

from . import settings
from .errors import (
    InvalidResponseBody,
    KlaviyoConfigError,
    KlaviyoConnectionError,
    KlaviyoDailyQuotaSpent,
    KlaviyoForeignOrigin,
    KlaviyoRateLimited,
    KlaviyoServerError,
    KlaviyoTimeout,
    KlaviyoUnreachable,
    UnexpectedDocument,
    error_for_response,
    request_of,
    without_password,
)
from .member_pages import Member, decode_member_page
from .rate_limits import RateLimitedAdapter, RateLimiter, budgets_for, retry_after_seconds

Document = Dict[str, Any]
# Scheme, host and port: where a request goes, and so who may see the key.
Origin = Tuple[str, str, int]
Timeouts = Union[float, Tuple[float, float]]
ResponseHook = Callable[..., None]

logger = logging.getLogger(__name__)

_REVISION_PATTERN = re.compile(r"^\d{4}-\d{2}-\d{2}(\.pre)?$")
# Compiled once: `RESTClient` compiles a selector given as text again for every page, and
# jsonpath's parser cost more per page than parsing the page's JSON.
_PAGE_DATA = compile_path("data")
_DEFAULT_PORTS = {"http": 80, "https": 443}
_INVALID_PORT = -1
# Failures worth asking again for: the next attempt may well work.
_TRANSIENT = (
    KlaviyoServerError,
    InvalidResponseBody,
    ConnectionError,
    Timeout,
    ChunkedEncodingError,
)


def _joined(values: Optional[Sequence[str]]) -> Optional[str]:
    return ",".join(values) if values else None


def _query(params: Mapping[str, Any]) -> Dict[str, Any]:
    """Drop unset parameters so only what the caller asked for reaches Klaviyo."""
    return {name: value for name, value in params.items() if value is not None}


def _check_response(response: Response, *args: Any, **kwargs: Any) -> None:
    """The response hook of every request but member pages: `_check_and_decode` with JSON."""
    _check_and_decode(response, json.loadb)


def _check_member_page(response: Response, *args: Any, **kwargs: Any) -> None:
    """The response hook of member pages: `_check_and_decode` with `member_pages`."""
    _check_and_decode(response, decode_member_page)


def _check_and_decode(response: Response, decode: Callable[[bytes], Any]) -> None:
    """Raise the typed error for an error status; decode a success body once and keep it.

    The body is decoded here, inside the retried send, so that a cut or garbled body is asked
    for again like a dropped connection. The decoded document replaces `response.json` because
    the paginator and `RESTClient` each call it again; parsing a 100-profile page three times
    would cost more than the rest of the client.
    """
    if response.status_code >= 400:
        raise error_for_response(response)
    body = _whole_body(response)
    if not body:
        return
    try:
        document = decode(body)
    except msgspec.ValidationError as shape_error:
        revision = response.request.headers.get("revision", "") if response.request else ""
        raise UnexpectedDocument(
            f"Klaviyo answered {_request_line(response)} with JSON this source cannot read "
            f"({shape_error}). Check [sources.klaviyo] revision (sent: {revision!s}; the "
            f"source is built for {settings.DEFAULT_REVISION}) and base_url.",
            response=response,
        ) from None
    except (ValueError, msgspec.DecodeError) as parse_error:
        content_type = response.headers.get("Content-Type", "").split(";")[0].strip()
        # A proxy or a wrong base_url answers with a page; a dropped body is cut JSON.
        what = (
            f"{content_type} instead of JSON"
            if content_type and "json" not in content_type
            else "an incomplete JSON body"
        )
        raise InvalidResponseBody(
            f"Klaviyo sent {what} ({len(response.content)} bytes) for {_request_line(response)}",
            response=response,
        ) from parse_error
    response.json = lambda **_: document  # type: ignore[method-assign]


def _request_line(response: Response) -> str:
    return " ".join(request_of(response))


def _whole_body(response: Response) -> bytes:
    """The body, read in one call rather than in `requests`' 10 KB steps.

    A 150 KB page took 16 steps through five layers, each giving up and taking back the GIL:
    with several walks at once that cost 6 % of an export's CPU. `iter_content` keeps
    `requests`' translation of urllib3's errors (a cut body is a `ChunkedEncodingError`);
    `_content` is where `requests` keeps what it read, for `.content` and `.json()`.
    """
    if response._content is False:
        response._content = b"".join(response.iter_content(chunk_size=None))
    return response.content


def origin_of(url: str) -> Origin:
    """Where a URL leads, normalised: scheme and host in lower case, default ports filled in."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port or _DEFAULT_PORTS.get(scheme, _INVALID_PORT)
    except ValueError:
        port = _INVALID_PORT  # matches no origin, so nothing is ever sent there
    return scheme, (parts.hostname or "").lower(), port


def shown_origin(origin: Origin) -> str:
    """An origin as a user reads it; no user info, path or query, which may hold secrets."""
    scheme, host, port = origin
    bracketed = f"[{host}]" if ":" in host else host
    return f"{scheme}://{bracketed}" + (f":{port}" if port != _INVALID_PORT else "")


def without_user_info(url: str) -> str:
    """The URL without `user:password@`.

    The key takes the Authorization header, so `requests` never sent a base URL's user info
    anyway; dropped, it cannot show in dlt's own request log lines either.
    """
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def is_loopback(host: Optional[str]) -> bool:
    """Whether a host is this machine: `localhost`, 127.0.0.0/8 or ::1."""
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name other than localhost may resolve anywhere


def validate_connection_settings(
    base_url: str, revision: str, allow_insecure_http: bool = False
) -> None:
    """Reject a base URL or revision Klaviyo could never answer, before any request.

    Plain http would carry the key readable to every network in between, so it is refused
    unless the host is this machine (the simulator, a local proxy) or the user opted in.
    """
    parts = urlsplit(base_url)
    if (
        parts.scheme not in ("http", "https")
        or not parts.hostname
        or origin_of(base_url)[2] == _INVALID_PORT
    ):
        raise KlaviyoConfigError(
            f"base_url {without_password(base_url)!r} is not an http(s) URL. Set "
            f"[sources.klaviyo] base_url to {settings.DEFAULT_BASE_URL!r} (or your proxy's URL)."
        )
    if parts.scheme == "http" and not allow_insecure_http and not is_loopback(parts.hostname):
        raise KlaviyoConfigError(
            f"base_url {shown_origin(origin_of(base_url))} is plain http to another machine, "
            "which would send the API key unencrypted. Use https, or, on a network you trust, "
            "set [sources.klaviyo] allow_insecure_http = true "
            "(SOURCES__KLAVIYO__ALLOW_INSECURE_HTTP=true)."
        )
    if not _REVISION_PATTERN.match(revision):
        raise KlaviyoConfigError(
            f"revision {revision!r} is not of the form YYYY-MM-DD. Set [sources.klaviyo] "
            f"revision to a Klaviyo API revision such as {settings.DEFAULT_REVISION!r}."
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


class HomeLinks(JSONLinkPaginator):
    """`links.next`, followed only while it leads to base_url's origin.

    Klaviyo's links are absolute URLs on its own host; one anywhere else was rewritten on the
    way (a proxy, a tampered response), and following it would hand the key to that host.
    """

    def __init__(self, home: Origin) -> None:
        super().__init__(next_url_path="links.next")
        self.home = home

    def update_state(self, response: Response, data: Optional[List[Any]] = None) -> None:
        super().update_state(response, data)
        link = self._next_reference
        if not link:
            return
        foreign = origin_of(urljoin(response.url, link))
        if foreign != self.home:
            raise KlaviyoForeignOrigin(
                f"links.next of {_request_line(response)} leads to {shown_origin(foreign)}, "
                f"not to base_url's {shown_origin(self.home)}: it was not followed and the API "
                "key was not sent there. A proxy or a tampered response rewrote it; check "
                "[sources.klaviyo] base_url and any proxy between this source and Klaviyo."
            )


class RetryingSession(Session):
    """dlt's `Session` (default timeout, User-Agent) with Klaviyo's retry rules.

    One per thread; they share the rate-limited adapter, which paces and pauses every attempt.
    It sends nothing to any origin but base_url's.
    """

    def __init__(self, policy: RetryPolicy, adapter: RateLimitedAdapter, base_url: str) -> None:
        super().__init__(timeout=policy.timeout, raise_for_status=False)
        self.policy = policy
        self.adapter = adapter
        self.base_url = base_url
        self.home = origin_of(base_url)
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
        method = request.method or "GET"
        self._refuse_other_origins(method, request.url or "")
        path = urlsplit(request.url or "").path
        started = time.monotonic()
        attempts = failures = 0
        throttled_wait = 0.0
        while True:
            attempts += 1
            try:
                return super().send(request, **kwargs)  # type: ignore[no-untyped-call]
            except KlaviyoRateLimited as error:
                # No sleep here: the adapter holds the next attempt, like every other
                # thread's, until the budget's pause ends.
                wait = self.adapter.limiter.paused_for(budgets_for(method, request.url or ""))
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
                resend = method != "POST" or (
                    isinstance(error, ConnectionError) and _never_connected(error)
                )
                if failures >= self.policy.max_attempts or not resend:
                    raise self._gave_up(error, method, path, attempts, started) from None
                wait = self.policy.backoff(failures)
                logger.info(
                    f"{method} {path}: {self._short(error)}; attempt {failures + 1} of "
                    f"{self.policy.max_attempts} in {wait:.1f} s"
                )
                time.sleep(wait)

    def _refuse_other_origins(self, method: str, url: str) -> None:
        """Stop any request bound for another origin before it leaves, whatever its path here.

        `HomeLinks` refuses a foreign next link with a clearer message; this is the last check
        before the network, for redirects (they come through `send` too) and any future caller.
        """
        target = origin_of(url)
        if target != self.home:
            raise KlaviyoForeignOrigin(
                f"Refused to send {method} to {shown_origin(target)}: requests and the API key go "
                f"only to base_url's {shown_origin(self.home)}. A response (a redirect) pointed "
                "elsewhere; check [sources.klaviyo] base_url and any proxy between this source "
                "and Klaviyo."
            )

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


class KlaviyoClient:
    """Klaviyo's SegmentsApi operations plus `get_tags` and `get_profiles`, thread-safe."""

    def __init__(
        self,
        api_key: str,
        base_url: str = settings.DEFAULT_BASE_URL,
        revision: str = settings.DEFAULT_REVISION,
        rate_limiter: Optional[RateLimiter] = None,
        runtime: Optional[RuntimeConfiguration] = None,
        allow_insecure_http: bool = False,
    ) -> None:
        validate_connection_settings(base_url, revision, allow_insecure_http)
        if not api_key or not api_key.strip():
            raise KlaviyoConfigError(
                "The Klaviyo API key is empty. Set SOURCES__KLAVIYO__API_KEY or [sources.klaviyo] "
                "api_key in .dlt/secrets.toml."
            )
        if urlsplit(base_url).username is not None:
            logger.warning(
                "base_url's user info is not sent: Klaviyo's API key is the only credential"
            )
        self.base_url = without_user_info(base_url).rstrip("/")
        self.revision = revision
        self.rate_limiter = rate_limiter
        self._auth = APIKeyAuth(
            name="Authorization", api_key=f"Klaviyo-API-Key {api_key.strip()}", location="header"
        )
        self._runtime = runtime or resolve_configuration(RuntimeConfiguration())
        self.retry_policy = RetryPolicy.from_runtime(self._runtime)
        # One adapter for all threads: it holds the shared budgets and the connection pool
        # (sized for the extract workers, which would otherwise discard connections).
        self._adapter = RateLimitedAdapter(
            rate_limiter,
            backoff_factor=self.retry_policy.backoff_factor,
            max_delay=self.retry_policy.max_delay,
            pool_maxsize=50,
        )
        self._local = threading.local()

    # -- plumbing ---------------------------------------------------------------------------

    def _rest(self) -> RESTClient:
        """This thread's REST client: `requests` sessions must not be shared across threads."""
        rest: Optional[RESTClient] = getattr(self._local, "rest", None)
        if rest is None:
            session = RetryingSession(self.retry_policy, self._adapter, self.base_url)
            rest = RESTClient(
                base_url=f"{self.base_url}/api",
                headers={"revision": self.revision, "Accept": settings.MEDIA_TYPE},
                auth=self._auth,
                paginator=HomeLinks(origin_of(self.base_url)),
                data_selector=_PAGE_DATA,
                session=session,
                config=self._runtime,
            )
            self._local.rest = rest
        return rest

    def _paginate(
        self, path: str, params: Mapping[str, Any], check: ResponseHook = _check_response
    ) -> Iterator[Document]:
        """Yield every page document of a collection, following `links.next` (see `HomeLinks`)."""
        pages = self._rest().paginate(path, params=_query(params), hooks={"response": [check]})
        for page in pages:
            yield page.response.json()

    def _request(
        self,
        method: str,
        path: str,
        params: Optional[Mapping[str, Any]] = None,
        body: Optional[Document] = None,
    ) -> Document:
        headers = {"Content-Type": settings.MEDIA_TYPE} if body is not None else None
        response = self._rest().request(
            path,
            method=method,  # type: ignore[arg-type]
            params=_query(params or {}),
            json=body,
            headers=headers,
            hooks={"response": [_check_response]},
        )
        return response.json() if response.content else {}

    # -- segments ---------------------------------------------------------------------------

    def get_segments(
        self,
        *,
        filter: Optional[str] = None,
        sort: Optional[str] = None,
        fields_segment: Optional[Sequence[str]] = None,
        fields_tag: Optional[Sequence[str]] = None,
        fields_flow: Optional[Sequence[str]] = None,
        include: Optional[Sequence[str]] = None,
        page_size: Optional[int] = None,
    ) -> Iterator[Document]:
        """GET /api/segments: pages of segments (10 a page), with `included` tags if asked."""
        return self._paginate(
            "segments",
            {
                "filter": filter,
                "sort": sort,
                "fields[segment]": _joined(fields_segment),
                "fields[tag]": _joined(fields_tag),
                "fields[flow]": _joined(fields_flow),
                "include": _joined(include),
                "page[size]": page_size,
            },
        )

    def get_segment(
        self,
        segment_id: str,
        *,
        fields_segment: Optional[Sequence[str]] = None,
        fields_tag: Optional[Sequence[str]] = None,
        fields_flow: Optional[Sequence[str]] = None,
        include: Optional[Sequence[str]] = None,
        additional_fields_segment: Optional[Sequence[str]] = None,
    ) -> Document:
        """GET /api/segments/{id}; `additional_fields_segment=["profile_count"]` costs 1/s."""
        return self._request(
            "GET",
            f"segments/{segment_id}",
            {
                "fields[segment]": _joined(fields_segment),
                "fields[tag]": _joined(fields_tag),
                "fields[flow]": _joined(fields_flow),
                "include": _joined(include),
                "additional-fields[segment]": _joined(additional_fields_segment),
            },
        )

    def get_segment_profiles(
        self,
        segment_id: str,
        *,
        filter: Optional[str] = None,
        sort: Optional[str] = None,
        fields_profile: Optional[Sequence[str]] = None,
        additional_fields_profile: Optional[Sequence[str]] = None,
        page_size: Optional[int] = settings.SEGMENT_PROFILES_PAGE_SIZE,
    ) -> Iterator[List[Member]]:
        """GET /api/segments/{id}/profiles: the members of each page, with `joined_group_at`.

        Members keep their profile attributes undecoded until asked (see `member_pages`).
        """
        pages = self._paginate(
            f"segments/{segment_id}/profiles",
            {
                "filter": filter,
                "sort": sort,
                "fields[profile]": _joined(fields_profile),
                "additional-fields[profile]": _joined(additional_fields_profile),
                "page[size]": page_size,
            },
            _check_member_page,
        )
        return (page["data"] for page in pages)

    def get_segment_relationships_profiles(
        self,
        segment_id: str,
        *,
        filter: Optional[str] = None,
        sort: Optional[str] = None,
        page_size: Optional[int] = settings.SEGMENT_PROFILES_PAGE_SIZE,
    ) -> Iterator[Document]:
        """GET /api/segments/{id}/relationships/profiles: member ids only."""
        return self._paginate(
            f"segments/{segment_id}/relationships/profiles",
            {"filter": filter, "sort": sort, "page[size]": page_size},
        )

    def get_segment_tags(
        self, segment_id: str, *, fields_tag: Optional[Sequence[str]] = None
    ) -> Document:
        """GET /api/segments/{id}/tags (not paged: at most 100 tags a segment)."""
        return self._request(
            "GET", f"segments/{segment_id}/tags", {"fields[tag]": _joined(fields_tag)}
        )

    def get_segment_relationships_tags(self, segment_id: str) -> Document:
        """GET /api/segments/{id}/relationships/tags: tag ids only."""
        return self._request("GET", f"segments/{segment_id}/relationships/tags")

    def create_segment(
        self, name: str, definition: Document, *, is_starred: Optional[bool] = None
    ) -> Document:
        """POST /api/segments."""
        attributes = _query({"name": name, "definition": definition, "is_starred": is_starred})
        return self._request(
            "POST", "segments", body={"data": {"type": "segment", "attributes": attributes}}
        )

    def update_segment(
        self,
        segment_id: str,
        *,
        name: Optional[str] = None,
        definition: Optional[Document] = None,
        is_starred: Optional[bool] = None,
    ) -> Document:
        """PATCH /api/segments/{id} with only the attributes given."""
        attributes = _query({"name": name, "definition": definition, "is_starred": is_starred})
        body = {"data": {"type": "segment", "id": segment_id, "attributes": attributes}}
        return self._request("PATCH", f"segments/{segment_id}", body=body)

    def delete_segment(self, segment_id: str) -> None:
        """DELETE /api/segments/{id}."""
        self._request("DELETE", f"segments/{segment_id}")

    # -- tags -------------------------------------------------------------------------------

    def get_tags(
        self,
        *,
        filter: Optional[str] = None,
        sort: Optional[str] = None,
        fields_tag: Optional[Sequence[str]] = None,
        fields_tag_group: Optional[Sequence[str]] = None,
        include: Optional[Sequence[str]] = None,
        page_size: Optional[int] = None,
    ) -> Iterator[Document]:
        """GET /api/tags: pages of the account's tags (50 a page)."""
        return self._paginate(
            "tags",
            {
                "filter": filter,
                "sort": sort,
                "fields[tag]": _joined(fields_tag),
                "fields[tag-group]": _joined(fields_tag_group),
                "include": _joined(include),
                "page[size]": page_size,
            },
        )

    # -- profiles ---------------------------------------------------------------------------

    def get_profiles(
        self,
        *,
        filter: Optional[str] = None,
        sort: Optional[str] = None,
        fields_profile: Optional[Sequence[str]] = None,
        additional_fields_profile: Optional[Sequence[str]] = None,
        page_size: Optional[int] = settings.PROFILES_PAGE_SIZE,
    ) -> Iterator[Document]:
        """GET /api/profiles: pages of the account's profiles.

        `filter` takes `greater-than`/`less-than` on `updated` and `created` (not the `-or-equal`
        forms) and `any`/`equals` on `id`, `email`, `phone_number`, `external_id`;
        `additional_fields_profile=["predictive_analytics"]` also costs the 10/s, 150/m budget.
        """
        return self._paginate(
            "profiles",
            {
                "filter": filter,
                "sort": sort,
                "fields[profile]": _joined(fields_profile),
                "additional-fields[profile]": _joined(additional_fields_profile),
                "page[size]": page_size,
            },
        )

    # -- reports ----------------------------------------------------------------------------

    def query_segment_series(
        self,
        statistics: Sequence[str],
        timeframe: Mapping[str, str],
        interval: str,
        *,
        filter: Optional[str] = None,
    ) -> Document:
        """POST /api/segment-series-reports: `statistics` per `interval` over `timeframe`
        (`{"start", "end"}` or `{"key"}`) of the segments `filter` names; 1/s, 2/m, 225 a day.

        A report changes nothing, so unlike other POSTs an attempt that failed is sent again
        (5xx, a dropped connection, a timeout). A 429 asking to wait longer than the steady
        window means the day's quota is spent: `KlaviyoDailyQuotaSpent`, at once.
        """
        attributes = {"statistics": list(statistics), "timeframe": dict(timeframe)}
        attributes.update(_query({"interval": interval, "filter": filter}))
        body = {"data": {"type": "segment-series-report", "attributes": attributes}}

        def check(response: Response, *args: Any, **kwargs: Any) -> None:
            wait = retry_after_seconds(response) if response.status_code == 429 else None
            if wait is not None and wait > settings.STEADY_WINDOW_SECONDS:
                throttled = error_for_response(response)
                raise KlaviyoDailyQuotaSpent(
                    response, {"code": throttled.code, "detail": throttled.detail}
                )
            _check_response(response)

        started = time.monotonic()
        failures = 0
        while True:
            try:
                response = self._rest().request(
                    "segment-series-reports",
                    method="POST",
                    json=body,
                    headers={"Content-Type": settings.MEDIA_TYPE},
                    hooks={"response": [check]},
                )
                return response.json()  # type: ignore[no-any-return]
            except (KlaviyoServerError, KlaviyoTimeout, InvalidResponseBody) as error:
                failed: BaseException = error
            except KlaviyoConnectionError as error:
                if isinstance(error, KlaviyoUnreachable):
                    raise
                failed = error
            failures += 1
            if failures >= self.retry_policy.max_attempts:
                if isinstance(failed, KlaviyoServerError):
                    raise failed.after_retries(failures, time.monotonic() - started)
                raise failed
            wait = self.retry_policy.backoff(failures)
            logger.info(f"POST /api/segment-series-reports: {failed}; again in {wait:.1f} s")
            time.sleep(wait)


def resources_of(document: Document) -> List[Document]:
    """The `data` of a JSON:API document as a list, whether it holds one resource or many."""
    data = document.get("data")
    if data is None:
        return []
    return data if isinstance(data, list) else [data]
