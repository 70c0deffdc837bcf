"""Typed errors: what Klaviyo or the user's configuration can get wrong, each with its fix.

Every error raised to a user names the cause and the fix in one line. None of them carries
the API key: messages are built from the response status, Klaviyo's error body and the
request path only, never from request headers.

Errors of the network and of Klaviyo's responses also derive from the matching `requests`
exception (`ConnectionError`, `Timeout`, `HTTPError`), so code that handles a failing
request the `requests` way (the source's per-segment isolation does) handles them too.
"""

from typing import Any, Dict, Optional, Sequence, Tuple, Type
from urllib.parse import urlsplit, urlunsplit

from requests import ConnectionError, HTTPError, Response, Timeout
from requests.exceptions import RequestException


class KlaviyoError(Exception):
    """Base of every error this package raises on purpose."""


class KlaviyoConfigError(KlaviyoError, ValueError):
    """The source was configured with a value it cannot use."""


class InvalidResponseBody(KlaviyoError, RequestException):
    """A successful status arrived with a body that is not complete JSON (cut or garbled).

    It derives from `RequestException` so that it is retried like a dropped connection.
    """


class UnexpectedDocument(KlaviyoError, RequestException):
    """A successful status arrived with whole JSON that lacks what the revision documents.

    Asking again would get the same answer, so it is not retried.
    """


class KlaviyoConnectionError(KlaviyoError, ConnectionError):
    """Klaviyo kept dropping or refusing connections after every retry."""


class KlaviyoUnreachable(KlaviyoConnectionError):
    """The base_url never answered at all: a wrong host or port, DNS or a proxy. Not retried."""


class KlaviyoTimeout(KlaviyoError, Timeout):
    """Klaviyo did not answer within `request_timeout`, every time it was asked."""


class KlaviyoForeignOrigin(KlaviyoError, RequestException):
    """A response pointed the source at another origin than base_url's; nothing was sent there.

    It derives from `RequestException` so that the segment whose walk it stops fails alone,
    and it is not retried: asked again, the same proxy would point the same way.
    """


class ScratchFileError(KlaviyoError, OSError):
    """The run's temporary file of listed profiles (`profile_numbers`) could not be used."""

    def __init__(self, reason: str) -> None:
        super().__init__(
            f"This run's temporary file of listed profiles failed ({reason}). SQLite keeps it "
            "in SQLITE_TMPDIR, else TMPDIR, else /var/tmp or /tmp: point one of them at a "
            "writable folder with room for about 30 bytes a profile listed."
        )


