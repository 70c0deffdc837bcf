"""Klaviyo's SegmentsApi operations plus `get_tags` and `get_profiles`: one method per endpoint.

Each method takes its operation's documented parameters and names its endpoint (`endpoints`):
the budgets its requests spend, first page and next ones alike, and the scopes a key needs for
it. Collections are walked by following `links.next` exactly as Klaviyo gives it, as long as it
stays on base_url's origin (`origins`); pages of segment members are decoded by `member_pages`,
every other body as JSON (`documents`). Requests go through `transport`: retries, the origin
rule, pacing, one-line errors.
"""

import logging
import re
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence
from urllib.parse import urlsplit

from dlt.common.configuration import resolve_configuration
from dlt.common.configuration.specs import RuntimeConfiguration

from . import endpoints, settings
from .documents import Decoder, Document, decode_json
from .endpoints import Endpoint
from .errors import KlaviyoConfigError
from .member_pages import Member, decode_member_page
from .origins import check_base_url, next_link, origin_of, without_user_info
from .quota import RateLimiter
from .transport import RetryPolicy, Transport

logger = logging.getLogger(__name__)

_REVISION_PATTERN = re.compile(r"^\d{4}-\d{2}-\d{2}(\.pre)?$")


def _joined(values: Optional[Sequence[str]]) -> Optional[str]:
    return ",".join(values) if values else None


def _query(params: Mapping[str, Any]) -> Dict[str, Any]:
    """Drop unset parameters so only what the caller asked for reaches Klaviyo."""
    return {name: value for name, value in params.items() if value is not None}


def validate_connection_settings(
    base_url: str, revision: str, allow_insecure_http: bool = False
) -> None:
    """Reject a base URL or revision Klaviyo could never answer, before any request."""
    check_base_url(base_url, allow_insecure_http)
    if not _REVISION_PATTERN.match(revision):
        raise KlaviyoConfigError(
            f"revision {revision!r} is not of the form YYYY-MM-DD. Set [sources.klaviyo] "
            f"revision to a Klaviyo API revision such as {settings.DEFAULT_REVISION!r}."
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
        runtime = runtime or resolve_configuration(RuntimeConfiguration())
        self.retry_policy = RetryPolicy.from_runtime(runtime)
        self._home = origin_of(self.base_url)
        self._transport = Transport(
            self.base_url, revision, api_key.strip(), self.retry_policy, rate_limiter
        )

    # -- plumbing ---------------------------------------------------------------------------

    def _pages(
        self,
        endpoint: Endpoint,
        path: str,
        params: Mapping[str, Any],
        additional_fields: Optional[Sequence[str]] = None,
        decode: Decoder = decode_json,
    ) -> Iterator[Document]:
        """Yield every page document of a collection, following `links.next` (see `origins`).

        Every page spends the budgets of the first: a next link repeats the first query.
        """
        budgets = endpoint.budgets(additional_fields)
        session = self._transport.session()
        url: Optional[str] = f"{self.base_url}/api/{path}"
        query: Optional[Dict[str, Any]] = _query(params)
        while url is not None:
            page = session.fetch("GET", url, budgets, endpoint.scopes, query, decode=decode)
            yield page
            url, query = next_link(page, url, self._home), None

    def _request(
        self,
        method: str,
        endpoint: Endpoint,
        path: str,
        params: Optional[Mapping[str, Any]] = None,
        body: Optional[Document] = None,
        additional_fields: Optional[Sequence[str]] = None,
        *,
        resend_post: bool = False,
        daily_capped: bool = False,
    ) -> Document:
        session = self._transport.session()
        return session.fetch(
            method,
            f"{self.base_url}/api/{path}",
            endpoint.budgets(additional_fields),
            endpoint.scopes,
            _query(params or {}),
            body,
            resend_post=resend_post,
            daily_capped=daily_capped,
        )

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
        return self._pages(
            endpoints.GET_SEGMENTS,
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
            endpoints.GET_SEGMENT,
            f"segments/{segment_id}",
            {
                "fields[segment]": _joined(fields_segment),
                "fields[tag]": _joined(fields_tag),
                "fields[flow]": _joined(fields_flow),
                "include": _joined(include),
                "additional-fields[segment]": _joined(additional_fields_segment),
            },
            additional_fields=additional_fields_segment,
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
        pages = self._pages(
            endpoints.GET_SEGMENT_PROFILES,
            f"segments/{segment_id}/profiles",
            {
                "filter": filter,
                "sort": sort,
                "fields[profile]": _joined(fields_profile),
                "additional-fields[profile]": _joined(additional_fields_profile),
                "page[size]": page_size,
            },
            additional_fields_profile,
            decode_member_page,
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
        return self._pages(
            endpoints.GET_SEGMENT_PROFILE_IDS,
            f"segments/{segment_id}/relationships/profiles",
            {"filter": filter, "sort": sort, "page[size]": page_size},
        )

    def get_segment_tags(
        self, segment_id: str, *, fields_tag: Optional[Sequence[str]] = None
    ) -> Document:
        """GET /api/segments/{id}/tags (not paged: at most 100 tags a segment)."""
        return self._request(
            "GET",
            endpoints.GET_SEGMENT_TAGS,
            f"segments/{segment_id}/tags",
            {"fields[tag]": _joined(fields_tag)},
        )

    def get_segment_relationships_tags(self, segment_id: str) -> Document:
        """GET /api/segments/{id}/relationships/tags: tag ids only."""
        return self._request(
            "GET", endpoints.GET_SEGMENT_TAG_IDS, f"segments/{segment_id}/relationships/tags"
        )

    def create_segment(
        self, name: str, definition: Document, *, is_starred: Optional[bool] = None
    ) -> Document:
        """POST /api/segments."""
        attributes = _query({"name": name, "definition": definition, "is_starred": is_starred})
        body = {"data": {"type": "segment", "attributes": attributes}}
        return self._request("POST", endpoints.CREATE_SEGMENT, "segments", body=body)

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
        return self._request("PATCH", endpoints.UPDATE_SEGMENT, f"segments/{segment_id}", body=body)

    def delete_segment(self, segment_id: str) -> None:
        """DELETE /api/segments/{id}."""
        self._request("DELETE", endpoints.DELETE_SEGMENT, f"segments/{segment_id}")

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
        return self._pages(
            endpoints.GET_TAGS,
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
        return self._pages(
            endpoints.GET_PROFILES,
            "profiles",
            {
                "filter": filter,
                "sort": sort,
                "fields[profile]": _joined(fields_profile),
                "additional-fields[profile]": _joined(additional_fields_profile),
                "page[size]": page_size,
            },
            additional_fields_profile,
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
        return self._request(
            "POST",
            endpoints.QUERY_SEGMENT_SERIES,
            "segment-series-reports",
            body=body,
            resend_post=True,
            daily_capped=True,
        )


def resources_of(document: Document) -> List[Document]:
    """The `data` of a JSON:API document as a list, whether it holds one resource or many."""
    data = document.get("data")
    if data is None:
        return []
    return data if isinstance(data, list) else [data]
