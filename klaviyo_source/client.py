"""HTTP client for Klaviyo's segment and tag endpoints, built on dlt's `RESTClient`.

One method per API operation, each taking that operation's documented parameters. Collections
are walked by following `links.next` exactly as Klaviyo gives it. Every request goes through
dlt's retrying session (429, 5xx, dropped connections, timeouts) plus one more retry reason:
a 200 whose body is not complete JSON. The key travels only through an auth object, so no
log line at any level shows it.
"""

import re
import threading
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence
from urllib.parse import urlsplit

from dlt.common import json
from dlt.common.configuration import resolve_configuration
from dlt.common.configuration.specs import RuntimeConfiguration
from dlt.sources.helpers.requests.retry import DEFAULT_RETRY_EXCEPTIONS, Client
from dlt.sources.helpers.rest_client import RESTClient
from dlt.sources.helpers.rest_client.auth import APIKeyAuth
from dlt.sources.helpers.rest_client.paginators import JSONLinkPaginator
from requests import Response

from . import settings
from .errors import InvalidResponseBody, KlaviyoConfigError, error_for_response
from .rate_limits import RateLimitedAdapter, RateLimiter

Document = Dict[str, Any]

_REVISION_PATTERN = re.compile(r"^\d{4}-\d{2}-\d{2}(\.pre)?$")


def _joined(values: Optional[Sequence[str]]) -> Optional[str]:
    return ",".join(values) if values else None


def _query(params: Mapping[str, Any]) -> Dict[str, Any]:
    """Drop unset parameters so only what the caller asked for reaches Klaviyo."""
    return {name: value for name, value in params.items() if value is not None}


def _check_response(response: Response, *args: Any, **kwargs: Any) -> None:
    """Raise the typed error for an error status; parse a success body once and keep it.

    The body is parsed here, inside the retried send, so that a cut or garbled body is asked
    for again like a dropped connection. The parsed document replaces `response.json` because
    the paginator and `RESTClient` each call it again; parsing a 100-profile page three times
    would cost more than the rest of the client.
    """
    if response.status_code >= 400:
        raise error_for_response(response)
    if not response.content:
        return
    try:
        document = json.loadb(response.content)
    except ValueError as parse_error:
        raise InvalidResponseBody(
            f"Klaviyo sent an incomplete JSON body ({len(response.content)} bytes) for "
            f"{urlsplit(response.url).path}",
            response=response,
        ) from parse_error
    response.json = lambda **_: document  # type: ignore[method-assign]


def validate_connection_settings(base_url: str, revision: str) -> None:
    """Reject a base URL or revision Klaviyo could never answer, before any request."""
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise KlaviyoConfigError(
            f"base_url {base_url!r} is not an http(s) URL. Set [sources.klaviyo] base_url to "
            f"{settings.DEFAULT_BASE_URL!r} (or your proxy's URL)."
        )
    if not _REVISION_PATTERN.match(revision):
        raise KlaviyoConfigError(
            f"revision {revision!r} is not of the form YYYY-MM-DD. Set [sources.klaviyo] "
            f"revision to a Klaviyo API revision such as {settings.DEFAULT_REVISION!r}."
        )


class KlaviyoClient:
    """Klaviyo's SegmentsApi operations plus `get_tags`, safe to share between threads."""

    def __init__(
        self,
        api_key: str,
        base_url: str = settings.DEFAULT_BASE_URL,
        revision: str = settings.DEFAULT_REVISION,
        rate_limiter: Optional[RateLimiter] = None,
        runtime: Optional[RuntimeConfiguration] = None,
    ) -> None:
        validate_connection_settings(base_url, revision)
        if not api_key or not api_key.strip():
            raise KlaviyoConfigError(
                "The Klaviyo API key is empty. Set SOURCES__KLAVIYO__API_KEY or [sources.klaviyo] "
                "api_key in .dlt/secrets.toml."
            )
        self.base_url = base_url.rstrip("/")
        self.revision = revision
        self.rate_limiter = rate_limiter
        self._auth = APIKeyAuth(
            name="Authorization", api_key=f"Klaviyo-API-Key {api_key.strip()}", location="header"
        )
        self._runtime = runtime or resolve_configuration(RuntimeConfiguration())
        self._http = Client(
            request_timeout=self._runtime.request_timeout,
            raise_for_status=False,
            exceptions=(*DEFAULT_RETRY_EXCEPTIONS, InvalidResponseBody),
            request_max_attempts=self._runtime.request_max_attempts,
            request_backoff_factor=self._runtime.request_backoff_factor,
            request_max_retry_delay=self._runtime.request_max_retry_delay,
        )
        self._adapter = RateLimitedAdapter(rate_limiter)
        self._local = threading.local()

    # -- plumbing ---------------------------------------------------------------------------

    def _rest(self) -> RESTClient:
        """This thread's REST client: `requests` sessions must not be shared across threads."""
        rest: Optional[RESTClient] = getattr(self._local, "rest", None)
        if rest is None:
            session = self._http.session
            session.mount("http://", self._adapter)
            session.mount("https://", self._adapter)
            rest = RESTClient(
                base_url=f"{self.base_url}/api",
                headers={"revision": self.revision, "Accept": settings.MEDIA_TYPE},
                auth=self._auth,
                paginator=JSONLinkPaginator(next_url_path="links.next"),
                data_selector="data",
                session=session,
                config=self._runtime,
            )
            self._local.rest = rest
        return rest

    def _paginate(self, path: str, params: Mapping[str, Any]) -> Iterator[Document]:
        """Yield every page document of a collection, following `links.next` verbatim."""
        pages = self._rest().paginate(
            path, params=_query(params), hooks={"response": [_check_response]}
        )
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
    ) -> Iterator[Document]:
        """GET /api/segments/{id}/profiles: members with `joined_group_at` in attributes."""
        return self._paginate(
            f"segments/{segment_id}/profiles",
            {
                "filter": filter,
                "sort": sort,
                "fields[profile]": _joined(fields_profile),
                "additional-fields[profile]": _joined(additional_fields_profile),
                "page[size]": page_size,
            },
        )

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


def resources_of(document: Document) -> List[Document]:
    """The `data` of a JSON:API document as a list, whether it holds one resource or many."""
    data = document.get("data")
    if data is None:
        return []
    return data if isinstance(data, list) else [data]
