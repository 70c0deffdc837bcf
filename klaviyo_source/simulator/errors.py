"""Klaviyo-style JSON:API error objects and the exception that carries them to the HTTP layer.

Bodies follow the observed shape ``{"errors": [{"id", "status" (int), "code", "title", "detail",
"source": {...}, "meta": {}}]}``; titles are Django REST Framework defaults where Klaviyo's own
text is unknown (see docs/klaviyo-api.md §9).
"""

from __future__ import annotations

import json
import uuid
from typing import Any

TITLE_INVALID = "Invalid input."
TITLE_NOT_FOUND = "Not found."
TITLE_NOT_AUTHENTICATED = "Authentication credentials were not provided."
TITLE_AUTHENTICATION_FAILED = "Incorrect authentication credentials."
TITLE_PERMISSION_DENIED = "You do not have permission to perform this action."
TITLE_THROTTLED = "Request was throttled."

NOT_AUTHENTICATED_DETAIL = "Missing or invalid authorization scheme. Please use Klaviyo-API-Key."


def error_object(
    status: int,
    code: str,
    title: str,
    detail: str,
    *,
    parameter: str | None = None,
    pointer: str | None = None,
    meta: bool = True,
) -> dict[str, Any]:
    """Build one error object; ``source`` holds ``parameter`` or ``pointer`` when given."""
    err: dict[str, Any] = {
        "id": str(uuid.uuid4()),
        "status": status,
        "code": code,
        "title": title,
        "detail": detail,
    }
    if parameter is not None:
        err["source"] = {"parameter": parameter}
    elif pointer is not None:
        err["source"] = {"pointer": pointer}
    if meta:
        err["meta"] = {}
    return err


def error_body(*errors: dict[str, Any]) -> bytes:
    """Serialise error objects into a response body."""
    return json.dumps({"errors": list(errors)}, separators=(",", ":")).encode()


class ApiError(Exception):
    """An error response: raised anywhere below the HTTP layer and rendered by it."""

    def __init__(
        self,
        status: int,
        code: str,
        title: str,
        detail: str,
        *,
        parameter: str | None = None,
        pointer: str | None = None,
        meta: bool = True,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.title = title
        self.detail = detail
        self.parameter = parameter
        self.pointer = pointer
        self.meta = meta
        self.headers = dict(headers or {})

    def body(self) -> bytes:
        """The JSON body for this error."""
        return error_body(
            error_object(
                self.status,
                self.code,
                self.title,
                self.detail,
                parameter=self.parameter,
                pointer=self.pointer,
                meta=self.meta,
            )
        )


def invalid(detail: str, *, parameter: str | None = None, pointer: str | None = None) -> ApiError:
    """400 ``invalid`` / "Invalid input."."""
    return ApiError(400, "invalid", TITLE_INVALID, detail, parameter=parameter, pointer=pointer)


def invalid_filter(detail: str = "Invalid filter provided.") -> ApiError:
    """400 for a filter that cannot be parsed or is not allowed."""
    return invalid(detail, parameter="filter")


def invalid_cursor() -> ApiError:
    """400 for a garbled or stale ``page[cursor]``."""
    return invalid("Invalid cursor provided.", pointer="/data/")


def not_found(detail: str = "Not found.") -> ApiError:
    """404 ``not_found`` (DRF default title)."""
    return ApiError(404, "not_found", TITLE_NOT_FOUND, detail, pointer="/data/")


def not_authenticated() -> ApiError:
    """401 for a missing header or wrong scheme; body as observed (no ``meta``)."""
    return ApiError(
        401,
        "not_authenticated",
        TITLE_NOT_AUTHENTICATED,
        NOT_AUTHENTICATED_DETAIL,
        pointer="/data/",
        meta=False,
    )


def authentication_failed() -> ApiError:
    """401 for a well-formed header carrying a key the account does not know."""
    return ApiError(
        401,
        "authentication_failed",
        TITLE_AUTHENTICATION_FAILED,
        TITLE_AUTHENTICATION_FAILED,
        pointer="/data/",
        meta=False,
    )


def permission_denied(missing: list[str]) -> ApiError:
    """403 naming the scopes the key lacks."""
    detail = "Your API key is missing required scopes: " + ", ".join(missing) + "."
    return ApiError(403, "permission_denied", TITLE_PERMISSION_DENIED, detail, pointer="/data/")


def throttled(retry_after: int | None) -> ApiError:
    """429 ``throttled``; ``Retry-After`` header only when ``retry_after`` is given."""
    if retry_after is None:
        detail = TITLE_THROTTLED
        headers: dict[str, str] = {}
    else:
        detail = f"Request was throttled. Expected available in {retry_after} seconds."
        headers = {"Retry-After": str(retry_after)}
    return ApiError(
        429, "throttled", TITLE_THROTTLED, detail, pointer="/data/", meta=False, headers=headers
    )


def method_not_allowed(method: str, allow: list[str]) -> ApiError:
    """405 with an ``Allow`` header (DRF default texts)."""
    text = f'Method "{method}" not allowed.'
    return ApiError(
        405, "method_not_allowed", text, text, meta=False, headers={"Allow": ", ".join(allow)}
    )


def unsupported_media_type(content_type: str) -> ApiError:
    """415 for a request body that is not JSON."""
    text = f'Unsupported media type "{content_type}" in request.'
    return ApiError(415, "unsupported_media_type", text, text, meta=False)


def not_acceptable() -> ApiError:
    """406 when ``Accept`` excludes every JSON media type."""
    text = "Could not satisfy the request Accept header."
    return ApiError(406, "not_acceptable", text, text, meta=False)
