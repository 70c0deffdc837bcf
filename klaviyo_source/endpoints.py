"""Klaviyo's endpoints as this source calls them: the scopes each needs and the quotas it spends.

Klaviyo keeps one quota per endpoint, at the endpoint's published tier; a few options
(`profile_count`, `predictive_analytics`) are also charged to a stricter quota that every
endpoint shares (klaviyo-api.md §4, §10). Each client method names its endpoint here, so what a
request spends and what a key needs for it are known where the request is made, for the first
page and every next one alike.
"""

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from . import settings

# Klaviyo's POST/PATCH segment limit (klaviyo-api.md §4): the XS tier plus 100 a day.
WRITE_TIER = "WRITE"
WRITES_PER_DAY = 100
_DAY_SECONDS = 86400.0


@dataclass(frozen=True)
class Budget:
    """A named quota and the published tier it starts from, e.g. ("get_segment_profiles", "L")."""

    name: str
    tier: str


# Klaviyo's segment reports: 1/s, 2/m and a daily cap.
REPORT_TIER = "REPORT"


def tier_windows(tier: str, revision: str = settings.DEFAULT_REVISION) -> List[Tuple[int, float]]:
    """(requests, seconds) windows of a published tier, burst first, then steady (then daily)."""
    if tier == WRITE_TIER:
        per_second, per_minute = settings.RATE_TIERS["XS"]
        return [(per_second, 1.0), (per_minute, 60.0), (WRITES_PER_DAY, _DAY_SECONDS)]
    if tier == REPORT_TIER:
        per_second, per_minute = settings.RATE_TIERS[REPORT_TIER]
        return [(per_second, 1.0), (per_minute, 60.0), (settings.REPORTS_PER_DAY, _DAY_SECONDS)]
    per_second, per_minute = settings.RATE_TIERS[tier]
    if tier == "L" and revision[:10] < settings.L_TIER_STEADY_RAISED_IN:
        per_minute = settings.L_TIER_STEADY_BEFORE
    return [(per_second, 1.0), (per_minute, 60.0)]


# Options with a quota of their own, shared by every endpoint, on top of the endpoint's.
PROFILE_COUNT = Budget("profile_count", "XS")
PREDICTIVE_ANALYTICS = Budget("predictive_analytics", "M")
_COSTLY_FIELDS: Dict[str, Budget] = {
    "profile_count": PROFILE_COUNT,
    "predictive_analytics": PREDICTIVE_ANALYTICS,
}


@dataclass(frozen=True)
class Endpoint:
    """One operation: the quota it spends and the scopes a private key needs for it."""

    budget: Budget
    scopes: Tuple[str, ...] = field(default=())

    def budgets(self, additional_fields: Optional[Sequence[str]] = None) -> Tuple[Budget, ...]:
        """What one request spends: the endpoint's own budget first, the one Klaviyo's
        `RateLimit-*` headers describe, then the quota of each costly additional field."""
        fields = additional_fields or ()
        return (self.budget, *(_COSTLY_FIELDS[name] for name in fields if name in _COSTLY_FIELDS))


def _endpoint(operation: str, tier: str, *scopes: str) -> Endpoint:
    return Endpoint(Budget(operation, tier), scopes)


GET_SEGMENTS = _endpoint("get_segments", "L", "segments:read")
GET_SEGMENT = _endpoint("get_segment", "L", "segments:read")
GET_SEGMENT_PROFILES = _endpoint("get_segment_profiles", "L", "segments:read", "profiles:read")
GET_SEGMENT_PROFILE_IDS = _endpoint(
    "get_segment_relationships_profiles", "L", "segments:read", "profiles:read"
)
GET_SEGMENT_TAGS = _endpoint("get_segment_tags", "S", "segments:read", "tags:read")
GET_SEGMENT_TAG_IDS = _endpoint("get_segment_relationships_tags", "S", "segments:read", "tags:read")
GET_TAGS = _endpoint("get_tags", "S", "tags:read")
GET_PROFILES = _endpoint("get_profiles", "L", "profiles:read")
CREATE_SEGMENT = _endpoint("create_segment", WRITE_TIER, "segments:write")
UPDATE_SEGMENT = _endpoint("update_segment", WRITE_TIER, "segments:write")
DELETE_SEGMENT = _endpoint("delete_segment", "S", "segments:write")
QUERY_SEGMENT_SERIES = _endpoint("query_segment_series", REPORT_TIER, "segments:read")