def without_password(url: str) -> str:
    """The URL as it may be shown: a password in its user info replaced by `***`."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


def request_of(response: Response) -> Tuple[str, str]:
    """The method and path of the request a response answered, for messages."""
    method = (response.request.method if response.request is not None else None) or "GET"
    return method, urlsplit(response.url or "").path


class KlaviyoAPIError(KlaviyoError, HTTPError):
    """Klaviyo answered with an error status; carries its status, error code and detail."""

    hint = "See Klaviyo's error detail above."

    def __init__(
        self,
        response: Response,
        errors: Optional[Dict[str, Any]] = None,
        scopes: Sequence[str] = (),
    ) -> None:
        first = errors or {}
        self.status: int = response.status_code
        self.code: str = str(first.get("code") or "")
        self.detail: str = str(first.get("detail") or first.get("title") or response.reason or "")
        source = first.get("source")
        self.parameter: Optional[str] = (
            source.get("parameter") if isinstance(source, dict) else None
        )
        self.method, self.path = request_of(response)
        self.reason: str = str(response.reason or "")
        self.scopes: Tuple[str, ...] = tuple(scopes)  # what a key needs for the endpoint
        self.retries = ""  # what the retrying session tried before giving up, if anything
        super().__init__(self.message, response=response)

    @property
    def message(self) -> str:
        detail = self.detail.strip().rstrip(".")
        said = f": {detail}." if detail else "."
        return (
            f"Klaviyo answered {self.status} {self.code or self.reason} to "
            f"{self.method} {self.path}{said}{self.retries} {self.describe_fix()}"
        )

    def describe_fix(self) -> str:
        return self.hint

    def after_retries(self, attempts: int, seconds: float) -> "KlaviyoAPIError":
        """This error, noting the attempts made before giving up on it."""
        self.retries = f" ({attempts} attempts over {seconds:.1f} s)"
        self.args = (self.message,)
        return self

    def __str__(self) -> str:
        return self.message


class KlaviyoBadRequest(KlaviyoAPIError):
    hint = "Fix the option or filter it names in .dlt/config.toml or the pipeline arguments."


class KlaviyoAuthenticationError(KlaviyoAPIError):
    hint = (
        "Set a valid private key in SOURCES__KLAVIYO__API_KEY or [sources.klaviyo] api_key "
        "in .dlt/secrets.toml."
    )


class KlaviyoPermissionError(KlaviyoAPIError):
    hint = (
        "Give the private key the scope it names (Klaviyo > Settings > API keys), or use a key "
        "that has segments:read, profiles:read and tags:read."
    )

    def describe_fix(self) -> str:
        # Klaviyo's 403 body is undocumented (a CDN may answer with HTML): name the scopes
        # of the endpoint, so the line says what to add whatever the body held.
        if not self.scopes:
            return self.hint
        return (
            f"This request needs {' and '.join(self.scopes)}: give the private key the missing "
            "scope (Klaviyo > Settings > API keys), or use a key with segments:read, "
            "profiles:read and tags:read."
        )


class KlaviyoNotFound(KlaviyoAPIError):
    hint = "Check the segment ids in [sources.klaviyo] segment_ids, and the base_url and revision."


class KlaviyoRateLimited(KlaviyoAPIError):
    hint = (
        "The account's rate limit stayed exhausted for all retries: run again later or lower "
        "[sources.klaviyo] rate_limit_share."
    )


class KlaviyoDailyQuotaSpent(KlaviyoAPIError):
    """A 429 whose wait outlasts the steady window: the endpoint's daily quota is spent.

    Not a `KlaviyoRateLimited`, which is waited out and retried: this one ends the day's
    requests to that endpoint at once.
    """

    hint = "The endpoint's daily quota is spent; a run after it resets goes on from here."


class KlaviyoServerError(KlaviyoAPIError):
    hint = "Klaviyo kept failing after all retries; run again later."


_BY_STATUS: Dict[int, Type[KlaviyoAPIError]] = {
    400: KlaviyoBadRequest,
    401: KlaviyoAuthenticationError,
    403: KlaviyoPermissionError,
    404: KlaviyoNotFound,
    410: KlaviyoNotFound,
    429: KlaviyoRateLimited,
}


def error_for_response(response: Response, scopes: Sequence[str] = ()) -> KlaviyoAPIError:
    """Build the typed error for an error response from Klaviyo's `errors[0]`, if any.

    `scopes` are what a key needs for the endpoint asked, named when Klaviyo answers 403.
    """
    first: Dict[str, Any] = {}
    try:
        body = response.json()
        errors = body.get("errors") if isinstance(body, dict) else None
        if isinstance(errors, list) and errors and isinstance(errors[0], dict):
            first = errors[0]
    except ValueError:
        pass  # CDN pages and proxies answer with HTML; the status alone must do
    status = response.status_code
    error_class = _BY_STATUS.get(status, KlaviyoServerError if status >= 500 else KlaviyoAPIError)
    return error_class(response, first, scopes)


# What a server answers for an endpoint it does not serve: a revision before the endpoint, or a
# proxy or stand-in without it.
_NOT_SERVED_STATUSES = frozenset({404, 405, 501})


def endpoint_not_served(error: Optional[BaseException]) -> bool:
    """Whether an error says the endpoint does not exist there, rather than that it failed."""
    return isinstance(error, KlaviyoAPIError) and error.status in _NOT_SERVED_STATUSES
