"""Typed errors: what Klaviyo or the user's configuration can get wrong, each with its fix.

Every error raised to a user names the cause and the fix in one line. None of them carries
the API key: messages are built from the response status, Klaviyo's error body and the
request path only, never from request headers.
"""

from typing import Any, Dict, Optional, Type
from urllib.parse import urlsplit

from requests import HTTPError, Response
from requests.exceptions import RequestException


class KlaviyoError(Exception):
    """Base of every error this package raises on purpose."""


class KlaviyoConfigError(KlaviyoError, ValueError):
    """The source was configured with a value it cannot use."""


class InvalidResponseBody(RequestException):
    """A successful status arrived with a body that is not complete JSON (cut or garbled).

    It derives from `RequestException` so that the retrying HTTP session treats it like a
    dropped connection and asks again.
    """


class KlaviyoAPIError(KlaviyoError, HTTPError):
    """Klaviyo answered with an error status; carries its status, error code and detail."""

    hint = "See Klaviyo's error detail above."

    def __init__(self, response: Response, errors: Optional[Dict[str, Any]] = None) -> None:
        first = errors or {}
        self.status: int = response.status_code
        self.code: str = str(first.get("code") or "")
        self.detail: str = str(first.get("detail") or first.get("title") or response.reason or "")
        source = first.get("source") or {}
        self.parameter: Optional[str] = source.get("parameter") if isinstance(source, dict) else None
        self.path: str = urlsplit(response.url or "").path
        method = response.request.method if response.request is not None else "GET"
        message = (
            f"Klaviyo answered {self.status} {self.code or response.reason} to {method} "
            f"{self.path}: {self.detail}. {self.hint}"
        )
        super().__init__(message, response=response)


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


class KlaviyoNotFound(KlaviyoAPIError):
    hint = "Check the segment ids in [sources.klaviyo] segment_ids, and the base_url and revision."


class KlaviyoRateLimited(KlaviyoAPIError):
    hint = (
        "The account's rate limit stayed exhausted for all retries: run again later or lower "
        "[sources.klaviyo] rate_limit_share."
    )


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


def error_for_response(response: Response) -> KlaviyoAPIError:
    """Build the typed error for an error response from Klaviyo's `errors[0]`, if any."""
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
    return error_class(response, first)
